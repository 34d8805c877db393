"""Installs `dynfocus_infer` (the runtime) and `dynfocus_kernels` (the top-level `kernels/` folder).

The csrc extension is built by CMake + ninja. Its core is torch-free, so no torch headers or ABI are
involved: pybind11 is the only build dependency besides a C++ compiler (and nvcc, when present).
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: Path):
        super().__init__(name, sources=[])
        self.source_dir = str(source_dir)


class CMakeBuild(build_ext):
    """Configures and builds one CMake project per extension, output placed where setuptools expects it."""

    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        config = os.environ.get("DYNFOCUS_BUILD_TYPE", "Release")
        args = [
            "cmake", ext.source_dir, "-G", "Ninja",
            f"-DCMAKE_BUILD_TYPE={config}",
            f"-DDYNFOCUS_EXT_OUTPUT_DIR={out_dir}",
            f"-DDYNFOCUS_EXT_NAME={ext.name.rsplit('.', 1)[-1]}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        ]
        if os.environ.get("DYNFOCUS_NO_CUDA"):
            args.append("-DDYNFOCUS_WITH_CUDA=OFF")
        subprocess.run(args, cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "--parallel"], cwd=build_dir, check=True)


def _extensions():
    # Nothing to build until csrc/ holds sources: the package then installs as pure Python.
    if not any((ROOT / "csrc").glob("*.cpp")):
        return []
    return [CMakeExtension("dynfocus_infer._csrc", ROOT)]


TEST_DEPS = [
    "pytest>=7",
    "transformers>=4.45",
    "safetensors",
    "gguf>=0.10",
    "accelerate",
    "av",
    "openai",       # the server tests drive it with the official client
    "fastapi",
    "uvicorn",
]

setup(
    name="dynfocus-infer",
    version="0.1.0",
    description="Inference engine for DynFocus (CVPR 2025), a video LLM with dynamic token budgets",
    python_requires=">=3.10",
    packages=find_packages(include=["dynfocus_infer", "dynfocus_infer.*"]) + ["dynfocus_kernels"],
    package_dir={"dynfocus_kernels": "kernels"},
    # dynfocus-smol's trained visual path (issue 17): weights and their card, loaded by presets.py.
    package_data={"dynfocus_infer": ["trained/dynfocus-smol.safetensors", "trained/dynfocus-smol.json"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
        "tqdm",
    ],
    extras_require={
        "test": TEST_DEPS,
        "bench": ["matplotlib", "httpx2"],
        "serve": ["fastapi", "uvicorn"],       # dynfocus-infer serve
        "video": ["av", "decord; platform_machine == 'x86_64'"],
        # GPU only: paged attention read in place (attention.paged_attention); CUDA without it warns once and
        # runs the SDPA fallback. Not installed or run in the CPU test environment.
        "flash": ["flash-attn==2.8.3.post2"],
        # Corpus inference (dynfocus_infer/corpus): Ray Data, pinned because its API still moves between releases.
        "distributed": ["ray[data]==2.60.0"],
    },
    entry_points={"console_scripts": ["dynfocus-infer=dynfocus_infer.cli:main"]},
    zip_safe=False,
)
