"""Safetensors files: atomic writes and reads with metadata. safetensors is an optional dependency."""

import os
import tempfile
from types import ModuleType

import torch


def require_safetensors() -> ModuleType:
    """Import and return ``safetensors.torch``, or raise ImportError saying how to install it."""
    try:
        import safetensors.torch
    except ImportError as e:
        raise ImportError(
            "reading and writing model weights needs safetensors: pip install safetensors"
        ) from e
    return safetensors.torch


def write_safetensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    """Write tensors and string metadata to path so that path is either the old file or the new one.

    The file is written to a temporary name in the same directory (so the rename cannot cross
    file systems), flushed to disk, then renamed over path; on failure the temporary is removed.
    """
    st = require_safetensors()
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    # safetensors refuses tensors that share memory or are not contiguous.
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        st.save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_safetensors(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor (onto device) and the metadata (empty dict when absent) from path."""
    st = require_safetensors()
    with st.safe_open(os.fspath(path), framework="pt", device=str(device)) as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata() or {}
    return tensors, metadata
