"""Rank-side code of the precision and offload tests."""

from __future__ import annotations

import torch

import parallax as px
from tests.distributed import zero_workers as zw


def tiny_net_run(rank: int, world: int, stage: int, offload: str, precision: str, device: str = "cpu") -> dict:
    torch.manual_seed(0)
    model = zw.TinyNet().to(device)
    model, opt = px.initialize(model, px.RuntimeConfig(zero_stage=stage, bucket_mb=0.0005, offload=offload,
                                                       precision=precision),
                               param_groups=zw._groups(model), lr=1e-2, betas=(0.9, 0.95))
    zw._train_steps(model, opt, rank, world, 6, device=device)
    report = px.zero.memory_report(model, opt)
    shard_params = sum(r.param.numel() for r in opt.runs)
    largest = max(b.layout.shard_numel for b in model._parallax_zero.buffers)
    host = opt.inner.host_bytes() if offload == "cpu" else None
    return {"state": px.zero.full_state_dict(model), "report": report, "shard_params": shard_params,
            "largest_shard": largest, "host_bytes": host, "dtype": str(next(model.parameters()).dtype)}


CLIP_MAX_NORM = 0.05  # below every gradient norm of clipped_runs: each step is clipped


def clipped_runs(rank: int, world: int, stages: list[int], offloads: list[str], device: str = "cpu") -> dict:
    """bf16 TinyNet trained 4 steps with ``clip_grad_norm_``: {(stage, offload): {"state", "norms"}}.

    On CUDA the current stream is kept busy (``torch.cuda._sleep``) before clipping, so the clipped
    gradients are written late: a host copy not ordered after the current stream reads them unclipped."""
    out = {}
    for stage in stages:
        for offload in offloads:
            torch.manual_seed(0)
            model = zw.TinyNet().to(device)
            model, opt = px.initialize(model, px.RuntimeConfig(zero_stage=stage, bucket_mb=0.0005, offload=offload,
                                                               precision="bf16"),
                                       param_groups=zw._groups(model), lr=1e-2, betas=(0.9, 0.95))
            local = 8 // world
            norms = []
            for step in range(4):
                idx, tgt = (t[rank * local:(rank + 1) * local].to(device) for t in zw._batches(step, 0, 8, 5, 11))
                opt.backward(model(idx, tgt))
                if torch.device(device).type == "cuda":
                    torch.cuda._sleep(100_000_000)  # about 50 ms of GPU time ahead of the clipping kernels
                norms.append(opt.clip_grad_norm_(CLIP_MAX_NORM))  # read after the loop: no host sync here
                opt.step()
                opt.zero_grad()
            out[(stage, offload)] = {"state": px.zero.full_state_dict(model), "norms": [float(n) for n in norms]}
    return out


def assert_offload_equals_the_device_optimizer(runs: dict) -> None:
    """``clipped_runs`` results: every step was clipped, and per stage offload="cpu" ends with the
    same parameters, bit for bit, as the optimizer on the device."""
    for stage in sorted({stage for stage, _ in runs}):
        device, host = runs[(stage, "none")], runs[(stage, "cpu")]
        assert all(n > CLIP_MAX_NORM for n in device["norms"]), (stage, device["norms"])
        assert device["norms"] == host["norms"], (stage, device["norms"], host["norms"])
        for name, value in device["state"].items():
            assert torch.equal(value.cpu(), host["state"][name].cpu()), (stage, name)


def gpt_run(rank: int, world: int, precision: str, stage: int, steps: int, device: str = "cpu",
            global_batch: int = 16) -> dict:
    """The tiny GPT on the built-in corpus, px.initialize's defaults (fp16: the default loss scale),
    ``global_batch`` sequences of 64 tokens per step split over the ranks.

    Per step: ``losses``, ``scales`` (the loss scale after the step; fp16 only) and ``steps_taken``
    (the optimizer's step count after it: a skipped step does not advance it)."""
    from parallax.data import load_dataset
    from parallax.models import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", n_layer=2, n_embd=64, n_head=2, block_size=64)).to(device)
    model, opt = px.initialize(model, px.RuntimeConfig(zero_stage=stage, precision=precision), lr=3e-3,
                               betas=(0.9, 0.95), weight_decay=0.1)
    ds = load_dataset()
    record: dict[str, list] = {"losses": [], "scales": [], "steps_taken": []}
    for step in range(steps):
        x, y = ds.get_batch("train", global_batch // world, 64, step=step, seed=0, rank=rank, world_size=world,
                            device=device)
        loss = model(x, y)
        opt.backward(loss)
        opt.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
        record["losses"].append(float(loss.detach().float()))
        record["scales"].append(opt.loss_scaler.get_scale() if opt.loss_scaler is not None else None)
        record["steps_taken"].append(max((int(s["step"]) for s in opt.state.values()), default=0))
    return record


