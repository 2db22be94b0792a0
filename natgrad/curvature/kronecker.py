"""``KroneckerFisher``: K-FAC and EKFAC curvatures behind the :class:`~natgrad.Curvature` protocol.

Per covered layer, the Fisher of its block matrix ``V = [W, b]`` (``(d_G, d_A)``,
flattened row-major; ``Wᵀ`` for weights stored ``(in, out)``; one block per group of a
grouped convolution) is

* **K-FAC** (``kind="kfac"``): ``F ≈ G ⊗ A`` with the factors of
  :mod:`natgrad.curvature.kfac` ("expand" convention),
  ``A = (1/(N·T)) Σ ã ãᵀ``, ``G = (1/N) Σ_{n,t} Σ_j w_j b bᵀ``;
* **EKFAC** (``kind="ekfac"``, George et al. 2018): ``F ≈ (Q_G ⊗ Q_A) diag(s) (Q_G ⊗ Q_A)ᵀ``
  with ``A = Q_A diag(s_A) Q_Aᵀ``, ``G = Q_G diag(s_G) Q_Gᵀ`` and the diagonal re-fitted
  in that eigenbasis from exact per-sample gradients,
  ``s = (1/N) Σ_n Σ_j w_j (Q_Gᵀ g_nj Q_A)²`` (``g_nj = Σ_t b_ntj ã_ntᵀ``), in place of
  ``s_G s_Aᵀ``. It needs a second pass over the data, in the eigenbasis of the first.

With ``S = s_G s_Aᵀ`` (K-FAC, eigenvalues clamped at 0) or ``S = s`` (EKFAC), the
protocol methods are, per layer::

    mv(V)               = G V A  (K-FAC),  Q_G (S ⊙ Q_Gᵀ V Q_A) Q_Aᵀ  (EKFAC)
    solve(V, λ)         = Q_G ((Q_Gᵀ V Q_A) / (S + λ)) Q_Aᵀ
    quad(V)             = Σ ⟨V, mv(V)⟩
    diagonal()          = diag(G) diag(A)ᵀ  (K-FAC),  Q_G² S (Q_A²)ᵀ  (EKFAC)
    inverse_diagonal(λ) = Q_G² (1 / (S + λ)) (Q_A²)ᵀ
    logdet(λ)           = Σ log(S + λ)

A **diagonal factor side** is an exact Kronecker factor that happens to be diagonal:
an Embedding's ``A`` (token frequencies) always, and any side whose dimension exceeds
``max_factor_dim`` (``A_ii`` or ``G_ii`` only; its eigenbasis is the identity). This
keeps e.g. the ``G`` of a 50k-vocabulary output layer a vector instead of a 10 GB matrix.

**Layers pruned by** ``torch.nn.utils.prune`` (``W = W_orig ⊙ M``, a forward pre-hook;
also a pruned bias). The layer computes ``s = (W_orig ⊙ M) a``, so its ``A`` and ``G``
(and EKFAC's ``s``) are those of the effective weight, captured as for an unpruned layer.
The block's parameters are ``weight_orig`` / ``bias_orig`` (the model's names), whose
per-sample gradient is ``M ⊙ g_n``, so their Fisher is ``D_M F D_M`` with
``D_M = diag(vec M)`` (``M = [M_W, m_b]``, the block's mask, held as ``mask``; the
factors' F as above). Per layer, with ``P(V) = M ⊙ V``::

    mv(V)               = P(F P(V))                         exact
    quad(V)             = ⟨P(V), F P(V)⟩                    exact
    diagonal()          = M ⊙ diag F                        exact (M is 0/1)
    solve(V, λ)         = P((F + λI)⁻¹ P(V))                masked projection
    inverse_diagonal(λ) = M ⊙ diag (F + λI)⁻¹                the diagonal of that solve
    logdet(λ)           = log det(F + λI)                   the effective weight's, unmasked

``solve`` is not ``(D_M F D_M + λI)⁻¹``, which has no Kronecker form: it inverts the
effective weight's curvature and projects onto the kept entries, so a preconditioned
step never moves a pruned ``W_orig`` entry (the exact solve would move them by
``v/λ`` wherever ``v`` is nonzero there; a gradient is zero there). ``logdet`` ignores
the mask (the exact one is ``log det(F_KK + λI) + #pruned · log λ`` over the kept set
``K``). The mask is a property of the model, not of the statistics: it is read from the
model's ``*_mask`` buffers at each estimate (a mask that is not 0/1 is refused), ``ema``
keeps the averaged factors and takes the newer curvature's mask (after a regrowth, e.g.
``prune.remove`` then ``prune.custom_from_mask`` with a mask keeping entries pruned before,
the regrown entries are preconditioned at once), ``+`` refuses two curvatures whose masks
differ (the sum of two differently masked Fishers has no masked Kronecker form), and
:meth:`KroneckerFisher.with_masks` puts a model's current masks on a curvature
(:class:`natgrad.FisherPreconditioner` does so at each step). The Laplace functions and
:func:`natgrad.obs_saliency` refuse masked blocks (they would need the exact solve or its
inverse diagonal, ``[(F_KK + λI)⁻¹]_qq``).

Parameters K-FAC cannot cover (LayerNorm, biases without their weight, weights shared by
several modules such as a tied embedding and LM head, layers called without the batch as
first dimension, ...) are held as the diagonal Fisher ``(1/N) Σ_n E_y[g_n²]`` in the same
object: ``structure()`` says ``"diag"`` for them, and one warning (also logged on the
``"natgrad"`` logger) names them with the reason.

Combination: ``a + b`` pools the statistics sample-weighted, ``A = (N_a A_a + N_b A_b)/N``
and the same for ``G`` (the K-FAC of the pooled samples, what one estimate over both
gives; not the mean of the two Kronecker products, which is no Kronecker product). For
EKFAC, ``s`` is re-fitted in the pooled eigenbasis as the diagonal of the pooled operator
``(N_a F_a + N_b F_b)/N`` there: ``s = Σ_x w_x R_G,x² s_x (R_A,x²)ᵀ``, ``R_x = Q_poolᵀ Q_x``
(exact when the bases agree). ``ema`` uses the weights ``d`` and ``1 - d`` the same way;
``c * F`` scales ``G`` (and ``s``) by ``c``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, cast, get_args

import torch
from torch import nn
from typing_extensions import Unpack

from natgrad.curvature.kfac import (
    KFAC_APPROX,
    KFAC_DAMPING,
    OUTSIDE_REASON,
    KfacApprox,
    KfacDamping,
    KFACLayer,
    capture,
    factor_stats,
    kfac_coverage,
    kfac_eigen,
    per_sample_blocks,
    split_weight_blocks,
    weight_blocks,
)
from natgrad.curvature.protocol import (
    Curvature,
    Params,
    flat_inner,
    refuse_pruning_rename,
    register_curvature,
)
from natgrad.engine.checks import (
    check_choice,
    check_finite,
    check_fixed_model,
    check_fraction,
    check_int,
)
from natgrad.engine.common import acc_dtype, mix, to_acc
from natgrad.engine.distributed import (
    describe_call,
    is_distributed,
    raise_if_any_rank_failed,
    rank_and_world,
    resolve_distributed,
)
from natgrad.engine.likelihoods import Likelihood
from natgrad.engine.options import EstimatorOptions, Options
from natgrad.engine.per_sample import Plan

__all__ = ["KroneckerFisher", "FactorMemoryError", "KRONECKER_KINDS", "default_factor_bytes"]

_log = logging.getLogger("natgrad")
_FORMAT = "natgrad.KroneckerFisher"
KroneckerKind = Literal["kfac", "ekfac"]
KRONECKER_KINDS: tuple[KroneckerKind, ...] = get_args(KroneckerKind)
_BLOCK_FLOATS = 2**24  # per-sample gradient floats per EKFAC chunk (64 MiB of float32)
_CACHE_FLOATS = 2**20  # a layer's 1/(S + λ) is kept between solves up to this many entries


class FactorMemoryError(MemoryError):
    """The Kronecker factors would not fit in the allowed memory (see ``max_factor_dim``)."""


@dataclass
class KroneckerBlock:
    """One layer's Kronecker statistics and the layout of its parameters.

    ``A``: ``(groups, d_A, d_A)``, or ``(groups, d_A)`` when diagonal; ``G`` likewise
    with ``d_G``. EKFAC also holds its eigenbases ``QA``, ``QG`` (None on a diagonal side)
    and the re-fitted eigenvalues ``s`` ``(groups, d_G, d_A)``. ``mask``: for a layer
    pruned by ``torch.nn.utils.prune``, the 0/1 block mask ``M`` ``(groups, d_G, d_A)``
    (see the module doc), else None.
    """

    weight: str
    bias: str | None
    shape: tuple[int, ...]
    transposed: bool
    groups: int
    A: torch.Tensor
    G: torch.Tensor
    s: torch.Tensor | None = None
    QA: torch.Tensor | None = None
    QG: torch.Tensor | None = None
    eig: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    mask: torch.Tensor | None = None

    @property
    def names(self) -> list[str]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"A": self.A, "G": self.G}
        for k in ("s", "QA", "QG", "mask"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        return out

    def layout(self) -> tuple[Any, ...]:
        return (self.weight, self.bias, tuple(self.shape), self.transposed, self.groups,
                tuple(self.A.shape), tuple(self.G.shape))

    def bases(self) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``(Q_A, s_A, Q_G, s_G)``: eigenbases (None for a diagonal side) and eigenvalues
        clamped at 0; computed once per statistics (damping-independent)."""
        if "QA" not in self.eig and self.s is not None:  # EKFAC: its own bases; S is s
            self.eig.update({"QA": self.QA, "sA": None, "QG": self.QG, "sG": None})
        if "QA" not in self.eig and self.A.dim() == 3 and self.G.dim() == 3:
            e = kfac_eigen(self.A, self.G)  # batched over groups
            self.eig.update({"QA": e["QA"].contiguous(), "sA": e["dA"],
                             "QG": e["QG"].contiguous(), "sG": e["dG"]})
        if "QA" not in self.eig:
            self.eig.update(_eigen(self.A, "A"))
            self.eig.update(_eigen(self.G, "G"))
        e = self.eig
        return e["QA"], e["sA"], e["QG"], e["sG"]

    def block_mask(self) -> torch.Tensor | None:
        """``mask`` shaped like the block matrices the methods see: ``(d_G, d_A)`` for one
        group (its dimension dropped, as :func:`_ops` does), else ``(groups, d_G, d_A)``."""
        if self.mask is None:
            return None
        return self.mask[0] if self.groups == 1 else self.mask

    def eigenvalues(self) -> torch.Tensor:
        """``S``: ``s`` (EKFAC) or ``s_G s_Aᵀ`` (K-FAC), shape ``(groups, d_G, d_A)``."""
        if self.s is not None:
            return self.s
        _, sA, _, sG = self.bases()
        return sG.unsqueeze(-1) * sA.unsqueeze(-2)


