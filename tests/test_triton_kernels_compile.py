"""Triton kernels never rot in their compiled form: on a machine without a GPU, compile a
representative set of parallax's Triton kernels ahead of time for sm_90 (H100/H200) and check
that their shared memory fits the card and stays under the launcher's estimate (which prunes
autotuning candidates). The CPU tests run the same kernels through Triton's interpreter, which
checks the arithmetic but not the compiler's lowering; on a GPU the real tests compile them.

The compiling runs in a subprocess with TRITON_INTERPRET=0: triton's own library functions are
decorated once, at import, as interpreted or compilable, and the CPU suite imports triton under
the interpreter. Run this file as a script (``python tests/test_triton_kernels_compile.py``) to
see the compile results as JSON.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[1] / "parallax" / "kernels"
SM90_SMEM = 232448  # bytes of shared memory one H100/H200 thread block may opt into (227 KiB)
FLASH_POINTERS = ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")
# pointers whose element type is fixed (others take the job's dtype)
TYPED_POINTERS = {"bt_ptr": "i32", "ctx_ptr": "i32", "cu_q_ptr": "i32", "part_acc_ptr": "fp32", "part_m_ptr": "fp32",
                  "part_l_ptr": "fp32", "slot_ptr": "i64", "targets_ptr": "i64", "loss_ptr": "fp32",
                  "scale_ptr": "fp32"}
# paged_attention_varlen: name -> (dtype, max_seqlen_q, GQA group, head dim, block size, sliding window),
# compiled with the launcher's configuration (launch_config)
VARLEN_CASES = {"bf16-d128-gqa4-prefill-window": ("bf16", 512, 4, 128, 16, True),
                "fp16-d64-mha-prefill": ("fp16", 512, 1, 64, 16, False),
                "bf16-d256-gqa2-bs32": ("bf16", 64, 2, 256, 32, False),
                "fp32-d64-gqa8-decode": ("fp32", 1, 8, 64, 8, True),
                "fp32-d256-mha-prefill": ("fp32", 300, 1, 256, 16, False)}

# name -> (module, kernel, dtype, constexprs, num_warps, num_stages[, types]); flash kernels use
# the launcher's default configuration for their head dim and dtype (see _jobs); ``types`` gives
# the signature of parameters the naming rules of _compile would get wrong (mixed dtypes)
FLASH_CASES = {"bf16-d128-causal": ("bf16", 128, True, False), "fp32-d72-varlen": ("fp32", 72, False, True)}


def _load(name: str):
    """parallax/kernels/<name>.py under a private module name (it imports only triton)."""
    spec = importlib.util.spec_from_file_location(f"_parallax_aot_{name}", KERNELS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _jobs() -> dict[str, tuple]:
    flash = _load("flash_attention")
    jobs = {}
    for case, (dtype, head_dim, causal, varlen) in FLASH_CASES.items():
        block_d = max(16, 1 << (head_dim - 1).bit_length())
        for kind in ("fwd", "dkdv", "dq"):
            cfg = flash.default_config(kind, block_d, 4 if dtype == "fp32" else 2)
            const = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, IS_CAUSAL=causal, VARLEN=varlen,
                         DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", **cfg.kwargs)
            kernel = {"fwd": "_attn_fwd", "dkdv": "_attn_bwd_dkdv", "dq": "_attn_bwd_dq"}[kind]
            jobs[f"flash-{kind}-{case}"] = ("flash_attention", kernel, dtype, const, cfg.num_warps, cfg.num_stages)
    jobs["flash-preprocess"] = ("flash_attention", "_attn_bwd_preprocess", "bf16",
                                dict(HEAD_DIM=40, BLOCK_D=64, VARLEN=False, BLOCK_M=64), 4, 2)
    for case, (dtype, d, group, split) in {"bf16-d128-gqa4-split": ("bf16", 128, 4, True),
                                           "fp32-d64-mha": ("fp32", 64, 1, False)}.items():
        const = dict(GROUP=group, GROUP_PAD=max(16, group), HEAD_DIM=d, BLOCK_SIZE=16, BLOCK_N=64, SPLIT=split,
                     UPCAST=False)
        jobs[f"paged-fwd-{case}"] = ("paged_attention", "_paged_attn_fwd", dtype, const, 4, 2)
    jobs["paged-reduce"] = ("paged_attention", "_paged_attn_reduce", "bf16", dict(HEAD_DIM=128, PARTS=16), 4, 2)
    varlen = _load("paged_attention_varlen")
    for case, (dtype, max_q, group, d, block_size, sliding) in VARLEN_CASES.items():
        cfg = varlen.launch_config(max_q, group, d, block_size, 4 if dtype == "fp32" else 2, interpreted=False)
        num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        const = dict(GROUP=group, HEAD_DIM=d, BLOCK_SIZE=block_size, SLIDING=sliding, **cfg)
        jobs[f"paged-varlen-{case}"] = ("paged_attention_varlen", "_paged_attn_varlen_fwd", dtype, const, num_warps,
                                        num_stages)
    jobs["reshape-and-cache"] = ("paged_attention", "_reshape_and_cache", "fp16",
                                 dict(NUM_KV_HEADS=3, HEADS_PAD=4, HEAD_DIM=64, DIM_PAD=64, BLOCK_SIZE=16), 4, 2)
    jobs.update(_fused_jobs())
    jobs.update(_lora_jobs())
    jobs.update(_sgmv_jobs())
    jobs.update(_quant_jobs())
    # the launcher's widest block (a 128k vocabulary) and a narrow one without the gradient pass
    jobs["cross-entropy-bf16-grad"] = ("cross_entropy", "_cross_entropy_fwd_bwd", "bf16",
                                       dict(COMPUTE_GRAD=True, BLOCK_V=8192), 16, 3)
    jobs["cross-entropy-fp32-loss"] = ("cross_entropy", "_cross_entropy_fwd_bwd", "fp32",
                                       dict(COMPUTE_GRAD=False, BLOCK_V=1024), 4, 3)
    return jobs


def _fused_jobs() -> dict[str, tuple]:
    """RMSNorm, rotary embedding and SwiGLU in the launchers' configurations for Llama-sized
    shapes: hidden 4096 and 8192, QK-norm over a head dim of 128, head dims 128 and 80."""
    fp32_stats = {"rstd_ptr": "*fp32", "dw_ptr": "*fp32", "eps": "fp32"}
    mixed = dict(fp32_stats, w_ptr="*fp32", y_ptr="*fp32")  # bf16 x, fp32 weight -> fp32 y
    tables = {"cos_ptr": "*fp32", "sin_ptr": "*fp32"}
    return {
        "rms-norm-fwd-bf16-c4096": ("rms_norm", "_rms_norm_fwd", "bf16", dict(BLOCK_R=1, BLOCK_C=4096), 4, 2,
                                    fp32_stats),
        "rms-norm-fwd-bf16-fp32w-qknorm": ("rms_norm", "_rms_norm_fwd", "bf16", dict(BLOCK_R=32, BLOCK_C=128), 4, 2,
                                           mixed),
        "rms-norm-bwd-bf16-c8192": ("rms_norm", "_rms_norm_bwd", "bf16",
                                    dict(BLOCK_R=1, BLOCK_C=8192, COMPUTE_DW=True), 8, 2, fp32_stats),
        "rms-norm-bwd-fp32-qknorm-no-dw": ("rms_norm", "_rms_norm_bwd", "fp32",
                                           dict(BLOCK_R=32, BLOCK_C=128, COMPUTE_DW=False), 4, 2, fp32_stats),
        "rotary-bf16-d128": ("rotary_embedding", "_rotary_embedding", "bf16",
                             dict(HALF=64, HALF_PAD=64, BLOCK_R=32, INVERSE=False), 4, 2, tables),
        "rotary-fp32-d80-inverse": ("rotary_embedding", "_rotary_embedding", "fp32",
                                    dict(HALF=40, HALF_PAD=64, BLOCK_R=32, INVERSE=True), 4, 2, tables),
        "swiglu-fwd-bf16": ("swiglu", "_swiglu_fwd", "bf16", dict(BLOCK=4096), 8, 2),
        "swiglu-bwd-bf16": ("swiglu", "_swiglu_bwd", "bf16", dict(BLOCK=4096), 8, 2),
        "swiglu-bwd-fp16-narrow": ("swiglu", "_swiglu_bwd", "fp16", dict(BLOCK=16), 4, 2),
    }


def _lora_jobs() -> dict[str, tuple]:
    """The LoRA matmul in the launcher's GPU configurations (``_launch_config``): 16-bit 128 x 128
    tiles, with 16-bit or fp32 adapters (PEFT's default for 16-bit models), and exact fp32."""
    def cfg(block, block_k, block_r, warps, low_rank_precision="tf32", dot_precision="tf32"):
        return (dict(BLOCK_M=block, BLOCK_N=block, BLOCK_K=block_k, BLOCK_R=block_r, GROUP_M=8, HAS_BIAS=True,
                     DOT_PRECISION=dot_precision, LOW_RANK_PRECISION=low_rank_precision), warps, 3)

    fp32_adapters = {"u_ptr": "*fp32", "c_ptr": "*fp32"}
    return {
        "lora-matmul-bf16-r16": ("lora_linear", "_lora_matmul", "bf16", *cfg(128, 64, 16, 8)),
        "lora-matmul-bf16-fp32-adapters-r64": ("lora_linear", "_lora_matmul", "bf16",
                                               *cfg(128, 64, 64, 8, low_rank_precision="ieee"), fp32_adapters),
        "lora-matmul-fp16-decode": ("lora_linear", "_lora_matmul", "fp16", *cfg(16, 64, 16, 4)),
        "lora-matmul-fp32": ("lora_linear", "_lora_matmul", "fp32", *cfg(64, 32, 64, 4, "ieee", "ieee")),
    }


def _sgmv_jobs() -> dict[str, tuple]:
    """The multi-LoRA shrink and expand kernels in the launcher's GPU configurations
    (``parallax.ops.sgmv._sgmv_triton``): 16-bit decode tiles (16 rows) and prefill tiles (64 rows,
    128 columns), with exact fp32 adapters."""
    tiles = {"order_ptr": "*i64", "tile_slot_ptr": "*i32", "tile_start_ptr": "*i32", "tile_end_ptr": "*i32",
             "u_ptr": "*fp32", "scaling_ptr": "*fp32"}

    def shrink(dtype, block_m, block_r):
        const = dict(DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", BLOCK_M=block_m,
                     BLOCK_K=32 if dtype == "fp32" else 64, BLOCK_R=block_r)
        return ("sgmv", "_sgmv_shrink", dtype, const, 4, 3, tiles)

    def expand(dtype, block_m, block_n, block_r):
        const = dict(DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", BLOCK_M=block_m, BLOCK_N=block_n,
                     BLOCK_R=block_r)
        return ("sgmv", "_sgmv_expand", dtype, const, 8 if block_m * block_n >= 64 * 128 else 4, 3, tiles)

    return {"sgmv-shrink-bf16-decode-r16": shrink("bf16", 16, 16),
            "sgmv-shrink-fp16-prefill-r64": shrink("fp16", 64, 64),
            "sgmv-shrink-fp32-r64": shrink("fp32", 64, 64),
            "sgmv-expand-bf16-decode-r16": expand("bf16", 16, 128, 16),
            "sgmv-expand-bf16-prefill-r64": expand("bf16", 64, 128, 64),
            "sgmv-expand-fp32-r64": expand("fp32", 64, 64, 64)}


def _quant_jobs() -> dict[str, tuple]:
    """The weight-only quantized matmul in the launcher's GPU configurations (``_launch_config``):
    decode (16-row tiles, split-K) and prefill (64 x 128 tiles), int8 and int4 in one-group and
    group-crossing tiles, 16-bit and exact fp32."""
    def cfg(bits, block_m, block_n, block_k, aligned, warps, stages, dot_precision="tf32"):
        return (dict(BITS=bits, GROUP_ALIGNED=aligned, HAS_BIAS=True, DOT_PRECISION=dot_precision, BLOCK_M=block_m,
                     BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8), warps, stages)

    int8 = {"q_ptr": "*i8", "scale_ptr": "*fp32", "zero_ptr": "*fp32"}
    int4 = {"q_ptr": "*u8", "scale_ptr": "*fp32", "zero_ptr": "*fp32"}
    return {
        "quant-int8-bf16-decode": ("quant_linear", "_quant_matmul", "bf16", *cfg(8, 16, 64, 128, False, 4, 4), int8),
        "quant-int8-bf16-prefill": ("quant_linear", "_quant_matmul", "bf16", *cfg(8, 64, 128, 128, False, 8, 3), int8),
        "quant-int4-g128-bf16-decode": ("quant_linear", "_quant_matmul", "bf16", *cfg(4, 16, 64, 128, True, 4, 4),
                                        int4),
        "quant-int4-g32-fp16-prefill": ("quant_linear", "_quant_matmul", "fp16", *cfg(4, 64, 128, 32, True, 8, 3),
                                        int4),
        "quant-int4-g20-bf16-crossing": ("quant_linear", "_quant_matmul", "bf16", *cfg(4, 16, 64, 64, False, 4, 4),
                                         int4),
        "quant-int4-fp32": ("quant_linear", "_quant_matmul", "fp32", *cfg(4, 64, 128, 64, True, 8, 3, "ieee"), int4),
        "quant-sum-splits-bf16": ("quant_linear", "_sum_splits", "bf16", dict(SPLITS=5, BLOCK=1024), 4, 2,
                                  {"partial_ptr": "*fp32"}),
    }


def _compile(job: tuple) -> dict:
    """Compile one job for sm_90: pointers are 16-byte aligned (as torch allocates), other
    runtime parameters i32, or fp32 for the scales. Returns shared memory bytes or the error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, kernel, dtype, const, num_warps, num_stages, *extra = job
    types = extra[0] if extra else {}
    fn = getattr(_load(module), kernel)
    names = [p.name for p in fn.params]
    signature, attrs = {}, {}
    for i, name in enumerate(names):
        if name in const:
            signature[name] = "constexpr"
        elif name in types:
            signature[name] = types[name]
        elif name in FLASH_POINTERS or name.endswith("_ptr") and name not in TYPED_POINTERS:
            signature[name] = "*" + dtype
        elif name in ("LSE", "DELTA") or name in ("CU_Q", "CU_K") and not const.get("VARLEN"):
            signature[name] = "*fp32"
        elif name in ("CU_Q", "CU_K"):
            signature[name] = "*i32"
        elif name in TYPED_POINTERS:
            signature[name] = "*" + TYPED_POINTERS[name]
        elif "scale" in name and not name.startswith("stride"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
        if signature[name].startswith("*"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    try:
        src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in const.items()},
                        attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": num_warps, "num_stages": num_stages})
    except Exception as exc:  # reported per job; the test fails with the message
        return {"error": f"{type(exc).__name__}: {str(exc)[-2000:]}"}
    return {"shared": compiled.metadata.shared}


def main() -> None:
    """Compile every job (in parallel processes) and print {name: result} as JSON."""
    try:
        import triton  # noqa: F401
        from triton.backends import backends
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:
        print(json.dumps({"skip": f"no triton ahead-of-time compile API here: {exc}"}))
        return
    if "nvidia" not in backends:
        print(json.dumps({"skip": "this triton has no NVIDIA backend"}))
        return
    jobs = _jobs()
    with ProcessPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        results = dict(zip(jobs, pool.map(_compile, jobs.values())))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
else:
    import pytest
    import torch

    pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                    reason="a GPU is present: the GPU tests compile the kernels for it")

    @pytest.fixture(scope="module")
    def results() -> dict:
        env = dict(os.environ, TRITON_INTERPRET="0")
        proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        if "skip" in out:
            pytest.skip(out["skip"])
        return out

    @pytest.mark.parametrize("name", sorted(_jobs() if importlib.util.find_spec("triton") else []))
    def test_kernel_compiles_for_sm90(results, name):
        result = results[name]
        assert "error" not in result, f"{name}: {result.get('error')}"
        assert result["shared"] <= SM90_SMEM, f"{name}: {result['shared']} bytes of shared memory do not fit sm_90"

    def test_smem_estimate_bounds_what_triton_allocates(results):
        """The launcher prunes autotuning candidates by ``_smem_bytes``: it must not undercount
        (checked on the 16-bit default configurations compiled here)."""
        flash = _load("flash_attention")
        dtype, head_dim, _, _ = FLASH_CASES["bf16-d128-causal"]
        for kind in ("fwd", "dkdv", "dq"):
            cfg = flash.default_config(kind, head_dim, 2)
            shared = results[f"flash-{kind}-bf16-d128-causal"].get("shared")
            assert shared is not None and shared <= flash._smem_bytes(kind, cfg, head_dim, 2), (kind, shared)
