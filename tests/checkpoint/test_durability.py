"""Checkpoints survive a process killed at any point of a save, reach the disk before they are
published, and saving leaves every random stream where it was."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import parallax as px
from parallax.data import ByteTokenizer
from parallax.data.tokenizer import tokenizer_reference
from parallax.models import GPT, GPTConfig
from parallax.train.checkpoints import latest_checkpoint, list_checkpoints, load_model, save_checkpoint
from tests.checkpoint.kill_points import run_forked
from tests.distributed import zero_workers as zw

pytest.importorskip("safetensors")

GPT_SMALL = dict(block_size=8, vocab_size=32, n_layer=1, n_head=2, n_embd=16)


def _tiny_gpt(dropout: float = 0.0):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**GPT_SMALL, dropout=dropout))
    return px.initialize(model, px.RuntimeConfig(zero_stage=2, bucket_mb=0.0005, timeout_s=30), lr=1e-2)


def _gpt_steps(model, opt, rank: int, steps: int) -> list[float]:
    losses = []
    for step in range(steps):
        g = torch.Generator().manual_seed(100 * step + rank)
        idx = torch.randint(0, GPT_SMALL["vocab_size"], (2, GPT_SMALL["block_size"] + 1), generator=g)
        loss = model(idx[:, :-1], idx[:, 1:])
        opt.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


# ---------------------------------------------------------------------------- killed saves


def _save_after(rank: int, arm, directory: str, steps: int) -> None:
    """Train the ZeRO-2 TinyNet ``steps`` steps and save it (the kill points start at the save)."""
    torch.manual_seed(0)
    model, opt = px.initialize(zw.TinyNet(), px.RuntimeConfig(zero_stage=2, bucket_mb=0.0005, timeout_s=30), lr=1e-2)
    zw._train_steps(model, opt, rank, torch.distributed.get_world_size(), steps)
    arm()
    px.checkpoint.save(directory, model, opt, step=steps)


def _save_into_each(rank: int, arm, directories: list[str], steps: int) -> None:
    for directory in directories:
        _save_after(rank, arm, directory, steps)


def _assert_same(tensors: dict, expected: dict, what: str) -> None:
    assert tensors.keys() == expected.keys(), what
    for name, t in expected.items():
        assert torch.equal(tensors[name], t), (what, name)


def _kill_at_every_point(tmp_path: Path, save, world: int, kill_rank: int, previous: Path, check) -> list[Path]:
    """Copy ``previous`` into a fresh directory, run ``save`` there killed at its 1st, 2nd, ...
    file-system change until one run is not killed, and ``check`` each trial directory."""
    trials = []
    for n in range(1, 500):
        trial = tmp_path / f"kill{n}"
        shutil.copytree(previous, trial)
        status = run_forked(save, world, str(trial), kill_rank=kill_rank, kill_at=n)
        if status[kill_rank][0] == 0:
            shutil.rmtree(trial)
            return trials
        assert status[kill_rank][0] == -9, status
        check(trial, n)
        trials.append(trial)
    raise AssertionError("the save never completed")


@pytest.mark.parametrize("world, kill_rank", [(1, 0), (2, 1)])
def test_a_save_killed_at_any_point_leaves_a_verified_checkpoint(tmp_path, world, kill_rank):
    """SIGKILL before each file-system change of a save replacing a checkpoint: the directory always
    loads (checksums verified) as the previous checkpoint or the new one, never as neither; a
    later save into it succeeds and leaves nothing behind."""
    refs = {}
    for steps in (1, 2):
        run_forked(_save_after, world, str(tmp_path / f"ref{steps}" / "c"), steps)
        refs[steps] = px.checkpoint.full_tensors(tmp_path / f"ref{steps}" / "c")[0]
    seen = set()

    def check(trial: Path, n: int) -> None:
        tensors, manifest = px.checkpoint.full_tensors(trial / "c")  # raises unless complete and verified
        _assert_same(tensors, refs[manifest["step"]], f"killed at call {n}")
        seen.add(manifest["step"])

    def save(rank, arm, trial):
        _save_after(rank, arm, str(Path(trial) / "c"), 2)

    trials = _kill_at_every_point(tmp_path / "trials", save, world, kill_rank, tmp_path / "ref1", check)
    # Rank 1 only writes its shard into the temporary directory; rank 0's kill points span the replacement.
    assert (len(trials) >= 10 and seen == {1, 2}) if kill_rank == 0 else (len(trials) >= 3 and seen == {1}), \
        (len(trials), seen)
    statuses = run_forked(_save_into_each, world, [str(t / "c") for t in trials], 2)
    assert all(code == 0 for code, _ in statuses.values()), statuses
    for trial in trials:
        _assert_same(px.checkpoint.full_tensors(trial / "c")[0], refs[2], f"{trial.name}, saved again")
        assert [p.name for p in trial.iterdir()] == ["c"], f"{trial.name}: leftovers {sorted(os.listdir(trial))}"


def _train_save(rank: int, arm, root: str, steps: int) -> None:
    """``parallax train``'s checkpoint of a tiny GPT after ``steps`` steps, keeping only the newest."""
    model, opt = _tiny_gpt()
    _gpt_steps(model, opt, rank, steps)
    arm()
    save_checkpoint(root, model, opt, step=steps, config={}, model_config=model.config,
                    tokenizer=tokenizer_reference(ByteTokenizer()), keep=1, is_main=rank == 0)


