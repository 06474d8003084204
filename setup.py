"""Build of parallax and its one compiled extension, ``parallax._C``.

C++ ops are always built (OpenMP, SIMD chosen at run time). CUDA ops are added when a CUDA
toolkit and a CUDA build of torch are both present; ``PARALLAX_SKIP_CUDA=1`` skips them.
The reference model in the top-level ``models/`` folder ships as ``parallax.models``, the
benchmark harness in ``bench/`` as ``parallax.bench``.
"""

import glob
import os
import platform
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit(
        "parallax compiles its extension against the installed torch, and none was found.\n"
        "Install torch first (CPU only: pip install torch --index-url "
        "https://download.pytorch.org/whl/cpu), then build without isolation:\n"
        "  pip install --no-build-isolation .      or      python -m build --wheel --no-isolation"
    )

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    if os.environ.get("PARALLAX_SKIP_CUDA", "0") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def _extension():
    cpp_sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    cu_sources = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    is_linux = platform.system() == "Linux"
    # fp-contract=off: every FMA in the kernels is written out, so results do not depend on the
    # compiler's choice (a contracted p * decay + update drifts an ulp per step from torch).
    # -g0: Python's default CFLAGS carry -g, which makes the wheel's extension 14 MB instead of ~2.
    cxx = ["-O3", "-g0", "-fno-math-errno", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas"]
    link = []
    if is_linux:
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    define_macros = []
    if _want_cuda():
        # sm_80 (A100) and sm_90 (H100/H200) SASS, plus PTX so newer cards JIT it.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        define_macros.append(("PARALLAX_WITH_CUDA", None))
        return CUDAExtension(
            "parallax._C",
            cpp_sources + cu_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=link,
        )
    return CppExtension(
        "parallax._C",
        cpp_sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
    )


packages = find_packages(include=["parallax", "parallax.*"])
packages += ["parallax.models"] + ["parallax.models." + p for p in find_packages("models")]
packages += ["parallax.bench"]  # the benchmark harness ships too: `parallax bench NAME`

setup(
    packages=packages,
    package_dir={"parallax": "parallax", "parallax.models": "models", "parallax.bench": "bench"},
    package_data={"parallax.models": ["*.toml"],
                  "parallax.eval.builtin": ["*.yaml", "*.jsonl", "corpus.sha256", "README.md"],
                  "parallax.eval.safety": ["data/*.jsonl", "data/*.md"],
                  # data the commands read at run time: finetune's default data, the shipped safety set
                  "parallax.finetune.demo": ["*.jsonl", "*.yaml", "README.md"],
                  "parallax.finetune.safety": ["*.jsonl", "README.md"],
                  "parallax.align.demo": ["README.md"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