def _eigen(M: torch.Tensor, side: str) -> dict[str, torch.Tensor | None]:
    if M.dim() == 2:  # a diagonal side: (groups, d)
        return {f"Q{side}": None, f"s{side}": M.clamp_min(0)}
    s, Q = torch.linalg.eigh(M)
    return {f"Q{side}": Q.contiguous(), f"s{side}": s.clamp_min(0)}


def _zero_stats(lay: KFACLayer, diag_A: bool, diag_G: bool) -> list[torch.Tensor]:
    """Zero ``[A, G]`` sums of a layer: ``(groups, d)`` for a diagonal side, else ``(groups, d, d)``."""
    g, dG, dA = lay.dims()
    w = lay.module_weight
    dt, dev = to_acc(w.detach()).dtype, w.device
    A = torch.zeros((g, dA) if diag_A else (g, dA, dA), dtype=dt, device=dev)
    G = torch.zeros((g, dG) if diag_G else (g, dG, dG), dtype=dt, device=dev)
    return [A, G]


def _sandwich_sq(S: torch.Tensor, QA: torch.Tensor | None, QG: torch.Tensor | None) -> torch.Tensor:
    """``Q_G² S (Q_A²)ᵀ`` (identity for a None basis)."""
    if QG is not None:
        S = (QG * QG) @ S
    return S if QA is None else S @ (QA * QA).mT


def _damping(damping: float) -> float:
    lam = float(damping)
    if not lam >= 0 or lam == float("inf"):
        raise ValueError(f"Invalid damping: {damping!r}; it must be a finite number >= 0.")
    return lam


def default_factor_bytes(device: torch.device) -> int:
    """The memory the Kronecker factors may take when ``max_factor_bytes`` is not given.

    ``max(available, total / 2)``: on CPU ``MemAvailable`` and ``MemTotal`` of
    ``/proc/meminfo``; on CUDA the driver's free memory plus what PyTorch's caching
    allocator holds unused, and the device's total. The available memory is a snapshot:
    on a loaded machine it can read near zero for a moment (other processes' peaks, page
    cache not yet reclaimed), which alone would refuse factors of a few kilobytes; half
    the total is the floor, so only factors that could not fit in half of the machine
    are refused during such a dip. Unknown (no ``/proc/meminfo``): no limit. Factors of
    at most 64 MiB in all are not checked against it (half of any machine PyTorch runs on
    holds them), so a small model's refresh queries no memory.
    """
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return max(int(free) + max(int(cached), 0), int(total) // 2)
    info: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("MemAvailable", "MemTotal") and rest.split():
                    info[key] = int(rest.split()[0]) * 1024  # reported in kB
    except (OSError, ValueError):
        pass
    if not info:
        return 2**62  # unknown: no guard beyond max_factor_bytes
    return max(info.get("MemAvailable", 0), info.get("MemTotal", 0) // 2)


# Factors up to this size are never refused by the default limit: its floor is half the
# machine's memory, and PyTorch alone needs more than twice this much to run. Skipping the
# memory query for them keeps a small model's refresh from reading /proc/meminfo each time.
_ALWAYS_FITS = 64 * 2**20


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _reduce_sum(
    tensors: list[torch.Tensor], n: int, group: Any
) -> tuple[list[torch.Tensor], int]:
    """Sum tensors (one collective per dtype, dtype kept) and ``n`` over all ranks."""
    import torch.distributed as dist

    out = list(tensors)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    for idx in by_dtype.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in idx]).clone()
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        j = 0
        for i in idx:
            m = tensors[i].numel()
            out[i] = flat[j : j + m].view_as(tensors[i])
            j += m
    dev = tensors[0].device if tensors else torch.device("cpu")
    count = torch.tensor([int(n)], dtype=torch.int64, device=dev)
    dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
    return out, int(count.item())


