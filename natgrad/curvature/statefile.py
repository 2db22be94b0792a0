"""One file format for curvature state dicts: safetensors with metadata and checksums.

:func:`save_state` flattens a (nested) ``state_dict`` into one safetensors file: every
tensor under its ``/``-joined key path, every plain value (numbers, strings, lists,
``None``) in the JSON metadata ``"state"`` (tensors appear there as
``{"__tensor__": key}``), the format name in ``"format"``, and per tensor the SHA-256 of
its raw bytes in ``"sha256"``. :func:`load_state` checks the format and every checksum
and rebuilds the same nested dict. The write is atomic (a temporary file in the same
folder, then ``os.replace``), so an interrupted save leaves the previous file intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import torch

from natgrad._version import __version__

__all__ = ["save_state", "load_state", "tensor_digest"]

_TENSOR = "__tensor__"


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 (hex) of a tensor's raw bytes, contiguous, on the CPU.

    Example:
        >>> len(tensor_digest(torch.zeros(3)))
        64
    """
    raw = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()


def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = prefix or "tensor"
        tensors[key] = obj.detach().contiguous().cpu()
        return {_TENSOR: key}
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str) or "/" in k:
                raise ValueError(f"Cannot save state key {k!r}: keys must be strings without '/'.")
            out[k] = _flatten(v, f"{prefix}/{k}" if prefix else k, tensors)
        return out
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"Cannot save a {type(obj).__name__} in a curvature state (at {prefix!r}).")


def _unflatten(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            return tensors[obj[_TENSOR]]
        return {k: _unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_state(path: str | os.PathLike, state: Mapping[str, Any], fmt: str) -> None:
    """Write ``state`` (tensors and plain values, nested dicts) to ``path`` atomically.

    Args:
        path: the file to write (its folder must exist).
        state: what a curvature's ``state_dict()`` returned.
        fmt: the format name stored in the metadata and checked by :func:`load_state`.

    Raises:
        TypeError: a value that is neither a tensor nor a plain value.
    """
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, "", tensors)
    meta = {
        "format": fmt,
        "natgrad_version": __version__,
        "state": json.dumps(skeleton),
        "sha256": json.dumps({k: tensor_digest(v) for k, v in tensors.items()}),
    }
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=".curvature-", suffix=".tmp", dir=os.path.dirname(
        os.path.abspath(path)))
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_state(path: str | os.PathLike, fmt: str, device: str | torch.device = "cpu") -> dict:
    """Read a file written by :func:`save_state`, checking its format and checksums.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a safetensors file, another format than ``fmt``, or a tensor
            whose checksum differs (the file is corrupt).
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No curvature file at {path!r}.")
    try:
        with safe_open(path, framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"{path!r} is not a readable safetensors file: {exc}") from None
    if meta.get("format") != fmt:
        raise ValueError(
            f"{path!r} holds format {meta.get('format')!r}, not {fmt!r}; load it with the "
            "class that saved it."
        )
    try:
        digests = json.loads(meta["sha256"])
        skeleton = json.loads(meta["state"])
    except (KeyError, json.JSONDecodeError):
        raise ValueError(f"{path!r} is corrupt: its metadata is incomplete.") from None
    if set(digests) != set(tensors):
        raise ValueError(f"{path!r} is corrupt: the stored tensors differ from its index.")
    for k, t in tensors.items():
        if tensor_digest(t) != digests[k]:
            raise ValueError(
                f"{path!r} is corrupt: tensor {k!r} fails its SHA-256 check; save it again."
            )
    tensors = {k: t.to(device) for k, t in tensors.items()}
    return _unflatten(skeleton, tensors)
