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

# how to fix a NaN/Inf gradient, wherever one is refused
GRAD_HINT = (
    "The loss or its backward pass produced it: check the loss for NaN/Inf (log of 0, "
    "division by zero, overflow in float16), lower the learning rate, or clip gradients "
    "before this step (torch.nn.utils.clip_grad_norm_)."
)


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
    a: Mapping[str, Any],
    b: Mapping[str, Any],
    what_a: str = "first",
    what_b: str = "second",
) -> None:
    """Raise ValueError naming the parameters whose names or shapes differ between a and b.

    Values are tensors, or shapes (tuples / ``torch.Size``) where only the expected shape
    is known (e.g. the K-FAC factors a layer must have).
    """
    missing = sorted(set(a) - set(b))
    extra = sorted(set(b) - set(a))
    shapes = sorted(
        f"{k}: {_shape(a[k])} vs {_shape(b[k])}"
        for k in set(a) & set(b)
        if _shape(a[k]) != _shape(b[k])
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


def _shape(v: Any) -> tuple[int, ...]:
    """A tensor's shape, or a shape given as a tuple / ``torch.Size``."""
    return tuple(v.shape) if hasattr(v, "shape") else tuple(v)


def _by_device(tensors: Iterable[torch.Tensor]) -> dict[torch.device, list[torch.Tensor]]:
    out: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        out.setdefault(t.device, []).append(t)
    return out


def _first(mask: torch.Tensor, t: torch.Tensor) -> tuple[tuple[int, ...], float, int]:
    """Index and value of the first True entry of ``mask`` over ``t``, and how many are True."""
    flat = mask.reshape(-1)
    i = int(flat.nonzero()[0])
    idx = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), t.shape)) if t.dim() else ()
    return idx, float(t.reshape(-1)[i]), int(flat.sum())


def check_all_finite(tensors: Mapping[str, torch.Tensor], what: str, hint: str) -> None:
    """Raise FloatingPointError naming the first tensor of ``tensors`` with NaN or Inf.

    One sum per tensor and one host sync per device; the culprit (name, index, value,
    count) is located only when a sum is not finite (a sum that merely overflows finds
    no culprit and passes).

    Args:
        tensors: ``{name: tensor}``.
        what: the message's noun before the name, e.g. ``"the gradient (.grad) of parameter"``.
        hint: how to fix it.
    """
    items = {k: v.detach() for k, v in tensors.items() if v.numel() and v.is_floating_point()}
    if not items:
        return
    sums = _by_device(v.sum() for v in items.values())
    if all(bool(torch.isfinite(torch.stack(s)).all()) for s in sums.values()):
        return
    for k, v in items.items():
        bad = ~torch.isfinite(v)
        if bool(bad.any()):
            idx, val, count = _first(bad, v)
            raise FloatingPointError(
                f"Non-finite values (NaN or Inf) in {what} {k!r}: {val} at index {idx} "
                f"({count} of {v.numel()} entries). {hint}"
            )


def check_fisher_values(values: Mapping[str, torch.Tensor], what: str = "the Fisher") -> None:
    """Raise unless every entry of a diagonal Fisher is finite and ``>= 0``.

    ``F_i = (1/N) Σ_n E_y[g_n,i²]`` is a mean of squares, so a negative, NaN or infinite
    entry means the values are not a Fisher (or are corrupt). One min/max reduction per
    tensor and one host sync per device; the culprit is located only on failure.

    Args:
        values: ``{name: tensor}``.
        what: what holds the values, e.g. ``"DiagonalFisher"`` or ``"the state_dict's Fisher"``.

    Raises:
        FloatingPointError: NaN or Inf (names the entry, the index and the value).
        ValueError: negative values (names the entry, the index and the value).
    """
    items = {k: v.detach() for k, v in values.items() if v.numel()}
    if not items:
        return
    # per tensor [min, max] (NaN propagates into both); valid iff min >= 0 and max < inf
    lo_hi = _by_device(torch.stack(torch.aminmax(v)).double() for v in items.values())
    ok = all(
        bool(((s[:, 0] >= 0) & (s[:, 1] < float("inf"))).all())
        for s in (torch.stack(t) for t in lo_hi.values())
    )
    if ok:
        return
    for k, v in items.items():
        bad = ~torch.isfinite(v)
        if bool(bad.any()):
            idx, val, count = _first(bad, v)
            raise FloatingPointError(
                f"Non-finite values (NaN or Inf) in {what} entry {k!r}: {val} at index {idx} "
                f"({count} of {v.numel()} entries); a Fisher is finite and >= 0. Estimate it again "
                "(natgrad.estimate_fisher); in training, NaN/Inf usually means the run "
                "diverged (lower the learning rate)."
            )
    for k, v in items.items():
        neg = v < 0
        if bool(neg.any()):
            idx, val, count = _first(neg, v)
            raise ValueError(
                f"{what[:1].upper() + what[1:]} entry {k!r} has negative values ({val:.6g} at index {idx}; "
                f"{count} of {v.numel()} entries < 0); a diagonal Fisher is a mean of "
                "squared gradients, so every entry is >= 0. Pass squared-gradient means "
                "(e.g. from natgrad.estimate_fisher), not gradients or differences."
            )
