"""CUDA sources never rot: on a machine with nvcc but no GPU, compile every .cu for sm_80 and
sm_90 (compile only). On a GPU machine the real build (setup.py) compiles and tests them."""

import inspect
import os
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]
CU_SOURCES = sorted((ROOT / "csrc").rglob("*.cu"))
NVCC = shutil.which("nvcc")

pytestmark = [
    pytest.mark.skipif(NVCC is None, reason="nvcc is not installed"),
    pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the real CUDA build covers the sources"),
]


def _nvcc_command(source: Path, out: Path, shim: Path) -> list[str]:
    std = "c++20" if "-std=c++20" in inspect.getsource(cpp_extension) else "c++17"
    includes = [ROOT / "csrc", *cpp_extension.include_paths(), shim, sysconfig.get_paths()["include"]]
    return [
        NVCC, "-c", str(source), "-o", str(out), f"-std={std}", "-O3", "-lineinfo",
        *cpp_extension.COMMON_NVCC_FLAGS,
        "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
        "-Xcompiler", "-fPIC", "-DPARALLAX_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_C",
        *[f"-I{p}" for p in includes],
    ]


def test_every_cu_file_compiles_for_sm80_and_sm90(tmp_path):
    assert CU_SOURCES, "no .cu sources found under csrc/"
    # A CPU build of torch ships the c10/cuda headers but not the one CMake generates; its
    # whole content in a CUDA build is this macro.
    shim = tmp_path / "shim"
    (shim / "c10/cuda/impl").mkdir(parents=True)
    (shim / "c10/cuda/impl/cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")

    def compile_one(source: Path) -> tuple[Path, subprocess.CompletedProcess]:
        cmd = _nvcc_command(source, tmp_path / (source.stem + ".o"), shim)
        return source, subprocess.run(cmd, capture_output=True, text=True)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = list(pool.map(compile_one, CU_SOURCES))
    failures = [f"{src.relative_to(ROOT)}:\n{proc.stderr[-4000:]}" for src, proc in results if proc.returncode != 0]
    assert not failures, "nvcc failed:\n" + "\n".join(failures)
    for src, _ in results:
        assert (tmp_path / (src.stem + ".o")).stat().st_size > 0, f"no object for {src}"
