"""A base for result objects: dataclasses whose ``to_dict()`` is JSON-serializable."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch


def to_jsonable(value: Any) -> Any:
    """Tensors -> floats / nested lists, mappings -> dicts with str keys, enums -> values.

    Non-finite floats become ``None`` so the result is valid JSON.
    """
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return to_jsonable(
            value.item() if value.numel() == 1 and value.dim() == 0 else value.tolist()
        )
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "value") and hasattr(type(value), "__members__"):  # Enum
        return value.value
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if hasattr(value, "to_dict"):
        return to_jsonable(value.to_dict())
    if hasattr(value, "item"):  # numpy scalars
        return to_jsonable(value.item())
    return repr(value)


class Report:
    """Mixin for result dataclasses: ``to_dict()`` gives plain, JSON-serializable values."""

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(self)
