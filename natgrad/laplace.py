"""Laplace-style predictive uncertainty from a diagonal Fisher (linearized Laplace).

The Laplace approximation puts a Gaussian around the trained weights ``θ*``. Its
precision is the curvature of the negative log-posterior
``-Σ_n log p(y_n | x_n, θ) - log p(θ)``: every one of the ``N`` training samples adds
its own Fisher (generalized Gauss-Newton) term and the Gaussian prior ``N(0, δ⁻¹ I)``
adds ``δ``. With the diagonal Fisher stored as the per-sample *mean* ``F_i``, the
posterior precision is therefore the *sum* ``N·F_i + δ`` (not ``F_i + δ``, which would
describe a posterior after seeing one sample).

Linearizing the network around ``θ*`` (``f(x; θ) ≈ f(x; θ*) + J(x)(θ - θ*)``) makes the
outputs Gaussian with mean ``μ(x) = f(x; θ*)`` and, for the diagonal posterior,

    Var f_c(x) = Σ_i J_ci(x)² / (N F_i + δ).

This is a weighted sum of squared per-sample gradients (of the output ``f_c`` instead of
the loss), so it is computed the way the exact Fisher is (the capture path of
:mod:`natgrad.engine.capture`): one forward pass records every ``nn.Linear`` /
``nn.Conv1d`` / ``nn.Conv2d`` layer's input ``a`` and adds a zero perturbation to its
output; one backward pass per output column ``c`` gives the per-sample output gradients
``b_c`` of every layer at once. The Jacobian row of a layer's block ``[W, b]`` is
``J_c = Σ_t b_ct ã_tᵀ`` (``ã = [a, 1]``; ``t`` runs over sequence positions or
convolution patches), and

* diagonal posterior: ``Var f_c = Σ_{o,i} J_c,oi² / (N F_oi + δ)``; for one position
  ``= Σ_o b_co² M_o`` with ``M = (ã²) (1/(N F + δ))ᵀ`` shared by every column;
* Kronecker posterior (K-FAC ``F = G ⊗ A`` or EKFAC): ``N F + δ I`` is diagonal in the
  eigenbasis ``Q_G ⊗ Q_A``, with entries ``N S + δ`` (``S = s_G s_Aᵀ`` or the EKFAC
  ``s``), so ``Var f_c = Σ_{o,i} (Q_Gᵀ J_c Q_A)_oi² / (N S_oi + δ)``; for one position
  ``Q_Gᵀ J_c Q_A = (Q_Gᵀ b_c)(Q_Aᵀ ã)ᵀ`` factorises and no ``P x P`` matrix (nor any
  per-sample Jacobian) is formed;
* low-rank posterior (:class:`natgrad.LowRankFisher`, ``F = V diag(E) Vᵀ``):
  ``(N F + δ I)⁻¹ = I/δ - V diag(w) Vᵀ`` with ``w_k = N E_k / (δ (N E_k + δ))``, so
  ``Var f_c = ‖J_c‖²/δ - Σ_k w_k (J_c · v_k)²``; the projections
  ``J_c · v_k = Σ_layers b_cᵀ V_k ã`` come from the same captured ``a`` and ``b_c``
  (float64, as the difference cancels); it needs every parameter on the capture path.

Sequence models (``likelihood="token_categorical"``, logits ``(N, T, C)``): the
outputs of one sample are its ``D = T·C`` token logits, so the machinery above gives
every token's Jacobian ``J_t`` (``C x P``) as ``C`` of the ``D`` rows. Each token's
logits are Gaussian, ``f_t ~ N(f*_t, J_t Σ J_tᵀ)`` with ``Σ = (N F + δ I)⁻¹``, and the
links act on each token's ``C`` logits as on a categorical sample's (probit on the
variances, MC on the ``C x C`` diagonal block of the ``D x D`` covariance). ``N`` counts
sequences: the token Fisher's per-sample term sums over the sequence's kept tokens, so
``N F`` is the GGN of the whole training log-likelihood.

Parameters the capture path does not cover (other layer types, weights used twice,
curvatures coupling layers otherwise, such as a dense one) take the general path:
per-sample Jacobians with ``torch.func`` (``vmap`` over ``vjp`` rows) in chunks, reduced
against ``1 / (N F + δ)`` (or one ``curvature.solve`` per row) inside each chunk. The
posterior is block diagonal between the two groups, so their variances add.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeGuard, cast

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap

from natgrad.curvature.estimate import is_single_batch, iterate_batches
from natgrad.curvature.ops import check_curvature
from natgrad.curvature.protocol import BLOCK_KINDS, Curvature
from natgrad.engine import capture_layers as layers
from natgrad.engine.batch import Batch, OutputFn, add_batch_axis, default_output_fn, parse_batch
from natgrad.engine.capture import (
    RowsNotSamples,
    cached_split,
    check_captured,
    drop_modules,
    input_signature,
)
from natgrad.engine.capture_ops import zero_perturbation
from natgrad.engine.checks import (
    check_choice,
    check_fisher_type,
    check_fixed_model,
    check_int,
    check_names_in,
    check_positive,
    check_same_structure,
)
from natgrad.engine.common import internal_pass, model_acc_dtype, with_autograd
from natgrad.engine.likelihoods import Likelihood, get_likelihood
from natgrad.engine.options import ENGINES, EngineName, ParamSpec
from natgrad.engine.per_sample import (
    Plan,
    call_model,
    check_padding_read,
    hooked_output,
    loop_samples,
    masked_target,
    model_device,
    probe_failed,
    select_params,
    vmap_failure,
    warn_fallback,
)
from natgrad.engine.report import Report

__all__ = [
    "UncertaintyReport",
    "PriorPrecisionResult",
    "fisher_uncertainty",
    "optimize_prior_precision",
]

LINKS = ("probit", "mc")
SUPPORTED_LIKELIHOODS = ("categorical", "bernoulli", "gaussian", "token_categorical")
PRIOR_METHODS = ("grid", "marglik")
CHUNK_FLOATS = 2**25  # about 128 MiB of float32 Jacobian entries per chunk
_PROBIT = math.pi / 8
_PRODUCT_FLOATS = 2**22  # per-sample Jacobian blocks of one chunk (16 MiB of float32)
_GROUP_FLOATS = 2**18  # output gradients of several output columns held at once (1 MiB:
# larger groups leave the cache and run slower on CPU)
logger = logging.getLogger(__name__)


@dataclass
class UncertaintyReport(Report):
    """The linearized Laplace predictive on a batch of ``N`` samples with ``D`` outputs.

    For ``likelihood="token_categorical"`` (logits ``(N, T, C)``) every ``(N, D)`` field
    below is ``(N, T, C)`` (one categorical per token), ``logit_covariance`` is
    ``(N, T, C, C)`` (each token's block) and ``entropy`` / ``epistemic`` are ``(N, T)``.

    Attributes:
        mean: ``(N, D)`` MAP outputs ``μ = f(x; θ*)`` (logits, or regression means).
        logit_variance: ``(N, D)`` ``Var f_c(x) = Σ_i J_ci² / (N F_i + δ)``.
        logit_covariance: ``(N, D, D)`` ``Cov(f_c, f_e) = J_c (N F + δ I)⁻¹ J_eᵀ``,
            computed for categorical outputs with ``link="mc"`` (the draws need it);
            ``None`` otherwise.
        probs: ``(N, D)`` predictive probabilities (categorical: rows sum to one;
            bernoulli: one probability per logit); ``None`` for gaussian.
        predictive_variance: ``(N, D)`` gaussian only: ``Var f + σ²``; ``None`` otherwise.
        entropy: ``(N,)`` predictive entropy in nats (gaussian: differential entropy).
        epistemic: ``(N,)`` the epistemic score named by ``epistemic_kind``.
        epistemic_kind: ``"mutual_information"`` (``link="mc"``) or ``"total_variance"``.
        likelihood, link, prior_precision, n_data: how it was computed.
    """

    mean: torch.Tensor
    logit_variance: torch.Tensor
    logit_covariance: torch.Tensor | None
    probs: torch.Tensor | None
    predictive_variance: torch.Tensor | None
    entropy: torch.Tensor
    epistemic: torch.Tensor
    epistemic_kind: str
    likelihood: str
    link: str
    prior_precision: float
    n_data: int


@dataclass
class PriorPrecisionResult(Report):
    """The chosen prior precision and the score of every candidate.

    Attributes:
        prior_precision: the chosen ``δ``.
        method: ``"grid"`` or ``"marglik"``.
        grid: the candidate precisions.
        scores: one score per candidate: validation NLL (``grid``, lower is better) or
            log marginal likelihood up to the constant ``log p(D | θ*)`` (``marglik``,
            higher is better).
        score_name: ``"val_nll"`` or ``"log_marglik"``.
        best_score: the score at ``prior_precision``.
    """

    prior_precision: float
    method: str
    grid: list[float]
    scores: list[float]
    score_name: str
    best_score: float


# -- resolving the inputs ------------------------------------------------------------------

FisherLike = Mapping[str, torch.Tensor] | Curvature
"""A diagonal Fisher ``{name: tensor}`` or any :class:`natgrad.Curvature`."""
Reducer = Callable[[dict[str, torch.Tensor], int, int], torch.Tensor]
"""``(jacobians {name: (n, D, *shape)}, n, D) -> (n·D, G)`` variances of a curvature."""


def _resolve_likelihood(likelihood: str | Likelihood | None, fisher: object) -> Likelihood:
    stored = getattr(fisher, "likelihood", None)
    lik = get_likelihood((stored or "categorical") if likelihood is None else likelihood)
    if lik.name not in SUPPORTED_LIKELIHOODS:
        raise ValueError(
            f"The Laplace predictive supports likelihoods {SUPPORTED_LIKELIHOODS}, got "
            f"{lik.name!r}; pass likelihood= one of the supported names."
        )
    if stored is not None and likelihood is not None and stored != lik.name:
        raise ValueError(
            f"The Fisher was estimated with likelihood {stored!r} but likelihood={lik.name!r} "
            "was passed; estimate the Fisher with the same likelihood."
        )
    return lik


def _warn_default_sigma(likelihood: str | Likelihood | None, lik: Likelihood) -> None:
    """A curvature records its likelihood's name, not a Gaussian's ``σ``: warn when the
    predictive falls back to ``σ = 1`` (the predictive variance adds ``σ²``)."""
    if likelihood is None and lik.name == "gaussian":
        warnings.warn(
            "The curvature records the likelihood 'gaussian' without its sigma, so the "
            "predictive uses sigma = 1; pass likelihood=natgrad.Gaussian(sigma) with the "
            "sigma the curvature was estimated with (likelihood='gaussian' for sigma = 1).",
            UserWarning,
            stacklevel=3,
        )


def _resolve_params(
    model: nn.Module, fisher: Mapping[str, torch.Tensor], params: ParamSpec
) -> dict[str, nn.Parameter]:
    named = dict(model.named_parameters())
    if params is None:
        check_names_in(fisher, named)
        chosen = {k: named[k] for k in named if k in fisher}
    else:
        chosen = select_params(model, params)
        missing = [k for k in chosen if k not in fisher]
        if missing:
            raise ValueError(
                f"params selects {missing[:8]}, which the Fisher does not cover; estimate the "
                "Fisher with the same params= (or leave params=None to use the Fisher's own)."
            )
    if not chosen:
        raise ValueError("The Fisher is empty: there are no parameters to be uncertain about.")
    check_same_structure({k: fisher[k] for k in chosen}, chosen, "the Fisher", "the model")
    return chosen


def _resolve_n(fisher: object, n_data: int | None) -> int:
    n = getattr(fisher, "n_samples", None) if n_data is None else n_data
    if n is None:
        raise ValueError(
            "n_data is needed: the Fisher is a plain mapping without n_samples; pass "
            "n_data= the number of training samples."
        )
    check_int("n_data", n, 1)
    return int(n)


def _inverse_precisions(
    fisher: FisherLike,
    names: Iterable[str],
    n: int,
    deltas: torch.Tensor,
    dtype: torch.dtype,
    device: torch.device,
    full: bool = False,
) -> dict[str, torch.Tensor] | Reducer:
    """``{name: (G, numel)}`` holding ``1 / (N F_i + δ_g)`` for every candidate ``δ_g``;
    for a structured curvature, the reducer of :func:`_curvature_reducer` (``full``: it
    returns the output covariances)."""
    if _structured(fisher):
        return _curvature_reducer(fisher, list(names), n, deltas.tolist(), dtype, full)
    diag = cast(Mapping[str, torch.Tensor], fisher)  # not structured: a mapping
    out = {}
    for k in names:
        f = diag[k].detach().to(device=device, dtype=dtype).reshape(1, -1)
        if (f < 0).any() or not torch.isfinite(f).all():
            raise ValueError(f"The Fisher of {k!r} has negative or non-finite entries.")
        out[k] = 1.0 / (n * f + deltas.to(device=device, dtype=dtype).view(-1, 1))
    return out


# -- the linearized outputs ------------------------------------------------------------------


def _moments(
    model: nn.Module,
    b: Batch,
    params: Mapping[str, nn.Parameter],
    inv_prec: Mapping[str, torch.Tensor] | Reducer,
    output_fn: OutputFn,
    chunk_size: int | None,
    dtype: torch.dtype,
    full: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MAP outputs ``(N, D)`` and linearized variances ``(N, D, G)`` (one per candidate δ);
    ``full``: the output covariances ``J P⁻¹ Jᵀ``, ``(N, D, D, G)``.

    ``inv_prec``: ``{name: (G, numel)}`` diagonal inverse precisions, or a callable
    ``(jacobians {name: (n, D, *shape)}, n, D) -> (n·D, G)`` (``full``: ``(n, D, D, G)``)
    for a structured curvature.
    """
    detached = {k: p.detach() for k, p in params.items()}
    arg_dims, kw_dims = b.arg_dims, b.kw_dims
    assert arg_dims is not None and kw_dims is not None  # set by Batch.__post_init__

    def jac_fn(
        p: dict[str, torch.Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One sample's outputs ``(D,)`` and Jacobian ``{name: (D, *shape)}``, one row
        pulled back at a time (``jacrev`` nests a vmap over the rows inside the vmap
        over samples, which some backward formulas get wrong: ``nn.PReLU``)."""
        args, kwargs = add_batch_axis(args, kwargs, arg_dims, kw_dims)  # shared: as is

        def f(pp: dict[str, torch.Tensor]) -> torch.Tensor:
            with internal_pass():
                out = output_fn(functional_call(model, pp, args, kwargs, strict=False))
            return out.reshape(-1)

        # torch.func.vjp's annotation also admits the has_aux=True 3-tuple
        out, pull = vjp(f, p)  # type: ignore[misc]
        rows = [pull(e)[0] for e in torch.eye(out.numel(), dtype=out.dtype, device=out.device)]
        return {k: torch.stack([r[k] for r in rows]) for k in p}, out

    first = b.select(0, 1)
    with torch.no_grad():
        try:
            raw = model(*first.args, **first.kwargs)
        except Exception as exc:
            probe_failed(exc, model, first, b, "the batch")
        d = output_fn(raw)[0].numel()
    p_total = sum(p.numel() for p in params.values())
    chunk = chunk_size or max(1, min(b.size, CHUNK_FLOATS // max(d * p_total, 1)))
    means, variances = [], []
    loop = False
    for start in range(0, b.size, chunk):
        sub = b.select(start, min(start + chunk, b.size))
        in_dims = (None, sub.arg_dims, sub.kw_dims)
        args = (detached, sub.args, sub.kwargs)
        with torch.no_grad():  # vjp still differentiates; no graph to outer parameters
            jac, out, loop = _jacobians(model, jac_fn, in_dims, args, sub.size, d, loop)
        var: torch.Tensor | None = None
        if isinstance(inv_prec, Mapping):
            for k, j in jac.items():
                if full:  # Σ_i J_ci J_ei / (N F_i + δ_g), (n, D, D, G)
                    jj = j.to(dtype).reshape(sub.size, d, -1)
                    term = torch.stack([(jj * w) @ jj.mT for w in inv_prec[k]], -1)
                else:
                    sq = j.to(dtype).reshape(sub.size * d, -1) ** 2  # (n·D, numel)
                    term = sq @ inv_prec[k].t()  # (n·D, G)
                var = term if var is None else var + term
        else:
            var = inv_prec(jac, sub.size, d)
        assert var is not None  # params is not empty (checked by _prepare)
        means.append(out.detach().to(dtype))
        variances.append(var.reshape(sub.size, d, d, -1) if full else var.reshape(sub.size, d, -1))
    return torch.cat(means), torch.cat(variances)


def _jacobians(
    model: nn.Module,
    jac_fn: Callable[..., tuple[dict[str, torch.Tensor], torch.Tensor]],
    in_dims: tuple[Any, ...],
    args: tuple[Any, ...],
    n: int,
    d: int,
    loop: bool,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, bool]:
    """``vmap(jac_fn)`` over one chunk of ``n`` samples, checked: on a vmap failure or a
    Jacobian not of shape ``(n, d, *param.shape)``, the exact per-sample loop (one
    warning; ``loop`` stays True for the later chunks). Returns ``(jac, out, loop)``."""
    params = args[0]

    def bad(jac: Mapping[str, torch.Tensor], out: torch.Tensor) -> str | None:
        for k, p in params.items():
            if tuple(jac[k].shape) != (n, d, *p.shape):
                return (
                    f"Jacobians of shape {tuple(jac[k].shape)} for {k!r} (expected "
                    f"{(n, d, *p.shape)})"
                )
        return None if tuple(out.shape) == (n, d) else f"outputs of shape {tuple(out.shape)}"

    if not loop:
        try:
            jac, out = vmap(jac_fn, in_dims=in_dims, randomness="different")(*args)
        except Exception as exc:  # noqa: BLE001 - the loop re-raises the model's own errors
            why = vmap_failure(model, exc)
        else:
            wrong_shape = bad(jac, out)
            if wrong_shape is None:
                return jac, out, False
            why = f"vmap returned {wrong_shape}"
        jac, out = loop_samples(jac_fn, in_dims, args, n, params)
        warn_fallback(why)
    else:
        jac, out = loop_samples(jac_fn, in_dims, args, n, params)
    wrong = bad(jac, out)
    if wrong is not None:
        raise RuntimeError(
            f"The exact per-sample loop returned {wrong}; natgrad does not return a result "
            "of the wrong shape. Please report this model."
        )
    return jac, out, True


# -- the capture path ------------------------------------------------------------------------

_FAST_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d)
_FAST_KINDS = ("diag", "kfac", "ekfac")


@dataclass
class _Term:
    """One layer's share ``J_c P⁻¹ J_cᵀ`` of ``Var f_c`` for its block ``[W, b]``.

    In the rotated basis of the block (``Q_G`` on the output side, ``Q_A`` on the input
    side; None is the identity) the inverse precision is diagonal, ``inv`` of shape
    ``(G, d_G, d_A)`` (one slice per candidate ``δ``). The per-sample Jacobian row of the
    block for output ``c`` is ``Σ_t b_ct ã_tᵀ`` with ``ã_t = [a_t if weight else 0,
    bias]`` (``bias`` None: no bias column; 0.0: a bias column the posterior covers but
    the predictive leaves out).
    """

    module: nn.Module
    weight: bool
    bias: float | None
    inv: torch.Tensor
    QA: torch.Tensor | None
    QG: torch.Tensor | None
    V: torch.Tensor | None = None  # low-rank posterior: (r, d_G, d_A) basis blocks


def _module_names(model: nn.Module) -> dict[nn.Module, tuple[str | None, str | None]]:
    """``{module: (weight name, bias name)}`` for every Linear / Conv module the forward
    calls (``nn.MultiheadAttention`` reads its ``out_proj``'s weight without calling the
    module, so no hook sees that layer: its parameters take the ``vmap`` path)."""
    out: dict[nn.Module, tuple[str | None, str | None]] = {}
    not_called = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    for mname, m in model.named_modules():
        if isinstance(m, _FAST_MODULES) and id(m) not in not_called:
            prefix = f"{mname}." if mname else ""
            w = prefix + "weight" if m._parameters.get("weight") is not None else None
            b = prefix + "bias" if m._parameters.get("bias") is not None else None
            out[m] = (w, b)
    return out


def _diag_inverse(
    fisher: FisherLike,
    names: list[str],
    n: int,
    deltas: torch.Tensor,
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """``{name: (G, numel)}``: ``diag (N F + δ_g I)⁻¹`` of parameters held as a diagonal."""
    if not names:
        return {}
    if not _structured(fisher):
        inv = _inverse_precisions(fisher, names, n, deltas, dtype, device)
        assert isinstance(inv, dict)  # a mapping gives the diagonal inverse
        return inv
    per = [fisher.inverse_diagonal(float(d) / n) for d in deltas.tolist()]
    return {
        k: torch.stack([p[k].detach().to(device=device, dtype=dtype).reshape(-1) for p in per])
        / n
        for k in names
    }


def _basis(Q: torch.Tensor | None, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """The one group's eigenbasis, row-major (``eigh`` returns column-major bases, whose
    products run several times slower on CPU)."""
    return None if Q is None else Q[0].detach().to(device=device, dtype=dtype).contiguous()


def _diag_term(
    m: nn.Module, w: str | None, b: str | None, inv: Mapping[str, torch.Tensor]
) -> _Term:
    """The term of a layer whose chosen parameters ``w`` / ``b`` are held as a diagonal."""
    d_out = cast(torch.Tensor, m.weight).shape[0]
    parts = []
    if w is not None:
        parts.append(inv[w].reshape(inv[w].shape[0], d_out, -1))
    if b is not None:
        parts.append(inv[b].reshape(inv[b].shape[0], d_out, 1))
    return _Term(m, w is not None, None if b is None else 1.0, torch.cat(parts, -1), None, None)


def _lowrank_terms(
    model: nn.Module,
    fisher: Curvature,
    chosen: Mapping[str, nn.Parameter],
    fast: set[str],
    n: int,
    deltas: torch.Tensor,
    device: torch.device,
) -> tuple[list[_Term], list[str], torch.Tensor | None]:
    """Terms of a :class:`natgrad.LowRankFisher` posterior (float64), when every chosen
    parameter is on the capture path (and none is in a grouped convolution).

    With ``F = V diag(E) Vᵀ`` (``V`` orthonormal, ``P x r``),
    ``(N F + δ I)⁻¹ = I/δ - V diag(w) Vᵀ``, ``w_k = N E_k / (δ (N E_k + δ))``, so
    ``Var f_c = ‖J_c‖²/δ - Σ_k w_k (J_c · v_k)²``: a diagonal term with ``1/δ`` plus the
    projections ``J_c · v_k = Σ_layers Σ_t b_ctᵀ V_k ã_t`` (``V_k`` cut into each layer's
    ``[W, b]`` block). Returns ``(terms, covered, w (G, r))``.
    """
    from natgrad.curvature.lowrank import LowRankFisher, gram_eigen

    assert isinstance(fisher, LowRankFisher)  # checked by the caller
    f64 = torch.float64
    named = _module_names(model)
    owner = {k: m for m, pair in named.items() for k in pair if k is not None}
    if any(k not in fast or k not in owner for k in chosen) or set(chosen) != set(fisher.shapes):
        return [], [], None
    if any(getattr(owner[k], "groups", 1) != 1 for k in chosen):
        return [], [], None  # a grouped conv: its unfolded inputs span every channel (vmap)
    R = fisher.rows.detach().to(device=device, dtype=f64)
    eig = gram_eigen(R)
    V = R.T @ (eig["U"] / eig["S"].sqrt())  # (P, r)
    NE = n * eig["S"] / max(fisher.n_samples, 1)
    d = deltas.to(device=device, dtype=f64).view(-1, 1)
    w = NE / (d * (NE + d))  # (G, r)
    offsets, i = {}, 0
    for k, shape in fisher.shapes.items():
        size = math.prod(shape)
        offsets[k] = (i, i + size)
        i += size
    r, G = V.shape[1], d.shape[0]
    terms: list[_Term] = []
    for m, (wn, bn) in named.items():
        mine = [k for k in (wn, bn) if k is not None and k in chosen]
        if not mine:
            continue
        d_out = cast(torch.Tensor, m.weight).shape[0]
        blocks = []
        for k in mine:
            a, b = offsets[k]
            blocks.append(V[a:b].T.reshape(r, d_out, -1))
        Vb = torch.cat(blocks, -1)  # (r, d_G, d_A)
        inv = (1.0 / d).view(G, 1, 1).expand(G, *Vb.shape[1:]).contiguous()
        terms.append(_Term(m, wn in mine, 1.0 if bn in mine else None, inv, None, None, Vb))
    return terms, list(chosen), w


def _fast_terms(
    model: nn.Module,
    fisher: FisherLike,
    chosen: Mapping[str, nn.Parameter],
    fast: set[str],
    n: int,
    deltas: torch.Tensor,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[list[_Term], list[str]]:
    """The capture-path terms and the chosen parameters they cover.

    A Linear / Conv module takes the capture path when every chosen parameter of it is
    in ``fast`` (checked by :func:`natgrad.engine.capture.split_params`, remembered per model
    and batch signature by :func:`natgrad.engine.capture.cached_split`) and the
    posterior's block of the module is a diagonal (any curvature: its
    ``inverse_diagonal``), or a K-FAC / EKFAC block of :class:`natgrad.KroneckerFisher`
    (one group, weight stored ``(out, in)``), in whose eigenbasis ``N F + δ I`` is
    diagonal: ``N S + δ`` with ``S = s_G s_Aᵀ`` (K-FAC) or the re-fitted ``s`` (EKFAC).
    Curvatures coupling layers take no capture path here (low-rank:
    ``_lowrank_terms``).
    """
    from natgrad.curvature.kronecker import KroneckerFisher

    kinds: dict[str, str] = fisher.structure() if _structured(fisher) else {}
    if any(kinds[k] not in _FAST_KINDS for k in kinds):
        return [], []
    blocks = {}
    if isinstance(fisher, KroneckerFisher):
        blocks = {blk.weight: blk for blk in fisher.blocks.values()}
    terms: list[_Term] = []
    covered: list[str] = []
    plan_diag: list[tuple[nn.Module, str | None, str | None]] = []
    for m, (w, b) in _module_names(model).items():
        mine = [k for k in (w, b) if k is not None and k in chosen]
        if not mine or not all(k in fast for k in mine):
            continue
        if getattr(m, "groups", 1) != 1:  # the unfolded inputs below span every channel
            continue
        blk = blocks.get(w) if w is not None else None
        if blk is not None:
            if blk.groups != 1 or blk.transposed or blk.bias not in (None, b) or blk.mask is not None:
                continue
            rest_b = b if blk.bias is None and b in chosen else None
            if rest_b is not None and kinds.get(rest_b) != "diag":
                continue
            if w in chosen or (blk.bias is not None and blk.bias in chosen):
                QA, _, QG, _ = blk.bases()
                S = blk.eigenvalues()[0].detach().to(device=device, dtype=torch.float64)
                inv = 1.0 / (n * S.unsqueeze(0) + deltas.to(device).view(-1, 1, 1))
                bias = None if blk.bias is None else float(blk.bias in chosen)
                terms.append(_Term(
                    m, w in chosen, bias, inv.to(dtype),
                    _basis(QA, dtype, device),
                    _basis(QG, dtype, device),
                ))  # fmt: skip
            if rest_b is not None:
                plan_diag.append((m, None, rest_b))
            covered += mine
            continue
        if kinds and any(kinds[k] != "diag" for k in mine):
            continue  # a K-FAC block natgrad cannot read (not a KroneckerFisher)
        plan_diag.append((m, w if w in chosen else None, b if b in chosen else None))
        covered += mine
    names = [k for _, w, b in plan_diag for k in (w, b) if k is not None]
    inv_diag = _diag_inverse(fisher, names, n, deltas, dtype, device)
    terms += [_diag_term(m, w, b, inv_diag) for m, w, b in plan_diag]
    return terms, covered


def _inputs(term: _Term, a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``ã`` rotated, ``(N, T, d_A)``: the layer's inputs (unfolded patches for a
    convolution) with the bias column, times ``Q_A``."""
    m = term.module
    a = a.to(dtype)
    if isinstance(m, nn.Linear):
        A = a.reshape(a.shape[0], -1, a.shape[-1])
    else:
        A = layers.unfold(cast("nn.Conv1d | nn.Conv2d", m), a).transpose(1, 2)
    if not term.weight:
        # a Kronecker term's basis spans [W, b]: the weight columns are zero; a diagonal
        # or low-rank term holds the bias column alone (its last axis has width 1)
        A = A[..., :0] if term.inv.shape[-1] == int(term.bias is not None) else torch.zeros_like(A)
    if term.QA is not None and term.bias is not None:
        # [a, β] Q_A = a Q_A[:-1] + β Q_A[-1]: one product, no copy of a with its bias column
        QA = term.QA
        out = torch.addmm(QA[-1:] * term.bias, A.reshape(-1, A.shape[-1]), QA[:-1])
        return out.reshape(*A.shape[:-1], QA.shape[1])
    if term.bias is not None:
        A = torch.cat([A, A.new_full((*A.shape[:-1], 1), term.bias)], -1)
    if term.QA is None:
        return A
    return (A.reshape(-1, A.shape[-1]) @ term.QA).reshape(A.shape)  # one 2-D product


def _out_grads(
    term: _Term, g: torch.Tensor, dtype: torch.dtype, rotate: bool = True
) -> torch.Tensor:
    """The output gradients ``(N, T, d_G)`` rotated by ``Q_G`` (``rotate=False``: as
    they are, a view of ``g`` where the dtype allows)."""
    g = g.to(dtype)
    if isinstance(term.module, nn.Linear):
        B = g.reshape(g.shape[0], -1, g.shape[-1])
    else:
        B = g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2)
    if term.QG is None or not rotate:
        return B
    return (B.reshape(-1, B.shape[-1]) @ term.QG).reshape(B.shape)  # one 2-D product


