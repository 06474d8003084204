"""Sharded, reshardable checkpoints of a ZeRO model and its optimizer, data-parallel or 3D.

A checkpoint directory holds one safetensors file per rank with the pieces of parameters (and
their element-wise optimizer state) that the rank owns, plus ``manifest.json``: parameter names,
FULL shapes and dtypes, tied names, each shard's pieces (name, element range, param group, and
for a tensor-parallel slice its place in the full tensor) and SHA-256, the optimizer's
param-group hyperparameters, world size, mesh, stage and step. Because every piece is addressed
by (parameter, slice, element range), a checkpoint saved at any world size, ZeRO stage or
``(pp, dp, tp)`` layout loads into any other: each rank reads just the elements it now holds.

A model with a ``parallax.parallel`` state (tensor/pipeline parallelism, ZeRO over the mesh's
data-parallel group) is saved by every rank of the world: a pipeline stage writes only its
parameters, a tensor-parallel slice is written with its place in the full tensor, what the
tensor-parallel group replicates is written by its rank 0, and a parameter tied across two
stages (``pp_tied``) once (``placement.RankRole``).

Saving is atomic and durable: every rank writes and fsyncs its files in one temporary directory;
rank 0 (of the world, for a 3D model) adds the manifest, fsyncs the directory, renames it into
place and fsyncs the parent. Replacing a checkpoint first renames the old one to its backup
name ``<directory>.prev``, so at every instant (a process killed, a power cut) a complete
checkpoint exists at ``<directory>`` or at ``<directory>.prev``; ``locate`` (which ``load``,
``read_manifest`` and ``full_tensors`` use) picks ``<directory>`` when it is there, else the backup. Directories are only ever published
or removed by rename(2), so a name never shows a partial checkpoint. Saving draws no random
numbers from Python's, NumPy's or torch's generators, so a run that saves follows the same
random streams (dropout) as one that does not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from parallax.checkpoint.placement import CheckpointError, Place, RankRole, Region, check_coverage, merge_meta
from parallax.parallel.state import parallel_state
from parallax.zero.comm import Comm
from parallax.zero.module import ZeroState, zero_state
from parallax.zero.optimizer import ZeroOptimizer

__all__ = ["CheckpointError", "save", "load", "consolidate", "full_tensors", "read_manifest", "locate", "remove"]

log = logging.getLogger(__name__)
FORMAT = "parallax.checkpoint/2"  # /2: pieces may be tensor-parallel slices, buffers name their shard
READABLE_FORMATS = ("parallax.checkpoint/1", FORMAT)
MANIFEST = "manifest.json"
BACKUP_SUFFIX = ".prev"


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as exc:
        raise ImportError("parallax checkpoints need safetensors: pip install safetensors") from exc
    return safetensors.torch


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _key(kind: str, name: str, start: int) -> str:
    return f"{kind}/{name}/{start}"


# ---------------------------------------------------------------------------- durable file system steps


def _fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mkdir_durably(path: Path) -> None:
    """``mkdir -p`` whose new directory entries survive a power cut (each parent is fsync'd)."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for new in reversed(missing):
        new.mkdir(exist_ok=True)  # another rank may create it at the same time
        _fsync_path(new.parent)


def _rename_durably(src: Path, dst: Path) -> None:
    os.rename(src, dst)
    _fsync_path(dst.parent)


def _hidden_name(path: Path, kind: str, token: int | None = None) -> Path:
    """``.<name>.<kind>-<16 hex digits>`` beside ``path``: a temporary or to-be-deleted directory.

    The token comes from the OS (``secrets``), never from Python's, NumPy's or torch's seeded
    generators, whose streams a save must not advance."""
    token = secrets.randbits(62) if token is None else token
    return path.with_name(f".{path.name}.{kind}-{token:016x}")


def _remove_leftovers(directory: Path) -> None:
    """Delete the temporary and half-deleted directories that killed saves or removals of
    ``directory`` left (hidden names: no reader looks at them)."""
    if not directory.parent.is_dir():
        return
    pattern = re.compile(rf"^\.{re.escape(directory.name)}(?:{re.escape(BACKUP_SUFFIX)})?\.(?:tmp|trash)-[0-9a-f]{{16}}$")
    for child in directory.parent.iterdir():
        if pattern.match(child.name):
            shutil.rmtree(child, ignore_errors=True)


def _discard(path: Path) -> None:
    """Delete a directory by first renaming it to a hidden name: no name ``locate`` or a listing
    reads ever shows a half-deleted checkpoint."""
    if not path.exists():
        return
    trash = _hidden_name(path, "trash")
    _rename_durably(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def backup_path(directory: str | os.PathLike) -> Path:
    """Where the previous checkpoint lives while ``save`` replaces the one at ``directory``."""
    directory = Path(directory)
    return directory.with_name(directory.name + BACKUP_SUFFIX)


def locate(directory: str | os.PathLike) -> Path:
    """The directory holding the checkpoint saved at ``directory``: ``directory`` itself or, when a
    save that was replacing it was killed between its two renames, its backup ``<directory>.prev``.

    Both names only ever hold complete checkpoints, and ``directory`` is the newer one.
    Returns ``directory`` when neither holds one (reading it then raises a clear error).
    """
    directory = Path(directory)
    if (directory / MANIFEST).is_file():
        return directory
    backup = backup_path(directory)
    if (backup / MANIFEST).is_file():
        log.warning("checkpoint %s: a save that was replacing it was interrupted; using its backup %s",
                    directory, backup)
        return backup
    return directory


def remove(directory: str | os.PathLike) -> None:
    """Delete the checkpoint (or any directory) at ``directory``, its backup and what interrupted
    saves of it left, never leaving a partial checkpoint under either name: each is renamed to a
    hidden name before its files are deleted. Call it on one rank, while no save to ``directory`` runs."""
    directory = Path(directory)
    _discard(backup_path(directory))
    _discard(directory)
    _remove_leftovers(directory)


# ---------------------------------------------------------------------------- what a rank owns


def _aliases(model: nn.Module) -> dict[str, str]:
    """Tied names -> the canonical (first) name of the same parameter."""
    canonical: dict[int, str] = {}
    for name, p in model.named_parameters():
        canonical[id(p)] = name
    aliases = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in canonical and canonical[id(t)] != name:
            aliases[name] = canonical[id(t)]
    return aliases


def _role(model: nn.Module, zs: ZeroState) -> RankRole:
    return RankRole(parallel_state(model), zs.comm.rank)


def _checkpoint_comm(model: nn.Module, zs: ZeroState) -> Comm:
    """Who saves together: the ZeRO group, or the whole world for a tensor/pipeline-parallel
    model (whose ZeRO group is one data-parallel slice of the mesh)."""
    if parallel_state(model) is None:
        return zs.comm
    return Comm(None, zs.comm.timeout_s)


def _local_pieces(zs: ZeroState, model: nn.Module, role: RankRole) -> list[tuple[str, int, int, torch.Tensor]]:
    """(name, start, end, values) of the parameter elements this rank saves (ranges of its own,
    possibly tensor-parallel, copy of the parameter)."""
    pieces = []
    in_buffers = set()
    for buffer in zs.buffers:
        in_buffers.update(id(p) for p in buffer.params)
        if zs.stage == 0 and zs.comm.rank != 0:
            continue  # replicated: data-parallel rank 0 saves it
        for seg in buffer.layout.segments(buffer.rank):
            if role.saves(seg.name):
                pieces.append((seg.name, seg.start, seg.end,
                               buffer.shard[seg.shard_offset: seg.shard_offset + seg.numel]))
    if zs.comm.rank == 0:
        for name, p in model.named_parameters():
            # frozen parameters outside the flat buffers (stages 0-2)
            if id(p) not in in_buffers and role.saves(name):
                pieces.append((name, 0, p.numel(), p.detach().reshape(-1)))
    return pieces


# ---------------------------------------------------------------------------- save


def save(directory: str | os.PathLike, model: nn.Module, optimizer: ZeroOptimizer | None = None, *,
         step: int = 0, extra: dict[str, Any] | None = None) -> Path:
    """Write this rank's shard (every rank must call it) and, on rank 0, the manifest; atomically.

    For a model with a ``parallax.parallel`` state every rank of the world calls it and rank 0
    of the world writes the manifest (the full model's parameters with their full shapes).
    ``extra`` is stored in the manifest (JSON); its ``"metadata"`` (str -> str) also goes into
    ``consolidate``'s safetensors file. If any rank fails, every rank raises ``CheckpointError``
    naming it, and an earlier checkpoint at ``directory`` is left as it was. A process killed
    during the save leaves the earlier checkpoint loadable (at ``directory`` or, killed while
    replacing it, at ``<directory>.prev``: ``load`` finds either). Saving draws no number from
    Python's, NumPy's or torch's random generators. The directory must be on a file system that
    all ranks share (as for any multi-rank checkpoint).
    """
    st = _safetensors()
    zs = zero_state(model)
    comm = _checkpoint_comm(model, zs)
    directory = Path(directory)
    # Only tensor collectives, each waited and drained (object collectives leave work that gloo's
    # thread may free at interpreter exit, which aborts the process).
    token = torch.tensor([secrets.randbits(62) if comm.rank == 0 else 0], dtype=torch.int64, device=comm.device)
    comm.broadcast(token, what="broadcast of the checkpoint's temporary name").wait()
    tmp = _hidden_name(directory, "tmp", int(token.item()))
    _mkdir_durably(tmp)
    try:
        index = _write_shard(st, tmp, model, optimizer, zs, comm.rank)
        (tmp / f"shard_{comm.rank:05d}.json").write_text(json.dumps(index))
    except Exception as exc:
        (tmp / f"error_{comm.rank:05d}.txt").write_text(f"{type(exc).__name__}: {exc}")
    comm.barrier("barrier after writing checkpoint shards")
    status = torch.zeros(1, dtype=torch.int64, device=comm.device)  # 0 = saved, r + 1 = rank r failed
    if comm.rank == 0:
        failed = sorted(int(p.stem.split("_")[1]) for p in tmp.glob("error_*.txt"))
        if failed:
            status += failed[0] + 1
        else:
            try:
                shards = []
                for r in range(comm.world_size):
                    meta = tmp / f"shard_{r:05d}.json"
                    shards.append(json.loads(meta.read_text()))
                    meta.unlink()
                _write_manifest(tmp, model, optimizer, zs, comm.world_size, step, extra, shards)
                _fsync_path(tmp)
                _publish(tmp, directory)
            except Exception as exc:
                (tmp / "error_00000.txt").write_text(f"{type(exc).__name__}: {exc}")
                status += 1
    comm.broadcast(status, what="broadcast of the checkpoint's status").wait()
    failed_rank = int(status.item()) - 1
    if failed_rank >= 0:
        reason = (tmp / f"error_{failed_rank:05d}.txt").read_text()
        comm.barrier("barrier after a failed checkpoint")
        if comm.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"saving {directory} failed on rank {failed_rank} ({reason}); "
                              "any earlier checkpoint there is intact")
    return directory


def _write_shard(st, tmp: Path, model: nn.Module, optimizer: ZeroOptimizer | None, zs: ZeroState, rank: int) -> dict:
    """Write this rank's pieces (and module buffers, when it saves what its peers replicate);
    their index for the manifest, with this rank's parameters' full shapes."""
    role = _role(model, zs)
    tensors: dict[str, torch.Tensor] = {}
    entries = []
    run_of = {}
    if optimizer is not None:
        run_of = {(run.segment.name, run.segment.start): run for run in optimizer.runs}
    places = {name: role.saved_place(name, p.shape) for name, p in model.named_parameters()}
    for name, start, end, values in _local_pieces(zs, model, role):
        tensors[_key("param", name, start)] = values.detach().cpu().clone()
        entry = {"name": name, "start": start, "end": end, "group": None, "state": []}
        if places[name].dim is not None:
            entry["slice"] = places[name].to_json()
        run = run_of.get((name, start))
        if run is not None:
            entry["group"] = run.group
            for key, value in optimizer.inner.state.get(run.param, {}).items():
                if not isinstance(value, torch.Tensor):
                    continue
                if value.dim() == 0:
                    tensors[_key(f"scalar.{key}", name, start)] = value.detach().cpu().clone()
                    entry["state"].append(key)
                elif value.numel() == run.param.numel():  # element-wise state of this piece
                    tensors[_key(f"state.{key}", name, start)] = value.detach().reshape(-1).cpu().clone()
                    entry["state"].append(key)
        entries.append(entry)
    buffers = {}
    if role.saves_replicated:
        for name, t in model.state_dict(keep_vars=True).items():
            if not isinstance(t, nn.Parameter):
                tensors[f"buffer/{name}"] = t.detach().cpu().clone()
                buffers[name] = {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)}
    tied = role.tied_elsewhere()
    params = {name: {"shape": list(places[name].shape), "dtype": _dtype_name(p.dtype),
                     "requires_grad": p.requires_grad}
              for name, p in model.named_parameters() if name not in tied or role.saves(name)}
    shard_file = tmp / f"shard_{rank:05d}.safetensors"
    st.save_file(tensors, str(shard_file))
    _fsync_path(shard_file)
    return {"rank": rank, "file": shard_file.name, "sha256": _sha256(shard_file), "entries": entries,
            "params": params, "aliases": _aliases(model), "buffers": buffers, "pp_tied": tied}