@register_curvature(*KRONECKER_KINDS)
class KroneckerFisher(Curvature):
    """K-FAC or EKFAC Fisher per layer, diagonal for the rest (see the module doc).

    Build it with :meth:`estimate` (or ``natgrad.estimate_curvature(kind="kfac" |
    "ekfac")``), or from a state dict.

    Args:
        blocks: ``{layer name: KroneckerBlock}``.
        diag: ``{parameter name: tensor}`` diagonal Fisher of the uncovered parameters.
        n_samples: ``N``.
        kind: ``"kfac"`` or ``"ekfac"``.
        diag_reasons: ``{parameter name: why it is diagonal}``.
        labels: label source; likelihood: likelihood name.
        damping_mode: how :meth:`solve` damps a K-FAC layer: ``"exact"``
            (``(G ⊗ A + λI)⁻¹``, the protocol's definition) or ``"factored"`` (factored
            Tikhonov damping, Martens & Grosse 2015 §6.3:
            ``((G + (√λ/π) I) ⊗ (A + π√λ I))⁻¹`` with
            ``π = sqrt((tr A / d_A) / (tr G / d_G))``, two Cholesky inverses per layer and
            ``λ``). EKFAC layers always solve exactly in their eigenbasis. The other
            methods (``inverse_diagonal``, ``logdet``) always use the exact damping.
    """

    kind = "kfac"
    file_format = _FORMAT
    CAPTURE_KINDS = ("kfac", "ekfac")
    CHECKS_MODEL = True  # estimate runs check_fixed_model

    def __init__(
        self,
        blocks: Mapping[str, KroneckerBlock],
        diag: Mapping[str, torch.Tensor],
        n_samples: int,
        *,
        kind: str = "kfac",
        diag_reasons: Mapping[str, str] | None = None,
        labels: str = "empirical",
        likelihood: str = "categorical",
        order: list[str] | None = None,
        damping_mode: KfacDamping = "exact",
    ):
        self.kind = check_choice("kind", kind, KRONECKER_KINDS)
        self.damping_mode = check_choice("damping_mode", damping_mode, KFAC_DAMPING)
        if int(n_samples) < 0:
            raise ValueError(f"Invalid n_samples: {n_samples!r}; it must be >= 0.")
        if self.kind == "ekfac" and any(b.s is None for b in blocks.values()):
            raise ValueError("An EKFAC curvature needs the re-fitted eigenvalues s of every block.")
        self.blocks = {k: _block_to(b, copy=False) for k, b in blocks.items()}
        self.diag = {k: v.detach() for k, v in diag.items()}
        self.n_samples = int(n_samples)
        self.diag_reasons = dict(diag_reasons or {})
        self.labels = str(labels)
        self.likelihood = str(likelihood)
        self._owner = {n: k for k, b in self.blocks.items() for n in b.names}
        default = [*self._owner, *self.diag]
        self.order = list(order) if order is not None else default
        if sorted(self.order) != sorted(default):
            raise ValueError(
                f"order must list every covered parameter once; got {self.order[:8]}, "
                f"expected the names {default[:8]}."
            )

    def __repr__(self) -> str:
        return (
            f"KroneckerFisher(kind={self.kind!r}, {len(self.blocks)} layers, "
            f"{len(self.diag)} diagonal tensors, n_samples={self.n_samples})"
        )

    # -- estimation ----------------------------------------------------------------------
    @classmethod
    def estimate(  # type: ignore[override]  # each kind takes its own keyword options
        cls,
        model: nn.Module,
        data: Any,
        likelihood: str | Likelihood = "categorical",
        *,
        kind: str = "kfac",
        max_batches: int | None = None,
        progress: bool = False,
        max_factor_dim: int | None = None,
        max_factor_bytes: int | None = None,
        distributed: bool | None = None,
        damping_mode: KfacDamping = "exact",
        approx: KfacApprox = "expand",
        **options: Unpack[EstimatorOptions],
    ) -> KroneckerFisher:
        """Estimate the K-FAC (``kind="kfac"``) or EKFAC (``"ekfac"``) Fisher of ``model``.

        Covered layers (:func:`natgrad.curvature.kfac.kfac_coverage`): ``nn.Linear`` (any
        leading dimensions), ``nn.Conv1d`` / ``nn.Conv2d`` (groups: one block per group;
        every padding mode), transformers' ``Conv1D`` and ``nn.Embedding``, each when its
        weight is used by that module alone and read only inside its calls (checked on the
        first batch). The rest of the selected parameters get the exact diagonal Fisher
        (one warning names them).

        Args:
            model: the model (BatchNorm in eval mode); not modified.
            data: a batch or an iterable of batches (a DataLoader). Batches are pooled
                sample-weighted. EKFAC reads the data twice, so pass a re-iterable (a
                list or a DataLoader), not a one-shot iterator.
            likelihood: name or :class:`~natgrad.Likelihood`.
            kind: ``"kfac"`` or ``"ekfac"``.
            max_batches: stop after this many batches.
            progress: show a tqdm progress bar.
            max_factor_dim: a factor side (``d_A`` or ``d_G``) larger than this is kept
                diagonal (``A_ii`` / ``G_ii``); None: no limit.
            max_factor_bytes: the memory the factors (and their eigenbases) may take;
                default: :func:`default_factor_bytes` (the available memory of the
                device, at least half its total).
            distributed: all-reduce the statistics over ``torch.distributed`` ranks
                (each rank passes its own shard); None: when a process group is
                initialized. EKFAC re-fits ``s`` in the eigenbasis of the reduced factors,
                so every rank gets what one process gets on all the shards.
            damping_mode: ``"exact"`` or ``"factored"``, how :meth:`solve` damps (see the
                class doc).
            approx: ``"expand"`` (the module doc's factors) or ``"reduce"``
                (K-FAC-reduce for layers applied at several positions: the inputs averaged
                and the output gradients summed over a sample's positions before the outer
                products, ``N`` instead of ``N·T`` of them; see
                :func:`natgrad.curvature.kfac.factor_stats`). EKFAC re-fits its diagonal
                from the exact per-sample gradients either way.
            **options: the estimator options (:class:`natgrad.EstimatorOptions`):
                ``labels`` (``"mc"`` draws weigh ``1/k``; every pass uses the same
                draws), ``mc_samples``, ``params``, ``generator``, ``output_fn``, and
                ``chunk_size`` and ``engine`` for the diagonal part.

        Returns:
            :class:`KroneckerFisher` with ``n_samples = N``.

        Raises:
            ValueError: no selected parameter is in a covered layer (use ``kind="diag"``),
                no samples, a one-shot iterator for EKFAC, or bad options.
            FactorMemoryError: the factors would not fit; pass ``max_factor_dim``.
            FloatingPointError: NaN or Inf in the statistics.
        """
        from natgrad.curvature.estimate import (
            is_single_batch,
            iterate_batches,
            rank_options,
            with_progress,
        )
        from natgrad.engine.capture import square_sums_auto

        kind = check_choice("kind", kind, KRONECKER_KINDS)
        opts = Options.resolve(f"estimate_curvature(kind={kind!r})", options)
        labels, chunk_size, engine = opts.labels, opts.chunk_size, opts.engine
        check_choice("damping_mode", damping_mode, KFAC_DAMPING)
        check_choice("approx", approx, KFAC_APPROX)
        max_factor_dim = check_int("max_factor_dim", max_factor_dim, 1, optional=True)
        max_factor_bytes = check_int("max_factor_bytes", max_factor_bytes, 1, optional=True)
        dist_on = resolve_distributed(distributed, f"estimate_curvature(kind={kind!r})")
        what = f"estimate_curvature(kind={kind!r})"
        config = stream = None
        try:  # a failure here reaches every rank (the others would wait in the pass's
            # first collective)
            if dist_on:  # what every rank must share; a rank-seeded default MC generator
                opts, config, stream = rank_options(
                    opts, rank_and_world(True)[0], what, model, likelihood, kind=kind,
                    approx=approx, max_factor_dim=max_factor_dim,
                )  # fmt: skip
            check_fixed_model(model, what)
            plan = Plan.from_options(model, likelihood, opts, what=what, checked=True)
            layers, reasons = kfac_coverage(model, plan.params, masked=True)
            if not layers:
                raise ValueError(
                    f"kind={kind!r} covers none of the selected parameters: "
                    + "; ".join(f"{k} ({why})" for k, why in list(reasons.items())[:8])
                    + ". It covers nn.Linear, nn.Conv1d/2d, transformers' Conv1D and nn.Embedding "
                    "weights used by one module; select such layers or use kind='diag'."
                )
            diag_A, diag_G = cls._plan_sides(layers, kind, max_factor_dim, max_factor_bytes,
                                             plan.device)
            if kind == "ekfac" and not is_single_batch(data) and isinstance(data, Iterator):
                raise ValueError(
                    "kind='ekfac' reads the data twice (factors, then the eigenbasis diagonal), "
                    "but `data` is a one-shot iterator; pass a list of batches or a DataLoader."
                )
        except Exception as exc:
            if not dist_on:
                raise
            raise_if_any_rank_failed(exc, what)
            raise  # unreachable: the call above raises on every rank
        start = plan.generator.get_state()
        # Every layer and diagonal parameter gets a sum from the start, so that every rank
        # reduces the same buffers, even one whose shard is empty.
        sums = {k: _zero_stats(lay, diag_A[k], diag_G[k]) for k, lay in layers.items()}
        rest = dict(reasons)

        def rest_part() -> tuple[Plan | None, dict[str, torch.Tensor]]:
            names = [k for k in plan.params if k in rest]
            zeros = {k: torch.zeros_like(to_acc(plan.params[k].detach())) for k in names}
            return (plan.restrict(names) if names else None), zeros

        rest_plan, rest_sums = rest_part()
        n_total, first = 0, True
        batches = with_progress(iterate_batches(data, max_batches), data, progress, max_batches, kind)
        error = None  # under torch.distributed, a failure on one rank reaches every rank
        try:
            for batch in batches:
                state = plan.generator.get_state()
                cap = capture(plan, batch, layers, check_outside=first)
                for k in cap.outside:  # read outside its own call: K-FAC would miss that use
                    for p in (layers[k].weight, layers[k].bias):
                        if p:
                            rest[p] = OUTSIDE_REASON
                    del layers[k], sums[k]
                if cap.outside:
                    if not layers:
                        raise ValueError(
                            f"kind={kind!r} covers none of the selected parameters: the layers "
                            f"{cap.outside}: {OUTSIDE_REASON}; use kind='diag' or 'lowrank'."
                        )
                    rest_plan, rest_sums = rest_part()
                if cap.unbatched:
                    if not first:
                        raise ValueError(
                            f"Layers {cap.unbatched} were called without the batch dimension in a "
                            "later batch only; keep the batch as the first dimension of every batch."
                        )
                    for k in cap.unbatched:
                        if k not in layers:  # already left out: read outside its call
                            continue
                        for p in (layers[k].weight, layers[k].bias):
                            if p:
                                rest[p] = "its layer is called without the batch as first dimension"
                        del layers[k], sums[k]
                    if not layers:
                        raise ValueError(
                            f"kind={kind!r} covers none of the selected parameters: every K-FAC "
                            "layer is called without the batch dimension; use kind='diag'."
                        )
                    rest_plan, rest_sums = rest_part()
                shared: dict[tuple[int, bool], torch.Tensor] = {}  # one A per shared input
                for k, lay in layers.items():
                    if k in cap.inputs:
                        a = cap.inputs[k]
                        A, G = factor_stats(lay, a, cap.grads[k], cap.n, diag_A[k], diag_G[k],
                                            A=shared.get((id(a), diag_A[k])), approx=approx)
                        shared[(id(a), diag_A[k])] = A
                        sums[k][0] += cap.n * A
                        sums[k][1] += cap.n * G
                if rest_plan is not None:
                    plan.generator.set_state(state)
                    for _, acc in square_sums_auto(rest_plan, [batch], chunk_size, engine):
                        for k in rest_sums:
                            rest_sums[k] += acc[k]
                n_total += cap.n
                first = False
        except Exception as exc:
            if not dist_on:
                raise
            error = exc
        if dist_on:
            raise_if_any_rank_failed(error, what, config=config, stream=stream)
        order = list(layers)
        flat = [t for k in order for t in sums[k]] + list(rest_sums.values())
        if dist_on:
            flat, n_total = _reduce_sum(flat, n_total, None)
        if n_total == 0:
            raise ValueError(
                "No samples: `data` yielded no batches, so there is no Fisher to estimate."
            )
        blocks = {}
        for i, k in enumerate(order):  # a layer the forward never called: zero factors
            lay = layers[k]
            A, G = flat[2 * i] / n_total, flat[2 * i + 1] / n_total
            check_finite(f"the K-FAC factors of layer {k!r}", torch.stack([A.sum(), G.sum()]),
                         "Check the inputs, the model's outputs and the labels for NaN/Inf.")
            w = lay.module_weight
            blocks[k] = KroneckerBlock(lay.weight, lay.bias, tuple(w.shape), lay.transposed,
                                       lay.groups, A, G, mask=lay.mask_block(A.dtype))
        nr = len(order) * 2
        diag = {k: v / n_total for k, v in zip(rest_sums, flat[nr:], strict=True)}
        for k, v in diag.items():
            check_finite(f"the per-sample gradients of {k!r}", v.sum(),
                         "Check the inputs, the model's outputs and the labels for NaN/Inf.")
        if kind == "ekfac":
            plan.generator.set_state(start)
            cls._refit(plan, data, max_batches, layers, blocks, n_total, dist_on)
        if rest:
            by_reason: dict[str, list[str]] = {}
            for k in plan.params:
                if k in rest:
                    by_reason.setdefault(rest[k], []).append(k)
            msg = (
                f"kind={kind!r} keeps {len(rest)} parameter(s) diagonal (structure() says "
                "'diag'): " + "; ".join(f"{why}: {', '.join(ks)}" for why, ks in by_reason.items())
            )
            warnings.warn(msg, UserWarning, stacklevel=3)
            _log.info(msg)
        lik_name = plan.lik.name
        covered = {n for b in blocks.values() for n in b.names} | set(diag)
        return cls(blocks, {k: diag[k] for k in plan.params if k in diag}, n_total, kind=kind,
                   diag_reasons={k: rest[k] for k in plan.params if k in rest},
                   labels=labels, likelihood=lik_name,
                   order=[k for k in plan.params if k in covered], damping_mode=damping_mode)

    @classmethod
    def from_capture(cls, capture: Any, *, kind: str = "kfac", damping_mode: KfacDamping = "exact",
                     likelihood: str = "categorical", distributed: bool = False,
                     max_factor_dim: int | None = None, max_factor_bytes: int | None = None,
                     approx: KfacApprox = "expand", **options: Any) -> KroneckerFisher:
        """K-FAC or EKFAC from the user's own forward/backward (the empirical Fisher; see
        :mod:`natgrad.curvature.backward`).

        Per layer ``A = (1/(N·T)) Σ ã ãᵀ`` and ``G = (1/N) Σ_{n,t} b bᵀ`` of the recorded
        inputs ``ã`` and per-sample-loss output gradients ``b``. EKFAC then takes the
        eigenbases ``Q_A``, ``Q_G`` of these factors and re-fits the diagonal from the
        exact per-sample gradients of the same records, ``g_n = Σ_t b_nt ã_ntᵀ``:
        ``s = (1/N) Σ_n (Q_Gᵀ g_n Q_A)²``, which needs no second pass (the records hold
        every ``g_n``).

        Args:
            capture: a :class:`~natgrad.curvature.backward.BackwardCapture` (its records
                are consumed).
            kind: ``"kfac"`` or ``"ekfac"``.
            damping_mode: how a K-FAC solve damps (see the class doc).
            likelihood: provenance: the likelihood name.
            distributed: under ``torch.distributed``, pool every rank's records: the
                factors (``N_r``-weighted) and ``N`` are summed over the ranks before the
                EKFAC eigenbases are taken, and the EKFAC re-fit sums are summed after, so
                every rank holds the curvature of the union of the ranks' samples (exactly
                what one process on the concatenated batch gives).
            max_factor_dim: keep a factor side larger than this diagonal (as in
                :meth:`estimate`; e.g. the ``G`` of a 50k-vocabulary output layer).
            max_factor_bytes: memory allowed for the factors and eigenbases (default:
                :func:`default_factor_bytes`).
            approx: ``"expand"`` or ``"reduce"`` (see :meth:`estimate`).
            options: ignored (the options of other kinds).

        Raises:
            ValueError: nothing recorded (see ``BackwardCapture.take``), or a kind other
                than ``"kfac"``/``"ekfac"``.
            FactorMemoryError: the factors would not fit; pass ``max_factor_dim``.
            FloatingPointError: NaN or Inf in a factor or in the EKFAC eigenvalues.
        """
        if kind not in cls.CAPTURE_KINDS:
            super().from_capture(capture, kind=kind)  # raises: this kind cannot be captured
        max_factor_dim = check_int("max_factor_dim", max_factor_dim, 1, optional=True)
        max_factor_bytes = check_int("max_factor_bytes", max_factor_bytes, 1, optional=True)
        check_choice("approx", approx, KFAC_APPROX)
        first = next(iter(capture.layers.values()), None)
        device = first.module_weight.device if first is not None else torch.device("cpu")
        sides = cls._plan_sides(capture.layers, kind, max_factor_dim, max_factor_bytes, device)
        dist_on = bool(distributed) and is_distributed()
        order = list(capture.layers)
        sums: list[torch.Tensor] = []
        error = None
        try:  # this rank's part; a failure here reaches every rank before the reduction
            cap = capture.take()
            shared: dict[tuple[int, bool], torch.Tensor] = {}  # one A per shared input
            for k in order:
                lay = capture.layers[k]
                diag_A, diag_G = sides[0][k], sides[1][k]
                if k in cap.inputs:
                    a = cap.inputs[k]
                    key = (id(a), diag_A)
                    A, G = factor_stats(lay, a, cap.grads[k], cap.n, diag_A, diag_G,
                                        A=shared.get(key), approx=approx)
                    if key in shared:  # computed once, but each block owns its tensors (the
                        A = A.clone()  # preconditioner's in-place EMA updates them one by one)
                    shared[key] = A
                else:  # a layer the forward never reached: zero factors, as estimate gives
                    A, G = _zero_stats(lay, diag_A, diag_G)
                sums += [A, G]
        except Exception as exc:
            if not dist_on:
                raise
            error = exc
        if dist_on:
            what = f"FisherPreconditioner's refresh (kind={kind!r}, source='backward')"
            raise_if_any_rank_failed(error, what, config=describe_call(
                what, capture.params, approx=approx, max_factor_dim=max_factor_dim))
        n_total = cap.n
        if dist_on:  # N_r-weighted sums over the ranks, then the mean over all samples
            sums, n_total = _reduce_sum([f * cap.n for f in sums], cap.n, None)
            sums = [f / max(n_total, 1) for f in sums]
        factors = {k: (sums[2 * i], sums[2 * i + 1]) for i, k in enumerate(order)}
        totals = [f.sum() for f in sums]
        one_device = all(t.device == totals[0].device for t in totals)
        if totals and not (one_device and bool(torch.isfinite(torch.stack(totals)).all())):
            for k, (A, G) in factors.items():  # one host sync above; name the layer here
                check_finite(f"the K-FAC factors of layer {k!r}", torch.stack([A.sum(), G.sum()]),
                             "Training has likely diverged: lower the learning rate or raise "
                             "damping.")
        blocks = {}
        for k, (A, G) in factors.items():
            lay = capture.layers[k]
            blocks[k] = KroneckerBlock(lay.weight, lay.bias, tuple(lay.module_weight.shape),
                                       lay.transposed, lay.groups, A, G,
                                       mask=lay.mask_block(A.dtype))
        if kind == "ekfac":
            refit = []
            for k in order:
                blk, lay = blocks[k], capture.layers[k]
                QA, _, QG, _ = blk.bases()
                s = torch.zeros(blk.groups, blk.G.shape[1], blk.A.shape[1], dtype=blk.A.dtype,
                                device=blk.A.device)
                if k in cap.inputs:
                    a, (_, b) = cap.inputs[k], cap.grads[k][0]
                    step = max(1, _BLOCK_FLOATS // max(s.numel(), 1))
                    for j in range(0, cap.n, step):
                        M = per_sample_blocks(lay, a[j : j + step], b[j : j + step], QA, QG)
                        s += (M * M).sum(0)
                refit.append(s)
            if dist_on:
                refit, _ = _reduce_sum(refit, 0, None)
            for k, s in zip(order, refit, strict=True):
                blk = blocks[k]
                blk.s = s / max(n_total, 1)
                blk.QA, blk.QG = blk.eig["QA"], blk.eig["QG"]
                check_finite(f"the EKFAC eigenvalues of layer {k!r}", blk.s.sum(),
                             "Training has likely diverged: lower the learning rate or "
                             "raise damping.")
        names = [n for b in blocks.values() for n in b.names]
        return cls(blocks, {}, n_total, kind=kind, labels="empirical",
                   likelihood=str(likelihood), order=names, damping_mode=damping_mode)

    @staticmethod
    def _plan_sides(
        layers: Mapping[str, KFACLayer],
        kind: str,
        max_factor_dim: int | None,
        max_factor_bytes: int | None,
        device: torch.device,
    ) -> tuple[dict[str, bool], dict[str, bool]]:
        diag_A: dict[str, bool] = {}
        diag_G: dict[str, bool] = {}
        need, biggest = 0, (0, "", "")
        for k, lay in layers.items():
            g, dG, dA = lay.dims()
            item = acc_dtype(lay.module_weight.dtype).itemsize
            diag_A[k] = lay.kind == "embedding" or (max_factor_dim is not None and dA > max_factor_dim)
            diag_G[k] = max_factor_dim is not None and dG > max_factor_dim
            for side, d, is_diag in (("A", dA, diag_A[k]), ("G", dG, diag_G[k])):
                size = g * (d if is_diag else 2 * d * d) * item  # factor and eigenbasis
                need += size
                if size > biggest[0]:
                    biggest = (size, k, f"{side} {d}x{d}")
            if kind == "ekfac":
                need += g * dG * dA * item
        given = max_factor_bytes is not None
        if not given and need <= _ALWAYS_FITS:  # below half of any machine PyTorch runs on
            return diag_A, diag_G
        limit = max_factor_bytes if max_factor_bytes is not None else default_factor_bytes(device)
        if need > limit:
            raise FactorMemoryError(
                f"The Kronecker factors need about {_fmt_bytes(need)} (largest: layer "
                f"{biggest[1]!r} factor {biggest[2]}, {_fmt_bytes(biggest[0])} with its "
                f"eigenbasis), more than the {_fmt_bytes(limit)} allowed ("
                + ("max_factor_bytes" if given else "the default: the available memory, at "
                   "least half the total; or pass max_factor_bytes")
                + "). Pass max_factor_dim=... (e.g. 4096) to keep larger factor sides "
                "diagonal, or leave the layer out of `params`."
            )
        return diag_A, diag_G

    @staticmethod
    def _refit(
        plan: Plan,
        data: Any,
        max_batches: int | None,
        layers: Mapping[str, KFACLayer],
        blocks: Mapping[str, KroneckerBlock],
        n_total: int,
        dist_on: bool,
    ) -> None:
        """EKFAC: ``s = (1/N) Σ_n Σ_j w_j (Q_Gᵀ g_nj Q_A)²`` in the factors' eigenbasis."""
        from natgrad.curvature.estimate import iterate_batches

        bases: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        sums: dict[str, torch.Tensor] = {}
        for k, blk in blocks.items():
            QA, _, QG, _ = blk.bases()
            bases[k] = (QA, QG)
            g, dG, dA = blk.groups, blk.G.shape[1], blk.A.shape[1]
            blk.s = sums[k] = torch.zeros(g, dG, dA, dtype=blk.A.dtype, device=blk.A.device)
        n_seen, error = 0, None
        try:
            for batch in iterate_batches(data, max_batches):
                cap = capture(plan, batch, layers)
                n_seen += cap.n
                for k in cap.inputs:
                    a, blk = cap.inputs[k], blocks[k]
                    QA, QG = bases[k]
                    s = sums[k]  # is blk.s: updated in place
                    step = max(1, _BLOCK_FLOATS // max(s.numel(), 1))
                    for w, b in cap.grads[k]:
                        for i in range(0, cap.n, step):
                            M = per_sample_blocks(layers[k], a[i : i + step], b[i : i + step], QA, QG)
                            s += w * (M * M).sum(0)
        except Exception as exc:
            if not dist_on:
                raise
            error = exc
        if dist_on:
            raise_if_any_rank_failed(error, "estimate_curvature(kind='ekfac')")
        if dist_on:
            order = list(blocks)
            flat, n_seen = _reduce_sum([sums[k] for k in order], n_seen, None)
            for k, s in zip(order, flat, strict=True):
                blocks[k].s = sums[k] = s
        if n_seen != n_total:
            raise ValueError(
                f"kind='ekfac' saw {n_total} samples in its first pass over `data` and "
                f"{n_seen} in its second; pass data that yields the same batches every time."
            )
        for k, blk in blocks.items():
            blk.s = s = sums[k] / n_total
            blk.QA, blk.QG = bases[k]
            check_finite(f"the EKFAC eigenvalues of layer {k!r}", s.sum())

    # -- parameter helpers -------------------------------------------------------------
    def _check_names(self, v: Params) -> None:
        unknown = [k for k in v if k not in self._owner and k not in self.diag]
        if unknown:
            raise ValueError(
                f"The vector has names this curvature does not cover: {unknown[:8]}; it covers "
                f"{self.names()[:8]}. Pass only the curvature's parameters."
            )

    def _each(
        self,
        v: Params,
        layer_fn: Callable[[KroneckerBlock, torch.Tensor], torch.Tensor],
        diag_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        weights: Mapping[str, float] | None = None,
    ) -> tuple[dict[str, torch.Tensor], list[tuple[float, torch.Tensor]]]:
        """``layer_fn`` on each layer's block matrix, ``diag_fn(F, x)`` on the diagonal part;
        results in ``v``'s names, order and dtypes (missing names of a layer count as 0).

        With ``weights``, also the pieces ``(w, ⟨v_S, r_S⟩)`` of
        :meth:`~natgrad.Curvature.solve_inner` (one per layer when its weight and bias
        weigh the same), and a layer's results are views into its block (not made
        contiguous); without, the pieces are ``[]`` and every result is contiguous."""
        out: dict[str, torch.Tensor] = {}
        pieces: list[tuple[float, torch.Tensor]] = []
        for blk, w, b, V in self._walk_layers(v):
            R = layer_fn(blk, V)
            W, bo = split_weight_blocks(blk.shape, blk.transposed, blk.bias is not None, R,
                                        bias=b is not None, contiguous=weights is None)
            if w is not None:
                out[blk.weight] = W if W.dtype == w.dtype else W.to(w.dtype)
            if b is not None and bo is not None and blk.bias is not None:
                out[blk.bias] = bo if bo.dtype == b.dtype else bo.to(b.dtype)
            if weights is not None:
                names = [blk.weight] if w is not None else []
                if b is not None and blk.bias is not None:
                    names.append(blk.bias)
                if len({weights[n] for n in names}) == 1:  # the block's inner product
                    pieces.append((weights[names[0]], flat_inner(V, R)))
                else:
                    pieces += [(weights[n], flat_inner(v[n], out[n])) for n in names]
        for k, f, x, dt in self._walk_diag(v):
            r = diag_fn(f, x)
            if weights is not None:
                pieces.append((weights[k], flat_inner(x, r)))
            out[k] = r if r.dtype == dt else r.to(dt)
        return {k: out[k] for k in v}, pieces

    def _walk_layers(
        self, v: Params
    ) -> list[tuple[KroneckerBlock, torch.Tensor | None, torch.Tensor | None, torch.Tensor]]:
        """``(block, v's weight, v's bias, [W, b] block matrix)`` for each layer ``v``
        names (a part it lacks is None, and zero in the block matrix); checks the names.
        A list, not a generator: a few µs less per call on one small layer."""
        self._check_names(v)
        out = []
        for blk in self.blocks.values():
            w = v.get(blk.weight)
            b = None if blk.bias is None else v.get(blk.bias)
            if w is not None or b is not None:
                out.append((blk, w, b, _to_block(blk, w, b)))
        return out

    def _walk_diag(self, v: Params) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, torch.dtype]]:
        """``(name, F on v's device, v's entry in F's dtype, v's dtype)`` for each
        diagonal-part parameter ``v`` names."""
        for k, f in self.diag.items():
            x = v.get(k)
            if x is not None:
                yield k, f.to(x.device), (x if x.dtype == f.dtype else x.to(f.dtype)), x.dtype

    # -- linear algebra -------------------------------------------------------------------
    def mv(self, v: Params) -> dict[str, torch.Tensor]:
        """``F v``: ``G V A`` per K-FAC layer, ``Q_G (s ⊙ Q_Gᵀ V Q_A) Q_Aᵀ`` per EKFAC layer,
        ``F ⊙ v`` on the diagonal part; ``M ⊙ F (M ⊙ V)`` on a pruned layer (exact for
        ``D_M F D_M``, see the module doc)."""
        return self._each(v, _masked(_layer_mv), lambda f, x: f * x)[0]

    def solve(self, v: Params, damping: float) -> dict[str, torch.Tensor]:
        """``(F + λI)⁻¹ v``: ``Q_G ((Q_Gᵀ V Q_A) / (S + λ)) Q_Aᵀ`` per layer, ``v / (F + λ)``
        on the diagonal part; on a pruned layer the masked projection
        ``M ⊙ (F + λI)⁻¹ (M ⊙ V)`` (see the module doc)."""
        return self._each(v, *self._solvers(damping, v))[0]

    def solve_inner(
        self, v: Params, damping: float, weights: Mapping[str, float]
    ) -> tuple[dict[str, torch.Tensor], list[tuple[float, torch.Tensor]]]:
        """:meth:`solve` and the pieces of ``Σ_k w_k ⟨v_k, Δ_k⟩``, one inner product per
        layer block ``[W, b]`` (see :meth:`natgrad.Curvature.solve_inner`)."""
        return self._each(v, *self._solvers(damping, v), weights)

    def _solvers(self, damping: float, v: Params | None = None) -> tuple[
        Callable[[KroneckerBlock, torch.Tensor], torch.Tensor],
        Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ]:
        """``(layer_fn, diag_fn)`` of :meth:`_each` for ``(F + λI)⁻¹``: on one layer's
        block matrix, and ``x / (F + λ)`` on the diagonal part (``λ`` checked). With
        ``v``, the factored damped factors of the layers ``v`` names are computed first,
        all together (:func:`_factored_prepare`)."""
        lam = _damping(damping)
        factored = self.damping_mode == "factored"
        if factored and v is not None:  # the damped factors of v's layers, syncs shared
            _factored_prepare([blk for blk in self.blocks.values()
                               if blk.s is None and blk.eig.get("factored", (None,))[0] != lam
                               and any(n in v for n in blk.names)], lam)

        def layer(blk: KroneckerBlock, V: torch.Tensor) -> torch.Tensor:
            if factored and blk.s is None:
                return _factored_solve(blk, V, lam)
            QA, QAt, QG, QGt, inv = _solve_ops(blk, lam)
            return eig_scale(V, inv, QA, QG, QAt, QGt)

        return _masked(layer), lambda f, x: x / (f + lam)

    def prepare_solve(self, group: object | None = None) -> None:
        """The eigenbases of every K-FAC layer (EKFAC layers hold theirs), spread as KAISA
        does: under ``torch.distributed`` layer ``i`` (in model order) is decomposed on
        rank ``i mod world`` and broadcast from there, so a refresh's eigendecomposition
        cost divides by the world size and every rank holds the same bases bit for bit.
        With ``damping_mode="factored"`` a K-FAC solve uses no eigenbasis (its Cholesky
        inverses depend on ``λ`` and stay lazy, computed alike on every rank).
        """
        if self.damping_mode == "factored":
            return
        todo = [blk for blk in self.blocks.values() if blk.s is None]
        if not is_distributed():
            for blk in todo:
                blk.bases()
            return
        import torch.distributed as dist

        pg = cast("dist.ProcessGroup | None", group)
        world, rank = dist.get_world_size(pg), dist.get_rank(pg)
        for i, blk in enumerate(todo):
            owner = i % world
            src = owner if pg is None else dist.get_global_rank(pg, owner)
            if rank == owner:
                blk.bases()
            else:
                g = blk.groups
                dA, dG = blk.A.shape[1], blk.G.shape[1]
                dt, dev = blk.A.dtype, blk.A.device
                blk.eig.clear()
                blk.eig.update({
                    "QA": torch.empty(g, dA, dA, dtype=dt, device=dev) if blk.A.dim() == 3 else None,
                    "sA": torch.empty(g, dA, dtype=dt, device=dev),
                    "QG": torch.empty(g, dG, dG, dtype=dt, device=dev) if blk.G.dim() == 3 else None,
                    "sG": torch.empty(g, dG, dtype=dt, device=dev),
                })
            for key in ("QA", "sA", "QG", "sG"):
                t = blk.eig[key]
                if t is not None:
                    t = t.contiguous()
                    dist.broadcast(t, src=src, group=pg)
                    blk.eig[key] = t

    def quad(self, v: Params) -> torch.Tensor:
        """``vᵀ F v = Σ_layers ⟨V, mv(V)⟩ + Σ F v²`` (summed in the curvature's dtype;
        returned in the promoted dtype of ``v``)."""
        mv = _masked(_layer_mv)
        terms = [(V * mv(blk, V)).sum() for blk, _, _, V in self._walk_layers(v)]
        if self.diag:
            terms += [(f * x * x).sum() for _, f, x, _ in self._walk_diag(v)]
        if not terms:
            return torch.zeros(())
        total = terms[0]
        for t in terms[1:]:
            total = total + (t if t.device == total.device else t.to(total.device))
        dt = None
        for x in v.values():  # the promoted dtype of v
            dt = x.dtype if dt is None or dt == x.dtype else torch.promote_types(dt, x.dtype)
        return total if total.dtype == dt else total.to(dt)

    def diagonal(self) -> dict[str, torch.Tensor]:
        """``diag F``: ``diag(G) diag(A)ᵀ`` (K-FAC) or ``Q_G² s (Q_A²)ᵀ`` (EKFAC), times
        ``M`` on a pruned layer (exact for ``D_M F D_M``)."""
        out: dict[str, torch.Tensor] = {}
        for blk in self.blocks.values():
            if blk.s is not None:
                D = _sandwich_sq(blk.s, blk.QA, blk.QG)
            else:
                dA = blk.A if blk.A.dim() == 2 else blk.A.diagonal(dim1=-2, dim2=-1)
                dG = blk.G if blk.G.dim() == 2 else blk.G.diagonal(dim1=-2, dim2=-1)
                D = dG.unsqueeze(-1) * dA.unsqueeze(-2)
            if blk.mask is not None:
                D = D * blk.mask.to(D.dtype)
            out.update(self._split(blk, D))
        out.update({k: f.clone() for k, f in self.diag.items()})
        return {k: out[k] for k in self.names()}

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """``{name: shape}`` from the blocks' sizes (no diagonal is computed: an EKFAC
        diagonal costs two products per layer)."""
        out: dict[str, tuple[int, ...]] = {}
        for blk in self.blocks.values():
            D = torch.empty(blk.groups, blk.G.shape[1], blk.A.shape[1], device="meta")
            out.update({k: tuple(v.shape) for k, v in self._split(blk, D).items()})
        out.update({k: tuple(f.shape) for k, f in self.diag.items()})
        return {k: out[k] for k in self.names()}

    def inverse_diagonal(self, damping: float) -> dict[str, torch.Tensor]:
        """``diag (F + λI)⁻¹ = Q_G² (1/(S + λ)) (Q_A²)ᵀ`` per layer, ``1/(F + λ)`` else;
        times ``M`` on a pruned layer (the diagonal of its masked-projection
        :meth:`solve`; see the module doc)."""
        lam = _damping(damping)
        out: dict[str, torch.Tensor] = {}
        for blk in self.blocks.values():
            QA, _, QG, _ = blk.bases()
            D = _sandwich_sq(1.0 / (blk.eigenvalues() + lam), QA, QG)
            if blk.mask is not None:
                D = D * blk.mask.to(D.dtype)
            out.update(self._split(blk, D))
        out.update({k: 1.0 / (f + lam) for k, f in self.diag.items()})
        return {k: out[k] for k in self.names()}

    def logdet(self, damping: float) -> torch.Tensor:
        """``log det (F + λI) = Σ_layers Σ log(S + λ) + Σ log(F_diag + λ)`` (a pruned
        layer's term is its effective weight's, unmasked: see the module doc)."""
        lam = _damping(damping)
        terms = [torch.log(blk.eigenvalues() + lam).sum() for blk in self.blocks.values()]
        terms += [torch.log(f + lam).sum() for f in self.diag.values()]
        return torch.stack([t.to(terms[0].dtype) for t in terms]).sum() if terms else torch.zeros(())

    def _split(self, blk: KroneckerBlock, V: torch.Tensor) -> dict[str, torch.Tensor]:
        W, b = split_weight_blocks(blk.shape, blk.transposed, blk.bias is not None, V)
        if b is None or blk.bias is None:  # b is None exactly when there is no bias
            return {blk.weight: W}
        return {blk.weight: W, blk.bias: b}

    def structure(self) -> dict[str, str]:
        """``{parameter: "kfac" | "ekfac" | "diag"}`` in model order."""
        return {k: "diag" if k in self.diag else self.kind for k in self.order}

    def restrict(self, names: Sequence[str]) -> KroneckerFisher:
        """The curvature of ``names`` alone: the layers whose parameters they hold and
        their diagonal-part entries (tensors shared; cached eigenbases recomputed).

        A layer's weight and bias share one Kronecker block, so ``names`` holds both or
        neither (``subset="last_layer"`` does).

        Raises:
            ValueError: a name this curvature does not cover, or ``names`` holding only
                part of a layer's block.
        """
        keep = set(names)
        unknown = [k for k in names if k not in self._owner and k not in self.diag]
        if unknown:
            raise ValueError(
                f"Cannot restrict the curvature to {unknown[:8]}: it does not cover them; it "
                f"covers {self.names()[:8]}."
            )
        cut = {k: b.names for k, b in self.blocks.items()
               if keep & set(b.names) and not keep >= set(b.names)}
        if cut:
            layer, both = next(iter(cut.items()))
            raise ValueError(
                f"Cannot restrict the curvature to {list(names)[:8]}: they cut through the "
                f"Kronecker block of layer {layer!r}, which {both} share (one G ⊗ A over "
                "[W, b]); select both or neither (subset='last_layer' does), or estimate the "
                "curvature on the chosen parameters only (params=...)."
            )
        return KroneckerFisher(
            {k: b for k, b in self.blocks.items() if keep >= set(b.names)},
            {k: v for k, v in self.diag.items() if k in keep}, self.n_samples, kind=self.kind,
            diag_reasons={k: r for k, r in self.diag_reasons.items() if k in keep},
            labels=self.labels, likelihood=self.likelihood,
            order=[k for k in self.order if k in keep], damping_mode=self.damping_mode,
        )

    def masked_names(self) -> list[str]:
        """The parameters held in masked blocks (layers pruned by ``torch.nn.utils.prune``,
        see the module doc), in block order."""
        return [n for b in self.blocks.values() if b.mask is not None for n in b.names]

    def with_masks(self, masks: Mapping[str, torch.Tensor]) -> KroneckerFisher:
        """This curvature with the masks of some pruned layers replaced (factors, eigenbases
        and the diagonal part shared, not copied): ``{layer: M}`` with ``M`` the 0/1 block
        mask ``(groups, d_G, d_A)`` as :meth:`natgrad.curvature.kfac.KFACLayer.mask_block`
        reads it from the model. The mask belongs to the model, so this is how a curvature
        estimated before the masks changed (a regrowth, a loaded state) solves for the
        model as it is now (see the module doc).

        Raises:
            ValueError: a layer that is not a masked block of this curvature, or a mask of
                another shape.
        """
        bad = [k for k, m in masks.items() if k not in self.blocks
               or self.blocks[k].mask is None
               or tuple(m.shape) != tuple(cast(torch.Tensor, self.blocks[k].mask).shape)]
        if bad:
            raise ValueError(
                f"Cannot put masks on layers {bad[:8]}: not masked blocks of this curvature, "
                "or the mask's shape is not the block's (groups, d_G, d_A)."
            )
        blocks = {k: replace(b, mask=masks[k].to(b.A.device, b.A.dtype, copy=True))
                  if k in masks else b
                  for k, b in self.blocks.items()}
        new = KroneckerFisher(blocks, self.diag, self.n_samples, kind=self.kind,
                              diag_reasons=self.diag_reasons, labels=self.labels,
                              likelihood=self.likelihood, order=self.order,
                              damping_mode=self.damping_mode)
        for k, b in new.blocks.items():  # the eigenbases depend on the factors only
            b.eig.update(self.blocks[k].eig)
        return new

    # -- combination -------------------------------------------------------------------------
    def _check_same(self, other: Curvature, what: str) -> KroneckerFisher:
        """``other``, checked to be a KroneckerFisher of this kind and layout."""
        if not isinstance(other, KroneckerFisher) or other.kind != self.kind:
            raise TypeError(
                f"Cannot {what} a {self.kind!r} KroneckerFisher with "
                f"{getattr(other, 'kind', type(other).__name__)!r}; combine curvatures of one kind."
            )
        refuse_pruning_rename(self.order, other.order, what, "KroneckerFisher")
        mine = {k: b.layout() for k, b in self.blocks.items()}
        theirs = {k: b.layout() for k, b in other.blocks.items()}
        dshape = {k: tuple(v.shape) for k, v in self.diag.items()}
        oshape = {k: tuple(v.shape) for k, v in other.diag.items()}
        if mine != theirs or dshape != oshape:
            diff = sorted(set(mine) ^ set(theirs)) or sorted(
                k for k in mine if theirs.get(k) != mine[k]) or sorted(set(dshape) ^ set(oshape))
            raise ValueError(
                f"Cannot {what} KroneckerFishers of different layouts (differing: {diff[:8]}); "
                "estimate both on the same model with the same params and max_factor_dim."
            )
        return other

    def _mix(self, other: KroneckerFisher, wa: float, wb: float, n: int) -> KroneckerFisher:
        """``wa · self + wb · other`` statistic by statistic (``wa + wb = 1``; the factors
        and the diagonal part as :func:`~natgrad.engine.common.mix`, rounded as the
        in-place :meth:`ema_`); a pruned layer takes
        ``other``'s mask (the newer one for :meth:`ema`; :meth:`__add__` checks both equal)."""
        blocks = {}
        for k, a in self.blocks.items():
            b = other.blocks[k]
            A, G = mix(a.A, b.A, wb), mix(a.G, b.G, wb)
            new = replace(a, A=A, G=G, s=None, QA=None, QG=None, eig={},
                          mask=_newer_mask(b.mask, a.A))
            if self.kind == "ekfac":
                QA, _, QG, _ = new.bases()
                dt = A.dtype  # the promoted dtype of the two (float32 with float64: float64)
                new.s = (wa * _project(_block_to(a, a.A.device, dt), QA, QG)
                         + wb * _project(_block_to(b, a.A.device, dt), QA, QG))
                new.QA, new.QG = QA, QG
            blocks[k] = new
        diag = {k: mix(v, other.diag[k], wb) for k, v in self.diag.items()}
        labels = self.labels if self.labels == other.labels else "mixed"
        return KroneckerFisher(blocks, diag, n, kind=self.kind, diag_reasons=self.diag_reasons,
                               labels=labels, likelihood=self.likelihood, order=self.order,
                               damping_mode=self.damping_mode)

    def __add__(self, other: Curvature) -> KroneckerFisher:
        """Pooled statistics ``(N_a · a + N_b · b) / (N_a + N_b)`` (see the module doc)."""
        if not isinstance(other, KroneckerFisher):
            return NotImplemented
        self._check_same(other, "add")
        differ = [k for k, a in self.blocks.items()
                  if not _same_mask(a.mask, other.blocks[k].mask)]
        if differ:
            raise ValueError(
                f"Cannot add KroneckerFishers whose layers {differ[:8]} are pruned with "
                "different masks: the sum of two differently masked Fishers D_Ma F_a D_Ma + "
                "D_Mb F_b D_Mb has no masked Kronecker form. Estimate both with the same "
                "masks, or use ema(), which takes the newer curvature's mask."
            )
        n = self.n_samples + other.n_samples
        if n == 0:
            raise ValueError("Cannot combine two curvatures that both have n_samples=0.")
        return self._mix(other, self.n_samples / n, other.n_samples / n, n)

    def __mul__(self, scalar: float) -> KroneckerFisher:
        """``c F``: ``G``, ``s`` and the diagonal part scaled by ``c >= 0``; same ``N``."""
        if isinstance(scalar, bool) or not isinstance(scalar, (int, float)):
            return NotImplemented
        c = float(scalar)
        if not c >= 0 or c == float("inf"):
            raise ValueError(f"Invalid scale {scalar!r}: a curvature is scaled by a finite c >= 0.")
        blocks = {}
        for k, b in self.blocks.items():
            blocks[k] = replace(b, G=b.G * c, s=None if b.s is None else b.s * c, eig={})
        return KroneckerFisher(blocks, {k: v * c for k, v in self.diag.items()}, self.n_samples,
                               kind=self.kind, diag_reasons=self.diag_reasons,
                               labels=self.labels, likelihood=self.likelihood,
                               order=self.order, damping_mode=self.damping_mode)

    __rmul__ = __mul__

    def ema(self, other: Curvature, decay: float) -> KroneckerFisher:
        """``decay · self + (1 - decay) · other`` statistic by statistic; ``N = N_a + N_b``.

        A pruned layer takes ``other``'s (the newer estimate's) mask: the mask belongs to
        the model, so entries regrown since ``self`` was estimated are kept (their factors
        are the effective weight's, defined whatever the mask), and entries pruned since
        are dropped (see the module doc)."""
        decay = check_fraction("decay", decay, closed=True)
        same = self._check_same(other, "average")
        return self._mix(same, decay, 1 - decay, self.n_samples + same.n_samples)

    def ema_union(self, other: Curvature, decay: float) -> KroneckerFisher:
        """:meth:`ema` over the union of both curvatures' layers and diagonal entries.

        A layer (or diagonal entry) both hold is averaged as :meth:`ema` does, factor by
        factor: ``(d A₁ + (1-d) A₂) ⊗ (d G₁ + (1-d) G₂)`` (EKFAC: ``s`` re-fitted in the
        averaged factors' eigenbasis); one only ``self`` holds is ``d F_self``'s block
        (``G`` and ``s`` scaled, as ``c * F``), one only ``other`` holds ``(1 - d)
        F_other``'s: exact, as a missing layer's curvature is zero. ``N = N_a + N_b``.

        Raises:
            TypeError: ``other`` is not a KroneckerFisher of this kind.
            ValueError: a shared layer laid out differently (e.g. a bias in one only), a
                parameter in a Kronecker block in one and in the diagonal part of the other,
                or one named ``w`` in one and ``w_orig`` in the other (pruned in between).
        """
        decay = check_fraction("decay", decay, closed=True)
        if not isinstance(other, KroneckerFisher) or other.kind != self.kind:
            raise TypeError(
                f"Cannot average a {self.kind!r} KroneckerFisher with "
                f"{getattr(other, 'kind', type(other).__name__)!r}; combine curvatures of one kind."
            )
        refuse_pruning_rename(self.order, other.order, "average", "KroneckerFisher")
        theirs = set(other.order)
        shared = [k for k in self.order if k in theirs]
        mine_only = [k for k in self.order if k not in theirs]
        their_only = [k for k in other.order if k not in set(self.order)]
        keep = set(shared)
        for f in (self, other):
            for layer, blk in f.blocks.items():
                if keep & set(blk.names) and not keep >= set(blk.names):
                    raise ValueError(
                        f"Cannot average these KroneckerFishers: the Kronecker block of layer "
                        f"{layer!r} covers {blk.names} in one and only "
                        f"{sorted(keep & set(blk.names))} in the other. Estimate every "
                        "curvature over whole layers (a layer's weight and bias together)."
                    )
        a, b = self.restrict(shared), other.restrict(shared)
        n = self.n_samples + other.n_samples
        both = a._mix(a._check_same(b, "average"), decay, 1 - decay, n)
        parts = [both, self.restrict(mine_only) * decay, other.restrict(their_only) * (1 - decay)]
        labels = self.labels if self.labels == other.labels else "mixed"
        return KroneckerFisher(
            {k: blk for p in parts for k, blk in p.blocks.items()},
            {k: v for p in parts for k, v in p.diag.items()}, n, kind=self.kind,
            diag_reasons={**other.diag_reasons, **self.diag_reasons}, labels=labels,
            likelihood=self.likelihood, order=[*self.order, *their_only],
            damping_mode=self.damping_mode,
        )

    def ema_(self, other: Curvature, decay: float) -> KroneckerFisher:
        """:meth:`ema` written into this curvature's own factors: ``A.lerp_(A_other, 1 -
        decay)``, the same for ``G`` and the diagonal part (no new tensors for them);
        EKFAC then re-fits ``s`` in the new eigenbasis as :meth:`ema` does. Returns
        ``self``, whose cached eigenbases and solves are dropped. Use it only on a
        curvature nothing else refers to. A subclass that redefines :meth:`ema` gets its
        ``ema`` (a new curvature).
        """
        if type(self).ema is not KroneckerFisher.ema:
            return self.ema(other, decay)
        decay = check_fraction("decay", decay, closed=True)
        same = self._check_same(other, "average")
        w = 1 - decay
        ekfac = self.kind == "ekfac"
        olds = {k: replace(a, eig={}) for k, a in self.blocks.items()} if ekfac else {}
        mine = [t for a in self.blocks.values() for t in (a.A, a.G)]
        theirs = [t for k in self.blocks for t in (same.blocks[k].A, same.blocks[k].G)]
        mine += list(self.diag.values())
        theirs += [same.diag[k] for k in self.diag]
        theirs = [y.to(x.device, x.dtype) for x, y in zip(mine, theirs, strict=True)]
        if mine and all(x.device == mine[0].device for x in mine):
            # one dispatch for every factor and diagonal entry, each lerp_ as alone
            torch._foreach_lerp_(mine, theirs, w)
        else:  # a model spread over devices
            for x, y in zip(mine, theirs, strict=True):
                x.lerp_(y, w)
        for k, a in self.blocks.items():
            b = same.blocks[k]
            a.mask = _newer_mask(b.mask, a.A)
            a.eig.clear()
            if ekfac:
                a.s = a.QA = a.QG = None
                QA, _, QG, _ = a.bases()
                a.s = (decay * _project(olds[k], QA, QG)
                       + w * _project(_block_to(b, a.A.device, a.A.dtype), QA, QG))
                a.QA, a.QG = QA, QG
        self.n_samples += same.n_samples
        self.labels = self.labels if self.labels == same.labels else "mixed"
        return self

    def to(self, *args: Any, **kwargs: Any) -> KroneckerFisher:
        """Move / cast every tensor like ``Tensor.to``; returns a new curvature."""
        blocks = {k: _block_to(b, *args, **kwargs) for k, b in self.blocks.items()}
        return self._with(blocks, {k: v.to(*args, **kwargs) for k, v in self.diag.items()})

    def to_model_dtypes(self, params: Mapping[str, torch.Tensor]) -> KroneckerFisher:
        """Each block in the dtype an estimate gives it: a layer's factors in its weight's
        accumulation dtype, a diagonal part in its parameter's (see
        :meth:`Curvature.to_model_dtypes`); a model of mixed dtypes keeps each layer's."""
        blocks = {k: _block_to(b, acc_dtype(params[b.weight].dtype))
                  for k, b in self.blocks.items()}
        return self._with(blocks, {k: v.to(acc_dtype(params[k].dtype))
                                   for k, v in self.diag.items()})

    def _with(self, blocks: dict[str, KroneckerBlock], diag: dict[str, torch.Tensor]) -> KroneckerFisher:
        """A curvature with this one's metadata holding ``blocks`` and ``diag``."""
        return KroneckerFisher(blocks, diag, self.n_samples, kind=self.kind,
                               diag_reasons=self.diag_reasons, labels=self.labels,
                               likelihood=self.likelihood, order=self.order,
                               damping_mode=self.damping_mode)

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only; round-trips exactly through :meth:`from_state_dict`."""
        layers = {}
        for k, b in self.blocks.items():
            layers[k] = {
                "weight": b.weight, "bias": b.bias, "shape": list(b.shape),
                "transposed": b.transposed, "groups": b.groups,
                **{t: v.clone() for t, v in b.tensors().items()},
            }
        return {
            "format": _FORMAT, "kind": self.kind, "n_samples": self.n_samples,
            "labels": self.labels, "likelihood": self.likelihood, "layers": layers,
            "diag": {k: v.clone() for k, v in self.diag.items()},
            "diag_reasons": dict(self.diag_reasons),
            "order": list(self.order),
            "damping_mode": self.damping_mode,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the contents; when this curvature is not empty, the layouts must match."""
        if not isinstance(state, Mapping) or state.get("format") != _FORMAT:
            raise ValueError(
                f"Not a KroneckerFisher state_dict (format {_FORMAT!r} missing); use the "
                "state_dict() of a KroneckerFisher."
            )
        blocks = {}
        for k, d in state["layers"].items():
            blocks[k] = KroneckerBlock(
                d["weight"], d["bias"], tuple(int(s) for s in d["shape"]), bool(d["transposed"]),
                int(d["groups"]), d["A"].clone(), d["G"].clone(),
                s=_clone_opt(d.get("s")), QA=_clone_opt(d.get("QA")), QG=_clone_opt(d.get("QG")),
                mask=_clone_opt(d.get("mask")),
            )
        new = KroneckerFisher(blocks, {k: v.clone() for k, v in state["diag"].items()},
                              int(state["n_samples"]), kind=state["kind"],
                              diag_reasons=state.get("diag_reasons", {}),
                              labels=state.get("labels", "empirical"),
                              likelihood=state.get("likelihood", "categorical"),
                              order=state.get("order"),
                              damping_mode=state.get("damping_mode", "exact"))
        if self.blocks or self.diag:
            self._check_same(new, "load")
        self.__dict__.update(new.__dict__)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> KroneckerFisher:
        """A new curvature holding ``state`` (what :meth:`state_dict` returned)."""
        f = cls({}, {}, 0, kind=state.get("kind", "kfac") if isinstance(state, Mapping) else "kfac")
        f.load_state_dict(state)
        return f

    def all_reduce(self, group: object | None = None) -> KroneckerFisher:
        """The sample-weighted pooling over all ranks, as ``+`` over the ranks' curvatures.

        K-FAC: ``A``, ``G`` and the diagonal part are summed as ``N_r ·`` statistic, and
        ``N``. EKFAC: the same, then each rank's ``s`` is projected onto the eigenbasis of
        the reduced factors and reduced alike. Identity (a copy) when not distributed.
        """
        if not is_distributed():
            return self * 1.0
        order = list(self.blocks)
        n = self.n_samples
        flat = [t * n for k in order for t in (self.blocks[k].A, self.blocks[k].G)]
        flat += [v * n for v in self.diag.values()]
        red, total = _reduce_sum(flat, n, group)
        if total == 0:
            return self * 0.0
        blocks = {}
        for i, k in enumerate(order):
            a = self.blocks[k]
            blocks[k] = replace(a, A=red[2 * i] / total, G=red[2 * i + 1] / total,
                                s=None, QA=None, QG=None, eig={})
        if self.kind == "ekfac":
            proj = []
            for k in order:
                QA, _, QG, _ = blocks[k].bases()
                proj.append(_project(self.blocks[k], QA, QG) * n)
            proj, _ = _reduce_sum(proj, 0, group)
            for k, s in zip(order, proj, strict=True):
                blocks[k].s = s / total
                blocks[k].QA, blocks[k].QG = blocks[k].bases()[0], blocks[k].bases()[2]
        diag = {k: v / total for k, v in zip(self.diag, red[2 * len(order) :], strict=True)}
        return KroneckerFisher(blocks, diag, total, kind=self.kind, diag_reasons=self.diag_reasons,
                               labels=self.labels, likelihood=self.likelihood,
                               order=self.order, damping_mode=self.damping_mode)


