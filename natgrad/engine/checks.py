"""Argument checks shared by every module: one place for repeated error messages.

Each message names what was expected, what arrived, and how to fix it.
"""

from __future__ import annotations

import functools
import math
import operator
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, TypeVar, overload

import torch
from torch import nn

from natgrad.engine.common import module_list

_BATCHNORM_TYPES = (nn.modules.batchnorm._BatchNorm,)

# how to fix a NaN/Inf gradient, wherever one is refused
GRAD_HINT = (
    "The loss or its backward pass produced it: check the loss for NaN/Inf (log of 0, "
    "division by zero, overflow in float16), lower the learning rate, or clip gradients "
    "before this step (torch.nn.utils.clip_grad_norm_)."
)


S = TypeVar("S", bound=str)


def check_choice(name: str, value: object, choices: Iterable[S]) -> S:
    """Return ``value`` if it is one of ``choices`` (typed as they are, e.g. a ``Literal``);
    else raise a ValueError listing them."""
    options = tuple(choices)
    for c in options:
        if value == c:
            return c
    raise ValueError(
        f"Unknown {name} {value!r}; expected one of {', '.join(repr(c) for c in options)}."
    )


@overload
def check_int(
    name: str, value: Any, minimum: int, *, optional: Literal[False] = False
) -> int: ...


@overload
def check_int(name: str, value: Any, minimum: int, *, optional: bool) -> int | None: ...


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
    """Raise if a module mixes samples in its forward pass: a train-mode BatchNorm, or a
    BatchNorm without running statistics (``track_running_stats=False``), which
    normalizes with the batch's statistics in eval mode too.

    Per-sample gradients exist only when each output depends on its own input alone.
    """
    for name, module in model.named_modules():
        if not isinstance(module, _BATCHNORM_TYPES):
            continue
        where = f"Module {name or type(model).__name__!r} ({type(module).__name__})"
        if getattr(module, "running_mean", None) is None:
            raise ValueError(
                f"{where} keeps no running statistics (track_running_stats=False), so it "
                "normalizes with the batch's statistics even in eval mode: one sample's "
                "output depends on the others and per-sample gradients do not exist. Use a "
                "BatchNorm with running statistics (in eval mode), or GroupNorm/LayerNorm."
            )
        if module.training:
            raise ValueError(
                f"{where} is in train "
                "mode: it normalizes with batch statistics, so one sample's output depends on "
                "the others and per-sample gradients do not exist. Call model.eval() before "
                "estimating the Fisher, or replace BatchNorm with GroupNorm/LayerNorm."
            )