def test_train_checkpoints_killed_at_any_point_resume_from_a_verified_checkpoint(tmp_path):
    """SIGKILL before each file-system change of saving step 2 (and removing step 1): --resume's
    pick is a complete, verified checkpoint of step 1 or 2, and no partial one is listed."""
    refs = {}
    for steps in (1, 2):
        run_forked(_train_save, 1, str(tmp_path / f"ref{steps}" / "checkpoints"), steps)
        refs[steps] = px.checkpoint.full_tensors(latest_checkpoint(tmp_path / f"ref{steps}" / "checkpoints"))[0]
    seen = set()

    def check(trial: Path, n: int) -> None:
        root = trial / "checkpoints"
        for step, path in list_checkpoints(root):
            _assert_same(px.checkpoint.full_tensors(path)[0], refs[step], f"killed at call {n}: {path.name}")
        latest = latest_checkpoint(root)
        assert latest is not None, f"killed at call {n}: no checkpoint to resume from"
        assert load_model(latest).config == GPTConfig(**GPT_SMALL)
        seen.add(px.checkpoint.read_manifest(latest)["step"])

    def save(rank, arm, trial):
        _train_save(rank, arm, str(Path(trial) / "checkpoints"), 2)

    trials = _kill_at_every_point(tmp_path / "trials", save, 1, 0, tmp_path / "ref1", check)
    assert len(trials) >= 10 and seen == {1, 2}, (len(trials), seen)
    statuses = run_forked(_train_save_into_each, 1, [str(t / "checkpoints") for t in trials], 3)
    assert statuses[0][0] == 0, statuses
    for trial in trials:  # the next save also removes what the killed one left
        assert sorted(os.listdir(trial / "checkpoints")) == ["step_000003"], (trial.name, os.listdir(trial / "checkpoints"))


def _train_save_into_each(rank: int, arm, roots: list[str], steps: int) -> None:
    for root in roots:
        _train_save(rank, arm, root, steps)


def _save_over(rank: int, arm, directory: str) -> str:
    torch.manual_seed(0)
    model, opt = px.initialize(zw.TinyNet(), px.RuntimeConfig(zero_stage=1, timeout_s=30), lr=1e-2)
    try:
        px.checkpoint.save(directory, model, opt, step=1)
    except px.checkpoint.CheckpointError as exc:
        return str(exc)
    return "no error"


