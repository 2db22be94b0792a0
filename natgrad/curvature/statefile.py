"""Curvature state dicts in natgrad's verified tensor files.

:func:`save_state` flattens a (nested) ``state_dict`` into one verified safetensors file
(:func:`natgrad.engine.files.save_tensors`: atomic write, format name and version, and a
SHA-256 per tensor): every tensor under its ``/``-joined key path, every plain value
(numbers, strings, lists, ``None``) in the JSON metadata ``"state"`` (tensors appear there
as ``{"__tensor__": key}``). :func:`load_state` verifies the file
(:func:`natgrad.engine.files.load_tensors`) and rebuilds the same nested dict.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch

from natgrad.engine.files import load_tensors, meta_json, save_tensors

__all__ = ["save_state", "load_state"]

_TENSOR = "__tensor__"


def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = prefix or "tensor"
        tensors[key] = obj.detach()
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


def save_state(
    path: str | os.PathLike[str], state: Mapping[str, Any], fmt: str, *, overwrite: bool = False
) -> None:
    """Write ``state`` (tensors and plain values, nested dicts) to ``path`` atomically.

    Args:
        path: the file to write (its folder must exist).
        state: what a curvature's ``state_dict()`` returned (floating-point tensors).
        fmt: the file kind stored as ``format`` and checked by :func:`load_state`.
        overwrite: replace a file at ``path`` that natgrad did not write (see
            :func:`~natgrad.engine.files.save_tensors`).

    Raises:
        TypeError: a value that is neither a tensor nor a plain value, or an integer tensor.
    """
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, "", tensors)
    save_tensors(path, tensors, fmt, {"state": json.dumps(skeleton)}, overwrite=overwrite)


def load_state(
    path: str | os.PathLike[str], fmt: str, device: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Read and verify a file written by :func:`save_state` for ``fmt``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a safetensors file, another kind or version;
            :class:`natgrad.engine.files.CorruptFileError` (a ValueError): a checksum,
            shape, dtype or metadata entry that does not verify.
    """
    cls = fmt.rsplit(".", 1)[-1]
    fix = f"Save it again with {cls}.save."
    tensors, meta = load_tensors(path, fmt, fix=fix, what=cls, device=device)
    state: dict[str, Any] = _unflatten(meta_json(os.fspath(path), meta, "state", fix), tensors)
    return state
