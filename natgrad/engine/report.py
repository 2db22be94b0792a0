"""A base for result objects: dataclasses whose ``to_dict()`` is JSON-serializable."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def _summarize_tensor(t: torch.Tensor) -> dict[str, Any]:
    """Shape, dtype and a few statistics of a tensor (no entries)."""
    out: dict[str, Any] = {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
    if t.dtype == torch.bool:
        out["count_true"] = int(t.sum())
        return out
    f = t.double()
    if f.numel():
        out.update(sum=float(f.sum()), mean=float(f.mean()), min=float(f.min()), max=float(f.max()))
    return out


def _summarize_fisher(fisher: Any) -> dict[str, Any]:
    return {
        "n_samples": fisher.n_samples,
        "labels": fisher.labels,
        "likelihood": fisher.likelihood,
        "n_entries": sum(v.numel() for v in fisher.values()),
        "total": fisher.total(),
        "layer_totals": fisher.layer_totals(),
    }


def to_jsonable(value: Any, *, max_elements: int | None = None) -> Any:
    """Plain JSON values from results: tensors, dataclasses, mappings, enums, Fishers, models.

    Tensors become floats / nested lists; with ``max_elements`` a tensor with more
    entries than that becomes a summary ``{"shape", "dtype", "sum", "mean", "min",
    "max"}`` (``count_true`` for masks) instead. A :class:`natgrad.DiagonalFisher` is
    summarized as ``n_samples``, ``total`` and ``layer_totals`` (never every entry); a
    module as its class name and parameter count; a :class:`Report` that defines its own
    ``to_dict`` is converted with it. Non-finite floats become ``None`` so the result is
    valid JSON.

    Example:
        >>> to_jsonable({"a": torch.tensor(2.0), "b": (1, float("nan"))})
        {'a': 2.0, 'b': [1, None]}
        >>> to_jsonable(torch.zeros(2, 3), max_elements=4)["shape"]
        [2, 3]
    """
    from natgrad.curvature.diagonal import (
        DiagonalFisher,  # lazy: fisher.py must not depend on reports
    )

    def rec(v: Any) -> Any:
        return to_jsonable(v, max_elements=max_elements)

    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if max_elements is not None and value.numel() > max_elements:
            return rec(_summarize_tensor(value))
        return rec(value.item() if value.numel() == 1 and value.dim() == 0 else value.tolist())
    if isinstance(value, DiagonalFisher):
        return rec(_summarize_fisher(value))
    if isinstance(value, nn.Module):
        return {
            "module": type(value).__name__,
            "parameters": sum(p.numel() for p in value.parameters()),
        }
    if isinstance(value, Report) and type(value).to_dict is not Report.to_dict:
        return rec(value.to_dict())  # a report that summarizes itself
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: rec(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): rec(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rec(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "value") and hasattr(type(value), "__members__"):  # Enum
        return value.value
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if hasattr(value, "to_dict"):
        return rec(value.to_dict())
    if hasattr(value, "tolist") and hasattr(value, "shape"):  # numpy arrays and scalars
        return rec(value.tolist())
    if hasattr(value, "item"):
        return rec(value.item())
    return repr(value)


class Report:
    """Mixin for result dataclasses: ``to_dict()`` gives plain, JSON-serializable values."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = to_jsonable(self)
        return out
