"""The exact mini-batch Fisher ``F = GᵀG/N`` applied through its ``N x N`` Gram system.

``G`` holds one row per per-sample gradient (``R = N`` rows for one label per sample,
``N·K`` rows for ``K`` factor columns per sample), so ``F = GᵀG/N`` is ``P x P`` but has
rank at most ``R``. With the Gram eigendecomposition ``GGᵀ = U S Uᵀ`` (``R x R``, never
``P x P``) and ``V = Gᵀ U S^-1/2`` (orthonormal columns spanning the row space of ``G``),

    ``(F + λI)^-1 g = V (S/N + λ)^-1 Vᵀ g + (g - V Vᵀ g) / λ``,

which equals the Woodbury form ``(g - Gᵀ (NλI + GGᵀ)^-1 G g) / λ`` but keeps its accuracy
as ``λ -> 0``: the row-space part is solved with the well-conditioned ``S/N + λ`` and
only the (numerically tiny, when ``g`` is a combination of per-sample gradients)
orthogonal remainder is divided by ``λ``. The two parts are combined as

    ``(F + λI)^-1 g = g/λ - Gᵀ U (Uᵀ G g / (N λ (S/N + λ)))``,

one product with ``G`` and one with ``Gᵀ``.

Precision: whatever ``G``'s dtype, the Gram matrix ``GGᵀ`` (cost ``R x R x P``), its
eigenpairs and the products ``G g`` and ``Gᵀ w`` (cost ``R x P``) are formed in float64,
converting ``G`` a block of columns at a time (never a full float64 copy). Dividing the
remainder by ``λ`` magnifies rounding errors by about ``1/λ``: in float32 arithmetic that
was a relative error near ``1e-4`` at ``λ = 1e-3`` and ``0.1`` at ``λ = 1e-6``; in float64
it stays below float32 round-off down to ``λ ≈ 1e-8`` (the result is returned in ``g``'s
dtype). Eigenvalues below ``R · eps64 · max(S)`` count as zero. The eigendecomposition
does not depend on ``λ``, so a damping schedule reuses it.

Example:
    >>> import torch
    >>> G = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    >>> eig = gram_eigen(G)
    >>> woodbury_solve(G, eig, torch.tensor([1.0, 1.0], dtype=torch.float64), 0.5, 2)
    tensor([1.0000, 0.4000], dtype=torch.float64)
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from typing_extensions import Unpack

from natgrad.curvature.protocol import Curvature, Params, refuse_pruning_rename, register_curvature
from natgrad.engine.checks import (
    check_choice,
    check_finite,
    check_fixed_model,
    check_fraction,
    check_int,
)
from natgrad.engine.common import acc_dtype, to_acc
from natgrad.engine.distributed import (
    is_distributed,
    raise_if_any_rank_failed,
    rank_and_world,
    resolve_distributed,
)
from natgrad.engine.likelihoods import Likelihood
from natgrad.engine.options import EstimatorOptions, Options
from natgrad.engine.per_sample import Plan, per_sample_grads

__all__ = ["gram_eigen", "woodbury_solve", "LowRankFisher"]

_FORMAT = "natgrad.LowRankFisher"

# float64 entries of G converted at a time (32 MiB): bounds the extra memory of the
# float64 products whatever the number of parameters
_BLOCK_FLOATS = 2**22


def _column_blocks(G: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
    """``(columns, G[:, columns] in float64)`` over blocks of about ``_BLOCK_FLOATS`` entries."""
    width = max(1, _BLOCK_FLOATS // max(G.shape[0], 1))
    for j in range(0, G.shape[1], width):
        cols = slice(j, min(j + width, G.shape[1]))
        yield cols, G[:, cols].double()


def _gram64(G: torch.Tensor) -> torch.Tensor:
    """``G Gᵀ`` in float64."""
    K = torch.zeros(G.shape[0], G.shape[0], dtype=torch.float64, device=G.device)
    for _, B in _column_blocks(G):
        K.addmm_(B, B.T)
    return K


def _matvec64(G: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``G v`` in float64 (``v`` float64, ``(P,)``)."""
    out = torch.zeros(G.shape[0], dtype=torch.float64, device=G.device)
    for cols, B in _column_blocks(G):
        out.addmv_(B, v[cols])
    return out