def assert_reaches_the_fp32_loss(low: dict, reference: dict) -> None:
    """``gpt_run`` records: the mean of the last 20 losses within 2% of fp32's, and learning."""
    ref_tail, low_tail = sum(reference["losses"][-20:]) / 20, sum(low["losses"][-20:]) / 20
    assert abs(low_tail - ref_tail) <= 0.02 * ref_tail, (low_tail, ref_tail)
    assert low_tail < reference["losses"][0] - 2.0, "it must actually learn"


def assert_the_default_loss_scale_holds(fp16: dict) -> None:
    """A ``gpt_run`` fp16 record at the default scale 2**16: the loss's own magnitude causes no skip or
    backoff (a gradient overflow may still back off once: the scale stays >= 2**15 at step 100)."""
    skipped = [i for i, (before, after) in enumerate(zip([0] + fp16["steps_taken"], fp16["steps_taken"]))
               if after == before]
    assert fp16["steps_taken"][0] == 1, f"the first step was skipped; skipped {skipped}, scales {fp16['scales'][:5]}"
    assert fp16["scales"][99] >= 2.0**15, f"scale {fp16['scales'][99]} after 100 steps; skipped steps {skipped}"


def bf16_to_fp32_resume(rank: int, world: int, directory: str) -> float:
    """A bf16 run's checkpoint resumed in fp32 starts from the fp32 master weights, not the bf16 copies."""
    torch.manual_seed(0)
    model = zw.TinyNet()
    model, opt = px.initialize(model, px.RuntimeConfig(zero_stage=2, precision="bf16", bucket_mb=0.0005),
                               param_groups=zw._groups(model), lr=1e-2)
    zw._train_steps(model, opt, rank, world, 3)
    px.checkpoint.save(directory, model, opt, step=3)
    masters = {}
    for run in opt.runs:
        seg = run.segment
        masters[(seg.name, seg.start, seg.end)] = opt.inner.state[run.param]["master_param"].clone()
    fresh = zw.TinyNet()
    fresh, fresh_opt = px.initialize(fresh, px.RuntimeConfig(zero_stage=2, bucket_mb=0.0005),
                                     param_groups=zw._groups(fresh), lr=1e-2)
    px.checkpoint.load(directory, fresh, fresh_opt)
    full = px.zero.full_state_dict(fresh)
    assert all(t.dtype == torch.float32 for t in full.values())
    return max(float((full[name].reshape(-1)[start:end] - master).abs().max())
               for (name, start, end), master in masters.items())


def fp16_overflow_on_one_rank(rank: int, world: int, directory: str) -> dict:
    """fp16 through px.initialize: the optimizer's own loss scaler skips an overflow on every rank."""
    torch.manual_seed(0)
    model = zw.TinyNet()
    model, opt = px.initialize(model, px.RuntimeConfig(zero_stage=3, precision="fp16", bucket_mb=0.0005),
                               lr=1e-2)
    opt.loss_scaler = px.amp.LossScaler(init_scale=2.0**8, hysteresis=1)
    local = 8 // world
    scales, skipped = [], []
    for step in range(4):
        idx, tgt = zw._batches(step, 0, 8, 5, 11)
        loss = model(idx[rank * local:(rank + 1) * local], tgt[rank * local:(rank + 1) * local])
        if step == 2 and rank == 1:
            loss = loss * float("inf")
        before = px.zero.full_state_dict(model)
        opt.backward(loss)
        opt.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
        after = px.zero.full_state_dict(model)
        skipped.append(all(torch.equal(before[k], after[k]) for k in before))
        scales.append(opt.loss_scaler.get_scale())
    px.checkpoint.save(directory, model, opt, step=4)
    fresh = zw.TinyNet()
    fresh, fresh_opt = px.initialize(fresh, px.RuntimeConfig(zero_stage=1, precision="fp16"), lr=1e-2)
    px.checkpoint.load(directory, fresh, fresh_opt)
    return {"skipped": skipped, "scales": scales, "restored_scale": fresh_opt.loss_scaler.get_scale()}