def _write_manifest(tmp: Path, model, optimizer, zs: ZeroState, world_size: int, step, extra, shards) -> None:
    params, aliases, buffers = merge_meta(shards)
    check_coverage(params, shards)
    shards = [{k: shard[k] for k in ("rank", "file", "sha256", "entries")} for shard in shards]
    groups = None
    if optimizer is not None:
        groups = [{k: v for k, v in g.items() if k != "params" and _jsonable(v)} for g in optimizer.param_groups]
    scaler = getattr(optimizer, "loss_scaler", None)
    state = parallel_state(model)
    mesh = None if state is None else {"pp": state.mesh.dims.pp, "dp": state.mesh.dims.dp, "tp": state.mesh.dims.tp}
    manifest = {"format": FORMAT, "step": step, "world_size": world_size, "mesh": mesh, "stage": zs.stage,
                "loss_scaler": None if scaler is None else scaler.state_dict(),
                "params": params, "aliases": aliases, "buffers": buffers,
                "optimizer": None if optimizer is None else {"class": type(optimizer.inner).__name__, "param_groups": groups},
                "shards": shards, "extra": extra or {}}
    path = tmp / MANIFEST
    path.write_text(json.dumps(manifest, indent=1))
    _fsync_path(path)


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except TypeError:
        return False
    return True