def _rmatvec64(G: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``Gᵀ w`` in float64 (``w`` float64, ``(R,)``)."""
    return torch.cat([B.T @ w for _, B in _column_blocks(G)])


def gram_eigen(G: torch.Tensor) -> dict[str, torch.Tensor]:
    """Eigenpairs of the Gram matrix ``GGᵀ`` with numerically positive eigenvalues.

    The Gram matrix is formed in float64 whatever ``G``'s dtype (see the module notes).

    Args:
        G: ``(R, P)`` per-sample gradients, one per row.

    Returns:
        ``{"U": (R, r), "S": (r,)}`` in float64, ``r <= R`` kept eigenpairs.

    Raises:
        FloatingPointError: NaN or Inf in ``G`` (seen on the diagonal of ``GGᵀ``, so the
            check costs ``R x R``, not ``R x P``).
    """
    K = _gram64(G)
    check_finite(
        "the per-sample gradients (their Gram matrix GGᵀ)",
        K,
        "Check the inputs; in training, the run has likely diverged: lower the learning rate "
        "or raise damping.",
    )
    S, U = torch.linalg.eigh(K)
    tol = S.abs().max() * G.shape[0] * torch.finfo(torch.float64).eps
    keep = S.gt(tol)
    return {"U": U[:, keep].contiguous(), "S": S[keep].contiguous()}


def woodbury_solve(
    G: torch.Tensor,
    eig: Mapping[str, torch.Tensor],
    g: torch.Tensor,
    damping: float,
    n_samples: int,
) -> torch.Tensor:
    """``(GᵀG/N + λI)^-1 g`` through the Gram eigenpairs of :func:`gram_eigen`.

    Computed in float64 (``G`` converted a block of columns at a time) as
    ``g/λ - Gᵀ U (Uᵀ G g / (N λ (S/N + λ)))``; see the module notes.

    Args:
        G: ``(R, P)`` per-sample gradients.
        eig: the output of ``gram_eigen(G)``.
        g: ``(P,)`` the vector to precondition.
        damping: ``λ > 0``.
        n_samples: ``N`` (the number of samples, not rows).

    Returns:
        ``(P,)`` in the dtype of ``g``.
    """
    U, S = eig["U"].double(), eig["S"].double()
    gd = g.double()
    if S.numel() == 0:
        return (gd / damping).to(g.dtype)
    c = U.T @ _matvec64(G, gd)
    w = U @ (c / (n_samples * damping * (S / n_samples + damping)))
    return (gd / damping - _rmatvec64(G, w)).to(g.dtype)


def _flat(v: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]],
          dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    parts = []
    for k, shape in shapes.items():
        x = v.get(k)
        n = math.prod(shape)
        parts.append(torch.zeros(n, dtype=dtype, device=device) if x is None
                     else x.reshape(-1).to(device=device, dtype=dtype))
    return torch.cat(parts)


def _unflat(x: torch.Tensor, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for k, shape in shapes.items():
        n = math.prod(shape)
        out[k] = x[i : i + n].reshape(shape)
        i += n
    return out


@register_curvature("lowrank")
class LowRankFisher(Curvature):
    """The exact mini-batch Fisher ``F = RᵀR/N`` from its rows, applied through the Gram
    eigenpairs (see the module doc).

    ``R`` (``rows``, ``(R, P)``) holds one row per sample and label column: the
    per-sample gradient ``g_n`` (``empirical``), ``g_nj / √k`` for ``k`` MC draws, or
    ``J_nᵀ s_j`` for the ``exact`` factor columns. With ``rank=k`` only the top-``k``
    eigenpairs of ``RRᵀ`` are kept: the rows are replaced by ``U_kᵀ R`` (``k`` rows), so
    ``F_k = RᵀU_k U_kᵀR/N`` is the best rank-``k`` approximation of ``F``.

    With ``RRᵀ = U S Uᵀ`` (float64, eigenvalues above ``R · eps · max S``, ``r`` kept) and
    the orthonormal ``V = Rᵀ U S^{-1/2}`` (``(P, r)``, float64), ``F = V (S/N) Vᵀ`` and::

        mv(v)               = V (S/N) Vᵀ v
        solve(v, λ)         = V (S/N + λ)⁻¹ Vᵀ v + (v - V Vᵀ v) / λ
        diagonal()          = Σ_k V_ik² S_k/N
        inverse_diagonal(λ) = Σ_k V_ik² / (S_k/N + λ) + (1 - Σ_k V_ik²) / λ
        logdet(λ)           = (P - r) log λ + Σ_k log(λ + S_k/N)

    ``a + b`` stacks the rows (``(RₐᵀRₐ + R_bᵀR_b)/(N_a + N_b)``, the exact
    sample-weighted mean), ``c * F`` scales the rows by ``√c``, ``ema`` scales them by
    ``√(d N/N_a)`` and ``√((1-d) N/N_b)``. The basis ``V`` takes ``P · r`` float64 numbers.

    Args:
        rows: ``(R, P)`` rows over the parameters ``shapes`` (flattened in that order).
        n_samples: ``N``.
        shapes: ``{parameter name: shape}``.
        rank: keep the top ``rank`` eigenpairs (None: all).
        labels: provenance: the label source.
        likelihood: provenance: the likelihood name.
    """

    kind = "lowrank"
    file_format = _FORMAT
    REFRESH_REPLACES = True
    CAPTURE_KINDS = ("lowrank",)
    CHECKS_MODEL = True  # estimate runs check_fixed_model

    def __init__(
        self,
        rows: torch.Tensor,
        n_samples: int,
        shapes: Mapping[str, Sequence[int]],
        *,
        rank: int | None = None,
        labels: str = "empirical",
        likelihood: str = "categorical",
    ):
        if int(n_samples) < 0:
            raise ValueError(f"Invalid n_samples: {n_samples!r}; it must be >= 0.")
        self.shapes = {k: tuple(int(s) for s in v) for k, v in shapes.items()}
        P = sum(math.prod(s) for s in self.shapes.values())
        if rows.dim() != 2 or rows.shape[1] != P:
            raise ValueError(
                f"rows must have shape (R, {P}) for the parameters {list(self.shapes)[:8]}, "
                f"got {tuple(rows.shape)}."
            )
        self.rank = check_int("rank", rank, 1, optional=True)
        self.n_samples = int(n_samples)
        self.labels = str(labels)
        self.likelihood = str(likelihood)
        self.rows = to_acc(rows.detach())
        self._eig: dict[str, torch.Tensor] = {}
        if self.rank is not None and self.rows.shape[0] > self.rank:
            U = self._gram()[0]
            self.rows = (U.T @ self.rows.double()).to(self.rows.dtype)
            self._eig = {}

    def __repr__(self) -> str:
        return (f"LowRankFisher({self.rows.shape[0]} rows x {self.rows.shape[1]} parameters, "
                f"rank={self.rank}, n_samples={self.n_samples})")

    @property
    def P(self) -> int:
        return self.rows.shape[1]

    def _gram(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U, S)`` of ``RRᵀ`` in float64, top ``rank`` kept, largest first."""
        if "U" not in self._eig:
            if self.rows.shape[0] == 0:
                z = self.rows.new_zeros(0, dtype=torch.float64)
                self._eig = {"U": z.reshape(0, 0), "S": z}
            else:
                e = gram_eigen(self.rows.double())
                U, S = e["U"].flip(-1), e["S"].flip(-1)
                if self.rank is not None:
                    U, S = U[:, : self.rank], S[: self.rank]
                self._eig = {"U": U, "S": S}
        return self._eig["U"], self._eig["S"]

    def _basis(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(V, S/N)``: the orthonormal basis ``V = RᵀU S^{-1/2}`` and its eigenvalues."""
        if "V" not in self._eig:
            U, S = self._gram()
            R = self.rows.double()
            V = R.T @ (U / S.sqrt()) if S.numel() else R.new_zeros(self.P, 0)
            self._eig["V"] = V
            self._eig["E"] = S / max(self.n_samples, 1)
        return self._eig["V"], self._eig["E"]

    # -- estimation ---------------------------------------------------------------------
    @classmethod
    def estimate(  # type: ignore[override]  # each kind takes its own keyword options
        cls,
        model: nn.Module,
        data: Any,
        likelihood: str | Likelihood = "categorical",
        *,
        kind: str = "lowrank",
        rank: int | None = None,
        max_batches: int | None = None,
        progress: bool = False,
        distributed: bool | None = None,
        **options: Unpack[EstimatorOptions],
    ) -> LowRankFisher:
        """Collect the rows (exact per-sample gradients, :func:`natgrad.per_sample_grads`)
        of every batch of ``data``; with ``torch.distributed`` (``distributed=None``: when
        a process group is initialized) the rows of all ranks are gathered, so every rank
        holds the Fisher of all shards. ``rank`` keeps the top-``rank`` eigenpairs;
        ``**options`` are the estimator options (:class:`natgrad.EstimatorOptions`;
        ``engine`` is not taken: the rows are the per-sample gradients themselves).

        Raises:
            ValueError: no samples, bad options.
            FloatingPointError: NaN or Inf in the per-sample gradients.
        """
        from natgrad.curvature.estimate import iterate_batches, rank_options, with_progress

        check_choice("kind", kind, ("lowrank",))
        opts = Options.resolve("estimate_curvature(kind='lowrank')", options,
                               unsupported=("engine",))
        rank = check_int("rank", rank, 1, optional=True)
        dist_on = resolve_distributed(distributed, "estimate_curvature(kind='lowrank')")
        what = "estimate_curvature(kind='lowrank')"
        config = stream = None
        try:  # a failure here reaches every rank (the others would wait in the gather)
            if dist_on:  # what every rank must share; a rank-seeded default MC generator
                opts, config, stream = rank_options(opts, rank_and_world(True)[0], what, model,
                                                    likelihood, top_rank=rank)
            check_fixed_model(model, what)
            plan = Plan.from_options(model, likelihood, opts, what=what, checked=True)
        except Exception as exc:
            if not dist_on:
                raise
            raise_if_any_rank_failed(exc, what)
            raise  # unreachable: the call above raises on every rank
        shapes = {k: tuple(p.shape) for k, p in plan.params.items()}
        gen = plan.generator
        rows, n = [], 0
        batches = with_progress(iterate_batches(data, max_batches), data, progress, max_batches,
                            "low-rank Fisher")
        error = None  # under torch.distributed, a failure on one rank reaches every rank
        try:
            for batch in batches:
                g = per_sample_grads(model, batch, likelihood, labels=opts.labels,
                                     mc_samples=opts.mc_samples, params=list(shapes),
                                     chunk_size=opts.chunk_size, generator=gen,
                                     output_fn=opts.output_fn)
                first = g[next(iter(shapes))]
                lead = first.shape[: first.dim() - len(shapes[next(iter(shapes))])]
                r = torch.cat([to_acc(g[k]).reshape(*lead, -1) for k in shapes], -1)
                r = r.reshape(-1, r.shape[-1])
                if plan.labels == "mc" and plan.k > 1:
                    r = r * math.sqrt(plan.weight)
                rows.append(r)
                n += lead[0]
        except Exception as exc:
            if not dist_on:
                raise
            error = exc
        if dist_on:
            raise_if_any_rank_failed(error, what, config=config, stream=stream)
        P = sum(math.prod(s) for s in shapes.values())
        dt = to_acc(next(iter(plan.params.values())).detach()).dtype
        R = torch.cat(rows) if rows else torch.zeros(0, P, dtype=dt, device=plan.device)
        if dist_on:  # every rank gathers, even one whose shard is empty
            R, n = _gather_rows(R, n, None)
        if n == 0:
            raise ValueError(
                "No samples: `data` yielded no batches, so there is no Fisher to estimate."
            )
        check_finite("the per-sample gradients (their Gram matrix)", (R.double() ** 2).sum(),
                     "Check the inputs, the model's outputs and the labels for NaN/Inf.")
        return cls(R, n, shapes, rank=rank, labels=opts.labels, likelihood=plan.lik.name)

    @classmethod
    def from_capture(cls, capture: Any, *, kind: str = "lowrank",
                     likelihood: str = "categorical", rank: int | None = None,
                     **options: Any) -> LowRankFisher:
        """The exact mini-batch empirical Fisher ``F = RᵀR/N`` from the user's own
        forward/backward: the rows are the per-sample gradients ``g_n = Σ_t b_nt ã_ntᵀ``
        of the recorded inputs and per-sample-loss output gradients
        (:func:`natgrad.curvature.backward.per_sample_gradients`), in the order of the
        selected parameters.

        Args:
            capture: a :class:`~natgrad.curvature.backward.BackwardCapture` (its records
                are consumed).
            kind: ``"lowrank"``.
            likelihood: provenance: the likelihood name.
            rank: keep the top ``rank`` eigenpairs (None: all).
            options: ignored (the options of other kinds).

        Raises:
            ValueError: nothing recorded (see ``BackwardCapture.take``).
            FloatingPointError: NaN or Inf in the per-sample gradients.
        """
        from natgrad.curvature.backward import per_sample_gradients

        if kind not in cls.CAPTURE_KINDS:
            super().from_capture(capture, kind=kind)  # raises: this kind cannot be captured
        cap = capture.take()
        g = per_sample_gradients(capture.layers, cap)
        names = [k for k in capture.order if k in g]
        R = torch.cat([g[k].reshape(cap.n, -1) for k in names], 1)
        check_finite("the per-sample gradients (their Gram matrix)", (R.double() ** 2).sum(),
                     "Training has likely diverged: lower the learning rate or raise damping.")
        return cls(R, cap.n, {k: tuple(g[k].shape[1:]) for k in names}, rank=rank,
                   labels="empirical", likelihood=str(likelihood))

    # -- linear algebra -----------------------------------------------------------------
    def _vec(self, v: Params) -> torch.Tensor:
        unknown = [k for k in v if k not in self.shapes]
        if unknown:
            raise ValueError(
                f"The vector has names this curvature does not cover: {unknown[:8]}; it "
                f"covers {list(self.shapes)[:8]}. Pass only the curvature's parameters."
            )
        return _flat(v, self.shapes, torch.float64, self.rows.device)

    def _out(self, x: torch.Tensor, v: Params) -> dict[str, torch.Tensor]:
        full = _unflat(x, self.shapes)
        return {k: full[k].to(v[k].dtype) for k in v}

    def mv(self, v: Params) -> dict[str, torch.Tensor]:
        """``F v = V (S/N) Vᵀ v``."""
        V, E = self._basis()
        return self._out(V @ (E * (V.T @ self._vec(v))), v)

    def solve(self, v: Params, damping: float) -> dict[str, torch.Tensor]:
        """``V (S/N + λ)⁻¹ Vᵀ v + (v - V Vᵀ v)/λ``.

        Raises:
            ValueError: ``damping = 0`` while ``F`` is singular (rank < P).
        """
        lam = _damping(damping)
        V, E = self._basis()
        x = self._vec(v)
        c = V.T @ x
        if lam == 0:
            if E.numel() < self.P:
                raise ValueError(
                    f"The low-rank Fisher has rank {E.numel()} < {self.P} parameters, so "
                    "F + 0·I is singular; pass damping > 0."
                )
            return self._out(V @ (c / E), v)
        return self._out(V @ (c / (E + lam)) + (x - V @ c) / lam, v)

    def diagonal(self) -> dict[str, torch.Tensor]:
        """``Σ_k V_ik² S_k / N``."""
        V, E = self._basis()
        return {k: t.to(self.rows.dtype) for k, t in _unflat((V * V) @ E, self.shapes).items()}

    def inverse_diagonal(self, damping: float) -> dict[str, torch.Tensor]:
        """``Σ_k V_ik² / (S_k/N + λ) + (1 - Σ_k V_ik²)/λ`` (exact)."""
        lam = _damping(damping)
        V, E = self._basis()
        V2 = V * V
        d = V2 @ (1.0 / (E + lam))
        if lam > 0:
            d = d + (1.0 - V2.sum(1)).clamp_min(0) / lam
        elif E.numel() < self.P:
            raise ValueError(
                f"The low-rank Fisher has rank {E.numel()} < {self.P} parameters, so F + 0·I "
                "is singular; pass damping > 0."
            )
        return {k: t.to(self.rows.dtype) for k, t in _unflat(d, self.shapes).items()}

    def logdet(self, damping: float) -> torch.Tensor:
        """``(P - r) log λ + Σ_k log(λ + S_k/N)``."""
        lam = _damping(damping)
        _, E = self._basis()
        out = torch.log(E + lam).sum()
        if E.numel() < self.P:
            out = out + (self.P - E.numel()) * math.log(lam) if lam > 0 else out - math.inf
        return out.to(self.rows.dtype)

    def structure(self) -> dict[str, str]:
        """Every covered parameter is ``"lowrank"``."""
        return {k: "lowrank" for k in self.shapes}

    # -- combination --------------------------------------------------------------------
    def _like(self, rows: torch.Tensor, n: int, labels: str | None = None) -> LowRankFisher:
        return LowRankFisher(rows, n, self.shapes, rank=self.rank, labels=labels or self.labels,
                             likelihood=self.likelihood)

    def _check_same(self, other: Curvature, what: str) -> LowRankFisher:
        if not isinstance(other, LowRankFisher):
            raise TypeError(f"Cannot {what} a LowRankFisher with a {type(other).__name__}.")
        refuse_pruning_rename(self.shapes, other.shapes, what, "LowRankFisher")
        if other.shapes != self.shapes:
            raise ValueError(
                f"Cannot {what} LowRankFishers over different parameters ({list(self.shapes)[:6]}"
                f" vs {list(other.shapes)[:6]}); estimate both with the same params."
            )
        # the same parameters listed in another order: its columns laid out as ours
        return other._padded(self.shapes)

    def __add__(self, other: Curvature) -> LowRankFisher:
        """Stacked rows: ``(N_a F_a + N_b F_b)/(N_a + N_b)`` exactly."""
        if not isinstance(other, LowRankFisher):
            return NotImplemented
        other = self._check_same(other, "add")
        n = self.n_samples + other.n_samples
        if n == 0:
            raise ValueError("Cannot combine two curvatures that both have n_samples=0.")
        labels = self.labels if self.labels == other.labels else "mixed"
        dt = torch.promote_types(self.rows.dtype, other.rows.dtype)  # as the other kinds
        rows = torch.cat([self.rows.to(dtype=dt), other.rows.to(self.rows.device, dt)])
        return self._like(rows, n, labels)

    def __mul__(self, scalar: float) -> LowRankFisher:
        """``c F`` (rows scaled by ``√c``, ``c >= 0``)."""
        if isinstance(scalar, bool) or not isinstance(scalar, (int, float)):
            return NotImplemented
        c = float(scalar)
        if not c >= 0 or c == math.inf:
            raise ValueError(f"Invalid scale {scalar!r}: a curvature is scaled by a finite c >= 0.")
        return self._like(self.rows * math.sqrt(c), self.n_samples)

    __rmul__ = __mul__

    def ema(self, other: Curvature, decay: float) -> LowRankFisher:
        """``decay F_a + (1 - decay) F_b`` with ``N = N_a + N_b`` (rescaled rows)."""
        decay = check_fraction("decay", decay, closed=True)
        other = self._check_same(other, "average")
        n = self.n_samples + other.n_samples
        parts = []
        dt = torch.promote_types(self.rows.dtype, other.rows.dtype)  # as the other kinds
        for f, w in ((self, decay), (other, 1 - decay)):
            if w > 0 and f.n_samples > 0:
                parts.append(f.rows.to(self.rows.device, dt) * math.sqrt(w * n / f.n_samples))
        rows = torch.cat(parts) if parts else self.rows[:0].to(dtype=dt)
        labels = self.labels if self.labels == other.labels else "mixed"
        return self._like(rows, n, labels)

    def ema_union(self, other: Curvature, decay: float) -> LowRankFisher:
        """``d F_self + (1 - d) F_other`` over the union of the parameters: both row
        stacks are zero-padded to the union's columns (a curvature is zero on, and
        uncoupled to, the parameters it lacks) and averaged as :meth:`ema`;
        ``N = N_self + N_other``. Exact, except that a curvature with ``rank`` set keeps
        the top ``rank`` eigenpairs of the result.

        Raises:
            TypeError: ``other`` is not a LowRankFisher.
            ValueError: a shared parameter shaped differently, or one named ``w`` in one
                and ``w_orig`` in the other (pruned in between).
        """
        decay = check_fraction("decay", decay, closed=True)
        if not isinstance(other, LowRankFisher):
            raise TypeError(f"Cannot average a LowRankFisher with a {type(other).__name__}.")
        refuse_pruning_rename(self.shapes, other.shapes, "average", "LowRankFisher")
        shapes = dict(self.shapes)
        for k, s in other.shapes.items():
            if shapes.setdefault(k, s) != s:
                raise ValueError(
                    f"Cannot average LowRankFishers that shape {k!r} differently ({shapes[k]} "
                    f"vs {s}); estimate both on the same model."
                )
        return self._padded(shapes).ema(other._padded(shapes), decay)

    def _padded(self, shapes: Mapping[str, tuple[int, ...]]) -> LowRankFisher:
        """The same ``F`` over ``shapes`` (a superset): zero columns for the added names."""
        if list(shapes) == list(self.shapes):
            return self
        rows = self.rows.new_zeros(self.rows.shape[0], sum(math.prod(s) for s in shapes.values()))
        start, j = {}, 0
        for k, s in self.shapes.items():  # this curvature's column range of each name
            start[k] = j
            j += math.prod(s)
        i = 0
        for k, s in shapes.items():
            n = math.prod(s)
            if k in start:
                rows[:, i : i + n] = self.rows[:, start[k] : start[k] + n]
            i += n
        return LowRankFisher(rows, self.n_samples, shapes, rank=self.rank, labels=self.labels,
                             likelihood=self.likelihood)

    def to(self, *args: Any, **kwargs: Any) -> LowRankFisher:
        """Move / cast the rows like ``Tensor.to``; returns a new curvature."""
        return LowRankFisher(self.rows.to(*args, **kwargs), self.n_samples, self.shapes,
                             rank=self.rank, labels=self.labels, likelihood=self.likelihood)

    def to_model_dtypes(self, params: Mapping[str, torch.Tensor]) -> LowRankFisher:
        """The rows in the dtype an estimate gives them: the promoted accumulation dtype
        of the covered parameters (float64 when any is float64; their per-sample gradients
        are concatenated into one row), see :meth:`Curvature.to_model_dtypes`."""
        dtypes = [acc_dtype(params[k].dtype) for k in self.shapes]
        dtype = torch.float64 if torch.float64 in dtypes else torch.float32
        return self.to(dtype) if dtypes else self

    # -- state --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only; round-trips exactly."""
        return {"format": _FORMAT, "rows": self.rows.clone(), "n_samples": self.n_samples,
                "shapes": {k: list(s) for k, s in self.shapes.items()}, "rank": self.rank,
                "labels": self.labels, "likelihood": self.likelihood}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the contents; the parameters must match when this curvature has any."""
        if not isinstance(state, Mapping) or state.get("format") != _FORMAT:
            raise ValueError(
                f"Not a LowRankFisher state_dict (format {_FORMAT!r} missing); use the "
                "state_dict() of a LowRankFisher."
            )
        shapes = {k: tuple(int(x) for x in s) for k, s in state["shapes"].items()}
        if self.shapes and shapes != self.shapes:
            if list(shapes) == list(self.shapes):
                diff = [k for k in shapes if shapes[k] != self.shapes[k]]
                raise ValueError(
                    f"The state_dict shapes its parameters differently from this curvature "
                    f"({', '.join(f'{k}: {shapes[k]} vs {self.shapes[k]}' for k in diff[:4])}): "
                    "it was estimated on a model of another size."
                )
            raise ValueError(
                f"The state_dict covers other parameters ({list(shapes)[:6]}) than this "
                f"curvature ({list(self.shapes)[:6]})."
            )
        new = LowRankFisher(state["rows"].clone(), int(state["n_samples"]), shapes,
                            rank=state["rank"], labels=str(state.get("labels", "empirical")),
                            likelihood=str(state.get("likelihood", "categorical")))
        self.__dict__.update(new.__dict__)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> LowRankFisher:
        """A new curvature holding ``state``."""
        f = cls(torch.zeros(0, 0), 0, {})
        f.load_state_dict(state)
        return f

    def all_reduce(self, group: object | None = None) -> LowRankFisher:
        """All ranks' rows gathered (rank order) and their ``N`` summed: the Fisher of the
        union of the ranks' samples, ``Σ_r F_r`` weighted by ``N_r``. With ``rank=k``
        each rank's rows are already its own top ``k``, so the result is the top ``k`` of
        those (``c_0 + c_1``'s), not the top ``k`` of the union's Fisher; for that, estimate
        with ``distributed=True``, which gathers the full rows first. A copy when not
        distributed."""
        if not is_distributed():
            return self._like(self.rows.clone(), self.n_samples)
        rows, n = _gather_rows(self.rows, self.n_samples, group)
        return self._like(rows, n)


def _gather_rows(rows: torch.Tensor, n: int, group: Any) -> tuple[torch.Tensor, int]:
    """Concatenate every rank's rows (rank order) and sum the sample counts."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    meta = torch.tensor([rows.shape[0], int(n)], dtype=torch.int64, device=rows.device)
    metas = [torch.zeros_like(meta) for _ in range(world)]
    dist.all_gather(metas, meta, group=group)
    counts = [int(m[0]) for m in metas]
    top = max(counts)
    pad = torch.zeros(top, rows.shape[1], dtype=rows.dtype, device=rows.device)
    pad[: rows.shape[0]] = rows
    gathered = [torch.zeros_like(pad) for _ in range(world)]
    dist.all_gather(gathered, pad, group=group)
    out = torch.cat([g[:c] for g, c in zip(gathered, counts, strict=True)])
    return out, sum(int(m[1]) for m in metas)


def _damping(damping: float) -> float:
    lam = float(damping)
    if not lam >= 0 or lam == math.inf:
        raise ValueError(f"Invalid damping: {damping!r}; it must be a finite number >= 0.")
    return lam