@dataclass(frozen=True, slots=True)
class _Ops:
    """A block's statistics as :meth:`KroneckerFisher.mv` applies them (see :func:`_ops`);
    ``dA``/``dG``: that side is diagonal; ``QAt``/``QGt``: the transposed bases."""

    A: torch.Tensor
    G: torch.Tensor
    dA: bool
    dG: bool
    s: torch.Tensor | None
    QA: torch.Tensor | None
    QG: torch.Tensor | None
    QAt: torch.Tensor | None
    QGt: torch.Tensor | None


def _ops(blk: KroneckerBlock) -> _Ops:
    """The block's statistics as :meth:`KroneckerFisher.mv` applies them, prepared once
    per statistics (kept in ``blk.eig``, which is emptied whenever they change).

    One group (every layer but a grouped convolution) has its group dimension dropped:
    plain matrix products instead of batched ones, which cost several times the
    dispatch on small layers.
    """
    ops = blk.eig.get("ops")
    if ops is None:
        one = blk.groups == 1

        def sq(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else (t[0] if one else t)

        QA, QG = sq(blk.QA), sq(blk.QG)
        ops = blk.eig["ops"] = _Ops(
            blk.A[0] if one else blk.A, blk.G[0] if one else blk.G,
            blk.A.dim() == 2, blk.G.dim() == 2, sq(blk.s), QA, QG,
            None if QA is None else QA.mT, None if QG is None else QG.mT,
        )
    return cast(_Ops, ops)


def _solve_ops(
    blk: KroneckerBlock, lam: float
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None,
           torch.Tensor]:
    """``(Q_A, Q_Aᵀ, Q_G, Q_Gᵀ, 1/(S + λ))`` (group dimension dropped as in :func:`_ops`);
    kept in ``blk.eig`` for the last ``λ`` when ``S`` has at most ``_CACHE_FLOATS``
    entries (a repeated solve, e.g. every step of a preconditioner or conjugate gradients,
    then costs its matrix products only)."""
    c = blk.eig.get("solve")
    if c is not None and c[0] == lam:
        return cast("tuple[Any, Any, Any, Any, torch.Tensor]", c[1:])
    QA, _, QG, _ = blk.bases()
    inv = torch.reciprocal(blk.eigenvalues() + lam)
    if blk.groups == 1:
        QA, QG, inv = (None if QA is None else QA[0]), (None if QG is None else QG[0]), inv[0]
    ops = (QA, None if QA is None else QA.mT, QG, None if QG is None else QG.mT, inv)
    if inv.numel() <= _CACHE_FLOATS:
        blk.eig["solve"] = (lam, *ops)
    return ops


def eig_scale(
    V: torch.Tensor,
    S: torch.Tensor,
    QA: torch.Tensor | None,
    QG: torch.Tensor | None,
    QAt: torch.Tensor | None = None,
    QGt: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Q_G (S ⊙ Q_Gᵀ V Q_A) Q_Aᵀ``: rotate a block matrix into the eigenbasis
    ``Q_G ⊗ Q_A``, scale it there elementwise, rotate it back.

    With ``S`` the eigenvalues this is the EKFAC ``mv``; with ``1/(S + λ)`` the damped
    solve. ``V``, ``S``: ``(d_G, d_A)`` or batched over groups ``(groups, d_G, d_A)``
    (the bases alike); a None basis is the identity (a diagonal side). ``QAt``/``QGt``:
    the transposed bases when the caller keeps them (one view fewer per call); None:
    taken here.
    """
    if QG is not None:
        V = (QG.mT if QGt is None else QGt) @ V
    if QA is not None:
        V = V @ QA
    V = V * S
    if QG is not None:
        V = QG @ V
    if QA is not None:
        V = V @ (QA.mT if QAt is None else QAt)
    return V


def _layer_mv(blk: KroneckerBlock, V: torch.Tensor) -> torch.Tensor:
    """``G V A`` (K-FAC) or ``Q_G (s ⊙ Q_Gᵀ V Q_A) Q_Aᵀ`` (EKFAC) of a block matrix."""
    o = _ops(blk)
    if o.s is not None:
        return eig_scale(V, o.s, o.QA, o.QG, o.QAt, o.QGt)
    V = o.G.unsqueeze(-1) * V if o.dG else o.G @ V
    return V * o.A.unsqueeze(-2) if o.dA else V @ o.A


def _to_block(blk: KroneckerBlock, w: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor:
    """``[W, b]`` in the block's dtype: ``(d_G, d_A)`` for one group, else
    ``(groups, d_G, d_A)`` (:func:`natgrad.curvature.kfac.weight_blocks` with
    ``squeeze``); a missing part is zero."""
    dt, dev = blk.A.dtype, blk.A.device
    if w is None:
        w = torch.zeros(blk.shape, dtype=dt, device=dev)
    elif w.dtype != dt:
        w = w.to(dt)
    if blk.bias is not None:
        if b is None:
            b = torch.zeros(blk.shape[1] if blk.transposed else blk.shape[0], dtype=dt,
                            device=dev)
        elif b.dtype != dt:
            b = b.to(dt)
    return weight_blocks(blk.shape, blk.transposed, blk.groups, w, b, squeeze=True)


def _factored_solve(blk: KroneckerBlock, V: torch.Tensor, lam: float) -> torch.Tensor:
    """``(G + (√λ/π) I)⁻¹ V (A + π√λ I)⁻¹`` per group.

    Each damped factor is Cholesky-factorized once per statistics and ``λ`` (cached);
    a small one is then kept as its explicit inverse (one matrix product per solve), a
    large one applied by ``cholesky_solve`` (its Cholesky costs a third of
    ``cholesky_inverse``); a factor whose Cholesky fails falls back to its
    pseudo-inverse; a diagonal side is inverted elementwise (never made dense), its
    mean entering ``π`` alike.
    """
    cached = blk.eig.get("factored")
    if cached is None or cached[0] != lam:
        cached = blk.eig["factored"] = _factored_sides(blk, lam)
    if V.dim() == 2:  # one group, its dimension dropped (see _ops)
        if cached[2] is not None:  # both sides explicit inverses: two matrix products
            return cached[2][0] @ V @ cached[2][1]
        gs, as_ = cached[1][0]
        return _apply_right(_apply_left(gs, V), as_)
    out = []
    for g, (gs, as_) in enumerate(cached[1]):
        out.append(_apply_right(_apply_left(gs, V[g]), as_))
    return torch.stack(out)


def _factored_sides(blk: KroneckerBlock, lam: float) -> tuple[
    float, list[tuple[tuple[str, torch.Tensor], tuple[str, torch.Tensor]]],
    tuple[torch.Tensor, torch.Tensor] | None,
]:
    """``(λ, [(G side, A side) per group], fast)`` for :func:`_factored_solve` (one
    block; see :func:`_factored_prepare`)."""
    _factored_prepare([blk], lam)
    return cast("tuple[Any, Any, Any]", blk.eig["factored"])


def _factored_prepare(blks: Sequence[KroneckerBlock], lam: float) -> None:
    """Cache ``blk.eig["factored"] = (λ, [(G side, A side) per group], fast)`` for
    :func:`_factored_solve` on every block of ``blks`` whose cache is not for ``lam``.

    Each side comes from :func:`_damped_factors` with ``π = sqrt((tr A / d_A) / (tr G /
    d_G))`` per group (1 when either trace is not positive); ``fast``: ``(G⁻¹, A⁻¹)``
    when there is one group and both sides are explicit inverses (the solve is then two
    matrix products), else None. The blocks share their host syncs (one per device): the
    mean diagonals of every group in one, the status of the Cholesky factorizations in
    another (:func:`_damped_factors`); each factor's arithmetic is what it is alone.
    """
    todo = [b for b in blks if b.eig.get("factored") is None or b.eig["factored"][0] != lam]
    if not todo:
        return
    s = lam**0.5
    mats = [M for b in todo for g in range(b.groups) for M in (b.A[g], b.G[g])]
    means = _host_values([M.mean() if M.dim() == 1 else M.diagonal().mean() for M in mats])
    shifted: list[tuple[torch.Tensor, float]] = []  # (factor, shift): G then A, per group
    for i in range(0, len(mats), 2):
        mA, mG = means[i], means[i + 1]
        pi = (mA / mG) ** 0.5 if mA > 0 and mG > 0 else 1.0
        shifted += [(mats[i + 1], s / pi), (mats[i], s * pi)]
    sides = iter(_damped_factors(shifted))
    for b in todo:
        per_group = [(next(sides), next(sides)) for _ in range(b.groups)]
        fast = None
        if b.groups == 1 and per_group[0][0][0] == "inv" and per_group[0][1][0] == "inv":
            fast = (per_group[0][0][1], per_group[0][1][1])
        b.eig["factored"] = (lam, per_group, fast)


def _host_values(xs: Sequence[torch.Tensor]) -> list[Any]:
    """0-dim tensors as Python numbers, read with one host sync per device."""
    if not xs:
        return []
    dev = xs[0].device
    if all(x.device == dev for x in xs):
        values: list[Any] = torch.stack(list(xs)).tolist()
        return values
    return [x.item() for x in xs]  # a model spread over devices


# Damped factors up to this size are kept as explicit inverses (from their Cholesky
# factor): each later solve is then one matrix product, several times cheaper than
# ``cholesky_solve``'s triangular solves on small factors (the MNIST-1D MLP's K-FAC step,
# six solves, went from 2.0 to 1.6 ms at 1 thread), at a refresh cost of n³ instead of
# n³/3 flops per factor.
_SMALL_INVERSE = 1024
# Cholesky factors awaiting their status read in :func:`_damped_factors` take at most this
# much memory (then the status is read and they are turned into their results)
_PENDING_BYTES = 64 * 2**20


def _upper(Ms: torch.Tensor) -> bool:
    """Whether :func:`_damped_factors` takes the upper Cholesky factor ``U = Lᵀ`` of
    ``Ms``: for an explicit inverse on the CPU, where ``cholesky_ex(upper=True)`` and
    ``cholesky_inverse(upper=True)`` cost about a fifth less than the lower forms
    (float32 at 10-101 rows, MKL; the inverse the same up to float round-off). A factor
    kept for ``cholesky_solve`` (``"chol"``) is the lower ``L``."""
    return Ms.device.type == "cpu" and Ms.shape[0] <= _SMALL_INVERSE


def _damped_factors(shifted: Sequence[tuple[torch.Tensor, float]]) -> list[tuple[str, torch.Tensor]]:
    """Each ``M + shift·I`` ready to solve with: ``("diag", 1/(m + shift))`` for a
    diagonal side; ``("inv", (M + shift·I)⁻¹)`` from its Cholesky factor for a side up to
    ``_SMALL_INVERSE`` rows, ``("chol", L)`` for a larger one; ``("inv", pinv)`` when the
    Cholesky fails. The Cholesky statuses are read together (one host sync per device and
    per ``_PENDING_BYTES`` of pending factors); each factor's arithmetic is its own."""
    out: list[tuple[str, torch.Tensor] | None] = [None] * len(shifted)
    pending: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    size = 0

    def finish() -> None:
        for (i, Ms, C, _), info in zip(pending, _host_values([p[3] for p in pending]),
                                       strict=True):
            if info != 0:
                out[i] = ("inv", torch.linalg.pinv(Ms, hermitian=True))
            elif Ms.shape[0] <= _SMALL_INVERSE:  # applied every step: a matmul beats a solve
                out[i] = ("inv", torch.cholesky_inverse(C, upper=_upper(Ms)))
            else:
                out[i] = ("chol", C)  # the lower L (see _upper)
        pending.clear()

    for i, (M, shift) in enumerate(shifted):
        if M.dim() == 1:
            out[i] = ("diag", 1.0 / (M + shift))
            continue
        Ms = M.clone()
        Ms.diagonal().add_(shift)
        C, info = torch.linalg.cholesky_ex(Ms, upper=_upper(Ms))  # Cholesky factor
        pending.append((i, Ms, C, info))
        size += 2 * Ms.numel() * Ms.element_size()
        if size > _PENDING_BYTES:
            finish()
            size = 0
    finish()
    return [cast("tuple[str, torch.Tensor]", x) for x in out]


def _apply_left(side: tuple[str, torch.Tensor], X: torch.Tensor) -> torch.Tensor:
    """``(M + shift·I)⁻¹ X`` for a side of :func:`_damped_factors`."""
    how, T = side
    if how == "diag":
        return X * T.unsqueeze(-1)
    if how == "chol":
        return torch.cholesky_solve(X, T)
    return T @ X


def _apply_right(X: torch.Tensor, side: tuple[str, torch.Tensor]) -> torch.Tensor:
    """``X (M + shift·I)⁻¹`` for a side of :func:`_damped_factors` (symmetric, so this is
    ``((M + shift·I)⁻¹ Xᵀ)ᵀ``; an explicit inverse multiplies from the right, which keeps
    the result contiguous: no strided copy when the caller splits it)."""
    how, T = side
    if how == "diag":
        return X * T
    if how == "chol":
        return torch.cholesky_solve(X.mT, T).mT
    return X @ T


def _project(blk: KroneckerBlock, QA: torch.Tensor | None, QG: torch.Tensor | None) -> torch.Tensor:
    """The diagonal of ``blk``'s EKFAC operator in the eigenbasis ``(Q_G ⊗ Q_A)``:
    ``R_G² s (R_A²)ᵀ`` with ``R = Q_newᵀ Q_blk``."""
    # Both operands are EKFAC blocks with the same diagonal sides (checked by the callers).
    assert blk.s is not None and (QG is None) == (blk.QG is None) and (QA is None) == (blk.QA is None)
    RG = None if QG is None or blk.QG is None else QG.mT @ blk.QG
    RA = None if QA is None or blk.QA is None else QA.mT @ blk.QA
    S = blk.s
    if RG is not None:
        S = (RG * RG) @ S
    return S if RA is None else S @ (RA * RA).mT


def _clone_opt(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clone()


def _block_to(b: KroneckerBlock, *args: Any, **kwargs: Any) -> KroneckerBlock:
    def mv(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(*args, **kwargs)

    def mv_opt(t: torch.Tensor | None) -> torch.Tensor | None:
        # eigenbases row-major whatever their origin (eigh, a file), so that products with
        # them, and so every result, do not depend on how the curvature was built or loaded
        return None if t is None else mv(t).contiguous()

    return replace(
        b, A=mv(b.A), G=mv(b.G), s=mv_opt(b.s), QA=mv_opt(b.QA), QG=mv_opt(b.QG), eig={},
        mask=mv_opt(b.mask),
    )


def _newer_mask(b: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """The newer curvature's mask ``b`` (None: nothing pruned) on ``like``'s device and dtype."""
    return None if b is None else b.to(like.device, like.dtype)


def _same_mask(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Whether two block masks keep the same entries (None: nothing pruned)."""
    if a is None or b is None:
        return a is None and b is None
    return torch.equal(a, b.to(a.device, a.dtype))


def _masked(
    fn: Callable[[KroneckerBlock, torch.Tensor], torch.Tensor],
) -> Callable[[KroneckerBlock, torch.Tensor], torch.Tensor]:
    """``V ↦ M ⊙ fn(M ⊙ V)`` for a pruned layer's block (``fn`` itself for the others)."""

    def run(blk: KroneckerBlock, V: torch.Tensor) -> torch.Tensor:
        if blk.mask is None:
            return fn(blk, V)
        m = cast(torch.Tensor, blk.block_mask()).to(V.dtype)
        return fn(blk, V * m) * m

    return run