def _publish(tmp: Path, directory: Path) -> None:
    """Rename the complete, fsync'd checkpoint ``tmp`` to ``directory``.

    Invariant: at every instant a complete checkpoint is at ``directory`` or at its backup name
    (what ``locate`` reads): the old one becomes the backup before the new one takes its place,
    and the backup is dropped only once ``directory`` holds the new one.
    """
    if directory.exists() and any(directory.iterdir()) and not (directory / MANIFEST).is_file():
        raise CheckpointError(f"{directory} exists and is not a parallax checkpoint; not replacing it "
                              "(save to a new or empty directory)")
    backup = backup_path(directory)
    if directory.exists():
        _discard(backup)  # a complete checkpoint is at `directory`: an older backup is not needed
        _rename_durably(directory, backup)
    _rename_durably(tmp, directory)
    try:
        _discard(backup)
        _remove_leftovers(directory)
    except OSError as exc:  # the new checkpoint is in place: what is left costs only disk space
        log.warning("checkpoint %s saved, but removing its backup or leftovers failed: %s", directory, exc)


# ---------------------------------------------------------------------------- read


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the checkpoint saved at ``directory`` (see ``locate``)."""
    path = locate(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except OSError as exc:
        raise CheckpointError(f"{directory} is not a parallax checkpoint: cannot read {MANIFEST} ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is corrupted: {exc}") from None
    if manifest.get("format") not in READABLE_FORMATS:
        raise CheckpointError(f"{path}: unknown format {manifest.get('format')!r}, expected one of "
                              f"{', '.join(READABLE_FORMATS)}")
    return manifest


@dataclass(frozen=True)
class _Wanted:
    """A rank's copy of a parameter: its name in the checkpoint and its place in the full tensor."""

    name: str
    place: Place


