"""Reading Hugging Face weights lazily: the index of what a directory (safetensors, sharded or not,
or pytorch_model.bin) or a model object holds, read from file headers only; a model allocated in
place on the meta device; and the copy, one source tensor alive at a time, shard by shard.
"""

import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn

from .weights import require_safetensors

# safetensors header dtype names -> torch dtypes.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}

# The weight files of a save_pretrained directory, in the order transformers prefers them.
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"


@dataclass(frozen=True)
class StoredTensor:
    """Where one source tensor is and what it looks like, known without reading its data."""

    file: str  # file name inside the directory, or a description of the model object
    shape: tuple[int, ...]
    dtype: torch.dtype


class WeightSource:
    """The tensors of a checkpoint by their Hugging Face names: ``index`` describes them (from file
    headers), ``read`` hands over the data one tensor at a time."""

    def __init__(self, where: str, index: dict[str, StoredTensor],
                 read_file: Callable[[str, list[str], Callable[[str, torch.Tensor], None]], None]) -> None:
        self.where = where  # the directory or object, for messages
        self.index = index
        self._read_file = read_file

    def read(self, names: Iterable[str], consume: Callable[[str, torch.Tensor], None]) -> None:
        """Call consume(name, tensor) for each name, file by file; the tensor is dropped when it returns."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.index[name].file, []).append(name)
        for file, file_names in by_file.items():
            self._read_file(file, file_names, consume)


def open_directory(directory: str) -> WeightSource:
    """The WeightSource of a save_pretrained directory (FileNotFoundError naming it when it has no weights)."""
    for file in (SAFETENSORS_FILE, SAFETENSORS_INDEX, PICKLE_FILE, PICKLE_INDEX):
        path = os.path.join(directory, file)
        if os.path.exists(path):
            break
    else:
        raise FileNotFoundError(f"no {SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, {PICKLE_FILE} or {PICKLE_INDEX} "
                                f"in {directory!r}")
    shards = _shards(directory, file) if file.endswith(".index.json") else [file]
    if file.startswith("model."):
        return _safetensors_source(directory, shards, file)
    return _pickle_source(directory, shards)


def open_state_dict(state: Mapping[str, torch.Tensor], where: str) -> WeightSource:
    """The WeightSource of tensors already in memory (a transformers model object's state dict)."""
    index = {name: StoredTensor(where, tuple(t.shape), t.dtype) for name, t in state.items()}

    def read_file(file: str, names: list[str], consume: Callable[[str, torch.Tensor], None]) -> None:
        for name in names:
            consume(name, state[name])

    return WeightSource(where, index, read_file)


def _shards(directory: str, index_file: str) -> list[str]:
    with open(os.path.join(directory, index_file)) as f:
        weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{os.path.join(directory, index_file)} has no 'weight_map' of tensor names to files")
    return sorted(set(weight_map.values()))


def _safetensors_source(directory: str, shards: list[str], listed_in: str) -> WeightSource:
    st = require_safetensors()
    index: dict[str, StoredTensor] = {}
    for shard in shards:
        with _safe_open(st, directory, shard) as f:
            for name in f.keys():
                view = f.get_slice(name)
                dtype = SAFETENSORS_DTYPES.get(view.get_dtype())
                if dtype is None:
                    raise ValueError(f"{os.path.join(directory, shard)}: tensor {name!r} has dtype "
                                     f"{view.get_dtype()!r}, which parallax does not read")
                index[name] = StoredTensor(shard, tuple(view.get_shape()), dtype)
    if listed_in == SAFETENSORS_INDEX:
        _check_weight_map(directory, index)

    def read_file(file: str, names: list[str], consume: Callable[[str, torch.Tensor], None]) -> None:
        with _safe_open(st, directory, file) as f:
            for name in names:
                consume(name, f.get_tensor(name))

    return WeightSource(directory, index, read_file)


def _safe_open(st, directory: str, file: str):
    path = os.path.join(directory, file)
    try:
        return st.safe_open(path, framework="pt", device="cpu")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing (listed in {SAFETENSORS_INDEX})") from None
    except Exception as e:  # safetensors raises its own error type for a corrupt header
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e


def _check_weight_map(directory: str, index: dict[str, StoredTensor]) -> None:
    with open(os.path.join(directory, SAFETENSORS_INDEX)) as f:
        weight_map = json.load(f)["weight_map"]
    wrong = [f"{name} (listed in {file})" for name, file in weight_map.items()
             if name not in index or index[name].file != file]
    if wrong:
        raise ValueError(f"{os.path.join(directory, SAFETENSORS_INDEX)} lists tensors that are not in the named "
                         f"shard: {_first(wrong)}")


def _pickle_source(directory: str, shards: list[str]) -> WeightSource:
    # Memory-mapped, so the data stays in the page cache until copied (zipfile-format files only;
    # files in torch's legacy format are read whole).
    states = {shard: _torch_load(os.path.join(directory, shard)) for shard in shards}
    index = {name: StoredTensor(shard, tuple(t.shape), t.dtype)
             for shard, state in states.items() for name, t in state.items()}

    def read_file(file: str, names: list[str], consume: Callable[[str, torch.Tensor], None]) -> None:
        for name in names:
            consume(name, states[file][name])

    return WeightSource(directory, index, read_file)


def _torch_load(path: str) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        return torch.load(path, map_location="cpu", weights_only=True)


def unique_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters and buffers by state-dict name, each tied tensor once (first name)."""
    seen: set[int] = set()
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            out[name] = t
    return out


def materialize(model: nn.Module, dtype: torch.dtype) -> None:
    """Allocate a meta-device model's tensors on the CPU in dtype, uninitialised, keeping tied parameters tied."""
    aliases = _tied_aliases(model)
    model.to(dtype)  # free on the meta device
    model.to_empty(device="cpu")  # allocates each tensor separately, which unties shared parameters
    for alias, owner in aliases.items():
        module_name, _, attr = alias.rpartition(".")
        setattr(model.get_submodule(module_name), attr, model.get_parameter(owner))


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    owners: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in owners:
            aliases[name] = owners[id(p)]
        else:
            owners[id(p)] = name
    return aliases


def load_weights(model: nn.Module, source: WeightSource, plan: Mapping[str, str],
                 transposed: Callable[[str], bool]) -> None:
    """Copy source tensor plan[name] into each of the model's tensors ``name``, transposing those for
    which transposed(name) is true, one source tensor at a time."""
    targets = unique_tensors(model)
    ours_of = {hf_name: name for name, hf_name in plan.items()}

    @torch.no_grad()
    def copy(hf_name: str, tensor: torch.Tensor) -> None:
        name = ours_of[hf_name]
        targets[name].copy_(tensor.t() if transposed(name) else tensor)

    source.read(plan.values(), copy)


def plan_load(model: nn.Module, source: WeightSource, import_name: Callable[[str], str | None],
              export_name: Callable[[str], str], transposed: Callable[[str], bool], what: str) -> dict[str, str]:
    """{model tensor name: source tensor name}, or one ValueError naming every missing, unexpected,
    duplicated or wrongly shaped tensor and its file. import_name maps a source name to the model's
    (None: not a weight, e.g. a tied LM head); export_name maps back, for messages; what names the model."""
    targets = unique_tensors(model)
    plan: dict[str, str] = {}
    unexpected, duplicated, wrong_shapes = [], [], []
    for hf_name, stored in source.index.items():
        name = import_name(hf_name)
        if name is None:
            continue
        if name not in targets:
            unexpected.append(f"{hf_name} ({stored.file})")
        elif name in plan:
            duplicated.append(f"{hf_name} and {plan[name]}")
        else:
            plan[name] = hf_name
            needed = tuple(targets[name].shape)[::-1] if transposed(name) else tuple(targets[name].shape)
            if stored.shape != needed:
                wrong_shapes.append(f"{hf_name} is {list(stored.shape)} in {stored.file}, the model needs {list(needed)}")
    missing = [export_name(name) for name in targets if name not in plan]
    problems = [f"{label}: {_first(items)}" for label, items in (
        ("missing tensors", missing), ("unexpected tensors", unexpected),
        ("tensors given twice", duplicated), ("wrong shapes", wrong_shapes)) if items]
    if problems:
        raise ValueError(f"the weights in {source.where} do not fit {what}: " + "; ".join(problems))
    return plan


def _first(items: list[str], n: int = 10) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more
