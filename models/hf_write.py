"""Writing a Hugging Face model directory atomically: config.json plus model.safetensors, or shards
and model.safetensors.index.json, in the layout ``save_pretrained`` writes.

Everything is written and fsync'd in a hidden temporary directory beside the target, which is then
renamed into place. An existing model directory is replaced only once the new one is complete: it
is first renamed to ``<directory>.prev`` (where it stays if the process dies between the two
renames) and deleted after. Files of the old directory that an export does not write (tokenizer,
generation config, README) are carried over, as ``save_pretrained`` leaves them in place.
"""

import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from .hf_read import SAFETENSORS_FILE, SAFETENSORS_INDEX
from .weights import require_safetensors

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
BACKUP_SUFFIX = ".prev"

# Files of an existing directory that describe the old weights: never carried into the new one.
_WEIGHT_FILE = re.compile(r"^(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?$")

_SIZE_UNITS = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
               "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string such as "5GB", "100KB" (powers of 10) or "2GiB" (powers of 2)."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    if isinstance(size, str):
        match = re.fullmatch(r"\s*(\d+)\s*([KMGT]I?B|B)\s*", size.upper())
        if match and int(match[1]) > 0:
            return int(match[1]) * _SIZE_UNITS[match[2]]
    raise ValueError(f"max_shard_size must be a positive number of bytes or a string like '5GB' or '500MiB'; "
                     f"got {size!r}")


def plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Tensor names grouped into shards of at most max_bytes, in order; a larger tensor gets a shard alone."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes.items():
        if shards[-1] and used + nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def write_hf_directory(directory: str | os.PathLike, config: dict, tensors: dict[str, torch.Tensor],
                       prepare: Callable[[str, torch.Tensor], torch.Tensor], max_bytes: int) -> Path:
    """Write config.json and the tensors (each passed through prepare(name, tensor) just before its
    shard is written, so at most one shard of prepared copies exists at a time) to directory, atomically."""
    directory = Path(directory)
    _check_replaceable(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{secrets.token_hex(8)}")
    tmp.mkdir()
    try:
        _write_weights(tmp, tensors, prepare, max_bytes)
        _write_json(tmp / CONFIG_FILE, config)
        previous = next((p for p in (directory, _backup(directory)) if p.is_dir()), None)
        if previous is not None:
            _carry_over(previous, tmp)
        _fsync(tmp)
        _publish(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _check_replaceable(directory: Path) -> None:
    if not directory.exists():
        return
    if not directory.is_dir():
        raise ValueError(f"to_hf: {directory} exists and is not a directory")
    if any(directory.iterdir()) and not (directory / CONFIG_FILE).is_file():
        raise ValueError(f"to_hf: {directory} exists, is not empty and holds no {CONFIG_FILE}; not replacing it "
                         "(export to a new directory, an empty one, or a model directory)")


def _write_weights(tmp: Path, tensors: dict[str, torch.Tensor], prepare: Callable[[str, torch.Tensor], torch.Tensor],
                   max_bytes: int) -> None:
    st = require_safetensors()
    sizes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    shards = plan_shards(sizes, max_bytes)
    weight_map = {}
    for i, names in enumerate(shards):
        file = SAFETENSORS_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        shard = {name: prepare(name, tensors[name]).detach().cpu().contiguous() for name in names}
        st.save_file(shard, str(tmp / file), metadata={"format": "pt"})
        del shard  # before the next shard's copies are made
        _fsync(tmp / file)
        weight_map.update(dict.fromkeys(names, file))
    if len(shards) > 1:
        total_parameters = sum(t.numel() for t in tensors.values())
        _write_json(tmp / SAFETENSORS_INDEX, {"metadata": {"total_parameters": total_parameters,
                                                           "total_size": sum(sizes.values())},
                                              "weight_map": dict(sorted(weight_map.items()))})


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
    _fsync(path)


def _carry_over(old: Path, new: Path) -> None:
    """Hard-link (or copy) into new what old holds besides its weights and config."""
    for entry in old.iterdir():
        if entry.name == CONFIG_FILE or _WEIGHT_FILE.match(entry.name) or (new / entry.name).exists():
            continue
        if entry.is_dir():
            shutil.copytree(entry, new / entry.name, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, new / entry.name)


def _link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _backup(directory: Path) -> Path:
    return directory.with_name(directory.name + BACKUP_SUFFIX)


def _publish(tmp: Path, directory: Path) -> None:
    """Rename the complete directory tmp to directory; an old one is kept at its backup name until
    then. Afterwards, delete the backup and the temporary directories of killed exports to the same
    place (one export to a directory at a time)."""
    backup = _backup(directory)
    if directory.exists():
        shutil.rmtree(backup, ignore_errors=True)
        os.rename(directory, backup)
    os.rename(tmp, directory)
    _fsync(directory.parent)
    leftovers = re.compile(rf"^\.{re.escape(directory.name)}\.tmp-[0-9a-f]{{16}}$")
    stale = [p for p in directory.parent.iterdir() if leftovers.match(p.name)]
    try:
        for path in ([backup] if backup.exists() else []) + stale:
            shutil.rmtree(path)
    except OSError as e:  # the new directory is in place: what is left costs only disk space
        log.warning("to_hf: wrote %s, but removing the previous version or leftovers failed: %s", directory, e)
