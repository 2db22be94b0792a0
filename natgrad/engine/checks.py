"""Argument checks shared by every module: one place for repeated error messages.

Each message names what was expected, what arrived, and how to fix it.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

_BATCHNORM_TYPES = (nn.modules.batchnorm._BatchNorm,)


def check_choice(name: str, value: str, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices``; else raise a ValueError listing them."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(
            f"Unknown {name} {value!r}; expected one of {', '.join(repr(c) for c in choices)}."
        )
    return value


def check_int(name: str, value: Any, minimum: int, *, optional: bool = False) -> int | None:
    """Return ``value`` as an int if it is an integer ``>= minimum`` (or None when ``optional``).

    Raises:
        ValueError: naming the argument, the value and the valid range.
    """
    if value is None and optional:
        return None
    try:
        v = operator.index(value)
    except TypeError:
        v = None
    if v is None or isinstance(value, bool) or v < minimum:
        raise ValueError(
            f"Invalid {name}: {value!r}; it must be an integer >= {minimum}"
            + (" or None." if optional else ".")
        )
    return v


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    """Raise ValueError unless ``value`` is a finite number > 0 (or >= 0)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}.") from None
    ok = v >= 0 if allow_zero else v > 0
    if not ok or v != v or v in (float("inf"), float("-inf")):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"Invalid {name}: {value!r}; it must be finite and {bound}.")
    return v


def check_fraction(name: str, value: float, *, closed: bool = False) -> float:
    """Raise ValueError unless ``0 <= value < 1`` (or ``<= 1`` when ``closed``)."""
    v = float(value)
    ok = 0.0 <= v <= 1.0 if closed else 0.0 <= v < 1.0
    if not ok:
        rng = "[0, 1]" if closed else "[0, 1)"
        raise ValueError(f"Invalid {name}: {value!r}; it must lie in {rng}.")
    return v


def check_no_batch_mixing(model: nn.Module) -> None:
    """Raise if a module mixes samples in its forward pass (train-mode BatchNorm).

    Per-sample gradients exist only when each output depends on its own input alone.
    """
    for name, module in model.named_modules():
        if isinstance(module, _BATCHNORM_TYPES) and module.training:
            raise ValueError(
                f"Module {name or type(model).__name__!r} ({type(module).__name__}) is in train "
                "mode: it normalizes with batch statistics, so one sample's output depends on "
                "the others and per-sample gradients do not exist. Call model.eval() before "
                "estimating the Fisher, or replace BatchNorm with GroupNorm/LayerNorm."
            )


def check_same_structure(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    what_a: str = "first",
    what_b: str = "second",
) -> None:
    """Raise ValueError naming the parameters whose names or shapes differ between a and b."""
    missing = sorted(set(a) - set(b))
    extra = sorted(set(b) - set(a))
    shapes = sorted(
        f"{k}: {tuple(a[k].shape)} vs {tuple(b[k].shape)}"
        for k in set(a) & set(b)
        if tuple(a[k].shape) != tuple(b[k].shape)
    )
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"only in {what_a}: {_short(missing)}")
        if extra:
            parts.append(f"only in {what_b}: {_short(extra)}")
        if shapes:
            parts.append(f"shapes differ ({what_a} vs {what_b}): {_short(shapes)}")
        raise ValueError(
            f"Parameter names or shapes differ between {what_a} and {what_b}: "
            + "; ".join(parts)
            + ". Use the same architecture, or restrict both to common parameters."
        )


def check_names_in(
    names: Iterable[str], available: Mapping[str, Any], what: str = "The Fisher"
) -> None:
    """Raise ValueError when ``names`` (e.g. a Fisher's) are not all in ``available``
    (e.g. ``dict(model.named_parameters())``), listing the missing and the available ones."""
    missing = [k for k in names if k not in available]
    if missing:
        more = f" ... ({len(missing)} in all)" if len(missing) > 8 else ""
        raise ValueError(
            f"{what} has parameters the model lacks: {missing[:8]}{more}; the model has "
            f"{list(available)[:8]}. Estimate {what[0].lower() + what[1:]} on this model "
            "(same architecture and parameter names)."
        )


def _short(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def check_finite(name: str, tensor: torch.Tensor, hint: str = "") -> None:
    """Raise FloatingPointError if ``tensor`` holds NaN or Inf."""
    if not torch.isfinite(tensor).all():
        raise FloatingPointError(
            f"Non-finite values (NaN or Inf) in {name}."
            + (f" {hint}" if hint else " Check the inputs, the loss and the learning rate.")
        )


def check_no_train_dropout(model: nn.Module, what: str) -> None:
    """Raise if a dropout module with ``p > 0`` is in train mode (``what`` needs a fixed model)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.training and module.p > 0:
            raise ValueError(
                f"Module {name or type(model).__name__!r} ({type(module).__name__}, p={module.p}) "
                f"is in train mode, so the model is random; {what} needs a deterministic model. "
                "Call model.eval() first."
            )
