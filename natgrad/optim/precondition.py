"""Natural gradient: the ``FisherPreconditioner`` that wraps any optimizer.

The natural-gradient step is ``Δ = (F + λI)^-1 g`` (docs/design.md);
:func:`natgrad.scale_by_fisher` is its diagonal form. :class:`FisherPreconditioner`
rewrites ``.grad`` with ``Δ`` for any registered :class:`natgrad.Curvature` (diagonal,
K-FAC, EKFAC, exact mini-batch low-rank), so any ``torch.optim`` optimizer then takes the natural-gradient step: ``loss.backward(); pre.step(batch); optimizer.step()``.
:class:`NaturalGradient` bundles an optimizer and a preconditioner into one optimizer.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import nn

from natgrad.curvature.backward import LOSS_REDUCTIONS, BackwardCapture, LossReduction
from natgrad.curvature.kfac import (
    KFAC_APPROX,
    KFAC_DAMPING,
    KfacApprox,
    KfacDamping,
    KFACLayer,
    kfac_layers,
)
from natgrad.curvature.kronecker import KroneckerFisher
from natgrad.curvature.protocol import CURVATURE_KINDS, Curvature, curvature_class, state_tensors
from natgrad.engine.batch import OutputFn
from natgrad.engine.checks import (
    GRAD_HINT,
    check_all_finite,
    check_choice,
    check_fixed_model,
    check_fraction,
    check_int,
    check_model,
    check_positive,
    check_same_structure,
)
from natgrad.engine.common import acc_dtype, evaluating
from natgrad.engine.distributed import (
    describe_call,
    generator_digest,
    is_distributed,
    raise_if_any_rank_failed,
)
from natgrad.engine.likelihoods import CustomLikelihood, Likelihood, get_likelihood
from natgrad.engine.options import LABEL_SOURCES, LabelSource, ParamSpec
from natgrad.engine.per_sample import select_params
from natgrad.engine.report import Report

__all__ = ["FisherPreconditioner", "PreconditionStep", "KINDS", "KIND_ALIASES", "SOURCES"]

logger = logging.getLogger(__name__)

#: other names of registered curvature kinds
KIND_ALIASES = {"woodbury": "lowrank"}
Source = Literal["batch", "backward"]
SOURCES: tuple[Source, ...] = get_args(Source)
Damping = float | Callable[[int], float]


def kinds() -> tuple[str, ...]:
    """Every kind :class:`FisherPreconditioner` accepts: the registered curvature kinds
    (:data:`natgrad.curvature.protocol.CURVATURE_KINDS`) and their aliases."""
    return (*CURVATURE_KINDS, *KIND_ALIASES)


#: the kinds at import time (see :func:`kinds` for the live list)
KINDS = kinds()


@dataclass
class PreconditionStep(Report):
    """What one :meth:`FisherPreconditioner.step` did.

    ``step``: index of this step (0-based); ``damping``: the ``λ`` used;
    ``curvature_updated``: the curvature was refreshed from this batch;
    ``preconditioned``: ``.grad`` was rewritten (False during warmup or without grads);
    ``kl_scale``: the trust-region factor ``ν`` applied (1.0 when no clipping).
    """

    step: int
    damping: float
    curvature_updated: bool
    preconditioned: bool
    kl_scale: float


class FisherPreconditioner:
    """Rewrite ``.grad`` with the natural-gradient direction ``(F + λI)^-1 g``.

    Use with any optimizer: ``loss.backward(); pre.step(batch); optimizer.step()``
    (``source="batch"``), or ``loss.backward(); pre.step(); optimizer.step()``
    (``source="backward"``). The gradient ``g`` is whatever ``.grad`` holds (e.g. of the
    mean loss); the Fisher uses the per-sample loss ``l_n = -log p(y_n | x_n, θ)`` and is
    scaled as the per-sample mean, so ``Δ`` is on the scale of a mean-loss Newton step.

    The curvature is a :class:`natgrad.Curvature` of the class registered for ``kind``
    (:func:`natgrad.curvature.protocol.curvature_class`); the step is
    ``Δ = curvature.solve(g, λ)``. This class keeps only the schedule (refresh, EMA,
    warmup, damping, trust region), so a new kind is one Curvature class and one registry
    entry. Kinds:

    * ``"diag"`` (:class:`natgrad.DiagonalFisher`): ``F_i = (1/N) Σ_n E_y[(∂l_n/∂θ_i)²]``
      from exact per-sample gradients; ``Δ = g / (F + λ)``.
    * ``"kfac"`` (:class:`natgrad.KroneckerFisher`): per Linear/Conv/Conv1D/Embedding layer
      ``F ≈ G ⊗ A``; other selected parameters use the diagonal Fisher. ``Δ`` per layer is
      ``((G + (√λ/π)I) ⊗ (A + π√λ I))^-1 g`` (``kfac_damping="factored"``, the default:
      factored Tikhonov damping, which trained better in our experiments; two Cholesky
      inverses per layer, recomputed when the factors or ``λ`` change) or
      ``(G ⊗ A + λI)^-1 g`` (``kfac_damping="exact"``: eigendecompositions once per
      refresh, for any ``λ``).
    * ``"ekfac"``: K-FAC with the diagonal re-fitted in the Kronecker eigenbasis (always
      the exact damping ``(F + λI)^-1``).
    * ``"lowrank"`` (alias ``"woodbury"``, :class:`natgrad.LowRankFisher`): the exact
      mini-batch Fisher ``F = GᵀG/N`` of the latest refresh batch over all selected
      parameters jointly, through the ``N x N`` Gram system. It is replaced at each
      refresh (no EMA: ``ema_decay`` is unused) and not refreshed during warmup.
      Memory: ``N x P`` per-sample gradients are kept.

    Schedule: step ``t`` (0-based count of :meth:`step` calls) refreshes the curvature
    when ``t < warmup_steps`` or ``(t - warmup_steps) % update_every == 0`` (a replacing
    kind: not during warmup). A refresh folds the batch's curvature into the EMA,
    ``C ← C.ema(C_batch, d) = d·C + (1 - d)·C_batch`` (K-FAC: factor by factor; the first
    refresh sets ``C = C_batch``), so with ``update_every = k`` the EMA averages one batch
    every ``k`` steps. During the first ``warmup_steps`` steps gradients pass through
    unchanged while curvature accumulates.

    Sources:

    * ``"batch"``: a refresh estimates the curvature of the batch passed to :meth:`step`
      (one extra forward and backward per label column), with the label source
      ``labels``.
    * ``"backward"``: forward hooks on the covered layers record their inputs, and tensor
      hooks their output gradients, during the user's own forward and ``loss.backward()``
      before the step (see :mod:`natgrad.curvature.backward`); a refresh costs no extra
      pass and :meth:`step` needs no batch. This is the empirical Fisher of the user's
      loss, rescaled to per-sample losses: ``loss_reduction="mean"`` (a mean-reduced loss
      gives output gradients scaled by ``1/N``, multiplied back by ``N``), ``"sum"``, or
      ``"token_mean"`` (a mean over the ``K`` kept tokens, as Hugging Face language and
      token-classification models compute it: multiplied back by ``K``, read from each
      model call's ``num_items_in_batch=`` or ``labels=`` keyword; a sample is a
      sequence), or ``"shifted_token_mean"`` (the same for a causal LM whose loss shifts
      its labels: ``labels[..., 1:]`` counted). A per-token mean read as ``"mean"`` gives
      a curvature ``(N/K)²`` too small; a model call with token labels under ``"mean"``
      warns once.
      Every built-in kind accepts it: the records hold each sample's exact gradient
      ``g_n = Σ_t b_nt ã_ntᵀ`` of a covered layer, so ``"diag"``, ``"ekfac"`` (its
      diagonal re-fitted in the eigenbasis of the factors of the same records) and
      ``"lowrank"`` (rows ``g_n``) need no extra pass either; every selected parameter
      must lie in a covered layer. A registered kind whose ``from_capture`` is missing is
      refused. Once, at the first refresh, the model is run again on a copy of its first
      recorded call's inputs (natgrad's own pass, no backward, random state and buffers
      restored; your forward hooks see it) to refuse a layer whose weight the forward
      also reads outside the layer's own call (its recorded statistics would miss those
      terms).

    Layers pruned by ``torch.nn.utils.prune`` (``W = W_orig ⊙ M``): the step preconditions
    ``weight_orig`` / ``bias_orig`` (see :class:`natgrad.KroneckerFisher` for ``"kfac"`` /
    ``"ekfac"``: the masked projection of the solve). The mask is the model's: before each
    solve (and when :attr:`curvature` is read) the K-FAC / EKFAC curvature takes the
    model's current ``*_mask`` buffers (:meth:`natgrad.KroneckerFisher.with_masks`), and the
    EMA keeps the factors and takes the newest mask. So a mask changed in place, or a
    regrowth (``prune.remove`` then ``prune.custom_from_mask`` with a mask keeping entries
    pruned before), is preconditioned at the next step, regrown entries included, and a
    state loaded with :meth:`load_state_dict` solves with the model's masks, not the saved
    ones. The other kinds (``"diag"``, ``"lowrank"``) hold the curvature of ``W_orig``,
    which is 0 at pruned entries: a regrowth since the last refresh would be solved
    there with ``λ`` alone (steps ``g/λ``, up to ``1/λ`` times too large), and an EMA
    would keep those entries too small for many refreshes, so a step that finds an entry
    kept now but pruned at the last refresh raises (unless it refreshes by replacing
    the curvature): regrow with ``"kfac"`` / ``"ekfac"``, or build a new preconditioner
    after regrowing. A layer pruned or un-pruned after the preconditioner was built (its
    parameters renamed ``<a>`` ↔ ``<a>_orig``) is refused at the next step: build a new
    preconditioner (and optimizer) on the model as it is now.

    Under ``torch.distributed`` (a process group initialized), each refresh pools the
    ranks' statistics sample-weighted (``Curvature.all_reduce`` /
    ``estimate(distributed=True)``), so every replica holds the curvature of the union
    batch, and :class:`natgrad.KroneckerFisher`'s eigendecompositions are spread over the
    ranks (layer ``i`` on rank ``i mod world``, then broadcast).

    Defaults: ``damping=1e-2``, ``update_every=10``, ``ema_decay=0.95``,
    ``kl_clip=1e-3`` (refresh the curvature every 10 steps, average it over about 20
    refreshes, clip each step's KL) are the settings tuned for K-FAC (``kind="kfac"``,
    factored damping) with SGD, momentum 0.9, in ``benchmarks/exp_natural_gradient.py``;
    for speed use ``source="backward"`` (no extra pass). See benchmarks/RESULTS.md for
    the steps and the wall-clock to each MNIST-1D target against Adam. Refreshing every
    step (``update_every=1``) costs several plain steps per step.

    Trust region (``kl_clip``, on by default): ``Δ ← ν Δ`` with
    ``ν = min(1, sqrt(kl_clip / |Σ_i lr_i² Δ_i g_i|))`` (``ν = 1`` when the sum is 0),
    where ``lr_i`` is the learning rate of parameter ``i``'s optimizer group, passed to
    :meth:`step` as ``lr`` (:class:`NaturalGradient` reads it from the wrapped
    optimizer's ``param_groups`` at every step, so schedulers are followed). ``½ lr² Δᵀ g = ½ lr² gᵀ(F + λI)^-1 g``
    is the quadratic model of the KL divergence one step ``-lr Δ`` moves the model's
    predictive distribution, so the clip caps it at ``kl_clip / 2`` and large
    learning rates cannot blow the step up. Without ``lr`` the step is not clipped (a
    warning says so once). The bound assumes the optimizer steps ``-lr · .grad`` (SGD,
    momentum); an Adam-like optimizer rescales ``.grad`` per coordinate, so the clip does
    not bound its step: use ``kl_clip=None`` there.

    Args:
        model: the model. Only ``.grad`` of selected parameters is modified. A
            ``source="batch"`` refresh runs its own pass with the model in eval mode
            (dropout off, BatchNorm on its running statistics: a deterministic Fisher, and
            no running-statistics update), then restores each module's mode, so it can be
            called in a training loop with the model in train mode.
        likelihood: name or :class:`natgrad.engine.likelihoods.Likelihood`.
        kind: a registered curvature kind (``"diag"``, ``"kfac"``, ``"ekfac"``,
            ``"lowrank"``) or an alias (``"woodbury"``).
        damping: ``λ > 0``, or a callable ``t -> λ`` of the step index (default 1e-2).
        update_every: refresh the curvature every this many steps (``>= 1``; default 10).
        ema_decay: ``d`` in ``[0, 1)`` (default 0.95).
        labels: ``"empirical"``, ``"mc"`` (one seeded draw per sample) or ``"exact"``
            (``source="batch"``; ``"backward"`` is always empirical).
        kl_clip: a positive trust-region size (default 1e-3), or ``None`` for no clip.
        params: which parameters to precondition (see :func:`natgrad.select_params`);
            the default ``None`` takes the parameters with ``requires_grad`` at
            construction. A parameter unfrozen later is not preconditioned (its ``.grad``
            passes unchanged; a refresh warns once, naming it): build the preconditioner
            after unfreezing, or select it with ``params=``.
        warmup_steps: pass-through steps at the start (``>= 0``).
        seed: seed of the generator for ``"mc"`` labels (saved in the state); under
            ``torch.distributed``, rank ``r`` uses ``seed + r`` (each rank its own draws),
            and a state loaded on rank ``r > 0`` continues from a stream derived from the
            loaded one and ``r`` (frameworks load rank 0's state on every rank).
        output_fn: maps model outputs to the output tensor (default: tensor or ``.logits``).
        kfac_damping: ``"factored"`` or ``"exact"``, passed to kinds whose ``estimate``
            takes a ``damping_mode`` (K-FAC).
        source: ``"batch"`` or ``"backward"``. ``"backward"`` reads the first dimension
            of each layer's input as the samples: a sequence-first model (``(T, N, d)``,
            ``batch_first=False``) needs ``batch_first=True``, or a wrapper taking
            ``(N, T, d)`` batches with ``source="batch"``.
        loss_reduction: ``"mean"`` (over the batch's samples), ``"sum"``,
            ``"element_mean"`` (over every output value: ``nn.MSELoss()`` and
            ``nn.BCEWithLogitsLoss()`` with their default reduction on several outputs per
            sample), ``"token_mean"`` (over the kept tokens, labels ``≠ -100``: Hugging
            Face token models) or ``"shifted_token_mean"`` (a causal LM's loss, which
            shifts its labels): how the user's loss reduces (``source="backward"`` only; a
            class-weighted or batch-statistics loss: see
            :mod:`natgrad.curvature.backward`). A ``token_categorical`` likelihood's
            ``shift`` must match the token mean chosen.
        max_factor_dim: K-FAC/EKFAC keep a factor side larger than this diagonal (e.g.
            the ``G`` of a 50k-vocabulary output layer), passed to kinds whose
            ``estimate`` takes it; None: every side full.
        grad_scaler: the ``torch.amp.GradScaler`` scaling the loss (mixed precision), or
            None. With it, ``source="backward"`` divides the recorded output gradients by
            its scale, and a step whose ``.grad`` holds NaN or Inf (an overflow, which the
            scaler's ``step`` skips) is skipped too: nothing changes, no error. Call
            ``scaler.unscale_(optimizer)`` before :meth:`step` (``scaler.step`` does it
            for :class:`NaturalGradient`).
        kfac_approx: ``"expand"`` (positions of a layer applied at several positions,
            e.g. tokens, count as extra samples) or ``"reduce"`` (K-FAC-reduce: inputs
            averaged and output gradients summed over a sample's positions before the
            outer products, ``T`` times fewer of them; see
            :func:`natgrad.curvature.kfac.factor_stats`), passed to kinds whose
            ``estimate`` takes ``approx``.

    Raises:
        ValueError / TypeError: invalid options (checked before anything else); a model
            that is not an ``nn.Module``; ``source="backward"`` with a kind the records do
            not determine, with ``labels`` other than ``"empirical"``, or with selected
            parameters outside the covered layers.

    Example:
        >>> import torch
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Linear(3, 2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> pre = FisherPreconditioner(model, kind="kfac", damping=0.1)
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> torch.nn.functional.cross_entropy(model(x), y).backward()
        >>> pre.step((x, y)).preconditioned
        True
        >>> opt.step()
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str | Likelihood = "categorical",
        *,
        kind: str = "diag",
        damping: Damping = 1e-2,
        update_every: int = 10,
        ema_decay: float = 0.95,
        labels: LabelSource = "empirical",
        kl_clip: float | None = 1e-3,
        params: ParamSpec = None,
        warmup_steps: int = 0,
        seed: int = 0,
        output_fn: OutputFn | None = None,
        kfac_damping: KfacDamping = "factored",
        source: Source = "batch",
        loss_reduction: LossReduction = "mean",
        max_factor_dim: int | None = None,
        kfac_approx: KfacApprox = "expand",
        grad_scaler: Any = None,
    ):
        check_model(model, "FisherPreconditioner")
        self.kind = check_choice("kind", kind, kinds())
        self.labels = check_choice("labels", labels, LABEL_SOURCES)
        if not callable(damping):
            check_positive("damping", damping)
        self.damping = damping
        self.update_every = check_int("update_every", update_every, 1)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 0)
        self.ema_decay = check_fraction("ema_decay", ema_decay)
        self.kl_clip = None if kl_clip is None else check_positive("kl_clip", kl_clip)
        self.kfac_damping = check_choice("kfac_damping", kfac_damping, KFAC_DAMPING)
        self.source = check_choice("source", source, SOURCES)
        self.loss_reduction = check_choice("loss_reduction", loss_reduction, LOSS_REDUCTIONS)
        self.likelihood = get_likelihood(likelihood)
        self.model = model
        self.params = select_params(model, params)
        self.output_fn = output_fn
        # under torch.distributed each rank draws its own MC labels (seed + rank): one seed
        # on every rank drew the same labels on all of them, so their noise never averaged
        rank = torch.distributed.get_rank() if is_distributed() else 0
        self.generator = torch.Generator().manual_seed(int(seed) + rank)
        self.curvature_kind = KIND_ALIASES.get(self.kind, self.kind)
        self.curvature_cls = curvature_class(self.curvature_kind)
        self._options: dict[str, Any] = {}
        takes = inspect.signature(self.curvature_cls.estimate).parameters
        self._takes = frozenset(takes)  # the kind's estimate options (see _settings)
        if "damping_mode" in takes:
            self._options["damping_mode"] = self.kfac_damping
        self.max_factor_dim = check_int("max_factor_dim", max_factor_dim, 1, optional=True)
        if self.max_factor_dim is not None and "max_factor_dim" in takes:
            self._options["max_factor_dim"] = self.max_factor_dim
        self.kfac_approx = check_choice("kfac_approx", kfac_approx, KFAC_APPROX)
        if self.kfac_approx != "expand" and "approx" in takes:
            self._options["approx"] = self.kfac_approx
        frozen = [k for k, p in self.params.items() if not p.requires_grad]
        if len(frozen) == len(self.params):
            raise ValueError(
                f"Every selected parameter is frozen (requires_grad=False: {frozen[:8]}), so "
                "none ever gets a .grad to precondition: select trainable parameters."
            )
        self._grad_scaler: Any = None
        self._capture: BackwardCapture | None = None
        if self.source == "backward":
            if self.curvature_kind not in self.curvature_cls.CAPTURE_KINDS:
                raise ValueError(
                    f"kind={self.kind!r} cannot use source='backward': the recorded layer "
                    "inputs and output gradients do not determine it exactly. Kinds that "
                    "can: "
                    + ", ".join(repr(k) for k in CURVATURE_KINDS
                                if k in CURVATURE_KINDS[k].CAPTURE_KINDS)
                    + "; or use source='batch'."
                )
            if self.labels != "empirical":
                raise ValueError(
                    f"source='backward' records the gradients of your own loss, i.e. the "
                    f"empirical Fisher, but labels={self.labels!r}; use labels='empirical' "
                    "or source='batch'."
                )
            shift = getattr(self.likelihood, "shift", None)
            if self.likelihood.name == "token_categorical" and shift and (
                    self.loss_reduction == "token_mean"):
                raise ValueError(
                    f"likelihood {self.likelihood!r} says the model's loss shifts its labels "
                    "(a causal LM), but loss_reduction='token_mean' counts the kept tokens "
                    "of unshifted labels, so the curvature's scale would be off by the ratio "
                    "of the two counts: pass loss_reduction='shifted_token_mean' (or "
                    "TokenCategorical(shift=False) if your loss does not shift)."
                )
            if self.likelihood.name == "token_categorical" and shift is False and (
                    self.loss_reduction == "shifted_token_mean"):
                raise ValueError(
                    f"loss_reduction='shifted_token_mean' reads the loss as a causal LM's, "
                    f"whose labels are shifted, but the likelihood {self.likelihood!r} does "
                    "not shift them: pass likelihood=natgrad.TokenCategorical(shift=True) "
                    "(or loss_reduction='token_mean' if your loss does not shift)."
                )
            if self.loss_reduction == "element_mean" and self.likelihood.name in (
                    "categorical", "token_categorical"):
                raise ValueError(
                    f"loss_reduction='element_mean' averages the loss over every output "
                    f"value, but a {self.likelihood.name} likelihood's outputs are the logits "
                    "of one distribution per sample (or token), which cross-entropy does not "
                    "average over (read so, the curvature would be C² too large): use "
                    "loss_reduction='mean' ('token_mean' for a mean over tokens)."
                )
            self._capture = BackwardCapture(
                model, self.params, loss_reduction=loss_reduction,
                per_output_loss=self.likelihood.name in ("gaussian", "bernoulli"),
                output_fn=self.output_fn)
        self.grad_scaler = grad_scaler
        self._capture_pools = (
            "distributed" in inspect.signature(self.curvature_cls.from_capture).parameters
        )
        self._curvature: Curvature | None = None
        self._lent = False  # whether `curvature` was read since it was last replaced
        # whether the curvature sits on the parameters' device and dtype: a loaded one is
        # moved at the next step (frameworks load state before they move or cast the model)
        self._placed = True
        # where each selected parameter lives (module, attribute): a layer pruned or
        # un-pruned since renames it (<a> <-> <a>_orig), which step() refuses
        self._homes = {k: (model.get_submodule(k.rpartition(".")[0]), k.rpartition(".")[2])
                       for k in self.params}
        self._mask_layers: dict[str, KFACLayer] = {}
        self._mask_seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._mask_synced: Curvature | None = None
        self._where_at_refresh = self._params_where()  # see _update_curvature
        # other kinds: {name: (module, mask buffer name)} of pruned selected parameters,
        # and copies of those masks taken at the last refresh (see _check_regrowth)
        self._regrow_masks: dict[str, tuple[nn.Module, str]] = {}
        self._masks_at_refresh: dict[str, torch.Tensor] | None = None
        self._mask_marks: dict[str, tuple[torch.Tensor, int]] = {}
        if self.curvature_kind not in ("kfac", "ekfac"):
            for k, (mod, attr) in self._homes.items():
                mask = attr[: -len("_orig")] + "_mask" if attr.endswith("_orig") else None
                if mask is not None and isinstance(mod._buffers.get(mask), torch.Tensor):
                    self._regrow_masks[k] = (mod, mask)
        if self.curvature_kind in ("kfac", "ekfac"):
            layers, diag_names = kfac_layers(model, self.params, extended=True, masked=True)
            self._mask_layers = {k: lay for k, lay in layers.items() if lay.mask_w or lay.mask_b}
            logger.info(
                "FisherPreconditioner(kind=%r): %d layers in Kronecker form; %d "
                "parameter tensors left diagonal%s",
                self.kind, len(layers), len(diag_names),
                f" ({', '.join(diag_names)})" if diag_names else "",
            )  # fmt: skip
        self._step = 0
        self._warned_no_lr = False
        # the default selection (trainable at construction): a refresh warns once about
        # parameters unfrozen since then, which get gradients but are not preconditioned
        self._check_unfrozen = params is None
        self._arm()

    @property
    def grad_scaler(self) -> Any:
        """The loss scaler (``torch.amp.GradScaler``) or None; settable after construction
        (the Hugging Face Trainer creates its scaler after the optimizer)."""
        return self._grad_scaler

    @grad_scaler.setter
    def grad_scaler(self, scaler: Any) -> None:
        if scaler is not None and not callable(getattr(scaler, "get_scale", None)):
            raise TypeError(
                f"grad_scaler must be a torch.amp.GradScaler (or have get_scale()), got "
                f"{type(scaler).__name__}."
            )
        self._grad_scaler = scaler
        if self._capture is not None:
            self._capture.scale_source = None if scaler is None else scaler.get_scale
            if scaler is None:
                self._capture.loss_scale = 1.0

    # -- damping and schedule -------------------------------------------------------------
    def damping_at(self, step: int) -> float:
        """``λ`` at step ``step`` (validated: finite and > 0)."""
        lam = self.damping(step) if callable(self.damping) else self.damping
        return check_positive(f"damping at step {step}", lam)

    def _refresh_due(self, t: int) -> bool:
        if t < self.warmup_steps:
            return not self.curvature_cls.REFRESH_REPLACES
        return (t - self.warmup_steps) % self.update_every == 0

    def _arm(self) -> None:
        """Record the coming forward/backward only when the next step refreshes."""
        if self._capture is not None:
            self._capture.armed = self._refresh_due(self._step)

    # -- curvature ---------------------------------------------------------------------------
    def _estimate(self, batch: Any) -> Curvature:
        lik = self.likelihood.name
        if self._capture is not None:
            # a kind whose from_capture pools the ranks itself (EKFAC: factors reduced before
            # its eigenbasis is taken) gets distributed=True; the others are all-reduced
            pools = self._capture_pools
            extra = {"distributed": is_distributed()} if pools else {}
            if pools or not is_distributed():
                return self.curvature_cls.from_capture(
                    self._capture, kind=self.curvature_kind, likelihood=lik, **self._options,
                    **extra,
                )
            # this rank's part first; a failure reaches every rank before the all-reduce
            # (a rank with nothing recorded left the others waiting until the timeout)
            what = f"FisherPreconditioner's refresh (kind={self.kind!r}, source='backward')"
            error, local = None, None
            try:
                local = self.curvature_cls.from_capture(
                    self._capture, kind=self.curvature_kind, likelihood=lik, **self._options
                )
            except Exception as exc:
                error = exc
            raise_if_any_rank_failed(error, what, config=describe_call(
                what, self._capture.params, **self._options))
            assert local is not None  # raised above otherwise
            return local.all_reduce()
        with evaluating(self.model), _preconditioner_hint():  # dropout off, BatchNorm frozen
            check_fixed_model(self.model, f"FisherPreconditioner(kind={self.kind!r})'s refresh")
            return self.curvature_cls.estimate(
                self.model,
                batch,
                self.likelihood,
                kind=self.curvature_kind,
                labels=self.labels,
                params=list(self.params),
                generator=self.generator,
                output_fn=self.output_fn,
                **self._options,
            )

    @property
    def curvature(self) -> Curvature | None:
        """The current curvature (``None`` before the first refresh).

        Reading it hands it out: the next refresh then builds a new curvature
        (:meth:`natgrad.Curvature.ema`) instead of averaging into this one in place, so
        what the caller holds, and anything derived from it that may share its tensors
        (``2 * pre.curvature``, ``pre.curvature.to(...)``), never changes under it.
        """
        self._lent = True
        self._place()
        if not self._renamed():
            self._sync_masks()
        return self._curvature

    def _renamed(self) -> list[str]:
        """The selected parameters no longer found under their name (their layer pruned or
        un-pruned by ``torch.nn.utils.prune`` / ``natgrad.make_permanent`` since the
        preconditioner was built)."""
        return [k for k, (mod, attr) in self._homes.items() if mod._parameters.get(attr) is None]

    def _check_pruning(self) -> None:
        gone = self._renamed()
        if gone:
            raise ValueError(
                f"The model's pruning changed since this FisherPreconditioner was built: "
                f"parameters {gone[:8]} are gone (a layer pruned by torch.nn.utils.prune "
                "renames <a> to <a>_orig; prune.remove or natgrad.make_permanent renames it "
                "back), so the preconditioner's parameters and curvature no longer match the "
                "model. Build a new FisherPreconditioner (and optimizer, e.g. "
                "natgrad.NaturalGradient) on the model as it is now (pre.close() the old one "
                "with source='backward'). To change which entries are kept without this, "
                "change the masks only (prune.custom_from_mask on a pruned layer, or edit "
                "its <a>_mask in place): the preconditioner follows the model's masks."
            )

    def _sync_masks(self) -> None:
        """Put the model's current pruning masks on a K-FAC / EKFAC curvature (the mask
        is the model's, not the statistics'; see the class doc). Re-read when a mask
        buffer was replaced or its values changed (compared with a copy kept from the last
        read, in one host sync for all of them: an edit through ``.data`` leaves no version
        trace) or the curvature is new."""
        C = self._curvature
        if not self._mask_layers or not isinstance(C, KroneckerFisher):
            return
        bufs = [b for lay in self._mask_layers.values()
                for attr, on in (("weight_mask", lay.mask_w), ("bias_mask", lay.mask_b)) if on
                for b in (lay.module._buffers[attr],) if b is not None]
        if (C is self._mask_synced and len(bufs) == len(self._mask_seen)
                and all(a is b for a, (b, _) in zip(bufs, self._mask_seen, strict=True))
                and not bool(torch.stack([(a != c).any() for a, (_, c) in
                                          zip(bufs, self._mask_seen, strict=True)]).any())):
            return
        masks = {k: m for k, lay in self._mask_layers.items()
                 if k in C.blocks and C.blocks[k].mask is not None
                 for m in (lay.mask_block(),) if m is not None}
        new = C.with_masks(masks) if masks else C
        self._curvature, self._mask_synced = new, new
        self._mask_seen = [(b, b.detach().clone()) for b in bufs]

    def _model_masks(self) -> dict[str, torch.Tensor]:
        """The current mask buffers of the pruned parameters (see ``_regrow_masks``)."""
        return {k: m for k, (mod, attr) in self._regrow_masks.items()
                for m in (mod._buffers.get(attr),) if isinstance(m, torch.Tensor)}

    def _mark_masks(self) -> None:
        """At a refresh: which entries each pruned parameter's mask prunes (``True``), and
        the mask buffers' identity and version (see :meth:`_check_regrowth`)."""
        masks = self._model_masks()
        self._masks_at_refresh = {k: m.detach() == 0 for k, m in masks.items()}
        self._mask_marks = {k: (m, m._version) for k, m in masks.items()}

    def _check_regrowth(self, replaces: bool) -> None:
        """Refuse entries kept now but pruned at the last refresh, for a kind whose
        curvature is of ``W_orig`` (0 there; see the class doc); ``replaces``: this
        step's refresh replaces ``C``. A mask buffer that is the same object at the same
        ``_version`` as when last seen is unchanged (no work; an edit that leaves no
        version trace, through ``.data`` or a NumPy view, is not seen); a changed one is
        compared with the
        refresh's pruned entries, one host sync for all of them."""
        seen = self._masks_at_refresh
        if not seen or self._curvature is None or replaces:
            return
        now = self._model_masks()
        changed = [k for k in seen if k in now
                   and not (k in self._mask_marks and self._mask_marks[k][0] is now[k]
                            and self._mask_marks[k][1] == now[k]._version)]
        if not changed:
            return
        pairs = [(k, now[k], seen[k]) for k in changed if now[k].shape == seen[k].shape]
        hits = [((m != 0) & s.to(m.device)).any() for _, m, s in pairs]
        if len({h.device for h in hits}) > 1:  # masks on several devices (a device_map split)
            hits = [h.cpu() for h in hits]
        flags = torch.stack(hits).tolist() if hits else []
        grown = [k for (k, _, _), f in zip(pairs, flags, strict=True) if f]
        self._mask_marks.update({k: (now[k], now[k]._version) for k in changed})
        if grown:
            raise ValueError(
                f"Entries of {grown[:8]} are kept by the model's pruning mask now but were "
                f"pruned at the last refresh: a kind={self.kind!r} curvature holds 0 there "
                "(the Fisher of <a>_orig), so the step would divide their gradient by the "
                "damping alone. For regrowth use kind='kfac' or 'ekfac' (they follow the "
                "model's masks), or build a new FisherPreconditioner after regrowing."
            )

    def _update_curvature(self, batch: Any) -> None:
        """Fold the batch's curvature into the EMA, ``C ← d·C + (1 - d)·C_batch``.

        While ``C`` has not been handed out (see :attr:`curvature`), the average is
        written into its own statistics (:meth:`natgrad.Curvature.ema_`: K-FAC factors
        ``lerp_``-ed in place, no new factor tensors); once it has, a new curvature is
        built (:meth:`natgrad.Curvature.ema`) and the one handed out is left as it was.
        """
        new = self._estimate(batch)
        C = self._curvature
        where = self._params_where()
        if C is not None and where != self._where_at_refresh:
            # the model was cast or moved since the last refresh (model.double()): the
            # average continues in the parameters' dtype and device, as a new one would
            C = self._on_params(C)
        self._where_at_refresh = where
        if C is None or self.curvature_cls.REFRESH_REPLACES:
            C = new
        elif self._lent:
            C = C.ema(new, self.ema_decay)
        else:
            C = C.ema_(new, self.ema_decay)
        self._curvature, self._lent = C, False
        C.prepare_solve()
        if self._regrow_masks:
            self._mark_masks()

    def group_lrs(self, param_groups: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """``{name: lr}`` for this preconditioner's parameters, read from an optimizer's
        ``param_groups``: the ``lr`` of the group holding each parameter, 0 for a parameter
        in no group (the optimizer does not move it). Pass it as ``step(..., lr=...)`` so
        that ``kl_clip`` measures the step each group really takes.

        Args:
            param_groups: the optimizer's ``param_groups`` (each a mapping with ``params``
                and ``lr``).

        Returns:
            ``{parameter name: lr}`` over ``self.params``.
        """
        by_id: dict[int, float] = {}
        for group in param_groups:
            for p in group["params"]:
                by_id[id(p)] = float(group["lr"])
        return {k: by_id.get(id(p), 0.0) for k, p in self.params.items()}

    def step(
        self, batch: Any = None, *, lr: float | Mapping[str, float] | None = None
    ) -> PreconditionStep:
        """Refresh the curvature when due, then rewrite ``.grad`` with ``(F + λI)^-1 g``.

        Call after ``loss.backward()`` and before ``optimizer.step()``.

        Args:
            batch: the batch the gradients came from (``(x, y)``, ``x`` or a dict);
                needed with ``source="batch"``, ignored with ``"backward"``.
            lr: the optimizer's learning rate, or ``{parameter name: lr}`` when its
                groups differ (every preconditioned parameter named); used only by the
                ``kl_clip`` trust region, which is skipped (with a one-time warning)
                without it.

        Returns:
            :class:`PreconditionStep` describing the step. With no ``.grad`` on any
            preconditioned parameter (a batch the loop skipped) the step is skipped with a
            warning: no refresh, nothing preconditioned.

        Raises:
            ValueError: a layer pruned or un-pruned since the preconditioner was built
                (its parameters renamed; build a new one); a mask that is not 0/1 on a
                pruned K-FAC layer; a negative or non-finite ``lr``, or an ``lr`` mapping
                that lacks a preconditioned parameter; ``source="batch"`` without a batch; invalid damping from a
                schedule; on a refresh, bad labels (checked on the whole batch) or a
                BatchNorm without running statistics; ``source="backward"`` with nothing
                recorded. (A module that stays random in eval mode, e.g. a dropout
                subclass that forces ``training=True``, cannot be detected.)
            FloatingPointError: NaN or Inf in a ``.grad`` (the parameter is named; checked
                before anything changes, warmup included: one host sync per step, shared
                with the ``kl_clip`` inner products on a step that only solves; with a
                ``grad_scaler`` the step is skipped instead), in the curvature, or in the
                preconditioned gradient.
        """
        self._check_pruning()
        lrs = self._check_lr(lr)
        grads: dict[str, torch.Tensor] = {}
        for k, p in self.params.items():
            if p.grad is not None:
                grads[k] = p.grad
        t = self._step
        if not grads:  # e.g. a batch the training loop skipped (Lightning: step returned None)
            warnings.warn(
                "FisherPreconditioner.step: no preconditioned parameter has a .grad, so the "
                "step is skipped (no refresh, nothing preconditioned); call loss.backward() "
                "before pre.step().",
                stacklevel=2,
            )
            return self._skip(t)
        self._place()
        updated = self._refresh_due(t)
        if (updated and self._capture is not None and not is_distributed()
                and not self._capture.backpropagated()):
            # .grad kept from earlier (zero_grad(set_to_none=False)) but no backward since:
            # a batch the loop skipped (Lightning: training_step returned None). Not under
            # torch.distributed: a skip on one rank would leave the others in the refresh's
            # collective; there the refresh's guard raises on every rank instead
            warnings.warn(
                "FisherPreconditioner.step: no backward ran since the last step (the .grad "
                "present are left from before, e.g. zeroed with set_to_none=False), so the "
                "step is skipped (no refresh, nothing preconditioned); call loss.backward() "
                "before pre.step().",
                stacklevel=2,
            )
            return self._skip(t)
        if updated and self._check_unfrozen:
            self._warn_unfrozen()
        clip = self.kl_clip is not None and lrs is not None
        solves = t >= self.warmup_steps and (updated or self._curvature is not None)
        scaler = self.grad_scaler
        if scaler is not None and getattr(scaler, "is_enabled", lambda: True)():
            try:  # an overflow: the scaler skips this step, and so does the preconditioner
                check_all_finite(grads, "the gradient (.grad) of parameter", GRAD_HINT)
            except FloatingPointError:
                return self._skip(t)
        elif updated or not solves:
            check_all_finite(grads, "the gradient (.grad) of parameter", GRAD_HINT)
        # else: a step that only solves reads the gradients' finiteness from its result
        # (the trust region's inner products, or Δ itself), before anything changes
        lam = self.damping_at(t)
        if updated and self.source == "batch" and batch is None:
            raise ValueError(
                "This refresh needs the batch the gradients came from: "
                "pre.step((x, y)); or build the preconditioner with source='backward', "
                "which records the statistics during your own forward and backward."
            )
        if self._regrow_masks:
            self._check_regrowth(updated and (
                self.curvature_cls.REFRESH_REPLACES or self._curvature is None
                or self.ema_decay == 0  # C ← new: the refresh measures the regrown entries
            ))
        try:
            if updated:
                self._update_curvature(batch)
        finally:
            if self._capture is not None:
                self._capture.clear()
        if not solves or self._curvature is None:
            self._advance()
            return PreconditionStep(t, lam, updated, False, 1.0)
        self._check_frozen_coupled()
        self._sync_masks()  # the model's masks now (a regrowth, a loaded state)
        nu = 1.0
        if clip:
            assert lrs is not None and self.kl_clip is not None
            deltas, pieces = self._curvature.solve_inner(
                grads, lam, {k: lrs[k] ** 2 for k in grads}
            )
            nu = kl_clip_scale(pieces, self.kl_clip, grads, deltas)
        else:
            deltas = self._curvature.solve(grads, lam)
            check_solution_finite(grads, deltas)
        self._advance()
        vals = list(deltas.values())
        dests = [grads[k] for k in deltas]
        if nu != 1.0 and all(g.dtype == d.dtype for g, d in zip(dests, vals, strict=True)):
            # Δ·ν rounded once in Δ's dtype, as below, but scaled in place in .grad
            torch._foreach_copy_(dests, vals)
            torch._foreach_mul_(dests, nu)
            return PreconditionStep(t, lam, updated, True, nu)
        if nu != 1.0:  # Δ·ν in Δ's dtype, then one rounding into .grad's
            vals = list(torch._foreach_mul(vals, nu))
        torch._foreach_copy_(dests, vals)  # one dispatch for all
        return PreconditionStep(t, lam, updated, True, nu)

    def _check_frozen_coupled(self) -> None:
        """Refuse a solve of a curvature that couples every parameter (``"lowrank"``) while
        some selected parameter is frozen: its zero-padded solve is ``[(F + λI)⁻¹]_SS g_S``
        (a Schur complement), not the trainable parameters' ``(F_SS + λI)⁻¹ g_S`` (274%
        apart in a review's case; the block-diagonal kinds solve each block alone). A
        frozen parameter the curvature holds no statistics for (0 diagonal: a
        ``source="backward"`` refresh after the freezing records none) decouples."""
        C = self._curvature
        if C is None or self.curvature_kind != "lowrank":  # the one coupled built-in kind
            return
        frozen = [k for k, p in self.params.items() if not p.requires_grad]
        if frozen:
            diag = C.diagonal()
            frozen = [k for k in frozen if bool(diag[k].ne(0).any())]
        if frozen:
            raise ValueError(
                f"Parameters {frozen[:8]} were frozen (requires_grad=False) after this "
                f"FisherPreconditioner(kind={self.kind!r}) was built, but its curvature "
                "couples every parameter, so leaving them out of the solve would not give "
                "the trainable parameters' natural gradient. Build a new preconditioner "
                "(and optimizer) after freezing: it selects the trainable parameters."
            )

    def _warn_unfrozen(self) -> None:
        """Warn once when parameters outside the default selection (frozen when the
        preconditioner was built) now have a ``.grad``: they are trained unpreconditioned."""
        extra = [k for k, p in self.model.named_parameters()
                 if p.requires_grad and p.grad is not None and k not in self.params]
        if extra:
            self._check_unfrozen = False
            warnings.warn(
                f"FisherPreconditioner: parameters {extra[:8]} have gradients but are not "
                "preconditioned: they were frozen (requires_grad=False) when the "
                "preconditioner was built, which selects the trainable parameters then. "
                "Their .grad passes unchanged; build the preconditioner after unfreezing, "
                "or select them with params=....",
                stacklevel=3,
            )

    def _skip(self, t: int) -> PreconditionStep:
        """A step that changes nothing: no refresh, no preconditioning, the step count kept
        (the records of this step's backward are dropped)."""
        if self._capture is not None:
            self._capture.clear()
        return PreconditionStep(t, self.damping_at(t), False, False, 1.0)

    def _advance(self) -> None:
        self._step += 1
        self._arm()

    def zero_grad_records(self) -> None:
        """Forget the ``source="backward"`` records of backward passes already run: their
        gradients are being zeroed without a :meth:`step` having used them (e.g. a step a
        ``GradScaler`` skipped), so a later refresh must not count them.
        :class:`NaturalGradient` calls it from ``zero_grad``; a forward whose backward has
        not run yet keeps its record. No-op with ``source="batch"``."""
        if self._capture is not None:
            self._capture.drop_backpropagated()

    def _check_lr(self, lr: float | Mapping[str, float] | None) -> dict[str, float] | None:
        """``{name: lr}`` of every selected parameter (checked), or None without ``lr``."""
        if lr is None:
            if self.kl_clip is not None and not self._warned_no_lr:
                self._warned_no_lr = True
                warnings.warn(
                    f"FisherPreconditioner: kl_clip={self.kl_clip:g} is not applied because "
                    "step() got no learning rate; pass pre.step(..., "
                    "lr=optimizer.param_groups[0]['lr']), use natgrad.NaturalGradient "
                    "(which passes it), or build the preconditioner with kl_clip=None.",
                    stacklevel=3,
                )
            return None
        if isinstance(lr, Mapping):
            missing = [k for k in self.params if k not in lr]
            if missing:
                raise ValueError(
                    f"The lr mapping has no learning rate for parameters {missing[:8]}; "
                    "give every preconditioned parameter's lr, or pass one float."
                )
            return {k: check_positive(f"lr of {k!r}", lr[k], allow_zero=True)
                    for k in self.params}
        value = check_positive("lr", lr, allow_zero=True)
        return dict.fromkeys(self.params, value)

    def close(self) -> None:
        """Remove the ``source="backward"`` hooks from the model (a no-op otherwise)."""
        if self._capture is not None:
            self._capture.remove()
            self._capture = None

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain values and tensors: kind, step count, generator state, the curvature's
        own ``state_dict()`` (None before the first refresh) and the settings it was
        estimated under (see :meth:`load_state_dict`)."""
        return {
            "kind": self.kind,
            "step": self._step,
            "generator": self.generator.get_state(),
            "curvature": None if self._curvature is None else self._curvature.state_dict(),
            "settings": self._settings(),
        }

    def _settings(self) -> dict[str, Any]:
        """The settings that decide what the saved curvature is (its labels, scale,
        layout): a state is loaded only under the same ones. Only those that apply count:
        ``loss_reduction`` under ``source="backward"``, the K-FAC options for kinds whose
        ``estimate`` takes them; ``"mc"`` and ``"exact"`` labels estimate one Fisher; a
        custom likelihood is compared by name. The schedule and the step's size
        (``damping``, ``update_every``, ``ema_decay``, ``kl_clip``, ``warmup_steps``) may
        change on resume."""
        lik = self.likelihood
        out: dict[str, Any] = {
            "source": self.source,
            "labels": "empirical" if self.labels == "empirical" else "mc/exact",
            "likelihood": lik.name if isinstance(lik, CustomLikelihood) else repr(lik),
        }
        if self.source == "backward":
            out["loss_reduction"] = self.loss_reduction
        for key, option in (("kfac_damping", "damping_mode"), ("kfac_approx", "approx"),
                            ("max_factor_dim", "max_factor_dim")):
            if option in self._takes:
                out[key] = getattr(self, key)
        return out

    def _curvature_from_state(self, state: Mapping[str, Any]) -> Curvature | None:
        """Check ``state`` (see :meth:`check_state_dict`) and build its curvature."""
        keys = ("kind", "step", "generator", "curvature")
        if not isinstance(state, Mapping) or not set(keys) <= set(state):
            got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(
                f"Not a FisherPreconditioner state_dict: expected keys {list(keys)}, got "
                f"{got}; save it with FisherPreconditioner.state_dict()."
            )
        if state["kind"] != self.kind:
            raise ValueError(
                f"This state_dict is for kind={state['kind']!r}, but the preconditioner "
                f"has kind={self.kind!r}; build the preconditioner with the same kind."
            )
        saved = state.get("settings")  # absent from states saved before it was kept
        if saved is not None:
            mine = self._settings()
            diff = [k for k in mine if k in saved and saved[k] != mine[k]]
            if diff:
                raise ValueError(
                    "This state_dict was saved by a preconditioner built with "
                    + ", ".join(f"{k}={saved[k]!r}" for k in diff)
                    + ", but this one has "
                    + ", ".join(f"{k}={mine[k]!r}" for k in diff)
                    + ": its curvature means something else here. Build the preconditioner "
                    "with the saved settings (damping, update_every, ema_decay, kl_clip and "
                    "warmup_steps may change on resume)."
                )
        try:
            torch.Generator().set_state(state["generator"])
        except (TypeError, RuntimeError) as exc:
            raise ValueError(f"The state_dict's generator state is corrupt: {exc}") from None
        cstate = state["curvature"]
        if cstate is None:
            return None
        check_all_finite(dict(state_tensors(cstate)), "the state_dict's curvature tensor",
                         "The saved run diverged.")
        try:
            curv = self.curvature_cls.from_state_dict(cstate)
        except (KeyError, TypeError, IndexError) as exc:
            raise ValueError(
                f"The state_dict's curvature is corrupt ({type(exc).__name__}: {exc}); save "
                "it again with FisherPreconditioner.state_dict()."
            ) from None
        diag = curv.diagonal()
        check_same_structure(self.params, diag, "this preconditioner's parameters",
                             "the state_dict's curvature")
        check_all_finite(diag, "the state_dict's curvature diagonal", "The saved run diverged.")
        return curv

    def check_state_dict(self, state: Mapping[str, Any]) -> None:
        """Raise unless ``state`` (from :meth:`state_dict`) fits this preconditioner.

        Checks the kind, the settings the curvature was estimated under (``source``,
        ``labels``, the likelihood, ``loss_reduction``, ``kfac_damping``, ``kfac_approx``,
        ``max_factor_dim``) and the generator state; rebuilds the curvature from its own state
        dict (its class checks the format and layout: K-FAC factor shapes, low-rank rows,
        diagonal values ``>= 0``), refuses NaN/Inf in any of its tensors, and compares its
        parameter names and shapes with the selected parameters. Changes nothing.

        Raises:
            ValueError: not a state_dict of this kind, or curvature of another model or
                parameter selection (every mismatched name is listed).
            FloatingPointError: NaN or Inf in the curvature (the tensor is named).
        """
        self._curvature_from_state(state)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (same kind, parameters and shapes).

        Like ``torch.optim``'s ``load_state_dict``, the curvature is moved to the selected
        parameters' device and cast to their accumulation dtype (float64 parameters:
        float64; others: float32), so a state saved on one device or dtype (e.g. loaded
        with ``map_location="cpu"``, as the Hugging Face Trainer does on one GPU) continues
        on the model's. The move happens at the next :meth:`step`, where the parameters
        are read: Lightning restores callback states before it moves and casts the module.

        Everything is checked first (:meth:`check_state_dict`); nothing changes when that
        raises.

        Raises:
            ValueError: another kind, or curvature for other parameters, layers or shapes.
            FloatingPointError: NaN or Inf in the curvature.
        """
        curv = self._curvature_from_state(state)
        self._placed = curv is None
        self._step = int(state["step"])
        self.generator.set_state(state["generator"].clone())
        rank = torch.distributed.get_rank() if is_distributed() else 0
        if rank:  # frameworks load rank 0's state on every rank: keep the ranks' draws apart
            self.generator.manual_seed(int(generator_digest(self.generator)[:15], 16) + rank)
        self._curvature, self._lent = curv, False
        if self._regrow_masks:  # the loaded curvature is read as of the model's masks now
            self._mark_masks()
        if self._capture is not None:
            self._capture.clear()
        self._arm()

    def _place(self) -> None:
        """Move a loaded curvature to the parameters' device and dtype (once, where the
        parameters are first read after :meth:`load_state_dict`)."""
        if not self._placed and self._curvature is not None:
            self._curvature = self._on_params(self._curvature)
            self._placed = True

    def _params_where(self) -> tuple[frozenset[torch.device], frozenset[torch.dtype]]:
        """The devices and dtypes of the selected parameters."""
        return (frozenset(p.device for p in self.params.values()),
                frozenset(p.dtype for p in self.params.values()))

    def _on_params(self, curv: Curvature) -> Curvature:
        """``curv`` on the selected parameters' device, in their accumulation dtype (float64
        for float64 parameters, else float32), as a refresh would build it; unchanged when
        the parameters span several devices or dtypes (each solve then casts)."""
        devices = {p.device for p in self.params.values()}
        dtypes = {acc_dtype(p.dtype) for p in self.params.values() if p.is_floating_point()}
        if len(devices) != 1 or len(dtypes) != 1:
            return curv
        (device,), (dtype,) = devices, dtypes
        tensors = [t for _, t in state_tensors(curv.state_dict())]
        if all(t.device == device and t.dtype == dtype for t in tensors):
            return curv
        return curv.to(device=device, dtype=dtype)

    def __repr__(self) -> str:
        return (
            f"FisherPreconditioner(kind={self.kind!r}, likelihood={self.likelihood!r}, "
            f"labels={self.labels!r}, source={self.source!r}, params={len(self.params)}, "
            f"step={self._step})"
        )


@contextlib.contextmanager
def _preconditioner_hint() -> Iterator[None]:
    """Re-raise the capture path's "use engine='vmap'" (a control flow that changed between
    batches) with the fix a preconditioner user has: it takes no ``engine``."""
    try:
        yield
    except RuntimeError as exc:
        if "engine='vmap'" not in str(exc):
            raise
        raise RuntimeError(
            f"{exc} FisherPreconditioner takes no engine option: build it with "
            "source='backward', which records your own forward and backward whatever "
            "layers they use."
        ) from exc


def kl_clip_scale(
    pieces: Sequence[tuple[float, torch.Tensor]],
    kl_clip: float,
    grads: Mapping[str, torch.Tensor],
    deltas: Mapping[str, torch.Tensor],
) -> float:
    """The trust-region factor ``ν = min(1, sqrt(κ / |Σ_i lr_i² Δ_i g_i|))``.

    ``½ Σ_i lr_i² Δ_i g_i`` is the quadratic (Fisher) model of the KL divergence that the
    step ``-lr Δ`` with ``Δ = (F + λI)^-1 g`` moves the predictions, so ``ν Δ`` keeps it
    at most ``κ / 2``. ``ν = 1`` when the sum is 0 (e.g. every lr 0).

    The sum comes in ``pieces`` (:meth:`natgrad.Curvature.solve_inner` with weights
    ``lr²``), read with one host sync. A non-finite piece means a NaN or Inf in ``g`` or
    ``Δ``, which is then located and raised; failing that (finite tensors whose inner
    product overflowed), the piece counts as ``+∞`` when its weight is not 0, so the
    step is ``ν = 0``.

    Args:
        pieces: ``[(lr², ⟨g_S, Δ_S⟩), ...]``.
        kl_clip: ``κ > 0``.
        grads: ``{name: g}``, the raw gradients.
        deltas: ``{name: Δ}``, the preconditioned gradients.

    Returns:
        ``ν`` in ``[0, 1]``.

    Raises:
        FloatingPointError: NaN or Inf in a gradient, or in a preconditioned gradient
            (then the curvature or the damping is at fault).
    """
    if not pieces:
        return 1.0
    dots = [x for _, x in pieces]
    dev = dots[0].device
    if all(x.device == dev for x in dots):  # one host sync for all the inner products
        values = torch.stack(dots).tolist()
    else:  # a model spread over devices
        values = [float(x) for x in dots]
    if not all(math.isfinite(x) for x in values):
        check_solution_finite(grads, deltas)
        values = [x if math.isfinite(x) else math.inf for x in values]
    vg = sum(w * x for (w, _), x in zip(pieces, values, strict=True) if w != 0.0)
    if vg == 0.0:
        return 1.0
    return min(1.0, float((kl_clip / abs(vg)) ** 0.5))


def check_solution_finite(
    grads: Mapping[str, torch.Tensor], deltas: Mapping[str, torch.Tensor]
) -> None:
    """Raise FloatingPointError when ``Δ = (F + λI)⁻¹ g`` holds NaN or Inf: naming the
    gradient when ``g`` does (a non-finite ``g`` always makes ``Δ`` non-finite, so one
    check of ``Δ``, one host sync, covers both), else the preconditioned gradient (then
    the curvature or the damping is at fault).

    Args:
        grads: ``{name: g}``.
        deltas: ``{name: Δ}``.
    """
    try:
        check_all_finite(deltas, "the preconditioned gradient (F + λI)⁻¹g of parameter",
                         "The gradient is finite, so the curvature or the damping is at "
                         "fault: check pre.curvature for NaN/Inf, or raise the damping.")
    except FloatingPointError:
        check_all_finite(grads, "the gradient (.grad) of parameter", GRAD_HINT)
        raise
