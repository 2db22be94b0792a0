"""Natural gradient: the ``FisherPreconditioner`` that wraps any optimizer.

The natural-gradient step is ``Δ = (F + λI)^-1 g`` (docs/design.md);
:func:`natgrad.scale_by_fisher` is its diagonal form. :class:`FisherPreconditioner`
rewrites ``.grad`` with ``Δ`` for a diagonal, K-FAC or exact mini-batch (Woodbury) Fisher,
so any ``torch.optim`` optimizer then takes the natural-gradient step: ``loss.backward(); pre.step(batch); optimizer.step()``.
:class:`NaturalGradient` bundles an optimizer and a preconditioner into one optimizer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from natgrad.curvature.estimate import estimate_fisher
from natgrad.curvature.kfac import (
    KFAC_DAMPING,
    kfac_eigen,
    kfac_factored_inverses,
    kfac_factors,
    kfac_layers,
    kfac_solve,
    layer_matrix,
    split_layer_matrix,
)
from natgrad.curvature.lowrank import gram_eigen, woodbury_solve
from natgrad.engine.batch import OutputFn
from natgrad.engine.checks import (
    GRAD_HINT,
    check_all_finite,
    check_choice,
    check_finite,
    check_fisher_values,
    check_fixed_model,
    check_fraction,
    check_int,
    check_model,
    check_positive,
    check_same_structure,
)
from natgrad.engine.common import to_acc
from natgrad.engine.likelihoods import Likelihood, get_likelihood
from natgrad.engine.per_sample import LABEL_SOURCES, ParamSpec, per_sample_grads, select_params
from natgrad.engine.report import Report

__all__ = ["FisherPreconditioner", "PreconditionStep", "KINDS"]

logger = logging.getLogger(__name__)

KINDS = ("diag", "kfac", "woodbury")
_DIVERGED = "Training has likely diverged: lower the learning rate or raise damping."
Damping = float | Callable[[int], float]


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

    Use with any optimizer: ``loss.backward(); pre.step(batch); optimizer.step()``.
    The gradient ``g`` is whatever ``.grad`` holds (e.g. of the mean loss); the Fisher
    uses the per-sample loss ``l_n = -log p(y_n | x_n, θ)`` of ``batch`` and is scaled as
    the per-sample mean, so ``Δ`` is on the scale of a mean-loss Newton step.

    Kinds:
        * ``"diag"``: ``F_i = (1/N) Σ_n E_y[(∂l_n/∂θ_i)²]`` from exact per-sample gradients
          (:func:`natgrad.estimate_fisher`), kept as an EMA; ``Δ = g / (F + λ)``.
        * ``"kfac"``: per Linear/Conv1d/Conv2d layer ``F ≈ G ⊗ A`` (see
          :mod:`natgrad.curvature.kfac`), ``A`` and ``G`` kept as EMAs;
          ``Δ = ((G + (√λ/π)I) ⊗ (A + π√λ I))^-1 g`` (``kfac_damping="factored"``, the
          default: factored Tikhonov damping, which trained better in our experiments; two
          Cholesky inverses per layer, recomputed when the factors or ``λ`` change) or
          ``Δ = (G ⊗ A + λI)^-1 g`` (``kfac_damping="exact"``: eigendecompositions once
          per refresh, for any ``λ``); see :func:`natgrad.curvature.kfac.kfac_solve`. Other selected parameters use the
          diagonal EMA.
        * ``"woodbury"``: the exact mini-batch Fisher ``F = GᵀG/N`` of the latest refresh
          batch (no EMA: ``ema_decay`` is unused) over all selected parameters jointly,
          applied through the ``N x N`` Gram system (:mod:`natgrad.curvature.lowrank`), never
          forming ``P x P``. Memory: ``N x P`` per-sample gradients are kept.

    Schedule: step ``t`` (0-based count of :meth:`step` calls) refreshes the curvature
    from its batch when ``t < warmup_steps`` or ``(t - warmup_steps) % update_every == 0``
    (woodbury: not during warmup). A refresh folds the batch's estimate into the EMA,
    ``C ← d·C + (1 - d)·C_batch`` (the first refresh sets ``C = C_batch``), so with
    ``update_every = k`` the EMA averages one batch every ``k`` steps. During the first
    ``warmup_steps`` steps gradients pass through unchanged while curvature accumulates.

    Trust region (``kl_clip``): ``Δ ← ν Δ`` with
    ``ν = min(1, sqrt(kl_clip / (lr² |Σ_i Δ_i g_i|)))`` (``ν = 1`` when the sum is 0),
    where ``lr`` is passed to :meth:`step` (:class:`NaturalGradient` passes the first
    param group's ``lr``).

    Args:
        model: the model. Only ``.grad`` of selected parameters is modified. A refresh
            needs a deterministic model: BatchNorm and dropout in eval mode during
            :meth:`step` (a train-mode dropout Fisher mixes in mask noise, and is refused).
            In a training loop: ``loss.backward(); model.eval(); pre.step(batch);
            model.train(); opt.step()``.
        likelihood: name or :class:`natgrad.engine.likelihoods.Likelihood`.
        kind: ``"diag"``, ``"kfac"`` or ``"woodbury"``.
        damping: ``λ > 0``, or a callable ``t -> λ`` of the step index.
        update_every: refresh the curvature every this many steps (``>= 1``).
        ema_decay: ``d`` in ``[0, 1)``.
        labels: ``"empirical"``, ``"mc"`` (one seeded draw per sample) or ``"exact"``.
        kl_clip: ``None`` or a positive trust-region size.
        params: which parameters to precondition (see :func:`natgrad.select_params`).
        warmup_steps: pass-through steps at the start (``>= 0``).
        seed: seed of the generator for ``"mc"`` labels (saved in the state).
        output_fn: maps model outputs to the output tensor (default: tensor or ``.logits``).
        kfac_damping: ``"factored"`` or ``"exact"`` (``kind="kfac"`` only).

    Raises:
        ValueError / TypeError: invalid options (checked before anything else); a model
            that is not an ``nn.Module``.

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
        damping: Damping = 1e-3,
        update_every: int = 1,
        ema_decay: float = 0.95,
        labels: str = "empirical",
        kl_clip: float | None = None,
        params: ParamSpec = None,
        warmup_steps: int = 0,
        seed: int = 0,
        output_fn: OutputFn | None = None,
        kfac_damping: str = "factored",
    ):
        check_model(model, "FisherPreconditioner")
        self.kind = check_choice("kind", kind, KINDS)
        self.labels = check_choice("labels", labels, LABEL_SOURCES)
        if not callable(damping):
            check_positive("damping", damping)
        self.damping = damping
        self.update_every = check_int("update_every", update_every, 1)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 0)
        self.ema_decay = check_fraction("ema_decay", ema_decay)
        self.kl_clip = None if kl_clip is None else check_positive("kl_clip", kl_clip)
        self.kfac_damping = check_choice("kfac_damping", kfac_damping, KFAC_DAMPING)
        self.likelihood = get_likelihood(likelihood)
        self.model = model
        self.params = select_params(model, params)
        self.output_fn = output_fn
        self.generator = torch.Generator().manual_seed(int(seed))
        if self.kind == "kfac":
            self._layers, self._diag_names = kfac_layers(model, self.params)
            logger.info(
                "FisherPreconditioner(kind='kfac'): %d layers in Kronecker form; %d "
                "parameter tensors left diagonal%s",
                len(self._layers), len(self._diag_names),
                f" ({', '.join(self._diag_names)})" if self._diag_names else "",
            )
        else:
            self._layers, self._diag_names = {}, list(self.params) if kind == "diag" else []
        self._step = 0
        self._diag: dict[str, torch.Tensor] = {}
        self._kfac: dict[str, dict[str, torch.Tensor]] = {}  # {layer: {"A", "G"}}
        self._solvers: dict[str, Any] = {}  # derived from _kfac by _kfac_apply; not state
        self._wood: dict[str, torch.Tensor] = {}
        self._wood_n = 0

    # -- damping and schedule -------------------------------------------------------------
    def damping_at(self, step: int) -> float:
        """``λ`` at step ``step`` (validated: finite and > 0)."""
        lam = self.damping(step) if callable(self.damping) else self.damping
        return check_positive(f"damping at step {step}", lam)

    def _refresh_due(self, t: int) -> bool:
        if t < self.warmup_steps:
            return self.kind != "woodbury"
        return (t - self.warmup_steps) % self.update_every == 0

    # -- curvature ---------------------------------------------------------------------------
    def _ema(self, old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
        return new if old is None else self.ema_decay * old + (1 - self.ema_decay) * new

    def _update_curvature(self, batch: Any) -> None:
        check_fixed_model(self.model, f"FisherPreconditioner(kind={self.kind!r})'s refresh")
        common = dict(labels=self.labels, generator=self.generator, output_fn=self.output_fn)
        if self.kind == "woodbury":
            g = per_sample_grads(
                self.model, batch, self.likelihood, params=list(self.params), **common
            )
            rows = torch.cat([_with_label_axis(g[k], p) for k, p in self.params.items()], -1)
            G = to_acc(rows.reshape(-1, rows.shape[-1]))  # (N·K, P)
            self._wood = {"G": G, **gram_eigen(G)}  # raises on NaN/Inf in G
            self._wood_n = rows.shape[0]
            return
        if self._layers:
            factors = kfac_factors(
                self.model,
                batch,
                self.likelihood,
                params=list(self.params),
                layers=self._layers,
                **common,
            )
            for name, f in factors.items():
                for which, M in (("A", f.A), ("G", f.G)):
                    check_finite(f"the K-FAC factor {which} of layer {name!r}", M, _DIVERGED)
                old = self._kfac.get(name, {})
                A, G = self._ema(old.get("A"), f.A), self._ema(old.get("G"), f.G)
                self._kfac[name] = {"A": A, "G": G}
            self._solvers = {}
        if self._diag_names:
            F = estimate_fisher(
                self.model, batch, self.likelihood, params=self._diag_names, **common
            )
            self._diag = {k: self._ema(self._diag.get(k), F[k]) for k in self._diag_names}

    # -- preconditioning ---------------------------------------------------------------------
    def _apply(self, grads: dict[str, torch.Tensor], lam: float) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.kind == "woodbury":
            flat = torch.cat(
                [
                    (grads[k] if k in grads else torch.zeros_like(p)).reshape(-1)
                    for k, p in self.params.items()
                ]
            ).to(self._wood["G"].dtype)
            d = woodbury_solve(self._wood["G"], self._wood, flat, lam, self._wood_n)
            i = 0
            for k, p in self.params.items():
                if k in grads:
                    out[k] = d[i : i + p.numel()].reshape(p.shape)
                i += p.numel()
            return out
        for name, lay in self._layers.items():
            if lay.weight not in grads and (lay.bias is None or lay.bias not in grads):
                continue
            D = self._kfac_apply(name, layer_matrix(lay, grads, self._kfac[name]["A"].dtype), lam)
            for k, v in split_layer_matrix(lay, D).items():
                if k in grads:
                    out[k] = v
        for k in self._diag_names:
            if k in grads:
                g = grads[k]
                out[k] = g.to(self._diag[k].dtype) / (self._diag[k] + lam)
        return out

    def _kfac_apply(self, name: str, V: torch.Tensor, lam: float) -> torch.Tensor:
        """The damped Kronecker solve of one layer, with its factorizations cached until the
        next refresh: eigendecompositions (``"exact"``, any ``λ``) or the two inverses
        ``(G + (√λ/π)I)^-1``, ``(A + π√λ I)^-1`` of the current ``λ`` (``"factored"``)."""
        fac, cached = self._kfac[name], self._solvers.get(name)
        if self.kfac_damping == "exact":
            if cached is None:
                cached = self._solvers[name] = kfac_eigen(fac["A"], fac["G"])
            return kfac_solve(cached, V, lam, "exact")
        if cached is None or cached[0] != lam:
            cached = self._solvers[name] = (lam, *kfac_factored_inverses(fac["A"], fac["G"], lam))
        _, Ginv, Ainv = cached
        return Ginv @ V @ Ainv

    def step(self, batch: Any, *, lr: float | None = None) -> PreconditionStep:
        """Refresh the curvature when due, then rewrite ``.grad`` with ``(F + λI)^-1 g``.

        Call after ``loss.backward()`` and before ``optimizer.step()``.

        Args:
            batch: the batch the gradients came from (``(x, y)``, ``x`` or a dict).
            lr: the optimizer's learning rate; needed only with ``kl_clip``.

        Returns:
            :class:`PreconditionStep` describing the step.

        Raises:
            ValueError: ``kl_clip`` set but ``lr`` missing; invalid damping from a schedule;
                on a refresh, train-mode BatchNorm or dropout (call ``model.eval()``
                before the step) or bad labels (checked on the whole batch).
            FloatingPointError: NaN or Inf in a ``.grad`` (the parameter is named; checked
                before anything changes, warmup included: one sum per gradient and one
                host sync per step).
        """
        if self.kl_clip is not None and lr is None:
            raise ValueError(
                "kl_clip needs the learning rate: call pre.step(batch, lr=optimizer's lr), "
                "or use natgrad.NaturalGradient, which passes it."
            )
        grads = {k: p.grad for k, p in self.params.items() if p.grad is not None}
        check_all_finite(grads, "the gradient (.grad) of parameter", GRAD_HINT)
        t = self._step
        lam = self.damping_at(t)
        updated = self._refresh_due(t)
        if updated:
            self._update_curvature(batch)
        self._step += 1
        if t < self.warmup_steps or not grads or (self.kind == "woodbury" and not self._wood):
            return PreconditionStep(t, lam, updated, False, 1.0)
        deltas = self._apply(grads, lam)
        nu = 1.0
        if self.kl_clip is not None:
            vg = sum(float((deltas[k] * grads[k].to(deltas[k].dtype)).sum()) for k in deltas)
            if vg != 0.0:
                nu = min(1.0, (self.kl_clip / (float(lr) ** 2 * abs(vg))) ** 0.5)
        for k, d in deltas.items():
            self.params[k].grad.copy_(d * nu if nu != 1.0 else d)
        return PreconditionStep(t, lam, updated, True, nu)

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values: step count, generator state and the curvature."""
        return {
            "kind": self.kind,
            "step": self._step,
            "generator": self.generator.get_state(),
            "diag": {k: v.clone() for k, v in self._diag.items()},
            "kfac": {n: {k: v.clone() for k, v in d.items()} for n, d in self._kfac.items()},
            "woodbury": {k: v.clone() for k, v in self._wood.items()},
            "woodbury_n": self._wood_n,
        }

    def check_state_dict(self, state: Mapping[str, Any]) -> None:
        """Raise unless ``state`` (from :meth:`state_dict`) fits this preconditioner.

        Checks the kind; the diagonal curvature's names, shapes and values (finite, ``>= 0``);
        every K-FAC layer's factors ``A`` ``(d_in[+1])²`` and ``G`` ``d_out²`` (all layers or
        none, finite); the Woodbury rows (one column per selected entry), eigenpairs and
        sample count; the generator state. Changes nothing.

        Raises:
            ValueError: not a state_dict of this kind, or curvature of another model or
                parameter selection (every mismatched name is listed).
            FloatingPointError: NaN or Inf in the curvature (named).
        """
        keys = ("kind", "step", "generator", "diag", "kfac", "woodbury", "woodbury_n")
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
        diag = state["diag"]
        if diag:
            ref = {k: self.params[k] for k in self._diag_names}
            check_same_structure(ref, diag, "this preconditioner's parameters", "the state_dict")
            check_fisher_values(diag, "the state_dict's diagonal curvature")
        if state["kfac"]:
            want = {}
            for name, lay in self._layers.items():
                w = lay.module.weight
                d_in = w[0].numel() + (lay.bias is not None)
                want[f"{name}.A"], want[f"{name}.G"] = (d_in, d_in), (w.shape[0], w.shape[0])
            got = {f"{n}.{k}": v for n, d in state["kfac"].items() for k, v in d.items()}
            check_same_structure(
                want, got, "this preconditioner's K-FAC factors", "the state_dict's"
            )
            check_all_finite(got, "the state_dict's K-FAC factor", "The saved run diverged.")
        wood = state["woodbury"]
        if wood:
            P = sum(p.numel() for p in self.params.values())
            G, U, S, n = wood.get("G"), wood.get("U"), wood.get("S"), state["woodbury_n"]
            if G is None or U is None or S is None:
                raise ValueError(
                    "The state_dict's Woodbury state is corrupt: it needs 'G', 'U' and 'S', "
                    f"got {sorted(wood)}."
                )
            if G.dim() != 2 or G.shape[1] != P:
                raise ValueError(
                    f"The state_dict's Woodbury gradients have shape {tuple(G.shape)}: "
                    f"{G.shape[-1]} columns, but the selected parameters have {P} entries; "
                    "use the same model and params."
                )
            R = G.shape[0]
            if U.dim() != 2 or U.shape[0] != R or tuple(S.shape) != (U.shape[1],):
                raise ValueError(
                    f"The state_dict's Woodbury state is corrupt: {R} gradient rows, "
                    f"eigenvectors {tuple(U.shape)} and eigenvalues {tuple(S.shape)} do not "
                    "fit together (expected (R, r) and (r,)); save it again."
                )
            if int(n) < 1 or R % int(n):
                raise ValueError(
                    f"The state_dict's Woodbury state is corrupt: woodbury_n={n} does not "
                    f"divide its {R} gradient rows; save it again."
                )
            check_all_finite(
                {"G": G, "U": U, "S": S}, "the state_dict's Woodbury", "The saved run diverged."
            )
        try:
            torch.Generator().set_state(state["generator"])
        except (TypeError, RuntimeError) as exc:
            raise ValueError(f"The state_dict's generator state is corrupt: {exc}") from None

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (same kind, parameters and shapes).

        Everything is checked first (:meth:`check_state_dict`); nothing changes when that
        raises.

        Raises:
            ValueError: another kind, or curvature for other parameters, layers or shapes.
            FloatingPointError: NaN or Inf in the curvature.
        """
        self.check_state_dict(state)
        self._step = int(state["step"])
        self.generator.set_state(state["generator"].clone())
        self._diag = {k: v.clone() for k, v in state["diag"].items()}
        self._kfac = {n: {k: d[k].clone() for k in ("A", "G")} for n, d in state["kfac"].items()}
        self._solvers = {}
        self._wood = {k: v.clone() for k, v in state["woodbury"].items()}
        self._wood_n = int(state["woodbury_n"])

    def __repr__(self) -> str:
        return (
            f"FisherPreconditioner(kind={self.kind!r}, likelihood={self.likelihood!r}, "
            f"labels={self.labels!r}, params={len(self.params)}, step={self._step})"
        )


def _with_label_axis(g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Per-sample gradients as ``(N, K, numel)`` (``K`` label columns per sample)."""
    if g.dim() == p.dim() + 1:
        return g.reshape(g.shape[0], 1, -1)
    return g.reshape(g.shape[0], g.shape[1], -1)