def _rotated_variance(
    term: _Term, A: torch.Tensor, g: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``(N, G)``: one output column's ``Σ_{o,i} (Q_Gᵀ J Q_A)²_oi inv_goi`` for a layer
    with ``T > 1`` positions (``A``: the rotated inputs ``(N, T, d_A)``, ``g``: the
    column's output gradients).

    The transposed rotated Jacobian ``(Q_Gᵀ J)ᵀ = Σ_t ã_t (Q_Gᵀ b_t)ᵀ`` is formed as
    ``(N, d_A, d_G)`` by rotating whichever is smaller: the gradients ``b`` before the
    per-sample product (``N T d_G²`` multiply-adds) or the Jacobian after it
    (``N d_A d_G²``, when ``d_A < T``: a first convolution's small patches).
    """
    assert term.QG is not None  # the caller's condition
    B = _out_grads(term, g, dtype, rotate=False)  # (N, T, d_G)
    n, T, d_G = B.shape
    d_A = A.shape[-1]
    invT = term.inv.transpose(1, 2).reshape(term.inv.shape[0], -1)  # (G, d_A·d_G)
    out = torch.empty(n, invT.shape[0], dtype=dtype, device=B.device)
    step = max(1, _PRODUCT_FLOATS // max(d_G * max(d_A, T), 1))
    for s in range(0, n, step):
        As, Bs = A[s : s + step].mT, B[s : s + step]
        if d_A < T:
            Jt = (torch.bmm(As, Bs).reshape(-1, d_G) @ term.QG).reshape(-1, d_A, d_G)
        else:
            R = Bs.reshape(-1, d_G) @ term.QG
            Jt = torch.bmm(As, R.reshape(-1, T, d_G))
        torch.mm(Jt.square_().reshape(Jt.shape[0], -1), invT.t(), out=out[s : s + step])
    return out


def _fast_moments(
    model: nn.Module,
    b: Batch,
    terms: list[_Term],
    output_fn: OutputFn,
    dtype: torch.dtype,
    lowrank_w: torch.Tensor | None = None,
    full: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MAP outputs ``(N, D)`` and the terms' variances ``(N, D, G)`` (``full``: the
    covariances ``(N, D, D, G)``, every output column pulled back in one group) from one forward
    (recording every layer's input and adding a zero perturbation to its output) and
    one backward per output column ``c`` (the perturbations' gradients are the
    per-sample output gradients ``b_c``; no weight gradient is formed).

    Per term, with ``ã`` and ``b_c`` rotated into its eigenbasis:
    ``Var_c = Σ_{o,i} (Σ_t b_cto ã_ti)² inv_oi``; for one position (``T = 1``) this is
    ``Σ_o b_co² M_o`` with ``M = (ã²) invᵀ`` computed once for every ``c``; the
    covariance of columns ``c`` and ``e`` is ``Σ_o b_co b_eo M_o`` (``T = 1``), else
    ``Σ_{o,i} J_c,oi J_e,oi inv_oi``.
    """
    mods = list(dict.fromkeys(t.module for t in terms))
    store: dict[nn.Module, tuple[torch.Tensor, int, torch.Tensor]] = {}
    outs: dict[nn.Module, tuple[torch.Tensor, int]] = {}
    ins: dict[nn.Module, torch.Tensor] = {}

    twice: set[nn.Module] = set()

    def hook(m: nn.Module, inp: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        if m in store:
            twice.add(m)
        e = zero_perturbation(out)
        store[m] = (inp[0].detach(), inp[0]._version, e)
        ins[m] = inp[0]
        res = out + e
        outs[m] = (res, res._version)
        return res

    raw = hooked_output(model, b, output_fn, "the batch", [(m, hook) for m in mods])
    check_captured(
        model, twice, [m for m in mods if m not in store],
        [(m, a, version) for m, (a, version, _) in store.items()],
        b.size, [(m, a) for m, (a, _, _) in store.items()],
    )  # fmt: skip
    out = raw.reshape(b.size, -1)
    # a layer whose (unmodified) output is the model's output has the one-hot output
    # gradient e_c for column c
    head = {m for m, (res, v) in outs.items() if res is raw and raw.dim() == 2 and res._version == v}
    n, d = out.shape
    G = terms[0].inv.shape[0]
    var = torch.zeros((n, d, d, G) if full else (n, d, G), dtype=dtype, device=out.device)
    acts = [_inputs(t, store[t.module][0], dtype) for t in terms]
    single = [A.shape[1] == 1 for A in acts]
    # T = 1: M_g = (ã²) inv_gᵀ, (G, N, d_G), shared by every output column
    pre = [
        torch.einsum("ni,goi->gno", A[:, 0] ** 2, t.inv) if one else None
        for t, A, one in zip(terms, acts, single, strict=True)
    ]
    # low-rank: Z = ã V_kᵀ, (N, r, d_G), so that J_c · v_k = Σ_o b_co Z_ko (T = 1)
    pre_v = [
        torch.einsum("ni,koi->nko", A[:, 0], t.V) if one and t.V is not None else None
        for t, A, one in zip(terms, acts, single, strict=True)
    ]
    r = 0 if lowrank_w is None else lowrank_w.shape[1]
    work = []
    for t, A, M, Z in zip(terms, acts, pre, pre_v, strict=True):
        if t.module in head and M is not None and Z is None and not full:
            # b_c = e_c: (Q_Gᵀ b_c)_o = Q_G[c, o], so Var_c = Σ_o Q_G[c, o]² M_o, every
            # column in one product and no backward pass for this term
            for gi in range(G):
                var[..., gi] += M[gi] if t.QG is None else M[gi] @ t.QG.square().t()
        else:
            work.append((t, A, M, Z))
    if not work and r == 0:
        return out.detach().to(dtype), var
    # the backward starts at the output with the one-hot rows e_c, or, when the output
    # layer is a Linear read above, at its input x with the rows W[c] (out = x Wᵀ + b:
    # ∂f_c/∂x = W[c]), one product and one node less per column
    start, seeds, skip = out, torch.eye(d, dtype=out.dtype, device=out.device), None
    last = next(iter(head)) if len(head) == 1 else None
    if (
        isinstance(last, nn.Linear)
        and layers.runs_own_forward(last, nn.Linear)  # ∂f_c/∂x = W[c] needs F.linear(x, W)
        and all(t.module is not last for t, *_ in work)
        and ins[last].dim() == 2
        and ins[last].requires_grad
    ):
        start, seeds, skip = ins[last], last.weight.detach(), last
    mods = [m for m in mods if m is not skip]
    es = [store[m][2] for m in mods]
    index = {m: i for i, m in enumerate(mods)}
    # output columns are pulled back one at a time (a vmapped, is_grads_batched backward
    # is no faster on CPU), their gradients stacked in groups for the products
    group = d if full else max(1, _GROUP_FLOATS // max(sum(e.numel() for e in es), 1))
    # one column at a time, one position: √M, so that Σ_o B²_o M_o = Σ_o (B_o √M_o)²
    roots = {id(M): M.sqrt() for _, _, M, Z in work if not full and M is not None and Z is None}
    for c0 in range(0, d, group):
        cols = list(range(c0, min(c0 + group, d)))
        per = []
        for c in cols:
            u = seeds[c].expand_as(start)  # ∂f_c/∂start, the same row for every sample
            per.append(
                torch.autograd.grad(start, es, u, retain_graph=c < d - 1, allow_unused=True)
            )
        k = len(cols)
        proj = torch.zeros(k, n, r, dtype=dtype, device=out.device) if r else None
        for t, A, M, Z in work:
            gs = [p[index[t.module]] for p in per]
            if any(g is None for g in gs):  # the output does not depend on this layer
                continue
            if k == 1 and M is not None and Z is None and not full:
                # one column, one position: Σ_o ((Q_Gᵀ b_c)_no √M_gno)² with the fewest
                # passes (the rotated product is fresh: weighted and squared in place)
                B = gs[0].reshape(n, -1).to(dtype)
                R = B @ t.QG if t.QG is not None else None
                root = roots[id(M)]
                for gi in range(G):
                    W = R.mul_(root[gi]) if R is not None and gi == G - 1 else (
                        (B if R is None else R) * root[gi])
                    var[:, c0, gi] += W.square_().sum(-1)
                continue
            if M is None and t.QG is not None and t.V is None and not full:
                for j, gj in enumerate(gs):  # T > 1, rotated: column by column
                    var[:, c0 + j] += _rotated_variance(t, A, gj, dtype)
                continue
            g = gs[0].unsqueeze(0) if k == 1 else torch.stack(gs)
            B = _out_grads(t, g.reshape(k * n, *g.shape[2:]), dtype)
            B = B.reshape(k, n, *B.shape[1:])  # (k, N, T, d_G)
            if Z is not None and proj is not None:
                proj += torch.einsum("cno,nko->cnk", B[:, :, 0], Z)
            if M is not None and full:  # k = d: every pair of columns
                B1 = B[:, :, 0]
                for gi in range(G):
                    var[..., gi] += torch.einsum("cno,eno->nce", B1 * M[gi], B1)
                continue
            if M is not None:
                # a rotated B is a fresh product: squared in place (an unrotated one may be
                # the gradient tensor of another layer too)
                B1 = B[:, :, 0]
                B2 = B1.square_() if t.QG is not None else B1.square()
                for gi in range(G):  # Σ_o B²_cno M_gno: a product (in place for the last
                    # candidate: twice as fast as vecdot's temporary) and a row sum
                    prod = B2.mul_(M[gi]) if gi == G - 1 else B2 * M[gi]
                    var[:, c0 : c0 + k, gi] += prod.sum(-1).t()
                continue
            inv = t.inv.reshape(G, -1)
            step = max(1, _PRODUCT_FLOATS // max(k * B.shape[-1] * A.shape[-1], 1))
            for s in range(0, n, step):
                J = B[:, s : s + step].transpose(-1, -2) @ A[s : s + step]  # (k, n_s, d_G, d_A)
                if t.V is not None and proj is not None:
                    proj[:, s : s + step] += J.reshape(k, J.shape[1], -1) @ t.V.reshape(r, -1).t()
                if full:
                    Jf = J.reshape(k, J.shape[1], -1)
                    for gi in range(G):
                        var[s : s + step, ..., gi] += torch.einsum("cnp,enp->nce", Jf * inv[gi], Jf)
                    continue
                v = J.square_().reshape(k * J.shape[1], -1) @ inv.t()
                var[s : s + step, c0 : c0 + k] += v.reshape(k, -1, G).transpose(0, 1)
        if proj is not None and lowrank_w is not None and full:
            var -= torch.einsum("cnk,enk,gk->nceg", proj, proj, lowrank_w)
        elif proj is not None and lowrank_w is not None:
            var[:, c0 : c0 + k] -= torch.einsum("cnk,gk->ncg", proj.square(), lowrank_w)
    return out.detach().to(dtype), var


def _exact_damping(fisher: FisherLike) -> FisherLike:
    """The posterior precision is ``N F + δ I`` exactly: a :class:`natgrad.KroneckerFisher`
    that solves with factored damping is read with exact damping instead (as its
    ``logdet`` and ``inverse_diagonal``, which the marginal likelihood uses, always are)."""
    from natgrad.curvature.kronecker import KroneckerFisher

    if not isinstance(fisher, KroneckerFisher) or fisher.damping_mode == "exact":
        return fisher
    return KroneckerFisher(
        fisher.blocks, fisher.diag, fisher.n_samples, kind=fisher.kind,
        diag_reasons=fisher.diag_reasons, labels=fisher.labels, likelihood=fisher.likelihood,
        order=fisher.order, damping_mode="exact",
    )  # fmt: skip


class _Posterior:
    """The predictive moments of one call for the candidates ``deltas``: the capture
    path for the layers :func:`_fast_terms` covers, ``vmap`` Jacobians for the rest
    (their sum is exact: the posterior is block diagonal between the two groups);
    ``full``: the output covariances instead of the variances."""

    def __init__(
        self,
        model: nn.Module,
        fisher: FisherLike,
        chosen: dict[str, nn.Parameter],
        n: int,
        deltas: list[float],
        lik: Likelihood,
        output_fn: OutputFn | None,
        chunk_size: int | None,
        engine: str,
        full: bool = False,
    ):
        self.model, self.fisher, self.chosen, self.n = model, _exact_damping(fisher), chosen, n
        self.full = full
        self.deltas = torch.tensor(deltas, dtype=torch.float64)
        self.lik, self.chunk_size, self.engine = lik, chunk_size, engine
        self.output_fn = output_fn or default_output_fn
        self.dtype = model_acc_dtype(model)
        self.device = model_device(model)
        self.terms: list[_Term] | None = None
        self.lowrank_w: torch.Tensor | None = None
        self.work = self.dtype  # the capture path's dtype
        self.rest: dict[str, nn.Parameter] = {}
        self.inv: dict[str, torch.Tensor] | Reducer | None = None
        # the capture plan and the input signature the terms were set up for (within one
        # predictive only the inputs can change, as in a Fisher pass)
        self.plan: Plan | None = None
        self.sig: Any = None
        self.routed: set[str] = set()  # modules found running on routed rows: on vmap

    def _setup(self, b: Batch) -> None:
        from natgrad.curvature.lowrank import LowRankFisher

        first = b.select(0, 1)
        with torch.no_grad(), internal_pass():  # a failing forward is reported on the user's batch
            try:
                self.model(*first.args, **first.kwargs)
            except Exception as exc:
                probe_failed(exc, self.model, first, b, "the batch")
        terms: list[_Term] = []
        covered: list[str] = []
        if self.engine != "vmap":
            plan = Plan(self.model, self.lik, "exact", 1, list(self.chosen), self.output_fn,
                        None, what="the Laplace predictive")  # fmt: skip
            fast = set(cached_split(plan, b).module_names) - self.routed
            self.plan, self.sig = plan, input_signature(b)
            if isinstance(self.fisher, LowRankFisher):
                terms, covered, self.lowrank_w = _lowrank_terms(
                    self.model, self.fisher, self.chosen, fast, self.n, self.deltas, self.device
                )
                self.work = torch.float64  # ‖J‖²/δ - Σ w (J·v)² cancels: float64 throughout
            else:
                terms, covered = _fast_terms(self.model, self.fisher, self.chosen, fast, self.n,
                                             self.deltas, self.dtype, self.device)  # fmt: skip
            if self.engine == "fast" and not terms:
                raise ValueError(
                    "engine='fast' found no parameter the Laplace capture path covers (the "
                    "weights and biases of nn.Linear / nn.Conv1d / nn.Conv2d used once per "
                    "forward, with a diagonal, K-FAC or EKFAC posterior block); pass "
                    "engine='auto' or engine='vmap'."
                )
        self.terms = terms
        self.rest = {k: p for k, p in self.chosen.items() if k not in set(covered)}
        if self.rest:
            self.inv = _inverse_precisions(self.fisher, self.rest, self.n, self.deltas,
                                           self.dtype, self.device, self.full)  # fmt: skip
        logger.info(
            "fisher_uncertainty: capture path for %d parameter tensors, vmap for %d",
            len(covered), len(self.rest),
        )  # fmt: skip

    def moments(self, b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean (N, D), var (N, D, G))`` of one parsed batch (``full``: ``(N, D, D, G)``).

        A captured layer found running on rows that are not the batch's samples (index
        routing, :class:`natgrad.engine.capture.RowsNotSamples`) is moved to ``vmap``
        (for later calls too, through the remembered split) and the batch is redone."""
        if self.terms is None or (self.plan is not None and input_signature(b) != self.sig):
            # the first batch, or one with another input signature (a list of another
            # length may use a captured weight outside its layer): its own split
            self._setup(b)
        while True:
            try:
                return self._moments(b)
            except RowsNotSamples as exc:
                names = {n for n, m in self.model.named_modules() if m in exc.modules}
                if self.plan is None or names <= self.routed:
                    raise
                logger.info("fisher_uncertainty: %s", exc)
                self.routed |= names
                drop_modules(cached_split(self.plan, b), exc.modules, self.plan)
                self._setup(b)

    def _moments(self, b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`moments` of a set-up posterior."""
        assert self.terms is not None  # set by _setup
        if not self.terms:
            assert self.inv is not None  # every chosen parameter is in rest
            return _moments(self.model, b, self.rest, self.inv, self.output_fn,
                            self.chunk_size, self.dtype, self.full)  # fmt: skip
        width = sum(t.inv.shape[0] * t.inv.shape[1] + t.inv.shape[2] for t in self.terms)
        width += sum(t.V.shape[0] * t.V.shape[1] for t in self.terms if t.V is not None)
        chunk = self.chunk_size or max(1, CHUNK_FLOATS // max(width, 1))
        means, variances = [], []
        for start in range(0, b.size, chunk):
            sub = b.select(start, min(start + chunk, b.size))
            mean, var = _fast_moments(self.model, sub, self.terms, self.output_fn, self.work,
                                      self.lowrank_w, self.full)  # fmt: skip
            mean, var = mean.to(self.dtype), var.to(self.dtype)
            if self.rest:
                assert self.inv is not None  # set with rest
                _, var_rest = _moments(self.model, sub, self.rest, self.inv, self.output_fn,
                                       self.chunk_size, self.dtype, self.full)  # fmt: skip
                var = var + var_rest
            means.append(mean)
            variances.append(var)
        return torch.cat(means), torch.cat(variances)


# -- the predictive ------------------------------------------------------------------------


def _entropy_categorical(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-30).log()).sum(-1)


def _entropy_bernoulli(p: torch.Tensor) -> torch.Tensor:
    q = 1 - p
    return -(p * p.clamp_min(1e-30).log() + q * q.clamp_min(1e-30).log()).sum(-1)


def _sqrt_psd(cov: torch.Tensor) -> torch.Tensor:
    """The symmetric square root ``U diag(√max(λ, 0)) Uᵀ`` of each ``(D, D)`` covariance
    (unique, so the draws do not depend on the eigenvectors' signs)."""
    lam, U = torch.linalg.eigh(0.5 * (cov + cov.mT))
    root: torch.Tensor = (U * lam.clamp_min(0).sqrt().unsqueeze(-2)) @ U.mT
    return root


def _full_cov(lik: Likelihood, link: str) -> bool:
    """Whether the predictive needs the full ``D x D`` logit covariance (softmax MC draws;
    for tokens, each token's ``C x C`` block of it)."""
    return lik.name in ("categorical", "token_categorical") and link == "mc"


def _predict(
    lik: Likelihood,
    link: str,
    mean: torch.Tensor,
    spread: torch.Tensor,
    eps: torch.Tensor | None,
) -> dict[str, Any]:
    """Probabilities, entropy and epistemic score from ``mean`` ``(N, D)`` and ``spread``:
    the logit variances ``(N, D)``, or the full logit covariance ``(N, D, D)`` (what
    categorical MC draws use; see :func:`_full_cov`), whose diagonal is the variances."""
    cov = spread if _full_cov(lik, link) else None
    var = spread if cov is None else cov.diagonal(dim1=1, dim2=2)
    if lik.name == "gaussian":
        pred_var = var + lik.sigma**2  # type: ignore[attr-defined]  # only the gaussian has sigma
        entropy = 0.5 * torch.log(2 * math.pi * math.e * pred_var).sum(-1)
        return dict(
            probs=None,
            predictive_variance=pred_var,
            entropy=entropy,
            epistemic=var.sum(-1),
            epistemic_kind="total_variance",
        )
    squash = (lambda z: z.softmax(-1)) if lik.name == "categorical" else torch.sigmoid
    ent = _entropy_categorical if lik.name == "categorical" else _entropy_bernoulli
    if link == "probit":
        probs = squash(mean / torch.sqrt(1 + _PROBIT * var))
        return dict(
            probs=probs,
            predictive_variance=None,
            entropy=ent(probs),
            epistemic=var.sum(-1),
            epistemic_kind="total_variance",
        )
    assert eps is not None  # drawn by _mc_noise for link="mc"
    if cov is not None:  # jointly Gaussian logits: f = μ + Σ^{1/2} ε
        noise = torch.einsum("nde,sne->snd", _sqrt_psd(cov), eps)
    else:  # sigmoid draws: each probability depends on its own logit's marginal only
        noise = var.sqrt().unsqueeze(0) * eps
    draws = squash(mean.unsqueeze(0) + noise)  # (S, N, D)
    probs = draws.mean(0)
    entropy = ent(probs)
    return dict(
        probs=probs,
        predictive_variance=None,
        entropy=entropy,
        epistemic=(entropy - ent(draws).mean(0)).clamp_min(0),
        epistemic_kind="mutual_information",
    )


def _mc_noise(
    lik: Likelihood,
    link: str,
    n_samples: int,
    mean: torch.Tensor,
    generator: torch.Generator,
    device: torch.device,
) -> torch.Tensor | None:
    """``n_samples`` standard normal draws shaped like ``mean`` for ``link="mc"`` (else None)."""
    if link != "mc" or lik.name == "gaussian":
        return None
    eps = torch.randn((int(n_samples), *mean.shape), generator=generator, dtype=mean.dtype,
                      device=generator.device)  # a CUDA generator draws on its device
    return eps.to(device)


def _token_shape(
    model: nn.Module, b: Batch, output_fn: OutputFn | None, lik: Likelihood
) -> tuple[int, int] | None:
    """``(T, C)`` of a ``token_categorical`` model's logits ``(N, T, C)``, read off the
    first sample's forward (one sample: the batch's ``T`` may differ from another's);
    for ``categorical``, None after checking that each sample's logits have one axis
    longer than 1 (``(N, C)``, or ``(N, 1, C)``: the predictive flattens them, and the
    softmax of a sequence model's flattened ``(T, C)`` logits would mix its tokens'
    classes); for the other likelihoods None, without a forward.

    Raises:
        ValueError: token logits not of rank 3, or categorical logits with two or more
            axes longer than 1.
    """
    if lik.name not in ("categorical", "token_categorical"):
        return None
    with torch.no_grad():
        raw = call_model(model, b.select(0, 1), "the first sample of the batch")
        out = (output_fn or default_output_fn)(raw)
    if lik.name == "categorical":
        if sum(int(k) > 1 for k in out.shape[1:]) > 1:
            raise ValueError(
                "likelihood='categorical' needs logits of shape (N, C), one categorical per "
                f"sample; the model's output has shape {tuple(out.shape)} for one sample. "
                "For (N, T, C) sequence outputs use likelihood='token_categorical' "
                "(estimate the curvature with it), or pass output_fn= returning (N, C) logits."
            )
        return None
    if out.dim() != 3:
        raise ValueError(
            "likelihood='token_categorical' needs logits of shape (N, T, C), one categorical "
            f"per token; the model's output has shape {tuple(out.shape)} for one sample. "
            "For one label per sample use likelihood='categorical' (estimate the curvature "
            "with it), or pass output_fn= returning the (N, T, C) logits."
        )
    return int(out.shape[1]), int(out.shape[2])


def _token_rows(
    mean: torch.Tensor, spread: torch.Tensor, shape: tuple[int, int], full: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """One row per token: means ``(N·T, C)`` and spreads ``(N·T, C)`` (variances) or
    ``(N·T, C, C)`` (``full``: each token's diagonal block of the ``(T·C) x (T·C)``
    covariance of its sequence's logits) from the flattened ``(N, T·C)`` moments."""
    T, C = shape
    n = mean.shape[0]
    rows = mean.reshape(n * T, C)
    if not full:
        return rows, spread.reshape(n * T, C, *spread.shape[2:])
    blocks = spread.reshape(n, T, C, T, C, *spread.shape[3:]).diagonal(dim1=1, dim2=3)
    # (n, C, C, [G,] T) -> (n, T, C, C, [G])
    blocks = blocks.movedim(-1, 1)
    return rows, blocks.reshape(n * T, C, C, *spread.shape[3:])


def _prepare(
    model: nn.Module,
    fisher: FisherLike,
    params: ParamSpec,
    likelihood: str | Likelihood | None,
    n_data: int | None,
    link: str,
    n_samples: int,
    chunk_size: int | None,
    subset: str | None = None,
) -> tuple[Likelihood, dict[str, nn.Parameter], int, str]:
    params = _subset_params(model, params, subset)
    check_fixed_model(model, "the Laplace predictive")
    if not _structured(fisher):
        check_fisher_type(fisher)
    check_int("chunk_size", chunk_size, 1, optional=True)
    link = check_choice("link", link, LINKS)
    check_int("n_samples", n_samples, 1)
    lik = _resolve_likelihood(likelihood, fisher)
    if _structured(fisher):
        chosen = _resolve_params_curvature(model, fisher, params)
    else:
        chosen = _resolve_params(model, cast(Mapping[str, torch.Tensor], fisher), params)
    return lik, chosen, _resolve_n(fisher, n_data), link


@with_autograd
def fisher_uncertainty(
    model: nn.Module,
    batch: Any,
    fisher: FisherLike,
    *,
    prior_precision: float = 1.0,
    n_data: int | None = None,
    params: ParamSpec = None,
    subset: Literal["all", "last_layer"] | None = None,
    link: Literal["probit", "mc"] = "probit",
    n_samples: int = 100,
    likelihood: str | Likelihood | None = None,
    chunk_size: int | None = None,
    generator: torch.Generator | None = None,
    output_fn: OutputFn | None = None,
    engine: EngineName = "auto",
) -> UncertaintyReport:
    """The linearized Laplace predictive with posterior precision ``N·F + δ`` (any curvature).

    Why the sum ``N·F`` and not the mean ``F``: the log-posterior is
    ``Σ_n log p(y_n | x_n, θ) + log p(θ)``, so its curvature adds one Fisher per
    training sample, and :class:`natgrad.DiagonalFisher` stores the per-sample mean.

    The outputs are Gaussian with mean ``μ = f(x; θ*)`` and variance
    ``Var f_c(x) = Σ_i J_ci(x)² / (N F_i + δ)`` (diagonal ``F``). Then

    * categorical, ``link="probit"``: ``p = softmax(μ / sqrt(1 + π/8 · Var f))`` (per
      class); epistemic score = total logit variance ``Σ_c Var f_c``;
    * bernoulli, ``link="probit"``: ``p = sigmoid(μ / sqrt(1 + π/8 · Var f))``; same score;
    * ``link="mc"``: ``n_samples`` logit draws (seeded), ``p`` = mean of their softmaxes
      (sigmoids); epistemic score = mutual information ``H[E p] - E[H[p]]``. Categorical:
      the logits are jointly Gaussian, ``f = μ + Σ^{1/2} ε`` with the full output
      covariance ``Σ = J (N F + δ I)⁻¹ Jᵀ`` (``D x D``, its symmetric square root, ``ε``
      standard normal); bernoulli: ``N(μ_c, Var f_c)`` per logit (each probability
      depends on its own logit only);
    * gaussian (regression, known ``σ``): predictive ``N(μ, Var f + σ²)`` in closed
      form (``link`` is not used); epistemic score = ``Σ_d Var f_d``;
    * token_categorical (logits ``(N, T, C)``): each token ``t`` is a categorical with
      Gaussian logits ``N(f*_t, J_t (N F + δ I)⁻¹ J_tᵀ)`` (``J_t`` its ``C x P``
      Jacobian), through either link as above; results per token, ``(N, T, C)`` and
      ``(N, T)``. ``N`` is the number of training *sequences* (the curvature's
      ``n_samples``: its per-sample term sums the sequence's kept tokens). Every position
      gets a predictive (labels, ``ignore_index`` and ``shift`` play no part here). The
      MC link forms the ``(T·C) x (T·C)`` covariance of each sequence and keeps its
      ``T`` diagonal blocks (memory ``N (T·C)²``). Cost: the ``D = T·C`` outputs are
      pulled back one column at a time, ``T·C`` backward passes per batch (a small
      vocabulary or a last-layer subset keeps it affordable).

    Any :class:`natgrad.Curvature` (Kronecker, low-rank, ...): the GLM predictive is
    ``Var f_c(x) = J_c (N F + δ I)⁻¹ J_cᵀ = J_c (F + (δ/N) I)⁻¹ J_cᵀ / N``: on the capture
    path (module doc) for diagonal, K-FAC, EKFAC and low-rank posteriors, else one
    ``curvature.solve`` per row ``J_c(x)`` of the Jacobian (batched with
    ``torch.func.vmap`` where the curvature's solve allows it, else a loop). With
    ``subset="last_layer"`` (or ``params``) and a curvature covering more parameters, the rows are zero off the subset; that is the
    last-layer Laplace posterior for block-diagonal kinds (``"diag"``, ``"kfac"``,
    ``"ekfac"``) and is refused for others (estimate the curvature on the subset).

    ``engine="auto"`` computes the layers it can on the capture path (see the module
    doc; one forward and one backward per output column, about 5-10 forward+backward
    passes for 10 classes) and the rest with per-sample ``vmap`` Jacobians; both give
    the same numbers. The precision is always ``N F + δ I`` with exact damping (a
    :class:`natgrad.KroneckerFisher` with ``damping_mode="factored"`` is read in its
    eigenbasis, as its ``logdet`` is).

    Args:
        model: the trained model at ``θ*`` (eval mode; it is not modified).
        batch: ``x``, ``(x, y)`` or a dict batch of ``N`` inputs (labels are ignored),
            or an iterable of such batches (a DataLoader): the per-batch results are
            concatenated along the sample axis, and ``link="mc"`` draws continue from
            one ``generator`` across the batches.
        fisher: diagonal Fisher (:class:`natgrad.DiagonalFisher` or ``{name: tensor}``) or
            any :class:`natgrad.Curvature`.
        prior_precision: ``δ > 0``.
        n_data: ``N``, the number of training samples (default ``fisher.n_samples``).
        params: the parameters treated as uncertain (default: all the Fisher covers; e.g.
            the last layer only); the others stay at ``θ*``.
        subset: ``"all"`` (every covered parameter) or ``"last_layer"`` (the trainable
            parameters of the last registered module that has any, in
            ``model.named_modules()`` order); instead of ``params``. The first batch's
            forward checks that this module is also the last one to run (a ValueError
            names the one that is: pass its parameters as ``params=``). A module whose
            weight is tied to an earlier parameter (a head sharing the embedding matrix)
            is refused, naming both (pass ``params=`` instead).
        link: ``"probit"`` or ``"mc"``.
        n_samples: logit draws for ``link="mc"``.
        likelihood: default ``fisher.likelihood``; pass ``natgrad.Gaussian(sigma)`` for
            regression with ``σ != 1``.
        chunk_size: samples per Jacobian chunk (memory ``≈ chunk × D × P``).
        generator: for ``link="mc"`` (default: seeded with 0).
        output_fn: maps model outputs to the output tensor.
        engine: ``"auto"`` (the capture path where it applies, ``vmap`` Jacobians for
            the rest), ``"vmap"`` (every parameter by ``vmap`` Jacobians) or ``"fast"``
            (as ``"auto"``, but an error when no parameter takes the capture path).

    Returns:
        :class:`UncertaintyReport` with per-sample tensors (``D`` outputs per sample).

    Raises:
        ValueError: unsupported likelihood or link, parameters the Fisher lacks, bad
            ``prior_precision`` / ``n_data``, train-mode BatchNorm or dropout, an
            iterable that yields no batches, an unknown ``engine``, ``engine="fast"``
            when no parameter takes the capture path.

    Warns:
        UserWarning: a ``"gaussian"`` curvature and no ``likelihood=``: the curvature
            records no ``σ``, so the predictive uses ``σ = 1``.

    Example:
        >>> import torch
        >>> from natgrad import DiagonalFisher
        >>> model = torch.nn.Linear(2, 3)
        >>> F = DiagonalFisher({k: torch.ones_like(p) for k, p in model.named_parameters()}, 10)
        >>> r = fisher_uncertainty(model, torch.zeros(1, 2), F, prior_precision=1.0)
        >>> r.logit_variance  # only the bias moves the outputs at x = 0: 1 / (10·1 + 1)
        tensor([[0.0909, 0.0909, 0.0909]])
    """
    delta = check_positive("prior_precision", prior_precision)
    lik, chosen, n, _ = _prepare(  # _prepare checks link and returns it unchanged
        model, fisher, params, likelihood, n_data, link, n_samples, chunk_size, subset
    )
    _warn_default_sigma(likelihood, lik)
    check_choice("engine", engine, ENGINES)
    device = model_device(model)
    full = _full_cov(lik, link)
    post = _Posterior(model, fisher, chosen, n, [delta], lik, output_fn, chunk_size, engine,
                      full)  # fmt: skip
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    parts: list[dict[str, Any]] = []
    for one in [batch] if is_single_batch(batch) else iterate_batches(batch):
        b = parse_batch(one).to(device)
        if subset == "last_layer" and not parts:
            _check_last_layer(model, b, list(chosen))
        mean, var = post.moments(b)  # first: a failing forward is reported on the batch
        # (T, C) for tokens, else None; the categorical check needs one batch (the rank of
        # a model's logits does not change between batches): one forward fewer per batch
        shape = (None if parts and lik.name == "categorical"
                 else _token_shape(model, b, output_fn, lik))
        spread = var[..., 0]  # (N, D, D) when full, else (N, D)
        row_lik = lik
        if shape is not None:  # one categorical row per token: (N·T, C)
            row_lik = get_likelihood("categorical")
            mean, spread = _token_rows(mean, spread, shape, full)
        lik.check_output(mean)
        cov = spread if full else None
        var = spread.diagonal(dim1=1, dim2=2) if full else spread
        eps = _mc_noise(row_lik, link, n_samples, mean, gen, device)
        pred = _predict(row_lik, link, mean, spread, eps)
        part = dict(mean=mean, logit_variance=var, logit_covariance=cov, **pred)
        if shape is not None:  # back to (N, T, ...)
            part = {k: v if not isinstance(v, torch.Tensor) else
                    v.reshape(-1, shape[0], *v.shape[1:]) for k, v in part.items()}
        parts.append(part)
    if not parts:
        raise ValueError(
            "batch yielded no batches: pass a batch of inputs or a non-empty DataLoader."
        )
    lengths = sorted({tuple(p["mean"].shape[1:]) for p in parts})
    if len(lengths) > 1:
        raise ValueError(
            f"The batches' outputs have different shapes per sample ({lengths[:4]}), so "
            "their results cannot be concatenated: pad every batch to one sequence length, "
            "or call fisher_uncertainty once per batch."
        )
    fields = {
        k: v if isinstance(v, str) or v is None else torch.cat([p[k] for p in parts])
        for k, v in parts[0].items()
    }
    return UncertaintyReport(
        likelihood=lik.name, link=link, prior_precision=delta, n_data=n, **fields  # type: ignore[arg-type]  # fields holds each report field's own type
    )


# -- choosing the prior precision ----------------------------------------------------------


def _nll(lik: Likelihood, pred: dict[str, Any], mean: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample negative log predictive density, shape ``(N,)``."""
    if lik.name == "gaussian":
        v: torch.Tensor = pred["predictive_variance"]
        r = target.reshape(mean.shape).to(mean.dtype) - mean
        return (0.5 * torch.log(2 * math.pi * v) + r**2 / (2 * v)).sum(-1)
    p: torch.Tensor = pred["probs"]
    if lik.name == "categorical":
        return -p.gather(-1, target.long().view(-1, 1)).squeeze(-1).clamp_min(1e-30).log()
    y = target.reshape(p.shape).to(p.dtype)
    return -(y * p.clamp_min(1e-30).log() + (1 - y) * (1 - p).clamp_min(1e-30).log()).sum(-1)


def _token_nll(
    lik: Likelihood, probs: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """``(Σ -log p_t(y_t), kept tokens)`` over the tokens ``lik`` keeps: labels equal to
    its ``ignore_index`` are left out and, with ``shift``, position ``t`` predicts the
    label at ``t + 1`` (as the Fisher reads them)."""
    ignore = int(getattr(lik, "ignore_index", -100))
    if getattr(lik, "shift", False):
        probs, target = probs[:, :-1], target[:, 1:]
    keep = target != ignore
    safe = torch.where(keep, target, torch.zeros_like(target))
    logp = probs.gather(-1, safe.unsqueeze(-1)).squeeze(-1).clamp_min(1e-30).log()
    return -(logp * keep).sum(), int(keep.sum())


def _marglik_terms(
    model: nn.Module,
    fisher: Mapping[str, torch.Tensor],
    chosen: Mapping[str, nn.Parameter],
    n: int,
    dtype: torch.dtype,
) -> tuple[float, torch.Tensor]:
    """``(‖θ*‖², [N F_i for every i])`` over the chosen parameters."""
    theta_sq = sum(float((p.detach().to(dtype) ** 2).sum()) for p in chosen.values())
    nf = torch.cat([n * fisher[k].detach().to("cpu", torch.float64).reshape(-1) for k in chosen])
    return theta_sq, nf


def _log_marglik(theta_sq: float, nf: torch.Tensor, delta: float) -> float:
    p = nf.numel()
    return float(
        -0.5 * delta * theta_sq + 0.5 * p * math.log(delta) - 0.5 * torch.log(nf + delta).sum()
    )


def _marglik_optimum(theta_sq: float, nf: torch.Tensor) -> float:
    """Root of ``d/dδ log Z = ½(γ(δ)/δ - ‖θ*‖²)``, ``γ(δ) = Σ_i N F_i / (N F_i + δ)``.

    ``γ(δ)/δ`` decreases strictly from ``+∞`` to 0, so the root is unique; bisection on
    ``log δ``.
    """
    if theta_sq <= 0 or not (nf > 0).any():
        raise ValueError(
            "The marginal likelihood has no finite optimum: the selected parameters are all "
            "zero or the Fisher is zero everywhere. Use method='grid' with validation data."
        )

    def h(log_d: float) -> float:
        d = math.exp(log_d)
        return float((nf / (nf + d)).sum()) / d - theta_sq

    return _log_root(h, what="the selected parameters are all zero or the Fisher is zero")


def _log_root(h: Callable[[float], float], *, what: str, tol: float = 1e-13) -> float:
    """``δ = exp(x)`` at the root of ``h(x)``, a function that decreases through 0: the
    bracket is widened by 30 at a time (at most 10 times each way), then bisected.

    Raises:
        ValueError: no sign change within the widened bracket (``what`` says why).
    """
    lo, hi = -30.0, 30.0
    for _ in range(10):
        if h(lo) >= 0:
            break
        lo -= 30.0
    for _ in range(10):
        if h(hi) <= 0:
            break
        hi += 30.0
    if not (h(lo) >= 0 >= h(hi)):
        raise ValueError(
            f"The marginal likelihood has no finite optimum ({what}); use method='grid' "
            "with validation data."
        )
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if h(mid) > 0:
            lo = mid
        else:
            hi = mid
        if hi - lo < tol:
            break
    return math.exp(0.5 * (lo + hi))


@with_autograd
def optimize_prior_precision(
    model: nn.Module,
    fisher: FisherLike,
    val_data: Any = None,
    *,
    method: Literal["grid", "marglik"] = "grid",
    grid: Sequence[float] | None = None,
    n_data: int | None = None,
    params: ParamSpec = None,
    subset: Literal["all", "last_layer"] | None = None,
    link: Literal["probit", "mc"] = "probit",
    n_samples: int = 100,
    likelihood: str | Likelihood | None = None,
    chunk_size: int | None = None,
    generator: torch.Generator | None = None,
    output_fn: OutputFn | None = None,
    engine: EngineName = "auto",
) -> PriorPrecisionResult:
    """Choose the prior precision ``δ`` of the Laplace posterior ``N·F + δI``, for a
    diagonal ``F`` or any :class:`natgrad.Curvature`.

    * ``method="grid"``: the ``δ`` in ``grid`` with the lowest mean validation negative
      log-likelihood ``-(1/M) Σ_m log p(y_m | x_m)`` under the Laplace predictive of
      :func:`fisher_uncertainty` (same ``link``). The Jacobians are computed once per
      chunk and reused for every candidate. ``token_categorical``: ``M`` counts the kept
      tokens (labels other than the likelihood's ``ignore_index``; with ``shift``, the
      logits at ``t`` score the label at ``t + 1``), so the score is the mean NLL per
      token; pass ``likelihood=natgrad.TokenCategorical(...)`` when the curvature was
      estimated with other settings (a curvature records only the name).
    * ``method="marglik"``: maximize the Laplace log marginal likelihood of the
      GGN posterior,
      ``log Z(δ) = log p(D | θ*) - ½ δ ‖θ*‖² + ½ P log δ - ½ log det(N F + δI)``
      (the ``2π`` terms of prior and posterior cancel; for a diagonal ``F`` the last
      term is ``½ Σ_i log(N F_i + δ)``, for a structured curvature its ``logdet``).
      ``log p(D | θ*)`` does not depend on ``δ`` and is left out of the scores. Its
      derivative vanishes where ``δ = γ / ‖θ*‖²`` with ``γ = P − δ tr (N F + δI)⁻¹``
      (the effective number of parameters; ``Σ_i N F_i / (N F_i + δ)`` for a diagonal
      ``F``); the exact root is returned, and ``scores`` tabulates ``grid``.
      ``val_data`` is not used for the score. With ``subset="last_layer"`` (or ``params``) and a
      curvature covering more, ``P``, ``‖θ*‖²`` and the log-determinant are the
      subset's: ``F`` is the curvature's block on it (:meth:`natgrad.Curvature.restrict`;
      block-diagonal kinds ``"diag"``, ``"kfac"``, ``"ekfac"``, whole blocks).
      ``subset="last_layer"`` takes the last *registered* module with trainable
      parameters; which module runs last only a forward pass tells, so marglik then
      needs ``val_data`` (inputs of one batch) to check it, as the predictive and
      ``"grid"`` do on their first batch: a model that registers its head before a final
      norm raises, naming the module to pass as ``params=``, instead of scoring the norm.
      ``token_categorical``: ``N`` is the curvature's number of sequences (``N F`` is
      the GGN of the training set's summed token log-likelihoods), not of tokens.

    Args:
        model: the trained model at ``θ*`` (eval mode; not modified).
        fisher: diagonal Fisher or any :class:`natgrad.Curvature` over the training data.
        val_data: labelled validation batch or iterable of batches (``grid``); for
            ``"marglik"`` with ``subset="last_layer"``, a batch of inputs (labels not
            needed) whose first sample's forward checks that the chosen module runs last
            (required there: without a forward the check cannot run).
        method: ``"grid"`` or ``"marglik"``.
        grid: candidate precisions (default ``10^-4 ... 10^4`` in half decades).
        n_data: as in :func:`fisher_uncertainty`.
        params: as in :func:`fisher_uncertainty`.
        subset: as in :func:`fisher_uncertainty`.
        link: as in :func:`fisher_uncertainty`.
        n_samples: as in :func:`fisher_uncertainty`.
        likelihood: as in :func:`fisher_uncertainty`.
        chunk_size: as in :func:`fisher_uncertainty`.
        generator: as in :func:`fisher_uncertainty`.
        output_fn: as in :func:`fisher_uncertainty`.
        engine: as in :func:`fisher_uncertainty`.

    Returns:
        :class:`PriorPrecisionResult`.

    Raises:
        ValueError: unknown method, non-positive grid values, missing validation labels,
            ``"marglik"`` with ``subset="last_layer"`` and no ``val_data`` (or a chosen
            module that is not the one running last),
            ``"marglik"`` on a subset of a curvature that cannot be restricted to it (a
            coupled kind such as ``"lowrank"``, or a subset that splits a Kronecker
            block), and everything :func:`fisher_uncertainty` raises.

    Warns:
        UserWarning: ``method="grid"`` chose the smallest or the largest value of a grid
            of two or more: the best ``δ`` may lie beyond it; widen the grid.
        UserWarning: ``method="grid"`` with a ``"gaussian"`` curvature and no
            ``likelihood=``: the validation NLL uses ``σ = 1``.

    Example:
        >>> import torch
        >>> from natgrad import DiagonalFisher
        >>> model = torch.nn.Linear(1, 1, bias=False)
        >>> _ = model.weight.data.fill_(0.5)
        >>> F = DiagonalFisher({"weight": torch.tensor([[3.0]])}, 1, likelihood="gaussian")
        >>> r = optimize_prior_precision(model, F, method="marglik")
        >>> round(r.prior_precision, 4)  # γ/δ = ‖θ‖²: 3/((3+δ)δ) = 0.25, δ² + 3δ - 12 = 0
        2.2749
    """
    check_choice("method", method, PRIOR_METHODS)
    check_choice("engine", engine, ENGINES)
    lik, chosen, n, _ = _prepare(  # _prepare checks link and returns it unchanged
        model, fisher, params, likelihood, n_data, link, n_samples, chunk_size, subset
    )
    values = [0.5 * i for i in range(-8, 9)]
    cand = [10.0**v for v in values] if grid is None else [float(g) for g in grid]
    if not cand:
        raise ValueError("grid is empty: pass at least one candidate prior precision.")
    for g in cand:
        check_positive("grid value", g)
    dtype = model_acc_dtype(model)
    if method == "marglik":
        if subset == "last_layer":
            _check_last_layer_marglik(model, val_data, list(chosen))
        if _structured(fisher):
            return _marglik_curvature(fisher, chosen, n, dtype, cand, method)
        theta_sq, nf = _marglik_terms(model, cast(Mapping[str, torch.Tensor], fisher), chosen, n, dtype)
        scores = [_log_marglik(theta_sq, nf, g) for g in cand]
        best = _marglik_optimum(theta_sq, nf)
        return PriorPrecisionResult(
            best, method, cand, scores, "log_marglik", _log_marglik(theta_sq, nf, best)
        )
    if val_data is None:
        raise ValueError(
            "method='grid' needs labelled validation data: pass val_data=(x_val, y_val), "
            "or use method='marglik'."
        )
    _warn_default_sigma(likelihood, lik)
    device = model_device(model)
    full = _full_cov(lik, link)
    post = _Posterior(model, fisher, chosen, n, cand, lik, output_fn, chunk_size, engine, full)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    totals = torch.zeros(len(cand), dtype=torch.float64)
    count, batches = 0, 0
    for batch in iterate_batches(val_data):
        b = parse_batch(batch).to(device)
        if subset == "last_layer" and batches == 0:
            _check_last_layer(model, b, list(chosen))
        batches += 1
        if b.target is None:
            raise ValueError(
                "method='grid' scores the validation NLL, but a validation batch has no "
                "labels: pass (x, y) batches."
            )
        mean, var = post.moments(b)  # first: a failing forward is reported on the batch
        # (T, C) for tokens, else None; the categorical check on the first batch only
        shape = (None if batches > 1 and lik.name == "categorical"
                 else _token_shape(model, b, output_fn, lik))
        if shape is not None:
            # tokens whose attention mask is 0 are ignored, as in the Fisher
            masked = masked_target(lik, b)
            assert masked is not None  # b.target is not None (checked above)
            target = lik.prepare_target(mean.reshape(-1, *shape), masked)
            rows, spread = _token_rows(mean, var, shape, full)
            row_lik = get_likelihood("categorical")
            eps = _mc_noise(row_lik, link, n_samples, rows, gen, device)
            for g in range(len(cand)):
                pred = _predict(row_lik, link, rows, spread[..., g], eps)
                nll, kept = _token_nll(lik, pred["probs"].reshape(-1, *shape), target)
                totals[g] += float(nll)
            count += kept
            continue
        check_padding_read(lik, mean, b)
        target = lik.prepare_target(mean, b.target)
        eps = _mc_noise(lik, link, n_samples, mean, gen, device)
        for g in range(len(cand)):
            pred = _predict(lik, link, mean, var[..., g], eps)  # (N, D, D) when full
            totals[g] += float(_nll(lik, pred, mean, target).sum())
        count += b.size
    if batches == 0:
        raise ValueError("val_data yielded no batches.")
    if count == 0:
        raise ValueError(
            "val_data holds no token to score: every label is the likelihood's ignore_index."
        )
    scores = (totals / count).tolist()
    i = min(range(len(cand)), key=lambda j: scores[j])
    _warn_grid_edge(cand, cand[i])
    return PriorPrecisionResult(cand[i], method, cand, scores, "val_nll", scores[i])


def _warn_grid_edge(cand: list[float], chosen: float) -> None:
    """Warn when ``chosen`` is the smallest or largest of two or more distinct candidates."""
    lo, hi = min(cand), max(cand)
    if lo == hi or chosen not in (lo, hi):
        return
    edge = "smallest" if chosen == lo else "largest"
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    a, b = (a - 4, b) if chosen == lo else (a, b + 4)
    warnings.warn(
        f"optimize_prior_precision chose prior_precision={chosen:g}, the {edge} value of "
        f"its grid [{lo:g}, {hi:g}]: the best value may lie beyond the grid. Widen the "
        f"grid, e.g. grid=torch.logspace({a}, {b}, {2 * (b - a) + 1}).tolist().",
        UserWarning,
        stacklevel=2,
    )


# -- any curvature -----------------------------------------------------------------------------


def _structured(fisher: object) -> TypeGuard[Curvature]:
    """A curvature other than a plain diagonal mapping (solve through the protocol)."""
    return isinstance(fisher, Curvature) and not isinstance(fisher, Mapping)


def _subset_params(model: nn.Module, params: ParamSpec, subset: str | None) -> ParamSpec:
    """``params`` from ``subset`` (``"all"``: unchanged; ``"last_layer"``: the last module's)."""
    if subset is None:
        return params
    check_choice("subset", subset, ("all", "last_layer"))
    if params is not None:
        raise ValueError(
            f"Pass either params= or subset=, not both (got subset={subset!r} and params)."
        )
    if subset == "all":
        return None
    last = None
    owner = ""
    for name, module in model.named_modules():
        own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if own:
            last, owner = [f"{name}.{n}" if name else n for n in own], name
    if last is None:
        raise ValueError("subset='last_layer': the model has no trainable parameters.")
    _refuse_tied_last_layer(model, owner, last)
    return last


def _refuse_tied_last_layer(model: nn.Module, owner: str, last: list[str]) -> None:
    """Raise when a parameter of the module ``subset="last_layer"`` took is tied to an
    earlier one (a GPT-2 style head sharing the embedding matrix): ``named_parameters``
    lists the shared tensor once, under its first name, and its curvature counts both
    uses, so "the last layer" alone has no curvature of its own."""
    first: dict[int, str] = {}
    for k, p in model.named_parameters():
        first.setdefault(id(p), k)
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tied = [(k, first[id(tensors[k])]) for k in last if first.get(id(tensors[k]), k) != k]
    if not tied:
        return
    untied = [k for k in last if k not in dict(tied)]
    pairs = ", ".join(f"{k!r} is tied to {t!r}" for k, t in tied)
    raise ValueError(
        f"subset='last_layer' takes the last registered module with trainable parameters, "
        f"{owner!r}, but {pairs}: the same tensor (e.g. a language-model head sharing the "
        "embedding matrix), which model.named_parameters() lists once under the first name "
        "and whose curvature counts both uses, so the last layer has no curvature of its "
        f"own. Pass params={[t for _, t in tied] + untied} for the shared tensor (head and "
        "embedding together), or params=[...] naming another layer's parameters."
    )


def _check_last_layer(model: nn.Module, b: Batch, chosen: list[str]) -> None:
    """Raise when the module ``subset="last_layer"`` took (the last registered one with
    trainable parameters, ``chosen``) is not the last such module to start in a forward
    pass on the first sample of ``b`` (forward pre-hooks; the model itself is left out, as
    it starts first).
    A module the forward never calls as a module (its parent reads its weights) is not
    checked."""
    own = {
        name: [f"{name}.{n}" for n, p in m.named_parameters(recurse=False) if p.requires_grad]
        for name, m in model.named_modules()
    }
    order: list[str] = []
    handles = [
        m.register_forward_pre_hook(lambda mod, args, name=name: order.append(name))
        for name, m in model.named_modules()
        if name and own[name]
    ]
    try:
        # one sample, in grad mode as the capture pass runs (under no_grad, eval-mode
        # nn.TransformerEncoderLayer takes a fused kernel that calls no submodule)
        with torch.enable_grad():
            call_model(model, b.select(0, 1), "the first sample of the batch")
    finally:
        for h in handles:
            h.remove()
    owner = chosen[0].rpartition(".")[0] if chosen else ""
    if owner and owner not in order:
        # never called as a module (e.g. MultiheadAttention's out_proj, whose weights its
        # parent reads): the call order says nothing about it, so there is nothing to check
        return
    if order and set(own[order[-1]]) != set(chosen):
        raise ValueError(
            f"subset='last_layer' takes the last registered module with trainable parameters "
            f"({chosen}), but the forward pass runs {order[-1]!r} after it; pass "
            f"params={own[order[-1]]} (the layer that runs last), or the parameters you mean."
        )


def _check_last_layer_marglik(model: nn.Module, val_data: Any, chosen: list[str]) -> None:
    """:func:`_check_last_layer` for ``method="marglik"``, on the first batch of
    ``val_data`` (its inputs only). The marginal likelihood itself needs no data, but
    without a forward pass the last *registered* module (what ``subset="last_layer"``
    takes) cannot be told from the last one to *run*: a model that registers its head
    before a final norm would silently get the norm's marginal likelihood.

    Raises:
        ValueError: no ``val_data`` (pass a batch or ``params=``), an empty iterable, or
            a chosen module that does not run last.
    """
    if val_data is None:
        raise ValueError(
            "subset='last_layer' with method='marglik' needs a batch to check that the "
            f"module it takes ({chosen}, the last registered one with trainable "
            "parameters) is the one that runs last (a model may register its output layer "
            "before another module): pass val_data= a batch of inputs (labels are not "
            "needed), or params=[...] naming the last layer's parameters."
        )
    first = next(iter(iterate_batches(val_data)), None)
    if first is None:
        raise ValueError("val_data yielded no batches.")
    _check_last_layer(model, parse_batch(first).to(model_device(model)), chosen)


def _resolve_params_curvature(
    model: nn.Module, curvature: Curvature, params: ParamSpec
) -> dict[str, nn.Parameter]:
    covered = check_curvature(curvature, model, "The curvature")
    from natgrad.curvature.kronecker import KroneckerFisher

    if isinstance(curvature, KroneckerFisher):
        # only a chosen parameter in a masked block needs the exact solve: the blocks are
        # independent, so the others' posterior is the curvature's block on them
        mine = covered if params is None else list(select_params(model, params))
        pruned = [n for n in curvature.masked_names() if n in mine]
        if pruned:
            raise ValueError(
                f"The curvature holds masked Kronecker blocks of layers pruned by "
                f"torch.nn.utils.prune ({pruned[:8]}): their posterior "
                "(N·D_M F D_M + δI)⁻¹ has no Kronecker form, and the masked projection "
                "solve() applies understates the kept weights' variance. Use kind='diag' or "
                "'lowrank' on the pruned model, or natgrad.make_permanent(model) and "
                "re-estimate (the pruned weights then count as free parameters)."
            )
    named = dict(model.named_parameters())
    if params is None:
        return {k: named[k] for k in covered}
    chosen = select_params(model, params)
    missing = [k for k in chosen if k not in covered]
    if missing:
        raise ValueError(
            f"params selects {missing[:8]}, which the curvature does not cover; estimate it "
            "with the same params= (or leave params=None to use the curvature's own)."
        )
    if len(chosen) < len(covered):
        kinds = curvature.structure()
        coupled = sorted({kinds[k] for k in covered if kinds[k] not in BLOCK_KINDS})
        if coupled:
            raise ValueError(
                f"A subset of a {coupled} curvature couples it to the other parameters, so "
                "its block is not the subset's posterior; estimate the curvature on the "
                "chosen parameters only (params=...)."
            )
    if not chosen:
        raise ValueError("No parameters chosen: there is nothing to be uncertain about.")
    return {k: named[k] for k in covered if k in chosen}


def _solve_rows(
    curvature: Curvature, rows: dict[str, torch.Tensor], lam: float
) -> dict[str, torch.Tensor]:
    """``(F + λI)⁻¹`` applied to every row ``rows[name][r]``: vmap, or a loop as fallback."""
    try:
        sol: dict[str, torch.Tensor] = vmap(lambda v: curvature.solve(v, lam))(rows)
        return sol
    except Exception:  # a solve torch.func cannot batch (data-dependent control flow)
        count = next(iter(rows.values())).shape[0]
        sols = [curvature.solve({k: v[r] for k, v in rows.items()}, lam) for r in range(count)]
        return {k: torch.stack([s_[k] for s_ in sols]) for k in rows}


def _curvature_reducer(
    curvature: Curvature,
    names: list[str],
    n: int,
    deltas: list[float],
    dtype: torch.dtype,
    full: bool = False,
) -> Reducer:
    """``(jac, size, D) -> (size·D, G)`` with ``J_c (N F + δ_g I)⁻¹ J_cᵀ`` per row and δ;
    ``full``: ``(size, D, D, G)`` with ``J_c (N F + δ_g I)⁻¹ J_eᵀ`` for every pair."""
    covered = curvature.names()
    diag = curvature.diagonal()

    def reduce(jac: dict[str, torch.Tensor], size: int, d: int) -> torch.Tensor:
        ref = next(iter(jac.values()))
        rows = {}
        for k in covered:
            shape = tuple(diag[k].shape)
            if k in jac:
                rows[k] = jac[k].to(dtype).reshape(size * d, *shape)
            else:
                rows[k] = torch.zeros((size * d, *shape), dtype=dtype, device=ref.device)
        cols = []
        for delta in deltas:
            sol = _solve_rows(curvature, rows, float(delta) / n)
            if full:
                cov = cast(torch.Tensor, sum(
                    rows[k].reshape(size, d, -1) @ sol[k].to(dtype).reshape(size, d, -1).mT
                    for k in names
                ))  # fmt: skip
                cols.append(cov / n)
                continue
            # names is never empty, so the sum is a tensor (sum starts at the int 0)
            var = cast(
                torch.Tensor,
                sum((rows[k] * sol[k].to(dtype)).reshape(size * d, -1).sum(1) for k in names),
            )
            cols.append(var / n)
        return torch.stack(cols, -1)

    return reduce


def _marglik_curvature(
    curvature: Curvature,
    chosen: Mapping[str, nn.Parameter],
    n: int,
    dtype: torch.dtype,
    cand: list[float],
    method: str,
) -> PriorPrecisionResult:
    """``log Z(δ) = −½δ‖θ*‖² + ½P log δ − ½ log det(N F + δ I)`` through ``logdet``.

    ``log det(N F + δ I) = P log N + logdet(F + (δ/N) I)``; the optimum is the root of
    ``γ(δ)/δ = ‖θ*‖²`` with ``γ(δ) = P − δ tr (N F + δ I)⁻¹`` (``inverse_diagonal``).
    For chosen parameters fewer than the curvature covers (``subset="last_layer"``),
    ``F`` is the curvature's block on them (:meth:`natgrad.Curvature.restrict`: the
    block-diagonal kinds, whole blocks), and ``P``, ``‖θ*‖²`` are theirs.
    """
    if list(chosen) != curvature.names():
        try:
            curvature = curvature.restrict(list(chosen))
        except ValueError as exc:
            raise ValueError(
                "method='marglik' on a subset needs the curvature's block on the chosen "
                f"parameters alone, not its logdet over all it covers: {exc}"
            ) from None
    theta_sq = sum(float((p.detach().to(dtype) ** 2).sum()) for p in chosen.values())
    p_total = sum(p.numel() for p in chosen.values())

    def score(delta: float) -> float:
        logdet = float(curvature.logdet(delta / n)) + p_total * math.log(n)
        return -0.5 * delta * theta_sq + 0.5 * p_total * math.log(delta) - 0.5 * logdet

    def h(log_d: float) -> float:
        d = math.exp(log_d)
        tr = sum(float(v.double().sum()) for v in curvature.inverse_diagonal(d / n).values()) / n
        return (p_total - d * tr) / d - theta_sq

    if theta_sq <= 0:
        raise ValueError(
            "The marginal likelihood has no finite optimum: the selected parameters are all "
            "zero. Use method='grid' with validation data."
        )
    best = _log_root(h, what="the curvature is zero in every direction", tol=1e-10)
    scores = [score(g) for g in cand]
    return PriorPrecisionResult(best, method, cand, scores, "log_marglik", score(best))
