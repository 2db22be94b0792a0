"""Batches and model outputs: one normal form for tuples, bare inputs and dict batches."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from natgrad.engine.checks import check_not_python_numbers

LABEL_KEYS = ("labels", "label", "y", "targets")


@dataclass
class Batch:
    """A parsed batch: positional args and keyword args for the model, target, size.

    ``target`` is None when the batch carries no labels. For dict batches with an
    ``attention_mask``, the mask is kept so sequence likelihoods can leave out padding.
    """

    args: tuple
    kwargs: dict
    target: torch.Tensor | None
    mask: torch.Tensor | None
    size: int

    def to(self, device: torch.device) -> Batch:
        mv = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
        return Batch(
            tuple(mv(a) for a in self.args),
            {k: mv(v) for k, v in self.kwargs.items()},
            mv(self.target),
            mv(self.mask),
            self.size,
        )

    def select(self, start: int, stop: int) -> Batch:
        """Samples ``start:stop`` (tensors whose leading dim is the batch size are sliced)."""
        sl = lambda t: t[start:stop] if is_batched(t, self.size) else t  # noqa: E731
        return Batch(
            tuple(sl(a) for a in self.args),
            {k: sl(v) for k, v in self.kwargs.items()},
            sl(self.target),
            sl(self.mask),
            min(stop, self.size) - start,
        )


def is_batched(t: Any, n: int) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == n


def parse_batch(batch: Any) -> Batch:
    """Normalize ``(x, y)``, ``(x,)``, ``x`` or a Hugging Face style dict.

    Raises:
        ValueError: for an empty batch, or one whose tensors disagree on the batch size.
        TypeError: for anything that is not a tensor, tuple/list or mapping, and for
            inputs given as Python lists of numbers or NumPy arrays (labels may be lists:
            they are converted with ``torch.as_tensor``).
    """
    if isinstance(batch, torch.Tensor):
        args, kwargs, target = (batch,), {}, None
    elif isinstance(batch, (tuple, list)):
        check_not_python_numbers(batch, "The batch")
        if len(batch) == 0:
            raise ValueError("Empty batch: expected (x, y), (x,) or x.")
        if len(batch) > 2:
            raise ValueError(
                f"A tuple batch must be (x, y) or (x,), got {len(batch)} items; pass a dict "
                "for models with several inputs."
            )
        args = (batch[0],)
        target = batch[1] if len(batch) == 2 else None
        kwargs = {}
    elif isinstance(batch, Mapping):
        kwargs = dict(batch)
        target = None
        for key in LABEL_KEYS:
            if key in kwargs:
                target = kwargs.pop(key)
                break
        args = ()
    else:
        raise TypeError(
            f"Unsupported batch type {type(batch).__name__}: expected a tensor, (x, y), (x,) "
            "or a dict of tensors."
        )
    for a in args:
        check_not_python_numbers(a, "The batch's input")
    for k, v in kwargs.items():
        check_not_python_numbers(v, f"Batch entry {k!r}")
    first = next(
        (t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.dim() > 0),
        None,
    )
    if first is None:
        raise ValueError("The batch holds no tensor with a batch dimension.")
    n = first.shape[0]
    if n == 0:
        raise ValueError("Empty batch (0 samples): there is nothing to estimate from.")
    if target is not None:
        if not isinstance(target, torch.Tensor):
            target = torch.as_tensor(target)
        if target.dim() == 0 or target.shape[0] != n:
            raise ValueError(
                f"Labels have shape {tuple(target.shape)} but the inputs hold {n} samples; "
                "the labels' first dimension must be the batch size."
            )
    mask = kwargs.get("attention_mask")
    return Batch(args, kwargs, target, mask, n)


def default_output_fn(out: Any) -> torch.Tensor:
    """Model output -> logits tensor: tensors as is, ``.logits`` or ``["logits"]`` otherwise."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(
        f"Cannot read logits from a model output of type {type(out).__name__}: pass "
        "output_fn=lambda out: ... that returns the output tensor."
    )


OutputFn = Callable[[Any], torch.Tensor]
