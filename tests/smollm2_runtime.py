"""Python source that makes the SmolLM2 package's own runtime (`llm`, `llama_cpp`) unimportable, as on a machine where
scripts/setup.sh installed the package with --no-deps, whatever this machine has installed. Run it first in a
subprocess (`python -c`, or as a sitecustomize.py)."""
import textwrap

REFUSE_SMOLLM2_RUNTIME = textwrap.dedent("""
    import importlib.abc, sys

    class _Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("llm", "llama_cpp"):
                raise ModuleNotFoundError(f"No module named {name!r}")
            return None

    sys.meta_path.insert(0, _Refuse())
""")
