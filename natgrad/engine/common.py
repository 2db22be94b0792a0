"""Small helpers shared across layers: accumulation dtype, module names, eval-mode passes."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
from collections.abc import Callable, Iterator
from typing import Any, ParamSpec, TypeVar

import torch
from torch import nn


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for ``dtype``: float64 stays float64, all else is float32.

    Example:
        >>> acc_dtype(torch.bfloat16), acc_dtype(torch.float64)
        (torch.float32, torch.float64)
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def model_acc_dtype(model: nn.Module) -> torch.dtype:
    """The accumulation dtype of a model's results: float64 when any of its parameters is
    float64 (a float64 head on a float32 body gives float64 outputs), else float32.

    Example:
        >>> model_acc_dtype(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1).double()))
        torch.float64
    """
    wide = any(p.dtype == torch.float64 for p in model.parameters())
    return torch.float64 if wide else torch.float32


def psd_solve(a: torch.Tensor, b: torch.Tensor, *, singular: bool = False) -> torch.Tensor:
    """``x`` with ``a x = b`` for a symmetric positive semi-definite ``a`` (batched).

    ``singular=False`` (a ridge makes ``a`` positive definite): Cholesky, or the
    pseudo-inverse below if Cholesky fails. ``singular=True`` (no ridge: ``a`` may be
    singular): the minimum-norm least-squares solution ``a⁺ b`` from the symmetric
    pseudo-inverse (eigenvalues below ``d·eps·max`` count as zero). Neither is left to
    rounding: ``torch.linalg.lstsq``'s default CPU driver ``gelsy`` returned solutions
    off the optimum on rank-deficient systems (15-19% residuals), and rounding lets
    Cholesky finish on a numerically singular matrix with a solve far from the
    minimum-norm one (up to 25x); a pivot threshold, tried instead, sent well-posed
    float32 systems to the pseudo-inverse, which then dropped real components.

    Example:
        >>> a = torch.tensor([[1.0, 1.0], [1.0, 1.0]])  # rank 1
        >>> psd_solve(a, torch.tensor([[2.0], [2.0]]), singular=True).flatten()
        tensor([1.0000, 1.0000])
    """
    if not singular:
        chol, info = torch.linalg.cholesky_ex(a)
        if not bool((info != 0).any()):
            return torch.cholesky_solve(b, chol)
    sol: torch.Tensor = torch.linalg.pinv(a, hermitian=True) @ b
    return sol


def callable_digest(fn: Any) -> str | None:
    """What identifies a user function across runs: its qualified name and the SHA-256 of
    its code (bytecode, names and constants, nested functions' code included); None for
    None. A closure's captured values are not read (two closures of one ``def`` that
    differ only there look the same).

    Example:
        >>> callable_digest(lambda o: o * 2) == callable_digest(lambda o: o * 3)
        False
    """
    if fn is None:
        return None
    target = fn if hasattr(fn, "__code__") else type(fn).__call__
    code = getattr(target, "__code__", None)
    name = getattr(fn, "__qualname__", type(fn).__qualname__)
    if code is None:
        return str(name)
    h = hashlib.sha256()
    _feed_code(h, code)
    return f"{name}:{h.hexdigest()}"


def _feed_code(h: Any, code: Any) -> None:
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    for c in code.co_consts:
        if hasattr(c, "co_code"):  # a nested function's code (its repr has an address)
            _feed_code(h, c)
        else:
            h.update(repr(c).encode())


def to_acc(t: torch.Tensor) -> torch.Tensor:
    """``t`` in its accumulation dtype (see :func:`acc_dtype`); no copy when already there."""
    dtype = acc_dtype(t.dtype)
    return t if t.dtype == dtype else t.to(dtype)


def mix(a: torch.Tensor, b: torch.Tensor, w: float) -> torch.Tensor:
    """``(1 - w)·a + w·b`` as ``torch.lerp`` in the two dtypes' promoted dtype, on ``a``'s
    device: a new tensor rounded as the in-place ``a.lerp_(b, w)`` of an EMA is, so an
    average taken out of place equals the same average taken in place (when ``a`` and
    ``b`` share a dtype; the in-place one keeps ``a``'s)."""
    dt = torch.promote_types(a.dtype, b.dtype)
    return torch.lerp(a.to(dt), b.to(a.device, dt), w)


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode (dropout off, BatchNorm frozen) and restore each
    submodule's own ``training`` flag afterwards, even on error.

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
        >>> with evaluating(m):
        ...     m[1].training
        False
        >>> m[1].training
        True
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def module_of(name: str) -> str:
    """The module part of a parameter name: everything before the last dot.

    Example:
        >>> module_of("encoder.0.weight"), module_of("scale")
        ('encoder.0', 'scale')
    """
    return name.rsplit(".", 1)[0] if "." in name else name


def vjp_pair(
    func: Callable[..., Any], *primals: Any
) -> tuple[Any, Callable[..., tuple[Any, ...]]]:
    """``torch.func.vjp(func, *primals)`` without ``has_aux``: ``(output, pullback)``.

    ``torch.func.vjp`` is annotated as returning a pair or a triple (the triple only with
    ``has_aux=True``); this names the pair, so callers unpack it with a checked type.
    """
    res = torch.func.vjp(func, *primals)
    return res[0], res[1]


_INTERNAL: contextvars.ContextVar[bool] = contextvars.ContextVar("natgrad_internal", default=False)


@contextlib.contextmanager
def internal_pass() -> Iterator[None]:
    """Mark the model calls inside as natgrad's own (probes, capture and ``vmap`` passes):
    a :class:`~natgrad.FisherPreconditioner` recording the user's passes
    (``source="backward"``) leaves them out."""
    token = _INTERNAL.set(True)
    try:
        yield
    finally:
        _INTERNAL.reset(token)


def in_internal_pass() -> bool:
    """Whether the current model call is one of natgrad's own (see :func:`internal_pass`)."""
    return _INTERNAL.get()


def current_backward_id() -> int:
    """Autograd's id of the backward running now, ``-1`` outside any backward (e.g. a
    checkpointed segment recomputed inside one shows its id). torch exposes this only
    through the private ``_current_graph_task_id``; without it the answer is ``-1``."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return -1 if task_id is None else int(task_id())


def module_list(model: nn.Module) -> list[nn.Module]:
    """``list(model.modules())``: every module of ``model`` once, in the same order (depth
    first, children in registration order, a shared module where it is first reached),
    without the qualified names that ``named_modules`` builds on the way (a per-call
    walk of the Fisher's checks and its remembered split)."""
    out: list[nn.Module] = []
    seen: set[int] = set()
    stack = [model]
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        out.append(m)
        children = [c for c in m._modules.values() if c is not None]
        children.reverse()
        stack += children
    return out


def global_forward_hooks() -> dict[int, Any]:
    """The forward hooks registered for every module
    (``torch.nn.modules.module.register_module_forward_hook``), by handle id. They run
    before any module's own hooks, so no hook can read a layer's own output under them."""
    hooks: dict[int, Any] = getattr(nn.modules.module, "_global_forward_hooks", {})
    return hooks


_P = ParamSpec("_P")
_R = TypeVar("_R")


def with_autograd(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """``fn`` run with ``torch.inference_mode`` off (``torch.inference_mode(False)``).

    natgrad differentiates the model, which inference mode forbids: tensors made under
    it cannot be saved for backward. Its entry points are wrapped in this, so that a
    call inside ``with torch.inference_mode():`` (an evaluation loop) works; what they
    return are ordinary tensors.

    Args:
        fn: the function to wrap.

    Returns:
        ``fn`` with the same signature, run with inference mode off.
    """

    @functools.wraps(fn)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        if not torch.is_inference_mode_enabled():  # off already: nothing to switch
            return fn(*args, **kwargs)
        with torch.inference_mode(False):
            return fn(*args, **kwargs)

    return run
