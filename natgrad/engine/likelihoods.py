"""Likelihoods: per-sample negative log-likelihoods, label samplers and exact Fisher factors.

A likelihood turns model outputs ``f`` into a per-sample loss
``l_n = -log p(y_n | f(x_n))`` (summed over all outputs of that sample) and knows
three ways to pick the label ``y`` that the Fisher averages over:

* ``empirical``: the data's own labels;
* ``mc``: labels drawn from the predictive ``p(y | f)``;
* ``exact``: the expectation in closed form. For an output-space Fisher
  ``Λ(f) = E_y[∇_f l ∇_f lᵀ]`` with symmetric factor ``Λ = Σ_j s_j s_jᵀ``, the
  diagonal parameter Fisher is ``Σ_j (J_nᵀ s_j)²``; :meth:`Likelihood.factor_columns`
  returns the ``s_j``.

Example:
    >>> import torch
    >>> lik = get_likelihood("categorical")
    >>> logits = torch.tensor([[2.0, 0.0]])
    >>> lik.nll(logits, torch.tensor([0])).round(decimals=4)
    tensor([0.1269])
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, overload

import torch
import torch.nn.functional as F

from natgrad.engine.checks import (
    check_choice,
    check_class_labels,
    check_finite,
    check_finite_target,
    check_not_probabilities,
    check_not_sigmoid_outputs,
    check_output_rows,
    check_per_sample_loss,
    check_positive,
    check_several_classes,
    check_softmax_logits,
    check_unit_interval,
    integer_labels,
)
from natgrad.engine.common import callable_digest, to_acc

__all__ = [
    "Likelihood",
    "Categorical",
    "Gaussian",
    "Bernoulli",
    "TokenCategorical",
    "IGNORE_INDEX",
    "CustomLikelihood",
    "get_likelihood",
    "LIKELIHOOD_NAMES",
    "inverse_cdf_draws",
]


class Likelihood(ABC):
    """Base class. Outputs and targets carry a leading batch dimension ``N``.

    Subclasses implement :meth:`nll` and :meth:`sample`; :meth:`output_grad` defaults
    to autograd; :meth:`factor_columns` is needed only for ``labels="exact"``.
    """

    name = "likelihood"

    @abstractmethod
    def nll(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample negative log-likelihood, shape ``(N,)``."""

    @abstractmethod
    def sample(
        self, output: torch.Tensor, generator: torch.Generator, k: int, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``k`` label draws from the predictive, shape ``(k, N, ...)``."""

    def output_grad(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``∇_f l_n`` for every sample, same shape as ``output``: the gradient of
        ``Σ_n l_n``, exact per sample because ``l_n`` reads only sample ``n``'s outputs
        (:meth:`nll` must return shape ``(N,)``; a batch mean raises)."""

        def total(o: torch.Tensor) -> torch.Tensor:
            return check_per_sample_loss(self.nll(o, target), o, self.name).sum()

        with torch.enable_grad():
            grad: torch.Tensor = torch.func.grad(total)(output)
            return grad

    def num_factor_columns(self, output: torch.Tensor) -> int:
        """Number ``K`` of symmetric-factor columns of the output Fisher per sample."""
        raise ValueError(
            f"The {self.name!r} likelihood has no closed-form expectation, so "
            "labels='exact' is unavailable; use labels='mc' (with mc_samples=k) instead."
        )

    def factor_columns(
        self, output: torch.Tensor, start: int, stop: int, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Columns ``s_start..s_stop-1`` of ``Λ(f) = Σ_j s_j s_jᵀ``, shape ``(k, *output.shape)``."""
        raise ValueError(
            f"The {self.name!r} likelihood has no closed-form expectation; use labels='mc'."
        )

    def check_target(self, output: torch.Tensor, target: torch.Tensor) -> None:
        """Raise a ValueError when the target does not fit the output (default: any fits).

        ``target`` is the whole batch's; ``output`` may hold only the first sample's
        outputs (natgrad probes one sample before ``vmap``): compare trailing dimensions.
        """
        return None

    def check_drawable(self, output: torch.Tensor, hint: str) -> None:
        """Raise FloatingPointError when labels cannot be drawn at ``output`` (default: any
        NaN or Inf; the softmax likelihoods allow ``-inf`` logits, see
        :func:`natgrad.engine.checks.check_softmax_logits`). ``hint`` ends the message."""
        check_finite("the model's outputs", output, hint)

    def check_output(self, output: torch.Tensor) -> None:
        """Raise a ValueError when the model's output cannot be this likelihood's (default:
        any can); the paths without labels (``labels="mc"`` / ``"exact"``, the Laplace
        predictive) call it, :meth:`check_target` covers the ones with labels."""
        return None

    def prepare_target(
        self, output: torch.Tensor, target: torch.Tensor, *, rows: int | None = None
    ) -> torch.Tensor:
        """Validate the whole target once, before any ``vmap``, and return it in the dtype
        :meth:`nll` expects.

        Checks that ``output`` has one row per sample (``rows`` of them: natgrad passes
        ``rows=1`` for its probe of the first sample; by default one per label, so an
        ``(N·T, C)`` output with ``N`` labels is refused), then runs :meth:`check_target`
        (shape, dtype and support of this likelihood), then, for floating targets,
        refuses NaN/Inf, naming the first bad sample. Every path that hands a batch's
        target to a likelihood calls this first.

        Args:
            output: the model's outputs, of the whole batch or of its first ``rows``
                samples.
            target: the whole batch's labels, ``(N, ...)``.
            rows: the number of samples ``output`` holds (default: ``N``).

        Returns:
            ``target`` in the dtype :meth:`nll` reads.

        Raises:
            ValueError: an output without one row per sample, or a target that does not
                fit ``output`` or the likelihood's support.
        """
        if target.dim() == 0:
            raise ValueError(
                f"The {self.name} labels are a 0-d tensor ({target.dtype}); labels need "
                "the batch dimension N first, one entry per sample."
            )
        check_output_rows(output, target.shape[0] if rows is None else rows, probe=rows == 1)
        self.check_target(output, target)
        check_finite_target(target, self.name)
        return target

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _softmax_factor(p: torch.Tensor, onehot: torch.Tensor, pc: torch.Tensor) -> torch.Tensor:
    """Columns ``s_c`` (``c < C - 1``) of a rank-``(C - 1)`` factor of ``diag(p) - p pᵀ``
    along the last axis: ``Σ_{c<C-1} s_c s_cᵀ = diag(p) - p pᵀ`` exactly.

    With ``q = √p``, ``diag(p) - p pᵀ = D (I - q qᵀ) D`` for ``D = diag(q)``, and the
    Householder reflection ``R`` that swaps ``q`` and the last basis vector ``e_K``
    (``K = C - 1``) gives ``I - q qᵀ = Σ_{c<K} R e_c (R e_c)ᵀ``; so
    ``s_c = D R e_c = q_c (e_c - κ p̃ + q_K e_K)`` with ``p̃`` = ``p`` with its last entry
    zeroed and ``κ = (1 + q_K) / Σ_{j<K} p_j`` (``1 - p_K`` summed, not subtracted;
    ``κ p_j <= 2``). One column fewer than the one-hot factor ``√p_c (e_c - p)``, with the
    same matrix. The callers put each row's most probable class last
    (:func:`_most_probable_last`): ``s_c``'s own entry ``q_c (1 - κ p_c)`` would lose its
    digits to cancellation for a confident class ``c < K``.

    Args:
        p: probabilities ``(..., C)``.
        onehot: ``e_c``, broadcastable against ``p``.
        pc: ``p_c`` (times any per-row weight), broadcastable against ``p[..., :1]``.
    """
    q = p.sqrt()
    qk = q[..., -1:]
    rest = p[..., :-1].sum(-1, keepdim=True)  # 1 - p_K, accurately
    # rest = 0 (every other class underflowed): a finite κ times p̃ = 0 gives zero columns
    kappa = (1 + qk) / rest.clamp_min(torch.finfo(p.dtype).tiny)
    base = torch.cat([-kappa * p[..., :-1], qk], -1)  # -κ p̃ + q_K e_K (no in-place: vmap)
    return pc.sqrt() * (onehot + base)


def _most_probable_last(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``p`` with each row's most probable class swapped into the last slot, and the
    swap ``perm`` (its own inverse: ``x.gather(-1, perm)`` undoes it).

    :func:`_softmax_factor` loses ``s_c``'s ``c``-th entry ``q_c (1 - κ p_c)`` to
    cancellation when a class ``c`` other than the last holds nearly all the mass
    (``κ p_c ≈ 1``); with the most probable class last, ``1 - p_c >= p_K >= 1/C`` for
    every other ``c``, so no entry of ``diag(p) - p pᵀ`` is a small difference.
    """
    C = p.shape[-1]
    ar = torch.arange(C, device=p.device)
    k = p.argmax(-1, keepdim=True)
    perm = torch.where(ar == k, C - 1, torch.where(ar == C - 1, k, ar))
    return p.gather(-1, perm), perm


# Rows of the inverse-CDF sampler's float64 cumulative sums held at once (16 MiB).
#: the label value token losses leave out (padding, special tokens), as torch's
#: ``cross_entropy`` and Hugging Face models do by default
IGNORE_INDEX = -100

_CDF_FLOATS = 2**21


def inverse_cdf_draws(logits: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` draws per row from ``softmax(logits)`` along the last axis, shape ``(R, k)``
    for logits ``(R, C)``, by inversion of the cumulative distribution.

    For each row, ``q_c = exp(f_c - max f)`` (in the logits' accumulation dtype) and its
    cumulative sums ``S_c = Σ_{c' <= c} q_c'`` (float64) are formed; a uniform
    ``u ~ U[0, 1)`` (float64, ``k`` per row, drawn from ``generator`` row by row) picks
    ``c = min{c : S_c > u S_C}``, so ``P(c) = q_c / S_C = softmax(f)_c`` up to the float64
    rounding of ``S`` and the 2⁻⁵³ resolution of ``u``. Classes with ``q_c = 0`` are never
    drawn. The sums are formed a block of rows at a time (at most ``2²¹`` floats), so
    the cost is one exponential and one cumulative sum per logit, about a sixth of
    ``torch.multinomial``'s, which draws one exponential variate per logit. The draws
    for a seeded ``generator`` are reproducible, but differ from ``torch.multinomial``'s.

    Args:
        logits: ``(R, C)`` finite logits.
        k: draws per row.
        generator: the source of the uniforms (a CPU generator; they are moved to the
            logits' device).

    Returns:
        ``(R, k)`` int64 class indices on the logits' device.

    Raises:
        ValueError: a row of logits holds NaN or Inf.
    """
    rows, c = logits.shape
    u = torch.rand(
        (rows, k), dtype=torch.float64, generator=generator, device=generator.device
    ).to(logits.device)
    step = max(1, _CDF_FLOATS // max(c, 1))
    out = torch.empty((rows, k), dtype=torch.long, device=logits.device)
    finite = torch.ones((), dtype=torch.bool, device=logits.device)  # one host sync, at the end
    for s in range(0, rows, step):
        f = to_acc(logits[s : s + step])
        q = (f - f.amax(-1, keepdim=True)).exp_()
        cdf = torch.cumsum(q, -1, dtype=torch.float64)
        total = cdf[:, -1:].contiguous()
        finite &= torch.isfinite(total).all()
        idx = torch.searchsorted(cdf, u[s : s + step] * total, right=True)
        # u * total can round up to total (probability ~2⁻⁵³): take the last class of
        # positive mass then, the first whose cumulative sum reaches the total.
        last = torch.searchsorted(cdf, total, right=False)
        out[s : s + step] = torch.minimum(idx, last)
    if not bool(finite):
        raise ValueError(
            "Cannot draw labels from non-finite logits (NaN or Inf): check the inputs "
            "and whether training diverged."
        )
    return out


def _minus_onehot(p: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``p - onehot(labels)`` along the last axis, without forming the one-hot tensor."""
    src = torch.full_like(labels, -1, dtype=p.dtype).unsqueeze(-1)
    return p.scatter_add(-1, labels.unsqueeze(-1), src)


class _Softmax(Likelihood):
    """What the softmax likelihoods (:class:`Categorical`, :class:`TokenCategorical`)
    share: integer labels, and logits whose softmax is defined."""

    def check_drawable(self, output: torch.Tensor, hint: str) -> None:
        """Logits whose softmax is defined at every row: ``-inf`` entries (masked classes,
        banned tokens) are fine."""
        check_softmax_logits("the model's outputs", output, hint)

    def prepare_target(
        self, output: torch.Tensor, target: torch.Tensor, *, rows: int | None = None
    ) -> torch.Tensor:
        """Integer labels of any width are cast to int64 (exact); float/bool labels raise."""
        return super().prepare_target(output, integer_labels(target, self.name), rows=rows)


class Categorical(_Softmax):
    """Softmax over logits of shape ``(N, C)``; ``l_n = -log softmax(f_n)[y_n]``.

    Exact Fisher: ``F = Σ_c p_c g_c g_cᵀ`` with ``g_c = ∇θ(-log p_c)`` (``g_c = Jᵀ(p - e_c)``),
    that is ``Jᵀ (diag(p) - p pᵀ) J``, via a rank-``(C - 1)`` factor of ``diag(p) - p pᵀ``
    (``C - 1`` vector-Jacobian products per sample, not ``C``; see ``_softmax_factor``).
    """

    name = "categorical"

    def check_target(self, output: torch.Tensor, target: torch.Tensor) -> None:
        """Logits ``(N, C)``; labels ``(N,)`` in ``[0, C)``."""
        if output.dim() != 2:
            raise ValueError(
                f"categorical likelihood expects logits of shape (N, C), got "
                f"{tuple(output.shape)}; for sequences use likelihood='token_categorical' "
                "(labels aligned with the logits: token classification) or "
                "natgrad.TokenCategorical(shift=True) (causal language models, whose labels "
                "are the input ids: position t predicts token t + 1)."
            )
        check_several_classes(output, self.name)
        if target.dim() != 1 or target.is_floating_point() or target.dtype == torch.bool:
            integer = not target.is_floating_point() and target.dtype != torch.bool
            if integer and target.dim() == 2 and target.shape[1] == 1:
                fix = "flatten them with y.view(-1)"
            elif integer and target.dim() == 2 and target.shape[1] == output.shape[1]:
                fix = "for one-hot or multi-hot labels use y.argmax(-1) or likelihood='bernoulli'"
            else:
                fix = "convert with y.long() (for one-hot labels: y.argmax(-1))"
            raise ValueError(
                f"categorical labels must be integer class indices of shape (N,) = "
                f"({target.shape[0]},), got {target.dtype} of shape {tuple(target.shape)}; "
                f"{fix}."
            )
        check_class_labels(target, output.shape[-1], self.name, logits=output)

    def check_output(self, output: torch.Tensor) -> None:
        """Logits of ``C >= 2`` classes (:func:`natgrad.engine.checks.check_several_classes`),
        not probabilities (:func:`natgrad.engine.checks.check_not_probabilities`)."""
        check_several_classes(output, self.name)
        check_not_probabilities(output, self.name)

    def nll(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(to_acc(output), target, reduction="none")

    def output_grad(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return _minus_onehot(to_acc(output).softmax(-1), target)

    def sample(
        self, output: torch.Tensor, generator: torch.Generator, k: int, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        # drawn where the generator lives (a CUDA generator draws on its device)
        p = to_acc(output.detach()).softmax(-1).to(generator.device)
        draws = torch.multinomial(p, k, replacement=True, generator=generator)  # (N, k)
        return draws.t().contiguous().to(output.device)

    def num_factor_columns(self, output: torch.Tensor) -> int:
        return max(output.shape[-1] - 1, 1)

    def factor_columns(
        self, output: torch.Tensor, start: int, stop: int, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        p = to_acc(output.detach()).softmax(-1)
        C = p.shape[-1]
        if C == 1:  # one class: p = 1 and diag(p) - p pᵀ = 0
            return torch.zeros(stop - start, *p.shape, dtype=p.dtype, device=p.device)
        p, perm = _most_probable_last(p)
        classes = torch.arange(start, stop, device=p.device)
        lead = (len(classes),) + (1,) * (p.dim() - 1)
        onehot = F.one_hot(classes, C).to(p.dtype).view(*lead, C)
        pc = p[..., start:stop].movedim(-1, 0).unsqueeze(-1)  # (k, ..., 1)
        S = _softmax_factor(p, onehot, pc)
        return S.gather(-1, perm.expand_as(S))


class Gaussian(Likelihood):
    """Gaussian with known ``sigma``: ``l_n = Σ_d [(y_nd - f_nd)² / (2σ²) + log(σ√(2π))]``.

    Exact Fisher: ``Λ = I / σ²``, factor columns ``e_d / σ``.
    """

    name = "gaussian"

    def __init__(self, sigma: float = 1.0):
        if isinstance(sigma, torch.Tensor) and (sigma.requires_grad or sigma.numel() != 1):
            what = "requires grad (a learned σ)" if sigma.requires_grad else (
                f"has {sigma.numel()} entries (a σ per output)")
            raise ValueError(
                f"Gaussian(sigma=...) takes one known σ, a number, but the tensor given "
                f"{what}: natgrad would read its current value once and keep it fixed. For a "
                "learned or per-output σ write the likelihood out, e.g. "
                "natgrad.CustomLikelihood(lambda f, y: (0.5 * ((y - f) / sigma) ** 2 + "
                "sigma.log()).flatten(1).sum(1), sampler=...), with sigma.detach() if it "
                "should not be differentiated; for a fixed σ pass float(sigma)."
            )
        self.sigma = check_positive("sigma", sigma)

    def __repr__(self) -> str:
        return f"Gaussian(sigma={self.sigma})"

    def check_target(self, output: torch.Tensor, target: torch.Tensor) -> None:
        """Targets shaped like the outputs, finite."""
        if target.shape[1:] != output.shape[1:]:
            want = (target.shape[0], *output.shape[1:])
            raise ValueError(
                f"gaussian targets must have the output's shape {want}, got "
                f"{tuple(target.shape)} (reshape y, e.g. y.view(-1, 1))."
            )

    def nll(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        r = target.to(to_acc(output).dtype) - to_acc(output)
        r = r.reshape(r.shape[0], -1)  # (N, D); outputs (N,) are one per sample
        d = r.shape[1]
        return 0.5 * (r**2).sum(1) / self.sigma**2 + d * math.log(
            self.sigma * math.sqrt(2 * math.pi)
        )

    def output_grad(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (to_acc(output) - target.to(to_acc(output).dtype)) / self.sigma**2

    def sample(
        self, output: torch.Tensor, generator: torch.Generator, k: int, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        f = to_acc(output.detach())  # noise in f's dtype, drawn on the generator's device
        eps = torch.randn((k, *f.shape), generator=generator, dtype=f.dtype,
                          device=generator.device).to(f.device)
        return f.unsqueeze(0) + self.sigma * eps

    def num_factor_columns(self, output: torch.Tensor) -> int:
        return output[0].numel()

    def factor_columns(
        self, output: torch.Tensor, start: int, stop: int, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        n, d = output.shape[0], output[0].numel()
        eye = (
            torch.eye(d, dtype=to_acc(output).dtype, device=output.device)[start:stop] / self.sigma
        )  # (k, D)
        return eye.unsqueeze(1).expand(stop - start, n, d).reshape(stop - start, *output.shape)


class Bernoulli(Likelihood):
    """Independent Bernoulli per output logit: ``l_n = Σ_d BCE(f_nd, y_nd)``.

    Exact Fisher: ``Λ = diag(p(1 - p))``, factor columns ``sqrt(p_d(1 - p_d)) e_d``.
    """

    name = "bernoulli"

    def check_target(self, output: torch.Tensor, target: torch.Tensor) -> None:
        """Targets shaped like the logits, in ``[0, 1]`` (0/1 labels or probabilities);
        logits, not a sigmoid's outputs (:func:`natgrad.engine.checks.check_not_sigmoid_outputs`)."""
        check_not_sigmoid_outputs(output, self.name)
        if target.shape[1:] != output.shape[1:]:
            want = (target.shape[0], *output.shape[1:])
            raise ValueError(
                f"bernoulli targets must have the logits' shape {want}, got "
                f"{tuple(target.shape)} (for one logit per sample use y.view(-1, 1).float())."
            )
        check_finite_target(target, self.name)
        check_unit_interval(target)

    def check_output(self, output: torch.Tensor) -> None:
        """Logits, not a sigmoid's outputs (:func:`natgrad.engine.checks.check_not_sigmoid_outputs`)."""
        check_not_sigmoid_outputs(output, self.name)

    def nll(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = F.binary_cross_entropy_with_logits(
            to_acc(output), target.to(to_acc(output).dtype), reduction="none"
        )
        return loss.reshape(loss.shape[0], -1).sum(1)  # outputs (N,): one logit per sample

    def output_grad(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return to_acc(output).sigmoid() - target.to(to_acc(output).dtype)

    def sample(
        self, output: torch.Tensor, generator: torch.Generator, k: int, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        # float64 uniforms (as inverse_cdf_draws): float32 ones are multiples of 2⁻²⁴, so
        # u < p held with probability >= 2⁻²⁴ for every p > 0
        p = to_acc(output.detach()).sigmoid().to(generator.device, torch.float64)
        u = torch.rand((k, *p.shape), generator=generator, dtype=torch.float64,
                       device=generator.device)
        return (u < p.unsqueeze(0)).float().to(output.device)

    def num_factor_columns(self, output: torch.Tensor) -> int:
        return output[0].numel()

    def factor_columns(
        self, output: torch.Tensor, start: int, stop: int, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        p = to_acc(output.detach()).sigmoid()
        p = p.reshape(p.shape[0], -1)  # (N, D); outputs (N,) are one logit per sample
        d = p.shape[1]
        eye = torch.eye(d, dtype=p.dtype, device=p.device)[start:stop]  # (k, D)
        cols = eye.unsqueeze(1) * (p * (1 - p)).sqrt().unsqueeze(0)
        return cols.reshape(stop - start, *output.shape)


class TokenCategorical(_Softmax):
    """Softmax per token over logits ``(N, T, V)``; ``l_n = Σ_t -log p(y_nt)`` over kept tokens.

    The logits' layout is ``(N, T, V)``, positions before classes (Hugging Face's);
    torch's ``cross_entropy`` layout ``(N, V, T)`` needs ``output_fn=lambda out:
    out.transpose(1, 2)`` (without labels it cannot be detected: ``V`` would be read as
    the positions).

    Tokens whose label equals ``ignore_index`` (or whose attention mask is 0: the
    batch's ``attention_mask``, or ``decoder_attention_mask`` in an encoder-decoder batch;
    see :meth:`natgrad.engine.batch.Batch.label_mask`) are left out; an encoder-decoder
    batch without labels and without ``decoder_attention_mask`` counts every decoder
    position (pass that mask for ``mc``/``exact`` labels on padded decoder inputs). With
    ``shift=True`` (causal language models) the logits at position ``t``
    predict the label at ``t + 1``. Exact Fisher: ``Σ_t Σ_c p_tc (∇θ log p_tc)²`` over
    kept tokens (tokens are conditionally independent given ``x``, so cross terms
    vanish), which costs ``T·(V - 1)`` vector-Jacobian products per sample: prefer ``mc``
    for large vocabularies. ``mc`` draws each kept token's label from ``softmax(f_nt)``
    by :func:`inverse_cdf_draws` (one cumulative sum per token, reproducible for a
    seeded generator), not by ``torch.multinomial``, whose one exponential variate per
    logit costs more than the rest of the Fisher's label work for ``V = 50257``.
    """

    name = "token_categorical"

    def __init__(self, ignore_index: int = IGNORE_INDEX, shift: bool = False):
        self.ignore_index = int(ignore_index)
        self.shift = bool(shift)

    def __repr__(self) -> str:
        return f"TokenCategorical(ignore_index={self.ignore_index}, shift={self.shift})"

    def check_target(self, output: torch.Tensor, target: torch.Tensor) -> None:
        """Logits ``(N, T, V)``; labels ``(N, T)`` in ``[0, V)`` or ``ignore_index``
        (with ``shift``, the label at position 0 is never read and not checked)."""
        if output.dim() != 3:
            raise ValueError(
                f"token_categorical expects logits of shape (N, T, V), got {tuple(output.shape)}."
            )
        self._check_shiftable(output)
        check_several_classes(output, self.name)
        want = (target.shape[0] if target.dim() else output.shape[0], output.shape[1])
        if target.is_floating_point() or target.dtype == torch.bool:
            raise ValueError(
                f"token_categorical labels must be integer tokens of shape (N, T) = {want} "
                f"(use ignore_index={self.ignore_index} for padding), got {target.dtype} of "
                f"shape {tuple(target.shape)}; convert with y.long()."
            )
        if target.dim() != 2 or target.shape[1] != output.shape[1]:
            transposed = target.dim() == 2 and target.shape[1] == output.shape[2]
            raise ValueError(
                f"token_categorical labels must be integer tokens of shape (N, T) = {want}, "
                f"one per position of the logits {tuple(output.shape)}, got shape "
                f"{tuple(target.shape)}. "
                + (f"The labels' length {target.shape[1]} is the logits' last axis: logits "
                   "in torch's cross_entropy layout (N, V, T) must be transposed to (N, T, "
                   "V), e.g. output_fn=lambda out: out.transpose(1, 2) (or "
                   "out.logits.transpose(1, 2)). Otherwise g" if transposed else "G")
                + f"ive every sequence's labels the length of its "
                f"inputs (pad with ignore_index={self.ignore_index}, or cut them to the "
                "model's sequence length)"
                + ("; with shift=True the labels are the unshifted sequence, as long as "
                   "the logits." if self.shift else ".")
            )
        if self.shift:
            first = torch.full_like(target[:, :1], self.ignore_index)
            target = torch.cat([first, target[:, 1:]], dim=1)
        check_class_labels(
            target, output.shape[-1], self.name, self.ignore_index, logits=output
        )

    def check_output(self, output: torch.Tensor) -> None:
        """Logits, not probabilities (see :func:`natgrad.engine.checks.check_not_probabilities`),
        with a token to score after the shift, and ``V >= 2`` classes."""
        self._check_shiftable(output)
        check_several_classes(output, self.name)
        check_not_probabilities(output, self.name)

    def _check_shiftable(self, output: torch.Tensor) -> None:
        """With ``shift``, the logits at ``t`` score the label at ``t + 1``: sequences of
        one token (``T = 1``) leave none to score."""
        if self.shift and output.dim() == 3 and output.shape[1] < 2:
            raise ValueError(
                f"token_categorical with shift=True scores the label at position t + 1 with "
                f"the logits at t, so sequences of length T = {output.shape[1]} (logits "
                f"{tuple(output.shape)}) leave no token to score. Pass sequences of at least "
                "2 tokens, or likelihood=natgrad.TokenCategorical(shift=False) when each "
                "position's label is already the token it predicts."
            )

    @overload
    def _align(
        self, output: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    @overload
    def _align(
        self, output: torch.Tensor, target: None
    ) -> tuple[torch.Tensor, None]: ...

    @overload
    def _align(
        self, output: torch.Tensor, target: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def _align(
        self, output: torch.Tensor, target: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.shift:
            output = output[:, :-1]
            target = None if target is None else target[:, 1:]
        return output, target

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        # Undo the shift on a tensor shaped like the aligned logits (zeros at the last position).
        if not self.shift:
            return x
        return torch.cat([x, torch.zeros_like(x[..., :1, :])], dim=-2)

    def nll(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        out, tgt = self._align(output, target)
        keep = tgt != self.ignore_index
        safe = torch.where(keep, tgt, torch.zeros_like(tgt))
        logp = to_acc(out).log_softmax(-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
        return -(logp * keep).sum(-1)

    def output_grad(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        out, tgt = self._align(output, target)
        keep = tgt != self.ignore_index
        safe = torch.where(keep, tgt, torch.zeros_like(tgt))
        g = _minus_onehot(to_acc(out).softmax(-1), safe)
        return self._pad(g.masked_fill_(~keep.unsqueeze(-1), 0))  # g is ours: no copy

    def sample(
        self, output: torch.Tensor, generator: torch.Generator, k: int, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        out, tgt = self._align(output.detach(), target)
        n, t, v = out.shape
        draws = inverse_cdf_draws(out.reshape(n * t, v), k, generator)
        draws = draws.t().reshape(k, n, t)
        if tgt is not None:
            draws = torch.where(tgt.unsqueeze(0) == self.ignore_index, tgt.unsqueeze(0), draws)
        if self.shift:  # labels are read at position t+1: position 0 holds ignore_index
            pad = torch.full((k, n, 1), self.ignore_index, dtype=draws.dtype, device=draws.device)
            draws = torch.cat([pad, draws], dim=-1)
        return draws

    def num_factor_columns(self, output: torch.Tensor) -> int:
        out, _ = self._align(output, None)
        return out.shape[1] * max(out.shape[2] - 1, 1)

    def factor_columns(
        self, output: torch.Tensor, start: int, stop: int, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        out, tgt = self._align(to_acc(output.detach()), target)
        n, t, v = out.shape
        p = out.softmax(-1)
        keep = (
            torch.ones(n, t, device=p.device) if tgt is None else (tgt != self.ignore_index).float()
        )
        idx = torch.arange(start, stop, device=p.device)
        per = max(v - 1, 1)  # factor columns per token (see Categorical)
        pos, cls = idx // per, idx % per  # column j = (token pos[j], class cls[j])
        p_pos, perm = _most_probable_last(p[:, pos, :])  # (N, k, V), each token's top class last
        pc = p_pos.gather(-1, cls.view(1, -1, 1).expand(n, -1, 1))  # (N, k, 1)
        if v == 1:  # one class: no curvature
            col = torch.zeros_like(p_pos)
        else:
            onehot = F.one_hot(cls, v).to(p.dtype)
            col = _softmax_factor(p_pos, onehot, pc * keep[:, pos].unsqueeze(-1))
            col = col.gather(-1, perm)
        at = F.one_hot(pos, t).to(p.dtype).view(stop - start, 1, t, 1)  # no in-place: vmap-safe
        return self._pad(at * col.transpose(0, 1).unsqueeze(2))


class CustomLikelihood(Likelihood):
    """A user-defined likelihood from a per-sample NLL and a sampler.

    Args:
        nll: ``nll(output, target) -> (N,)`` negative log-likelihood per sample, written
            with torch operations (it is differentiated with ``torch.func``). Its shape
            is checked at every call: a batch mean (a scalar) raises a ValueError, since
            natgrad sums it over a batch for the output gradients.
        sampler: ``sampler(output, generator) -> target`` one label draw per sample;
            needed for ``labels="mc"``.
        name: shown in Fisher metadata.

    Example:
        >>> import torch
        >>> lik = CustomLikelihood(lambda f, y: ((f - y) ** 2).sum(-1), name="sq")
        >>> lik.nll(torch.zeros(2, 1), torch.ones(2, 1))
        tensor([1., 1.])
    """

    def __init__(
        self,
        nll: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        sampler: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
        name: str = "custom",
    ):
        if not callable(nll):
            raise TypeError("CustomLikelihood needs a callable nll(output, target) -> (N,).")
        self._nll, self._sampler, self.name = nll, sampler, name

    def nll(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``nll(output, target)``, checked to hold one value per sample (shape ``(N,)``)."""
        return check_per_sample_loss(self._nll(output, target), output, self.name)

    def __repr__(self) -> str:
        """Names the functions by their code (a checkpoint's fingerprint reads it)."""
        return (f"CustomLikelihood(nll={callable_digest(self._nll)}, "
                f"sampler={callable_digest(self._sampler)}, name={self.name!r})")

    def sample(
        self, output: torch.Tensor, generator: torch.Generator, k: int, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self._sampler is None:
            raise ValueError(
                f"labels='mc' needs a sampler: pass CustomLikelihood(nll, sampler=...) for {self.name!r}."
            )
        return torch.stack([self._sampler(output.detach(), generator) for _ in range(k)])


_REGISTRY: dict[str, type[Likelihood]] = {
    "categorical": Categorical,
    "gaussian": Gaussian,
    "bernoulli": Bernoulli,
    "token_categorical": TokenCategorical,
}
LIKELIHOOD_NAMES = tuple(_REGISTRY)


def get_likelihood(likelihood: str | Likelihood, **kwargs: Any) -> Likelihood:
    """Resolve a likelihood given by name (with constructor kwargs) or as an object.

    Example:
        >>> get_likelihood("gaussian", sigma=0.5)
        Gaussian(sigma=0.5)
    """
    if isinstance(likelihood, Likelihood):
        if kwargs:
            raise TypeError(
                f"Options {sorted(kwargs)} apply only when the likelihood is given by name."
            )
        return likelihood
    if not isinstance(likelihood, str):
        raise TypeError(
            f"likelihood must be a name {LIKELIHOOD_NAMES} or a natgrad.engine.likelihoods.Likelihood, "
            f"got {type(likelihood).__name__}."
        )
    check_choice("likelihood", likelihood, LIKELIHOOD_NAMES)
    return _REGISTRY[likelihood](**kwargs)