def test_saving_over_a_directory_that_is_not_a_checkpoint_is_refused(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    message = run_forked(_save_over, 1, str(tmp_path / "notes"))[0][1]
    assert "notes exists and is not a parallax checkpoint" in message, message
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["notes"]


# ---------------------------------------------------------------------------- fsync before rename


def _record_durability(rank: int, arm, directory: str) -> list[tuple]:
    """The order of fsync (by path) and rename calls of a first save and of one replacing it."""
    torch.manual_seed(0)
    model, opt = px.initialize(zw.TinyNet(), px.RuntimeConfig(zero_stage=1, timeout_s=30), lr=1e-2)
    events = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst, *args, **kwargs):
        events.append(("rename", os.path.abspath(src), os.path.abspath(dst)))
        return real_rename(src, dst, *args, **kwargs)

    def replace(src, dst, *args, **kwargs):
        events.append(("rename", os.path.abspath(src), os.path.abspath(dst)))
        return real_replace(src, dst, *args, **kwargs)

    os.fsync, os.rename, os.replace = fsync, rename, replace
    for step in (1, 2):
        events.append(("save", step))
        px.checkpoint.save(directory, model, opt, step=step)
        events.append(("files", sorted(os.listdir(directory))))
    return events


def test_files_and_directories_are_fsynced_before_the_rename(tmp_path):
    """Each save fsyncs every file of the checkpoint, then its directory, before renaming it into
    place; every rename is followed by an fsync of the parent before anything else is renamed."""
    directory = str(tmp_path.resolve() / "c")
    events = run_forked(_record_durability, 1, directory)[0][1]
    starts = [i for i, e in enumerate(events) if e[0] == "save"] + [len(events)]
    for start, end in zip(starts, starts[1:]):
        save = events[start:end]
        files = save[-1][1]
        publish = next(i for i, e in enumerate(save) if e[0] == "rename" and e[2] == directory)
        tmp = save[publish][1]
        synced = [e[1] for e in save[:publish] if e[0] == "fsync"]
        for name in files:
            assert os.path.join(tmp, name) in synced, (name, save)
        assert tmp in synced and synced.index(tmp) > max(synced.index(os.path.join(tmp, n)) for n in files), save
        renames = [i for i, e in enumerate(save) if e[0] == "rename"]
        for i, nxt in zip(renames, renames[1:] + [len(save)]):
            parent = os.path.dirname(save[i][2])
            assert ("fsync", parent) in save[i + 1:nxt], (save[i], save)


# ---------------------------------------------------------------------------- random streams


def _rng_states() -> list:
    """Python's, NumPy's and torch's CPU generator (a forked child cannot use CUDA: see
    tests/distributed/test_checkpoint_cuda.py for the CUDA generator)."""
    return [random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state().tolist()]


def _dropout_run(rank: int, arm, directory: str | None) -> dict:
    """4 steps of a GPT with dropout on 2 ZeRO-2 ranks, saving after each step when ``directory``."""
    random.seed(1)
    np.random.seed(1)
    model, opt = _tiny_gpt(dropout=0.3)
    losses, rng_unchanged = [], []
    for step in range(4):
        losses += _gpt_steps(model, opt, rank, 1)
        if directory is not None:
            before = _rng_states()
            px.checkpoint.save(directory, model, opt, step=step + 1)
            rng_unchanged.append(_rng_states() == before)
    return {"losses": losses, "rng_unchanged": rng_unchanged}


def test_saving_every_step_leaves_dropout_draws_unchanged(tmp_path):
    """With dropout on, the losses of a run that saves after every step equal (bit for bit) those
    of one that never saves, on every rank; no save moves Python's, NumPy's or torch's RNG."""
    saving = run_forked(_dropout_run, 2, str(tmp_path / "c"))
    plain = run_forked(_dropout_run, 2, None)
    for rank in (0, 1):
        assert saving[rank][0] == 0 and plain[rank][0] == 0, (saving, plain)
        assert saving[rank][1]["rng_unchanged"] == [True] * 4, (rank, saving[rank][1])
        assert saving[rank][1]["losses"] == plain[rank][1]["losses"], (rank, saving[rank][1], plain[rank][1])
        assert len(set(plain[rank][1]["losses"])) == 4
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["step"] == 4
