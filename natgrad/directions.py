"""The top eigenpairs of the Fisher ``F = GᵀG / N`` built from exact per-sample gradients.

``G`` stacks per-sample gradients as rows, flattened over the selected parameters:

* ``labels="empirical"``: one row ``g_n`` per sample (``R = N`` rows);
* ``labels="mc"`` with ``k`` draws: rows ``g_nj / √k`` (``R = N k``);
* ``labels="exact"``: rows ``J_nᵀ s_nj``, the gradients pulled back from the columns
  ``s_nj`` of a factor of the output Fisher (``R = N K``: ``K = C - 1`` for a
  ``C``-class softmax, one per output for Bernoulli and Gaussian).

In every case ``F = GᵀG / N`` is the Fisher averaged over the ``N`` samples. Two ways
to its top-k eigenpairs:

* ``method="gram"``: the ``R × R`` Gram matrix ``GGᵀ/N = U Λ Uᵀ`` shares the nonzero
  eigenvalues of ``F``; its eigenvectors map to those of ``F`` by
  ``v = Gᵀu / √(N λ)`` (unit norm because ``uᵀGGᵀu = N λ``). Holds ``G`` (``R × P``)
  and the Gram matrix in memory.
* ``method="lanczos"``: Lanczos with full reorthogonalization on Fisher-vector
  products, without ``G``: writing ``F = (1/N) Σ_n J_nᵀ (Σ_j u_nj u_njᵀ) J_n`` with the
  output cotangents ``u_nj`` of the rows above, ``F v`` is one ``jvp`` (``J v``), a
  contraction with ``u`` in output space and one ``vjp`` over each batch: memory
  ``O(P · iterations)`` plus one batch of activations, for ``N`` too large for the
  Gram matrix. Fused attention kernels without a forward-mode rule (the CPU flash
  attention of ``scaled_dot_product_attention``, ``nn.TransformerEncoderLayer``'s fast
  path) are swapped for their composite forms, the same function, when the first
  ``jvp`` finds one.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import nn
from torch.func import functional_call, jvp
from typing_extensions import Unpack

from natgrad.curvature.estimate import iterate_batches
from natgrad.engine.batch import Batch, OutputFn
from natgrad.engine.checks import check_choice, check_fixed_model, check_int, check_positive
from natgrad.engine.common import acc_dtype, internal_pass, vjp_pair
from natgrad.engine.likelihoods import Likelihood, get_likelihood
from natgrad.engine.options import EstimatorOptions, LabelSource, Options, ParamSpec
from natgrad.engine.per_sample import Plan, per_sample_grads, select_params
from natgrad.engine.report import Report, to_jsonable

__all__ = ["FisherDirections", "top_fisher_directions"]

Method = Literal["gram", "lanczos"]
METHODS: tuple[Method, ...] = get_args(Method)


@dataclass
class FisherDirections(Report):
    """The top-k eigenpairs of ``F = GᵀG / N``.

    Attributes:
        eigenvalues: ``(k,)``, descending.
        eigenvectors: ``k`` unit vectors, each ``{name: tensor shaped like the parameter}``.
        residuals: ``(k,)`` ``‖F v - λ v‖`` (``gram``: computed; ``lanczos``: the Ritz
            estimate ``β_m |s_m|``).
        n_samples: ``N``.
        n_rows: ``R``, rows of ``G`` (``N`` times gradients per sample).
        trace: ``tr F = ‖G‖²/N`` (``gram`` only; ``None`` for ``lanczos``).
        method, labels, likelihood: how it was computed.
        iterations: Lanczos steps (0 for ``gram``).
        converged: every residual met the tolerance.

    ``to_dict()`` summarizes each eigenvector by the share of its squared norm in each
    parameter tensor instead of listing every entry.
    """

    eigenvalues: torch.Tensor
    eigenvectors: list[dict[str, torch.Tensor]]
    residuals: torch.Tensor
    n_samples: int
    n_rows: int
    trace: float | None
    method: str
    labels: LabelSource
    likelihood: str
    iterations: int
    converged: bool

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "eigenvectors"}
        out["parameter_share"] = [
            {k: float((t.double() ** 2).sum()) for k, t in v.items()} for v in self.eigenvectors
        ]
        shared: dict[str, Any] = to_jsonable(out)
        return shared


# (eigenvalues, eigenvectors, residuals, N, R, trace or None, iterations, converged)
_Result = tuple[
    torch.Tensor, list[dict[str, torch.Tensor]], torch.Tensor, int, int, float | None, int, bool
]


def _acc_dtype(params: Mapping[str, torch.Tensor]) -> torch.dtype:
    """float64 when any parameter is float64, else float32 (see :func:`acc_dtype`)."""
    dtypes = {acc_dtype(p.dtype) for p in params.values()}
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _unflatten(vec: torch.Tensor, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for k, p in params.items():
        out[k] = vec[i : i + p.numel()].reshape(p.shape)
        i += p.numel()
    return out


def _check_k(k: int, rows: int, p: int, clip: bool) -> int:
    """``k``, checked against the rank bound ``min(R, P)``; lowered to it when ``clip``."""
    check_int("k", k, 1)
    k = int(k)
    if clip:
        return min(k, rows, p)
    if k > min(rows, p):
        raise ValueError(
            f"k={k} exceeds the rank bound of the Fisher GᵀG/N: it has at most min(R, P) = "
            f"{min(rows, p)} nonzero eigenvalues (R = {rows} gradient rows, P = {p} "
            "parameters). Pass a smaller k or more data (or clip_k=True to get at most k)."
        )
    return k


def _rank_error(k: int, lam: torch.Tensor, cutoff: float) -> ValueError:
    r = int((lam > cutoff).sum())
    return ValueError(
        f"The Fisher has numerical rank {r} < k={k} (eigenvalues below {cutoff:.3g} are "
        "zero up to rounding), so those eigenvectors are not defined. Pass k <= "
        f"{r} or more (diverse) data."
    )


# -- gram ------------------------------------------------------------------------------------


def _gram(
    model: nn.Module,
    data: Any,
    lik: Likelihood,
    labels: LabelSource,
    mc_samples: int,
    params: ParamSpec,
    chunk_size: int | None,
    gen: torch.Generator,
    output_fn: OutputFn | None,
    k: int,
    clip_k: bool,
) -> _Result:
    chosen = select_params(model, params)
    dtype = _acc_dtype(chosen)
    rows: list[torch.Tensor] = []
    n_total = 0
    scale = 1.0 / math.sqrt(mc_samples) if labels == "mc" else 1.0
    for batch in iterate_batches(data):
        g = per_sample_grads(
            model,
            batch,
            lik,
            labels=labels,
            mc_samples=mc_samples,
            params=params,
            chunk_size=chunk_size,
            generator=gen,
            output_fn=output_fn,
        )
        n_total += next(iter(g.values())).shape[0]
        flat = [g[name].reshape(-1, p.numel()).to(dtype) for name, p in chosen.items()]
        rows.append(torch.cat(flat, dim=1).detach() * scale)
    if n_total == 0:
        raise ValueError("No samples: `data` yielded no batches.")
    G = torch.cat(rows)  # (R, P)
    R, P = G.shape
    k = _check_k(k, R, P, clip_k)
    lam, U = torch.linalg.eigh(G @ G.t() / n_total)
    lam, U = lam.flip(0)[:k], U.flip(1)[:, :k]
    cutoff = max(R, P) * torch.finfo(dtype).eps * max(float(lam[0]), 0.0)
    if float(lam[-1]) <= cutoff:
        raise _rank_error(k, lam, cutoff)
    V = G.t() @ U / torch.sqrt(n_total * lam)  # (P, k), unit columns
    FV = G.t() @ (G @ V) / n_total
    res = torch.linalg.vector_norm(FV - V * lam, dim=0)
    trace = float((G**2).sum() / n_total)
    vecs = [_unflatten(V[:, i].contiguous(), chosen) for i in range(k)]
    return lam, vecs, res, n_total, R, trace, 0, True


# -- lanczos ---------------------------------------------------------------------------------


def _cotangents(
    plan: Plan, b: Batch, target: torch.Tensor | None, draws: torch.Tensor | None
) -> torch.Tensor:
    """Output cotangents ``u_nj`` of the rows of ``G``, shape ``(N, K, *output)``: the plan's
    label columns, scaled by ``√w_j`` so that ``GᵀG/N`` is the Fisher."""
    out = plan.forward(b)
    u = plan.all_columns(out, target, draws).movedim(0, 1) * math.sqrt(plan.weight)
    return u.detach().to(out.dtype)


@contextlib.contextmanager
def _forward_ad_kernels() -> Iterator[None]:
    """Run attention through kernels that have a forward-mode (``jvp``) rule.

    ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` take a fused fast path in
    eval mode, and ``scaled_dot_product_attention`` picks a fused kernel (flash attention
    on CPU); neither has a forward-mode derivative. Inside this context the fast path
    is off (``torch.backends.mha.set_fastpath_enabled``, restored on exit) and
    attention uses the composite math kernel: the same function, differentiable in
    both modes. Process-wide while it lasts (torch keeps the fast-path switch global).

    Example:
        >>> import torch
        >>> attn = torch.nn.MultiheadAttention(4, 2, batch_first=True).eval()
        >>> x = torch.randn(1, 3, 4)
        >>> f = lambda q: attn(q, q, q, need_weights=False)[0]
        >>> with _forward_ad_kernels():
        ...     out, tangent = torch.func.jvp(f, (x,), (torch.ones_like(x),))
        >>> tangent.shape
        torch.Size([1, 3, 4])
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def _lanczos(
    model: nn.Module,
    data: Any,
    lik: Likelihood,
    labels: LabelSource,
    mc_samples: int,
    params: ParamSpec,
    chunk_size: int | None,
    gen: torch.Generator,
    output_fn: OutputFn | None,
    k: int,
    clip_k: bool,
    max_iter: int | None,
    tol: float | None,
    seed: int,
) -> _Result:
    plan = Plan(model, lik, labels, mc_samples, params, output_fn, gen, what="top_fisher_directions")
    prepared: list[tuple[Batch, torch.Tensor]] = []
    n_total, R = 0, 0
    for batch in iterate_batches(data):
        b, target, draws = plan.prepare(batch)
        u = _cotangents(plan, b, target, draws)
        prepared.append((b, u))
        n_total += b.size
        R += u.shape[0] * u.shape[1]
    if n_total == 0:
        raise ValueError("No samples: `data` yielded no batches.")
    chosen = {name: p.detach() for name, p in plan.params.items()}
    dtype = _acc_dtype(chosen)
    P = plan.P
    k = _check_k(k, R, P, clip_k)
    model_fn = plan.output_fn

    composite = False  # set once a jvp met a kernel without a forward-mode rule

    def _jvp(f: Any, p: dict[str, torch.Tensor], v: dict[str, torch.Tensor]) -> torch.Tensor:
        """``J v`` (the tangent of ``f`` at ``p`` along ``v``); on a fused kernel without a
        forward-mode rule (torch raises NotImplementedError naming "forward AD"), again
        through the composite kernels, for the rest of the call."""
        nonlocal composite
        if not composite:
            try:
                tangent: torch.Tensor = jvp(f, (p,), (v,))[1]  # (output, tangent)
                return tangent
            except NotImplementedError as exc:
                if "forward AD" not in str(exc):
                    raise
                composite = True
        with _forward_ad_kernels():
            tangent = jvp(f, (p,), (v,))[1]
        return tangent

    @torch.no_grad()  # the torch.func transforms inside still differentiate
    def fvp(vec: torch.Tensor) -> torch.Tensor:
        v = {name: t.to(chosen[name].dtype) for name, t in _unflatten(vec, chosen).items()}
        acc = torch.zeros(P, dtype=dtype, device=vec.device)
        for b, u in prepared:
            step = chunk_size or b.size
            for s in range(0, b.size, step):
                sub, us = b.select(s, min(s + step, b.size)), u[s : s + step]

                def f(p: dict[str, torch.Tensor], sub: Batch = sub) -> torch.Tensor:
                    with internal_pass():
                        return model_fn(functional_call(model, p, sub.args, sub.kwargs, strict=False))

                jv = _jvp(f, chosen, v)
                w = (us * jv.unsqueeze(1)).flatten(2).sum(-1)  # (n, K) = rows of G v
                cot = (us * w.view(*w.shape, *([1] * (us.dim() - 2)))).sum(1)
                _, pull = vjp_pair(f, chosen)
                (gt,) = pull(cot.to(jv.dtype))
                acc += torch.cat([gt[name].reshape(-1).to(dtype) for name in chosen])
        return acc / n_total

    limit = min(P, R + 1) if max_iter is None else min(int(max_iter), P)
    if limit < k:
        raise ValueError(f"max_iter={max_iter} is smaller than k={k}; pass max_iter >= k.")
    eps = torch.finfo(dtype).eps
    tol = (1e-10 if dtype == torch.float64 else 1e-5) if tol is None else tol
    device = next(iter(chosen.values())).device
    q = torch.randn(P, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(device)
    Q = [q / torch.linalg.vector_norm(q)]
    alphas: list[float] = []
    betas: list[float] = []
    anorm, converged = 0.0, False
    theta = S = torch.zeros(0, dtype=torch.float64)  # set by the first iteration
    while True:
        w = fvp(Q[-1])
        alpha = float(w @ Q[-1])
        alphas.append(alpha)
        Qm = torch.stack(Q)
        for _ in range(2):  # full reorthogonalization, twice for stability
            w = w - Qm.t() @ (Qm @ w)
        beta = float(torch.linalg.vector_norm(w))
        m = len(alphas)
        T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if m > 1:
            off = torch.tensor(betas, dtype=torch.float64)
            T += torch.diag(off, 1) + torch.diag(off, -1)
        theta, S = torch.linalg.eigh(T)
        anorm = max(anorm, float(theta.abs().max()))
        # the Krylov space is exhausted when the new direction is rounding noise: at most
        # about sqrt(P)·eps·‖F‖ (a looser bound, 1e3·eps·‖F‖, stopped float32 runs above
        # real eigenvalues and reported a wrong trailing pair as converged: review)
        exhausted = beta <= 10 * P**0.5 * eps * max(anorm, 1e-300)
        if m >= k:
            res = beta * S[-1, -k:].abs()
            if bool((res <= tol * anorm).all()):
                converged = True
                break
        if exhausted or m >= limit:
            break
        betas.append(beta)
        Q.append(w / beta)
    m = len(alphas)
    if m < k:
        raise ValueError(
            f"The Fisher has numerical rank {m} < k={k}: Lanczos exhausted its Krylov space "
            f"after {m} iterations (the next direction was rounding noise), so the "
            f"remaining eigenvectors are not defined. Pass k <= {m}, more (diverse) data, "
            "or a float64 model."
        )
    lam = theta.flip(0)[:k]
    Sk = S.flip(1)[:, :k]
    res = torch.zeros(k, dtype=torch.float64) if beta == 0 else beta * Sk[-1].abs()
    cutoff = max(P, R) * eps * max(float(lam[0]), 0.0)
    if float(lam[-1]) <= cutoff:
        raise _rank_error(k, lam, cutoff)
    if not converged:
        warnings.warn(
            f"Lanczos stopped after {m} iterations before the top-{k} eigenpairs converged "
            f"(largest residual {float(res.max()):.3g}); raise max_iter or loosen tol.",
            stacklevel=3,
        )
    V = torch.stack(Q[:m]).t() @ Sk.to(dtype=dtype, device=device)
    V = V / torch.linalg.vector_norm(V, dim=0)
    vecs = [_unflatten(V[:, i].contiguous(), chosen) for i in range(k)]
    return lam.to(dtype), vecs, res.to(dtype), n_total, R, None, m, converged


def top_fisher_directions(
    model: nn.Module,
    data: Any,
    k: int = 10,
    likelihood: str | Likelihood = "categorical",
    *,
    method: Method = "gram",
    max_iter: int | None = None,
    tol: float | None = None,
    seed: int = 0,
    clip_k: bool = False,
    **options: Unpack[EstimatorOptions],
) -> FisherDirections:
    """The top-k eigenvalues and eigenvectors of the Fisher ``F = GᵀG / N``.

    ``G`` holds the exact per-sample gradients ``g_n = ∇θ l_n`` as rows (flattened
    over the selected parameters); for ``labels="mc"`` with ``k`` draws or
    ``labels="exact"`` each sample contributes its ``K`` weighted gradients as rows, so
    that ``GᵀG/N`` is the Fisher averaged over samples and labels (see the module doc).

    * ``method="gram"``: eigenpairs ``(λ, u)`` of the ``R × R`` matrix ``GGᵀ/N``, then
      ``v = Gᵀu / √(N λ)``. Exact; memory ``R × P``.
    * ``method="lanczos"``: Lanczos with full reorthogonalization on ``F v``, computed
      as ``Gᵀ(G v)/N`` through one ``jvp`` and one ``vjp`` per batch (never forming
      ``G`` or a ``P × P`` matrix); for large ``N``. Stops when every top-k Ritz
      residual ``β_m |s_m|`` is below ``tol · λ_max``, or the Krylov space is exhausted.

    Args:
        model: any ``nn.Module``, deterministic: dropout and BatchNorm in eval mode
            (a train-mode dropout Fisher mixes in mask noise, and ``lanczos`` needs the
            same operator at every product).
        data: one batch or an iterable of batches.
        k: number of eigenpairs.
        likelihood: name or :class:`natgrad.engine.likelihoods.Likelihood`.
        method: ``"gram"`` or ``"lanczos"``.
        max_iter: Lanczos steps at most (default ``min(P, R + 1)``).
        tol: Lanczos relative residual (default 1e-10 in float64, 1e-5 in float32).
        seed: seed of the Lanczos start vector.
        clip_k: lower ``k`` to the rank bound ``min(R, P)`` when it exceeds it (a small
            batch: at most ``R`` eigenpairs) instead of raising; the result then holds
            ``min(k, R, P)`` eigenpairs. A Fisher of numerical rank below that still
            raises.
        **options: the estimator options (:class:`natgrad.EstimatorOptions`):
            ``labels``, ``mc_samples``, ``params``, ``chunk_size`` (samples per vmap
            chunk for ``gram``, per jvp/vjp for ``lanczos``), ``generator`` (both
            methods draw the same labels), ``output_fn``; ``engine`` is not taken.

    Returns:
        :class:`FisherDirections`; eigenvalues ``(k,)`` descending, eigenvectors as
        ``{name: tensor shaped like the parameter}``.

    Raises:
        ValueError: ``k < 1``, ``k > min(R, P)`` (without ``clip_k``), a Fisher of numerical rank below
            ``k``, unknown ``method``/``labels``, train-mode dropout or BatchNorm.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> _ = model.weight.data.zero_()
        >>> x, y = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[0.0], [0.0]])
        >>> d = top_fisher_directions(model, (x, y), k=2, likelihood="gaussian", labels="exact")
        >>> d.eigenvalues  # F = diag(1, 4) / 2
        tensor([2.0000, 0.5000])
        >>> d.eigenvectors[0]["weight"].abs()
        tensor([[0., 1.]])
    """
    check_fixed_model(model, "top_fisher_directions")
    chosen_method = check_choice("method", method, METHODS)
    o = Options.resolve("top_fisher_directions", options, unsupported=("engine",))
    labels = o.labels
    lik = get_likelihood(likelihood)
    if tol is not None:
        check_positive("tol", tol)
    gen = o.generator if o.generator is not None else torch.Generator().manual_seed(0)
    args = (model, data, lik, labels, int(o.mc_samples), o.params, o.chunk_size, gen,
            o.output_fn, k, bool(clip_k))
    if chosen_method == "gram":
        out = _gram(*args)
    else:
        out = _lanczos(*args, max_iter, tol, seed)
    lam, vecs, res, n, R, trace, iters, conv = out
    return FisherDirections(
        eigenvalues=lam,
        eigenvectors=vecs,
        residuals=res,
        n_samples=n,
        n_rows=R,
        trace=trace,
        method=chosen_method,
        labels=labels,
        likelihood=lik.name,
        iterations=iters,
        converged=conv,
    )