def check_same_structure(
    a: Mapping[str, Any],
    b: Mapping[str, Any],
    what_a: str = "first",
    what_b: str = "second",
    fix: str = "Use the same architecture, or restrict both to common parameters.",
) -> None:
    """Raise ValueError naming the parameters whose names or shapes differ between a and b,
    ending with ``fix`` (what to do about it).

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
            + ". "
            + fix
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
    """Raise FloatingPointError if ``tensor`` holds NaN or Inf.

    A finite sum means finite entries (NaN and Inf propagate through it); the
    elementwise test runs only when the sum is not finite (it may have overflowed),
    so a large finite tensor costs one reduction.
    """
    if (tensor.is_floating_point() or tensor.is_complex()) and bool(
        torch.isfinite(tensor.sum())
    ):
        return
    if not torch.isfinite(tensor).all():
        raise FloatingPointError(
            f"Non-finite values (NaN or Inf) in {name}."
            + (f" {hint}" if hint else " Check the inputs, the loss and the learning rate.")
        )


def check_softmax_logits(name: str, logits: torch.Tensor, hint: str = "") -> None:
    """Raise FloatingPointError unless ``softmax(logits)`` along the last axis is defined:
    no NaN or ``+inf``, and every row holds a finite logit. ``-inf`` entries are allowed
    (probability 0: masked actions, banned tokens). One reduction when all are finite."""
    if logits.is_floating_point() and bool(torch.isfinite(logits.sum())):
        return
    bad = torch.isnan(logits) | (logits == float("inf"))
    empty = ~torch.isfinite(logits).any(-1) if logits.dim() else ~torch.isfinite(logits)
    if bool(bad.any()) or bool(empty.any()):
        raise FloatingPointError(
            f"Non-finite values in {name}: NaN or +inf, or a row whose logits are all "
            "-inf (-inf alone is fine: probability 0)."
            + (f" {hint}" if hint else " Check the inputs, the loss and the learning rate.")
        )


# -- models --------------------------------------------------------------------------------

# Float attributes through which modules draw dropout inside their forward in train mode
# (nn.MultiheadAttention.dropout, Hugging Face attention's dropout / attention_dropout).
_DROPOUT_ATTRS = ("dropout", "dropout_p", "dropout_prob", "attention_dropout", "attn_dropout")


def check_model(model: Any, what: str) -> nn.Module:
    """Return ``model`` if it is an ``nn.Module`` whose tensors hold data.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` (None, a path, a parameter list).
        ValueError: a parameter or buffer is on the meta device (shapes without data).
    """
    if not isinstance(model, nn.Module):
        hint = {
            type(None): "pass the model itself",
            str: "load it first (torch.load, or from_pretrained for Hugging Face models)",
        }.get(type(model), "pass the model, not its parameters or outputs")
        raise TypeError(
            f"{what} needs a torch.nn.Module as model, got {type(model).__name__}: {hint}."
        )
    # One walk over the modules' own tensors (named_parameters and named_buffers cost
    # several times more); the names are looked up only when a meta tensor is found.
    if not any(
        t is not None and t.is_meta
        for m in model.modules()
        for t in (*m._parameters.values(), *m._buffers.values())
    ):
        return model
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        if t.is_meta:
            raise ValueError(
                f"{what}: the model's tensor {name!r} is on the meta device (a shape without "
                "data), so there is nothing to differentiate. Materialize the weights first: "
                "model.to_empty(device='cpu') then model.load_state_dict(...), or load with "
                "from_pretrained(...) without a meta device_map."
            )
    return model


def _randomness(module: nn.Module) -> str | None:
    """The description of ``module``'s own randomness (dropout with ``p > 0`` in train
    mode: ``"Dropout, p=0.1"``), or None."""
    if not module.training:
        return None
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return f"{type(module).__name__}, p={module.p}" if module.p > 0 else None
    own, cls = module.__dict__, type(module)
    for attr in _DROPOUT_ATTRS:
        # A float rate is an instance or class attribute (or a property), never one of
        # the parameters, buffers or submodules that Module.__getattr__ looks up (and
        # whose failed look-up, raising an AttributeError, is slow).
        if attr in own:
            v = own[attr]
        elif hasattr(cls, attr):
            v = getattr(module, attr, None)
        else:
            continue
        if isinstance(v, float) and not isinstance(v, bool) and v > 0:
            return f"{type(module).__name__}, {attr}={v}"
    return None


def random_module(model: nn.Module) -> tuple[str, str] | None:
    """``(name, description)`` of the first module that draws random numbers in its forward
    (dropout with ``p > 0`` in train mode), or None when the model is deterministic."""
    for name, module in model.named_modules():
        desc = _randomness(module)
        if desc is not None:
            return name or type(model).__name__, desc
    return None


def check_no_train_dropout(model: nn.Module, what: str) -> None:
    """Raise if the model is random: dropout with ``p > 0`` in train mode (``nn.Dropout*``,
    ``nn.AlphaDropout``, attention with a float dropout rate such as
    ``nn.MultiheadAttention(dropout=0.1)``). ``what`` names the use that needs a fixed model.

    A Fisher estimated in train mode would average over dropout masks, one per sample and
    call: two identical calls give different results, none of them the model's Fisher.
    """
    found = random_module(model)
    if found is not None:
        name, desc = found
        raise ValueError(
            f"Module {name!r} ({desc}) is in train mode, so the model is random; {what} needs "
            "a deterministic model (a train-mode Fisher mixes in dropout noise). Call "
            "model.eval() first; in a training loop, model.eval() before the Fisher step "
            "and model.train() after."
        )


def _may_fail(m: nn.Module) -> bool:
    """Whether one of :func:`check_fixed_model`'s checks may fail on module ``m``'s own
    tensors and settings: a meta tensor, a batch-mixing BatchNorm, train-mode dropout."""
    for p in m._parameters.values():
        if p is not None and p.is_meta:
            return True
    for b in m._buffers.values():
        if b is not None and b.is_meta:
            return True
    if isinstance(m, _BATCHNORM_TYPES) and (
        m.training or getattr(m, "running_mean", None) is None
    ):
        return True
    return m.training and _randomness(m) is not None


def check_fixed_model(model: nn.Module, what: str) -> None:
    """Everything a Fisher or curvature estimate needs of the model: an ``nn.Module`` with
    data, no batch-mixing module (train-mode BatchNorm) and no randomness (train-mode
    dropout). See :func:`check_model`, :func:`check_no_batch_mixing`,
    :func:`check_no_train_dropout`."""
    # One walk over the modules finds whether any check can fail (a meta tensor, a
    # batch-mixing BatchNorm, train-mode dropout): a Fisher call's fixed cost on small
    # batches. Only then do the checks run, in order, each raising its own error.
    if isinstance(model, nn.Module) and not any(map(_may_fail, module_list(model))):
        return
    check_model(model, what)
    check_no_batch_mixing(model)
    check_no_train_dropout(model, what)


# -- batches -------------------------------------------------------------------------------


def _numeric_leaf(value: Any) -> bool:
    """True for a non-empty (nested) list/tuple whose first leaf is a Python number."""
    depth = 0
    while isinstance(value, (list, tuple)) and value and depth < 8:
        value, depth = value[0], depth + 1
    return depth > 0 and isinstance(value, (int, float, bool, complex))


def check_not_python_numbers(value: Any, what: str) -> None:
    """Raise TypeError when a batch input is a Python list of numbers or a NumPy array.

    ``what`` names the input (``"The batch's input"``, ``"Batch entry 'input_ids'"``).
    """
    if _numeric_leaf(value):
        raise TypeError(
            f"{what} is a Python list, not a tensor: natgrad needs torch tensors with the "
            "batch as the first dimension. Convert with torch.tensor(x) (for a Hugging Face "
            "tokenizer, pass return_tensors='pt')."
        )
    if type(value).__module__ == "numpy" and hasattr(value, "dtype"):
        raise TypeError(
            f"{what} is a NumPy array, not a tensor: convert with torch.from_numpy(x)."
        )


def describe_inputs(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
    """``"(32, 39) float32"`` for one tensor; ``"{input_ids: (2, 7) int64, ...}"`` for dicts."""

    def one(v: Any) -> str:
        if isinstance(v, torch.Tensor):
            dev = "" if v.device.type == "cpu" else f" on {v.device}"
            return f"{tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}{dev}"
        return type(v).__name__

    parts = [one(a) for a in args]
    if kwargs:
        parts.append("{" + ", ".join(f"{k}: {one(v)}" for k, v in kwargs.items()) + "}")
    return parts[0] if len(parts) == 1 else "(" + ", ".join(parts) + ")"


def mark_user_error(exc: BaseException) -> None:
    """Mark ``exc``, raised by a torch operation of the user's forward that a natgrad
    torch-function mode ran (so the innermost frame is natgrad's), as the forward's own
    error: :func:`forward_failed` then names the batch and the inputs as for any other."""
    exc.natgrad_user_op = True  # type: ignore[attr-defined]


def _raised_by_natgrad(exc: BaseException) -> bool:
    if getattr(exc, "natgrad_user_op", False):
        return False
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    # natgrad's hooks and capture modes live in engine/ and curvature/ (models defined
    # elsewhere in natgrad, e.g. the CLI demos', are the user's models here).
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    where = os.path.abspath(tb.tb_frame.f_code.co_filename)
    return any(where.startswith(os.path.join(root, d) + os.sep) for d in ("engine", "curvature"))


def forward_failed(
    exc: Exception,
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    where: str,
    hint: str = "",
) -> Exception:
    """The error to raise (``from exc``) when the model's own forward fails on a batch.

    It names where (``"batch 3"``), the inputs' shapes and dtypes as the user passed them,
    and the parameters' dtypes, then the original message and ``hint`` (a further
    sentence, e.g. about the batch's shared entries). The type is the original's
    (so ``except`` clauses keep working) when it can carry a message, else RuntimeError.
    Errors natgrad raised itself (e.g. from its hooks) are returned unchanged.
    """
    if _raised_by_natgrad(exc):
        return exc
    if isinstance(exc, TypeError) and not args and kwargs:
        param = _dict_positional_parameter(model, kwargs)
        if param is not None:
            keys = ", ".join(repr(k) for k in list(kwargs)[:6])
            return TypeError(
                f"The model's forward failed on {where}: natgrad passes a dict batch (and the "
                "dict of an (inputs, y) batch) as keyword arguments, model(**inputs), as "
                f"Hugging Face models take them, but no parameter of "
                f"{type(model).__name__}.forward is named after a key ({keys}); it has one "
                f"required positional parameter, {param!r}. If the batch's keys are "
                "misnamed, name them after forward's parameters. If forward takes the dict "
                "itself as one argument, wrap the model so that it collects the keywords "
                "into a dict: a module holding it whose forward(self, **inputs) returns "
                f"self.model(inputs). (The call raised: {exc})"
            )
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    msg = (
        f"The model's forward failed on {where}, inputs {describe_inputs(args, kwargs)}, "
        f"parameters {' and '.join(dtypes) or 'none'}: {exc}{hint}"
    )
    try:
        new = type(exc)(msg)
    except Exception:
        return RuntimeError(msg)
    return new if str(new) == msg else RuntimeError(msg)


def _dict_positional_parameter(model: nn.Module, kwargs: Mapping[str, Any]) -> str | None:
    """The name of ``model.forward``'s one required positional parameter when the forward
    takes a dict batch positionally (``forward(self, batch)``): no ``**kwargs``, no
    parameter named after a key of ``kwargs``, and exactly one required positional
    parameter; else None (a keyword-argument model, or a signature that cannot be read)."""
    import inspect

    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None
    ps = list(sig.parameters.values())
    if any(p.kind is p.VAR_KEYWORD for p in ps) or any(k in sig.parameters for k in kwargs):
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p.name for p in ps if p.kind in positional and p.default is p.empty]
    return required[0] if len(required) == 1 else None


# -- targets -------------------------------------------------------------------------------


def integer_labels(target: torch.Tensor, likelihood: str) -> torch.Tensor:
    """Class labels as int64: other integer dtypes (uint8, int16, int32) are cast, which is
    exact for every value they hold; float, complex and bool labels are refused."""
    if target.dtype == torch.long:
        return target
    if target.dtype == torch.bool or target.is_floating_point() or target.is_complex():
        raise ValueError(
            f"{likelihood} labels must be integer class indices, got {target.dtype} labels of "
            f"shape {tuple(target.shape)}; convert with y.long() (one-hot labels: "
            "y.argmax(-1); for real-valued targets use likelihood='gaussian' or 'bernoulli')."
        )
    return target.long()


def _locate(flat_index: int, shape: torch.Size) -> str:
    """``"sample 3"`` or ``"sample 1, position 4"`` for an index into a tensor of ``shape``."""
    per = 1
    for s in shape[1:]:
        per *= s
    sample, rest = divmod(flat_index, max(per, 1))
    if len(shape) <= 1:
        return f"sample {sample}"
    pos = []
    for s in reversed(shape[1:]):
        rest, r = divmod(rest, s)
        pos.append(r)
    where = ", ".join(str(p) for p in reversed(pos))
    return f"sample {sample}, position {where}"


def check_class_labels(
    target: torch.Tensor,
    num_classes: int,
    likelihood: str,
    ignore_index: int | None = None,
    *,
    logits: torch.Tensor | None = None,
) -> None:
    """Raise ValueError unless every label lies in ``[0, num_classes)`` (or equals
    ``ignore_index``), naming the first bad sample (and position), its value and the fix;
    and, given the model's ``logits``, unless they are logits rather than probabilities.

    Checked on the whole target before any ``vmap``: under ``vmap`` an out-of-range
    ``one_hot`` gives a zero row instead of an error. ``logits`` that look like probabilities
    are refused as :func:`check_not_probabilities` does (the row sums share the label
    check's host sync).

    Raises:
        ValueError: a label out of range, or ``logits`` that are probabilities.
    """
    out_of_range, sums_one = _label_flags(target, num_classes, ignore_index, logits)
    if sums_one and logits is not None:
        _refuse_probabilities(logits, likelihood)
    if not out_of_range:
        return
    bad = (target < 0) | (target >= num_classes)
    if ignore_index is not None:
        bad &= target != ignore_index
    flat = bad.flatten().nonzero()[0, 0]
    value = int(target.flatten()[flat])
    count = int(bad.sum())
    allowed = f"class indices in [0, {num_classes - 1}] (the model outputs {num_classes} classes)"
    if ignore_index is not None:
        allowed += f" or ignore_index={ignore_index}"
    if value == -100 and ignore_index is None:
        fix = (
            "-100 is the usual ignore index for padding, but the "
            f"{likelihood} likelihood has none: drop those samples, or for sequences use "
            "likelihood='token_categorical' (which leaves out ignore_index labels)."
        )
    elif value < 0:
        fix = "Class indices start at 0; remap the labels (e.g. y - y.min())."
    else:
        fix = (
            f"Check the labels, or give the model {int(target.max()) + 1} outputs "
            "(the number of classes)."
        )
    raise ValueError(
        f"Label out of range: {_locate(int(flat), target.shape)} has label {value}, but "
        f"{likelihood} labels must be {allowed}; {count} label(s) are out of range. {fix}"
    )


def _label_flags(
    target: torch.Tensor,
    num_classes: int,
    ignore_index: int | None,
    logits: torch.Tensor | None,
) -> tuple[bool, bool]:
    """``(some label is out of range, every row of logits sums to 1)`` with one host sync
    and a handful of reductions (a Fisher call's fixed cost on small batches).

    Without an ignore index the labels' ``min`` and ``max`` decide the range, compared in
    the row sums' float dtype: exact for ``num_classes <= 2**24`` (a label ``>= C`` rounds
    to ``>= C`` when ``C`` is exact, a label ``< C <= 2**24`` is exact, signs are kept);
    otherwise, or with an ignore index, one elementwise test."""
    acc = torch.float32
    vals: list[torch.Tensor] = []
    ranged = ignore_index is None and num_classes <= 2**24
    if target.numel():
        if ranged:
            vals.extend(torch.aminmax(target if target.dim() == 1 else target.reshape(-1)))
        else:
            bad = (target < 0) | (target >= num_classes)
            if ignore_index is not None:
                bad &= target != ignore_index
            vals.append(bad.any())
    rows = None if logits is None else _row_sums(logits)
    if rows is not None:
        acc = rows.dtype
        vals.extend(torch.aminmax(rows))
    if not vals:
        return False, False
    dev = vals[0].device  # the logits may sit on another device than the labels
    read = torch.stack(
        [v if (v.dtype, v.device) == (acc, dev) else v.to(device=dev, dtype=acc) for v in vals]
    ).tolist()  # the one host sync
    out_of_range, i = False, 0
    if target.numel():
        out_of_range = read[0] < 0 or read[1] >= num_classes if ranged else bool(read[0])
        i = 2 if ranged else 1
    sums_one = False
    if rows is not None and logits is not None:
        tol = _sum_tolerance(logits)
        sums_one = read[i] >= 1 - tol and read[i + 1] <= 1 + tol
    return out_of_range, sums_one


def warn_unshifted_lm_labels(
    target: torch.Tensor, args: tuple[Any, ...], kwargs: Mapping[str, Any], ignore_index: int
) -> None:
    """Warn when token labels equal the model's input ids and the likelihood does not shift.

    A causal language model's logits at position ``t`` predict the token at ``t + 1``;
    Hugging Face passes ``labels = input_ids`` and shifts inside its loss. Scored without
    the shift (``TokenCategorical(shift=False)``, the ``"token_categorical"`` string),
    each position is scored against the token it reads, a different (and wrong) Fisher,
    with no error. Labels that equal the input ids (``kwargs["input_ids"]`` or the first
    positional input) at every kept token, two or more of them, are that mistake but
    for a model that really predicts its own input at each position (a copy task or an
    autoencoder), so this warns instead of raising.
    """
    ids = kwargs.get("input_ids")
    if ids is None and args:
        ids = args[0]
    if (
        not isinstance(ids, torch.Tensor)
        or ids.shape != target.shape
        or ids.is_floating_point()
        or ids.dtype == torch.bool
    ):
        return
    kept = target != ignore_index
    same = (ids.to(target.device) == target) | ~kept  # at every kept token
    if not bool(same.all() & (kept.sum() >= 2)):  # one host sync
        return
    warnings.warn(
        "token_categorical: the labels equal the input ids at every kept token, so the "
        "logits at each position are scored against the token they read, not the next "
        "one. For a causal language model (GPT-2 style; Hugging Face's labels=input_ids) "
        "pass natgrad.TokenCategorical(shift=True); if the model does predict its own "
        "input at each position, ignore this warning.",
        UserWarning,
        stacklevel=4,
    )


def check_not_probabilities(logits: torch.Tensor, likelihood: str) -> None:
    """Raise ValueError when ``logits`` look like probabilities (one host sync; the
    positivity is read only when every row sums to 1): every row along the last axis
    (``C >= 2`` classes) sums to 1 within ``ε/2 + 8 ε_acc √C`` (``ε`` the machine epsilon
    of their dtype, ``ε_acc`` of float32 or float64, the dtype a softmax computes in) and
    is positive, as a final ``nn.Softmax`` gives. A softmax likelihood would
    apply a second softmax to them. Log-probabilities (``nn.LogSoftmax``) are fine, and so
    is a row with a zero entry (e.g. exactly one-hot logits).

    Example:
        >>> check_not_probabilities(torch.tensor([[0.2, 0.8], [0.5, 0.5]]), "categorical")
        Traceback (most recent call last):
        ...
        ValueError: The model's outputs look like probabilities, not logits: ...
    """
    sums_one = _rows_sum_to_one(logits)
    if sums_one is not None and bool(sums_one):
        _refuse_probabilities(logits, likelihood)


def _row_sums(logits: torch.Tensor) -> torch.Tensor | None:
    """The sums of the rows of ``logits`` along the last axis, in float32 or float64, or
    None when the probability test does not apply (fewer than 2 classes, no rows, not
    floating)."""
    if logits.dim() == 0 or logits.shape[-1] < 2 or not logits.numel():
        return None
    if not logits.is_floating_point():
        return None
    return logits.detach().sum(-1, dtype=torch.promote_types(logits.dtype, torch.float32))


def _sum_tolerance(logits: torch.Tensor) -> float:
    """How far from 1 a row of probabilities in ``logits``' dtype may sum: each entry
    rounded to that dtype (at most ``ε/2`` of the sum), plus the softmax's own rounding in
    the dtype it computes in (float32 for low precision)."""
    return _tolerance(logits.dtype, logits.shape[-1])


@functools.lru_cache(maxsize=64)
def _tolerance(dtype: torch.dtype, classes: int) -> float:
    """:func:`_sum_tolerance` of ``classes`` entries of ``dtype`` (a pure function of both,
    remembered: ``torch.finfo`` is a call's fixed cost)."""
    acc = torch.promote_types(dtype, torch.float32)
    tol: float = torch.finfo(dtype).eps / 2 + 8 * torch.finfo(acc).eps * classes**0.5
    return tol


def _rows_sum_to_one(logits: torch.Tensor) -> torch.Tensor | None:
    """Whether every row of ``logits`` sums to 1 (a 0-dim bool tensor, not synced), or
    None when the test does not apply (see :func:`_row_sums`)."""
    rows = _row_sums(logits)
    if rows is None:
        return None
    ok: torch.Tensor = ((rows - 1).abs() <= _sum_tolerance(logits)).all()
    return ok


def _refuse_probabilities(logits: torch.Tensor, likelihood: str) -> None:
    """Raise when every entry of ``logits`` (whose rows sum to 1) is positive."""
    if bool((logits > 0).all()):
        raise ValueError(
            f"The model's outputs look like probabilities, not logits: every row of its "
            f"{tuple(logits.shape)} output is positive and sums to 1. The {likelihood} "
            "likelihood applies a softmax to the outputs itself, so probabilities would be "
            "softmaxed twice and give a wrong Fisher and loss. Drop the model's final "
            "nn.Softmax (natgrad's categorical likelihoods take logits), or output "
            "log-probabilities (nn.LogSoftmax), which are fine."
        )


# autograd nodes that only move or copy entries: a sigmoid's output seen through them
# (a squeeze, a view, .logits of a dict) is still made of probabilities
_SHAPE_NODES = ("View", "UnsafeView", "Squeeze", "Unsqueeze", "Reshape", "Expand",
                "Transpose", "Permute", "Clone", "Alias", "Select", "Slice", "T", "ToCopy",
                "Contiguous")


def check_not_sigmoid_outputs(output: torch.Tensor, likelihood: str) -> None:
    """Raise ValueError when ``output`` was made by a sigmoid (``nn.Sigmoid`` or
    ``torch.sigmoid`` last in the model, seen through views and copies), so that every
    entry is a probability in ``[0, 1]``: the Bernoulli analogue of
    :func:`check_not_probabilities`. The evidence is the output's autograd node (no host
    sync), present whenever a parameter before the sigmoid requires grad; a detached
    output is not checked (its values alone cannot tell logits in ``[0, 1]`` from
    probabilities).
    """
    fn = output.grad_fn
    while fn is not None and re.sub(r"Backward\d*$", "", type(fn).__name__) in _SHAPE_NODES:
        nxt = [f for f, _ in fn.next_functions if f is not None]
        fn = nxt[0] if len(nxt) == 1 else None
    if fn is None or not type(fn).__name__.startswith("SigmoidBackward"):
        return
    raise ValueError(
        f"The model's outputs look like probabilities, not logits: its "
        f"{tuple(output.shape)} output comes from a sigmoid (nn.Sigmoid or torch.sigmoid), "
        f"so every entry lies in [0, 1]. The {likelihood} likelihood applies a sigmoid to "
        "the outputs itself, so probabilities would be squashed twice and give a wrong "
        "Fisher and loss. Drop the model's final nn.Sigmoid (natgrad's bernoulli "
        "likelihood takes logits, as BCEWithLogitsLoss does)."
    )


def check_finite_target(target: torch.Tensor, likelihood: str) -> None:
    """Raise ValueError naming the first sample whose (floating) target is NaN or Inf."""
    if not (target.is_floating_point() or target.is_complex()):
        return
    finite = torch.isfinite(target)
    if bool(finite.all()):
        return
    flat = int((~finite).flatten().nonzero()[0, 0])
    value = target.flatten()[flat].item()
    raise ValueError(
        f"Non-finite target: {_locate(flat, target.shape)} has {value}; {likelihood} "
        "targets must be finite. Remove or impute the samples with NaN/Inf targets."
    )


def check_unit_interval(target: torch.Tensor, likelihood: str = "Bernoulli") -> None:
    """Raise ValueError unless every target lies in ``[0, 1]``, naming the first that does not."""
    bad = (target < 0) | (target > 1)
    if not bool(bad.any()):
        return
    flat = int(bad.flatten().nonzero()[0, 0])
    value = target.flatten()[flat].item()
    raise ValueError(
        f"{likelihood} targets must lie in [0, 1] (0/1 labels or probabilities): "
        f"{_locate(flat, target.shape)} has {value}. For labels in {{-1, 1}} use (y + 1) / 2; "
        "for logits use torch.sigmoid(y)."
    )


def check_several_classes(output: torch.Tensor, likelihood: str) -> None:
    """Raise ValueError when a softmax likelihood's logits have one class (last axis of
    size 1): ``softmax`` of one logit is 1 whatever its value, so every label has
    probability 1, the loss is 0 and the Fisher is exactly zero. A one-logit binary
    classifier (``BCEWithLogitsLoss``) is a Bernoulli model."""
    if output.dim() == 0 or output.shape[-1] != 1:
        return
    raise ValueError(
        f"The {likelihood} likelihood takes a softmax over the model's last output axis, "
        f"which has one class (output shape {tuple(output.shape)}): a softmax over one "
        "logit is 1 whatever its value, so the Fisher would be exactly zero. For a "
        "one-logit binary classifier (trained with BCEWithLogitsLoss) use "
        "likelihood='bernoulli' (labels 0/1 of shape (N, 1)); for C classes give the "
        "model C outputs."
    )


def check_per_sample_loss(loss: Any, output: torch.Tensor, likelihood: str) -> torch.Tensor:
    """Return ``loss`` as shape ``(N,)`` when it holds one value per sample (shape ``(N,)``,
    ``(N, 1, ...)``, or a scalar for ``N = 1``, for ``output`` of shape ``(N, ...)``), else
    raise ValueError.

    A likelihood's ``nll`` is summed over the batch where natgrad differentiates a whole
    batch at once (the capture path's output gradients) and read one sample at a time
    elsewhere, so a batch mean (a scalar) would make the engines disagree by ``1/N²``
    without an error. A shape check only: no host sync, fine under ``vmap``.
    """
    n = output.shape[0] if output.dim() else None
    if isinstance(loss, torch.Tensor) and n is not None:
        if tuple(loss.shape) == (n,):
            return loss
        # one value per sample in another layout: (N, 1) from a keepdim sum, or a scalar
        # for a batch of one (an nll that squeezes)
        if loss.numel() == n and (loss.dim() == 0 or loss.shape[0] == n):
            return loss.reshape(n)
    got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
    raise ValueError(
        f"The {likelihood} likelihood's nll(output, target) returned {got} for an output "
        f"of shape {tuple(output.shape)}; it must return one negative log-likelihood per "
        f"sample, shape ({n},): natgrad sums it over a batch for the output gradients, so "
        "a batch mean (.mean() or reduction='mean') gives a Fisher N² too small. Sum over "
        "each sample's own outputs instead, e.g. ((f - y) ** 2).sum(-1), or "
        "F.cross_entropy(f, y, reduction='none')."
    )


def check_finite_per_sample(
    grads: Mapping[str, torch.Tensor], inputs: Iterable[Any] = ()
) -> None:
    """Raise FloatingPointError naming the first parameter and sample whose per-sample
    gradient holds NaN or Inf (``grads[k]`` has the samples on its first axis).

    ``inputs``: the batch's tensors, to say whether that sample's inputs are non-finite.
    One reduction per parameter; the culprit is located only on failure.
    """
    for name, g in grads.items():
        if g.numel() == 0 or bool(torch.isfinite(g.sum())):
            continue
        bad = ~torch.isfinite(g).flatten(1).all(1)
        if not bool(bad.any()):
            continue  # the sum overflowed, the entries are finite
        i, n = int(bad.nonzero()[0, 0]), g.shape[0]
        own = [
            t[i]
            for t in inputs
            if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == n
            and (t.is_floating_point() or t.is_complex())
        ]
        if any(not bool(torch.isfinite(t).all()) for t in own):
            cause = f"sample {i}'s inputs hold NaN or Inf: clean or drop it."
        else:
            cause = (
                f"sample {i}'s inputs are finite: check the model's outputs for overflow, "
                "the targets, and whether training diverged."
            )
        raise FloatingPointError(
            f"Non-finite per-sample gradients (NaN or Inf) for parameter {name!r}: first at "
            f"sample {i} of {n} ({int(bad.sum())} bad sample(s)); {cause}"
        )


# -- Fishers -------------------------------------------------------------------------------


def check_fisher_type(fisher: Any, what: str = "fisher") -> Mapping[str, torch.Tensor]:
    """Return ``fisher`` if it is a mapping ``{parameter name: tensor}`` (a DiagonalFisher
    or a plain dict); raise TypeError naming what came instead."""
    if isinstance(fisher, Mapping):
        for k, v in fisher.items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(
                    f"{what}[{k!r}] is a {type(v).__name__}, not a tensor: a Fisher maps "
                    "parameter names to tensors; convert with torch.tensor(...) or pass a "
                    "DiagonalFisher from natgrad.estimate_fisher."
                )
        return fisher
    got = type(fisher).__name__
    if isinstance(fisher, (list, tuple)):
        got = f"a {got} of {len(fisher)} item(s)"
        fix = "pass one Fisher (e.g. fishers[0]), not a list"
    elif callable(getattr(fisher, "diagonal", None)) and hasattr(fisher, "n_samples"):
        fix = (  # a structured natgrad.Curvature
            "this function takes a diagonal Fisher: pass its diagonal, "
            "natgrad.DiagonalFisher(c.diagonal(), c.n_samples, labels=c.labels, "
            "likelihood=c.likelihood) (EWC, obs_prune, "
            "fisher_weighted_merge, fisher_uncertainty and fisher_weighted_damage take "
            "any curvature as it is)"
        )
    else:
        fix = "estimate one with natgrad.estimate_fisher(model, data)"
    raise TypeError(
        f"{what} must be a DiagonalFisher or a dict {{parameter name: tensor}}, got {got}; "
        f"{fix}."
    )


# -- collections of models, batches and Fishers -----------------------------------------------


def check_model_to_match(model: Any, what: str) -> None:
    """Raise TypeError unless ``model`` is None or an ``nn.Module`` to check a loaded
    object's names and shapes against (a meta-device model is fine: only the shapes are
    read). ``what`` names the call, e.g. ``"DiagonalFisher.load's model"``; the usual
    mistake is a device in the model's place."""
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(
            f"{what} must be the nn.Module to check against, got {type(model).__name__}; "
            "pass a device as device=..."
        )


def check_model_list(
    models: Any, what: str = "models", *, non_empty: bool = False
) -> Sequence[Any]:
    """Return ``models`` as a list of ``nn.Module`` (each checked by :func:`check_model`);
    a bare module is refused with the fix, and so is an empty list when ``non_empty``.

    Raises:
        TypeError: a bare module, something other than a list or tuple, or an entry that
            is not an ``nn.Module`` (named by its index).
        ValueError: an empty list when ``non_empty``; an entry on the meta device.
    """
    if isinstance(models, nn.Module):
        raise TypeError(
            f"{what} must be a list of models, got a single {type(models).__name__}: "
            f"pass {what}=[model]."
        )
    if not isinstance(models, (list, tuple)):
        raise TypeError(
            f"{what} must be a list of nn.Module, got {type(models).__name__}: pass a list "
            f"(e.g. list({what}))."
        )
    if non_empty and not models:
        raise ValueError(f"{what} is empty: pass at least one model.")
    for i, m in enumerate(models):
        check_model(m, f"{what}[{i}]")
    return models


def check_batch_list(batches: Any, what: str = "batches") -> Sequence[Any]:
    """Return ``batches`` as a list of batches; one batch given bare (``(x, y)``, a tensor
    or a dict) is refused, since its items would be read as separate batches."""
    single = isinstance(batches, (torch.Tensor, Mapping)) or (
        isinstance(batches, tuple)
        and 0 < len(batches) <= 2
        and all(isinstance(t, torch.Tensor) for t in batches)
    )
    if single:
        shown = "(x, y)" if isinstance(batches, tuple) and len(batches) == 2 else "batch"
        raise TypeError(
            f"{what} must be a list of batches (one per task), got one batch "
            f"({type(batches).__name__}): wrap it in a list: {what}=[{shown}]."
        )
    if not isinstance(batches, (list, tuple)):
        raise TypeError(
            f"{what} must be a list of batches, got {type(batches).__name__}; pass "
            f"{what}=[batch_task_0, batch_task_1, ...] (a DataLoader: list(islice(loader, k)))."
        )
    return batches


def check_fishers_by_task(fisher: Any, what: str = "fisher") -> Mapping[Any, Any]:
    """Return ``fisher`` if it maps task names to Fishers; one Fisher given bare is refused."""
    if not isinstance(fisher, Mapping):
        raise TypeError(
            f"{what} must be a dict {{task name: DiagonalFisher}}, got {type(fisher).__name__}."
        )
    if fisher and all(isinstance(v, torch.Tensor) for v in fisher.values()):
        raise TypeError(
            f"{what} must map task names to Fishers, but its values are tensors (one Fisher "
            f"by parameter name): pass {what}={{'task_0': F}}."
        )
    for task, f in fisher.items():
        check_fisher_type(f, f"{what}[{task!r}]")
    return fisher


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


def check_all_finite(
    tensors: Mapping[str, torch.Tensor], what: str, hint: str, *, nonneg: bool = False
) -> None:
    """Raise FloatingPointError naming the first tensor of ``tensors`` with NaN or Inf.

    One sum per tensor, their total and one host sync per device: a NaN or Inf entry
    makes its tensor's sum and the total NaN or Inf (``inf - inf`` is NaN). The culprit
    (name, index, value, count) is located only when a total is not finite (a total
    that merely overflows finds no culprit and passes). With ``nonneg`` (tensors whose
    entries are ``>= 0``, ``+inf`` or NaN by construction, as sums of squares are) the
    largest entry decides instead, in one ``torch._foreach_max`` call where torch has it:
    NaN propagates through the maximum and ``+inf`` is it, and a maximum never overflows.

    Args:
        tensors: ``{name: tensor}``.
        what: the message's noun before the name, e.g. ``"the gradient (.grad) of parameter"``.
        hint: how to fix it.
        nonneg: the entries are ``>= 0`` unless NaN or ``+inf`` (never ``-inf``).
    """
    items = {k: v for k, v in tensors.items() if v.is_floating_point() and v.numel()}
    if not items:
        return
    with torch.no_grad():  # one reduction per tensor, one host sync per device
        if nonneg and _FOREACH_MAX is not None:  # one call per device (a split model)
            groups = _by_device(items.values())
            if all(math.isfinite(torch.stack(_FOREACH_MAX(g)).max()) for g in groups.values()):
                return
        else:
            by_device = _by_device(v.sum() for v in items.values())
            if all(math.isfinite(torch.stack(s).sum()) for s in by_device.values()):
                return
    for k, v in items.items():
        bad = ~torch.isfinite(v.detach())
        if bool(bad.any()):
            idx, val, count = _first(bad, v)
            raise FloatingPointError(
                f"Non-finite values (NaN or Inf) in {what} {k!r}: {val} at index {idx} "
                f"({count} of {v.numel()} entries). {hint}"
            )


# torch >= 2.5: the maxima of a list of tensors in one call (None before)
_FOREACH_MAX = getattr(torch, "_foreach_max", None)


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
        bad = ~torch.isfinite(v.detach())
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


def check_output_rows(output: torch.Tensor, rows: int, *, probe: bool = False, hint: str = "") -> None:
    """Raise ValueError unless the model's output has one row per sample.

    Every likelihood reads row ``n`` of the output as sample ``n``'s: an output of
    ``N·T`` rows (a token classifier's ``logits.view(-1, C)``) would pair each label
    with another sample's row, or spread one sample's labels over several rows,
    without an error from the likelihood's arithmetic.

    Args:
        output: the model's output (after ``output_fn``).
        rows: the number of samples it was computed on.
        probe: the output is of one sample (natgrad's probe of the batch's first).
        hint: a further sentence for the message (e.g. about shared inputs).

    Raises:
        ValueError: ``output`` is 0-d or its first dimension is not ``rows``.
    """
    if output.dim() > 0 and output.shape[0] == rows:
        return
    on = "one sample (the batch's first)" if probe else f"a batch of {rows} samples"
    got = "no batch dimension" if output.dim() == 0 else f"{output.shape[0]} rows"
    raise ValueError(
        f"The model's output on {on} has shape {tuple(output.shape)}: {got}, but natgrad "
        "needs one output row per sample (its first dimension is the batch size N). A "
        "token classifier returning logits.view(-1, C) should return logits of shape "
        "(N, T, C) with likelihood='token_categorical'; otherwise pass output_fn=... that "
        f"returns one row per sample.{hint}"
    )


def torch_func_refusal(exc: BaseException, params: Iterable[str]) -> RuntimeError | None:
    """A named error for what ``torch.func`` cannot differentiate in a model, else None.

    natgrad's per-sample gradients outside the capture path come from
    ``torch.func.vjp``, which refuses three things a model may use: the autograd.Function
    of ``torch.utils.checkpoint(..., use_reentrant=True)`` (an old-style Function
    without ``setup_context``), any other custom ``torch.autograd.Function`` without
    ``setup_context`` (its ``forward`` takes ``ctx``), and saved-tensor hooks
    (``use_reentrant=False``, or ``torch.autograd.graph.saved_tensors_hooks``). torch's
    own message names neither the cause nor what works.

    Args:
        exc: the error the per-sample loop raised.
        params: the parameters left to ``torch.func`` (named in the message).

    Returns:
        The error to raise from ``exc``, or None when it is neither case.
    """
    msg = str(exc)
    names = _short(list(params))
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_filename.replace("\\", "/"))
        tb = tb.tb_next
    checkpointed = any(f.endswith("torch/utils/checkpoint.py") for f in frames)
    if "setup_context" in msg and not checkpointed:
        name = _custom_function(exc)
        return RuntimeError(
            f"The model calls a custom torch.autograd.Function{f' ({name})' if name else ''} "
            "without a setup_context staticmethod, which torch.func cannot differentiate "
            f"(natgrad's per-sample gradients of {names} come from torch.func: "
            "engine='vmap', or parameters outside the layers the capture path covers). "
            "Use engine='auto' where the Function's parameters belong to nn.Linear, Conv, "
            "Embedding or norm layers (the capture path differentiates the batched forward "
            "with ordinary autograd), or give the Function torch.func support: a forward "
            "without ctx, a setup_context(ctx, inputs, output) staticmethod, and "
            "generate_vmap_rule = True (or a vmap staticmethod); see "
            "https://pytorch.org/docs/stable/notes/extending.func.html."
        )
    if "setup_context" in msg and checkpointed:
        return RuntimeError(
            "The model calls torch.utils.checkpoint with use_reentrant=True, whose "
            "autograd.Function torch.func cannot differentiate (natgrad's per-sample "
            f"gradients of {names} come from torch.func). Use use_reentrant=False with "
            "engine='auto' (the capture path, which handles checkpointed Linear, Conv, "
            "Embedding and norm layers), or turn checkpointing off while estimating."
        )
    if "saved tensor hooks" in msg:
        cause = (
            "torch.utils.checkpoint (use_reentrant=False)" if checkpointed
            else "saved-tensor hooks (torch.autograd.graph.saved_tensors_hooks)"
        )
        return RuntimeError(
            f"The model runs {cause}, which torch.func cannot differentiate through, and "
            f"natgrad's per-sample gradients of {names} come from torch.func (engine='vmap', "
            "or parameters outside the layers the capture path covers). Use engine='auto' "
            "with use_reentrant=False, whose capture path handles checkpointed Linear, "
            "Conv, Embedding and norm layers; or turn checkpointing off while estimating."
        )
    return None


def _custom_function(exc: BaseException) -> str | None:
    """The name of the custom ``torch.autograd.Function`` whose ``apply`` raised ``exc``
    (read from the traceback's ``Function.apply`` frame), else None."""
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        where = frame.f_code.co_filename.replace("\\", "/")
        if frame.f_code.co_name == "apply" and where.endswith("torch/autograd/function.py"):
            cls = frame.f_locals.get("cls")
            if isinstance(cls, type):
                return f"{cls.__module__}.{cls.__qualname__}"
        tb = tb.tb_next
    return None
