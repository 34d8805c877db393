"""Corpus inference on Ray Data (DESIGN.md 12).

Ray and pyarrow come with the optional extra `dynfocus-infer[distributed]`; the names below load on first use, so
the CLI can list the `corpus` command (corpus/cli.py) on a machine without them."""
from importlib import import_module

_EXPORTS = {"CorpusError": ".errors", "CorpusJob": ".job", "CorpusSummary": ".summary", "run_corpus": ".pipeline"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name], __name__), name)