class _Source:
    """Every piece of a checkpoint, addressed by parameter name, place (tensor-parallel slice or
    the whole tensor) and element range within that place.

    A shard file is opened, and its SHA-256 checked, when a piece in it is first read: a rank
    reads (and hashes) only the files holding what it loads, not the whole checkpoint.
    """

    def __init__(self, directory: Path, manifest: dict[str, Any]) -> None:
        self.directory = directory
        self.manifest = manifest
        self.pieces: dict[str, dict[Place, list[tuple[int, int, dict, str]]]] = {}
        self._sha256 = {shard["file"]: shard["sha256"] for shard in manifest["shards"]}
        self._files: dict[str, Any] = {}
        for shard in manifest["shards"]:
            if not (directory / shard["file"]).is_file():
                raise CheckpointError(f"{directory}: shard {shard['file']} is missing")
            for entry in shard["entries"]:
                if entry["name"] not in manifest["params"]:
                    raise CheckpointError(f"{directory / shard['file']}: a piece of {entry['name']}, which the "
                                          "manifest does not list")
                place = Place.from_json(manifest["params"][entry["name"]]["shape"], entry.get("slice"))
                self.pieces.setdefault(entry["name"], {}).setdefault(place, []).append(
                    (entry["start"], entry["end"], entry, shard["file"]))
        for by_place in self.pieces.values():
            for pieces in by_place.values():
                pieces.sort(key=lambda p: p[0])

    def _file(self, name: str):
        """The open shard file ``name``, checked against the manifest's SHA-256 on first use."""
        if name not in self._files:
            path = self.directory / name
            if _sha256(path) != self._sha256[name]:
                raise CheckpointError(f"{path} is corrupted: its SHA-256 does not match the manifest")
            self._files[name] = _safetensors().safe_open(str(path), framework="pt")
        return self._files[name]

    def whole(self, name: str) -> _Wanted:
        """Parameter ``name`` as a whole tensor."""
        return _Wanted(name, Place(tuple(self.manifest["params"][name]["shape"])))

    def _region(self, wanted: _Wanted, start: int, end: int) -> Region:
        return Region(wanted.name, self.pieces.get(wanted.name, {}), wanted.place, start, end)

    def _flat(self, kind: str, name: str, place: Place, start: int, end: int) -> torch.Tensor:
        """Elements ``[start, end)`` of ``kind`` of the saved ``place`` of ``name``."""
        out, pos = [], start
        for a, b, entry, file in self.pieces[name][place]:
            if b <= pos or a >= end:
                continue
            if a > pos:
                break
            key = _key(kind, name, a)
            if kind != "param" and kind.removeprefix("state.") not in entry["state"]:
                raise CheckpointError(f"{self.directory}: no {kind} saved for {name}[{a}:{b}]")
            out.append(self._file(file).get_slice(key)[pos - a: min(b, end) - a])
            pos = min(b, end)
            if pos == end:
                break
        if pos != end:
            raise CheckpointError(f"{self.directory}: elements {pos}..{end} of {name} are in no shard")
        return torch.cat(out) if len(out) > 1 else out[0]

    def read(self, kind: str, wanted: _Wanted, start: int, end: int,
             dtype: torch.dtype | None = None) -> torch.Tensor:
        """Elements ``[start, end)`` of ``kind`` ('param' or 'state.KEY') of the wanted copy (flat)."""
        region = self._region(wanted, start, end)
        t = region.assemble([self._flat(kind, wanted.name, r.place, r.start, r.end) for r in region.reads])
        return t if dtype is None else t.to(dtype)

    def _covering(self, wanted: _Wanted, start: int, end: int) -> list[tuple[int, dict, Any]]:
        """(start, entry, file) of the saved pieces that elements ``[start, end)`` are read from."""
        out = []
        for r in self._region(wanted, start, end).reads:
            out += [(a, entry, file) for a, b, entry, file in self.pieces[wanted.name][r.place]
                    if a < r.end and b > r.start]
        return out

    def has_state(self, key: str, wanted: _Wanted, start: int, end: int) -> bool:
        """True when every piece covering ``[start, end)`` saved element-wise ``key``."""
        covering = self._covering(wanted, start, end)
        return bool(covering) and all(key in entry["state"] for _, entry, _ in covering)

    def values(self, wanted: _Wanted, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        """Parameter values, from the fp32 master weights when they were saved and ``dtype`` can use
        them (a bf16 run resumed in fp32 keeps full precision)."""
        if dtype == torch.float32 and self.has_state("master_param", wanted, start, end):
            return self.read("state.master_param", wanted, start, end, dtype)
        return self.read("param", wanted, start, end, dtype)

    def scalar(self, key: str, wanted: _Wanted, start: int, end: int) -> torch.Tensor | None:
        """Scalar state ``key`` (Adam's step) of the first piece covering ``[start, end)``, or None
        when that piece saved ``key`` element-wise. Pieces of one parameter share it."""
        for a, entry, file in self._covering(wanted, start, end):
            if key in entry["state"]:
                scalar_key, handle = _key(f"scalar.{key}", wanted.name, a), self._file(file)
                return handle.get_tensor(scalar_key) if scalar_key in handle.keys() else None
        raise CheckpointError(f"{self.directory}: no {key} saved for {wanted.name}[{start}:{end}]")

    def state_keys(self, wanted: _Wanted, start: int, end: int) -> list[str]:
        covering = self._covering(wanted, start, end)
        return covering[0][1]["state"] if covering else []

    def buffer(self, name: str) -> torch.Tensor:
        """Module buffer ``name``, from the shard that holds it (format /1: the first)."""
        file = self.manifest["buffers"][name].get("file", self.manifest["shards"][0]["file"])
        return self._file(file).get_tensor(f"buffer/{name}")


# ---------------------------------------------------------------------------- load


@torch.no_grad()
def load(directory: str | os.PathLike, model: nn.Module, optimizer: ZeroOptimizer | None = None) -> dict[str, Any]:
    """Load a checkpoint saved at any world size, stage and ``(pp, dp, tp)`` layout into this
    (sharded) model and optimizer.

    Each rank takes its own elements: of its pipeline stage's parameters, of its tensor-parallel
    slices (``parallax.parallel`` state's ``tp_dims``), of its ZeRO shard; element-wise optimizer
    state (Adam's moments) is sliced like its parameter, scalar state (the step) copied. Reads
    ``directory``, or its backup when a save replacing it was interrupted (``locate``).
    Everything is read and checked (names, full shapes, coverage, checksums) before the model or
    the optimizer changes, so a bad checkpoint raises ``CheckpointError`` and leaves both
    untouched. Returns the manifest (``step``, ``extra``, ...).
    """
    directory = locate(directory)
    zs = zero_state(model)
    manifest = read_manifest(directory)
    wanted = _check_model(manifest, model, _role(model, zs))
    source = _Source(directory, manifest)

    # 1. parameters: what this rank holds (full buffers in stages 0-2, its shard in stage 3)
    param_updates: list[tuple[torch.Tensor, torch.Tensor]] = []
    in_buffers = set()
    for buffer in zs.buffers:
        in_buffers.update(id(p) for p in buffer.params)
        if zs.stage == 3:
            for seg in buffer.layout.segments(buffer.rank):
                dst = buffer.shard[seg.shard_offset: seg.shard_offset + seg.numel]
                param_updates.append((dst, source.values(wanted[seg.name], seg.start, seg.end, buffer.dtype)))
        else:
            for slot in buffer.layout.slots:
                dst = buffer.full[slot.offset: slot.offset + slot.numel]
                param_updates.append((dst, source.values(wanted[slot.name], 0, slot.numel, buffer.dtype)))
    for name, p in model.named_parameters():
        if id(p) not in in_buffers:
            param_updates.append((p.data.reshape(-1), source.read("param", wanted[name], 0, p.numel(), p.dtype)))
    buffer_updates = [(t, source.buffer(name)) for name, t in model.state_dict(keep_vars=True).items()
                      if not isinstance(t, nn.Parameter)]

    # 2. optimizer state for this rank's runs, as a state dict of the wrapped optimizer
    inner_state = None
    if optimizer is not None:
        inner_state = _optimizer_state(source, manifest, optimizer, wanted)

    # 3. nothing failed: apply
    for dst, src in param_updates + buffer_updates:
        dst.copy_(src)
    if inner_state is not None:
        optimizer.load_inner_state_dict(inner_state)
        scaler = getattr(optimizer, "loss_scaler", None)
        if scaler is not None and manifest.get("loss_scaler"):
            scaler.load_state_dict(manifest["loss_scaler"])
    return manifest


def _check_model(manifest: dict[str, Any], model: nn.Module, role: RankRole) -> dict[str, _Wanted]:
    """Where each of the model's parameters is in the checkpoint (its saved name, as a tied
    parameter may be saved under another, and its place in the full tensor)."""
    saved, aliases = manifest["params"], manifest.get("aliases", {})
    wanted = {}
    for name, p in model.named_parameters():
        saved_name = name if name in saved else aliases.get(name)
        if saved_name not in saved:
            raise CheckpointError(f"the checkpoint has no parameter {name} (first mismatch)")
        wanted[name] = _Wanted(saved_name, role.target_place(name, saved[saved_name]["shape"], p.shape))
    if not role.pipeline_stage:  # a pipeline stage holds only some of the checkpoint's parameters
        extra = sorted(set(saved) - {w.name for w in wanted.values()})
        if extra:
            raise CheckpointError(f"the model has no parameter {extra[0]} that the checkpoint holds (first mismatch)")
    for name, t in model.state_dict(keep_vars=True).items():
        if not isinstance(t, nn.Parameter):
            if name not in manifest["buffers"] or list(t.shape) != manifest["buffers"][name]["shape"]:
                raise CheckpointError(f"buffer {name} is missing from the checkpoint or has another shape (first mismatch)")
    return wanted


def _optimizer_state(source: _Source, manifest: dict[str, Any], optimizer: ZeroOptimizer,
                     wanted: dict[str, _Wanted]) -> dict[str, Any]:
    saved = manifest.get("optimizer")
    if saved is None:
        raise CheckpointError(f"{source.directory} holds no optimizer state")
    groups = saved["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise CheckpointError(f"the checkpoint's optimizer has {len(groups)} param groups, this one "
                              f"{len(optimizer.param_groups)}")
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for run in optimizer.runs:
        seg, copy = run.segment, wanted[run.segment.name]
        keys = source.state_keys(copy, seg.start, seg.end)
        if not keys:
            continue  # never stepped when saved
        entry: dict[str, torch.Tensor] = {}
        for key in keys:
            scalar = source.scalar(key, copy, seg.start, seg.end)
            entry[key] = scalar if scalar is not None else source.read(f"state.{key}", copy, seg.start, seg.end)
        if run.param.dtype in (torch.bfloat16, torch.float16) and "master_param" not in entry:
            # an fp32 checkpoint resumed in low precision: its values are the master weights
            entry["master_param"] = source.read("param", copy, seg.start, seg.end, torch.float32)
        state[index[id(run.param)]] = entry
    param_groups = []
    for saved_group, group in zip(groups, optimizer.param_groups):
        param_groups.append({**group, **saved_group, "params": [index[id(p)] for p in group["params"]]})
    return {"state": state, "param_groups": param_groups}


# ---------------------------------------------------------------------------- consolidate


def full_tensors(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every full parameter (tied ones once; tensor-parallel slices joined, every pipeline
    stage's) and buffer of a checkpoint, and its manifest.

    Needs no process group: for export, inspection and single-process inference.
    """
    directory = locate(directory)
    manifest = read_manifest(directory)
    source = _Source(directory, manifest)
    tensors = {}
    for name, meta in manifest["params"].items():
        whole = source.whole(name)
        tensors[name] = source.read("param", whole, 0, whole.place.numel,
                                    getattr(torch, meta["dtype"])).reshape(meta["shape"])
    for name in manifest["buffers"]:
        tensors[name] = source.buffer(name)
    return tensors, manifest


def consolidate(directory: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the checkpoint's full parameters (and buffers) as one safetensors file, atomically.

    Needs no process group. Tied parameters are stored once under their first name; the
    manifest's ``extra["metadata"]`` becomes the file's metadata (e.g. the GPT config, so that
    ``GPT.load(out)`` works).
    """
    st = _safetensors()
    out = Path(out)
    tensors, manifest = full_tensors(directory)
    metadata = {k: str(v) for k, v in manifest.get("extra", {}).get("metadata", {}).items()}
    metadata["parallax.aliases"] = json.dumps(manifest["aliases"])
    _mkdir_durably(out.parent)
    tmp = _hidden_name(out, "tmp")
    try:
        st.save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        _fsync_path(tmp)
        os.replace(tmp, out)
        _fsync_path(out.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
