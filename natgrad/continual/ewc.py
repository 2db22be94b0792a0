"""``EWC``: the elastic-weight-consolidation penalty, a forgetting regularizer for any loss.

For stored tasks ``t`` with diagonal Fisher ``F_t`` (the per-sample mean of docs/design.md)
and anchor ``θ*_t`` (the parameters after training on ``t``), the penalty is

    ``Ω(θ) = Σ_t (λ/2) Σ_i F_t,i (θ_i - θ*_t,i)²``          (``mode="separate"``)

Online EWC keeps one Fisher and one anchor: at each consolidation
``F ← γ F + F_new`` and ``θ* ← θ_new`` (the newest anchor), and
``Ω(θ) = (λ/2) Σ_i F_i (θ_i - θ*_i)²``. The tasks' curvatures may cover different
parameters (task-incremental learning adds a head per task, and each task's curvature
covers the shared body and its own head): the fold is over the union of the names, each
curvature being zero on the parameters it does not cover, so a parameter only the new
curvature covers enters with ``F_new`` alone (anchored at its current value), and one
only the folded curvature covers keeps ``γ F_old`` (anchored at its current value when
no anchor is given, else at its previous anchor).

Any curvature (Kronecker, low-rank, ...): pass a :class:`natgrad.Curvature` instead of
a diagonal Fisher and each term is ``(λ/2) quad_t(θ - θ*_t)``, computed by the curvature
itself (for Kronecker ``Σ_layers ⟨ΔW, G ΔW A⟩`` from the factors, never a ``P x P``
matrix). Online mode folds curvatures with the protocol's arithmetic,
``F ← γ F + F_new = (1 + γ) · F.ema_union(F_new, d)`` with ``d = γ / (1 + γ)``: exact for
diagonal and low-rank curvatures (a low-rank fold stacks both row sets, zero-padded to
the union of the parameters; a curvature built with ``rank=k`` then keeps its top ``k``
eigenpairs, which truncates the fold); for Kronecker curvatures ``ema`` averages the factors
``A`` and ``G`` separately, so a layer both tasks cover folds to
``(1 + γ) (d A₁ + (1-d) A₂) ⊗ (d G₁ + (1-d) G₂)``, an approximation of
``γ A₁⊗G₁ + A₂⊗G₂`` (exact when the tasks share a factor; ``c · F`` scales ``G``, so a
folded layer's factors are ``(d A₁ + (1-d) A₂, (1 + γ)(d G₁ + (1-d) G₂))``; EKFAC re-fits
its eigenvalues ``s`` in the eigenbasis of those factors, from both tasks' blocks). A
layer one task covers alone is carried exactly: ``γ A₁⊗G₁`` (the old one) or
``A₂⊗G₂`` (the new one).

Choosing λ without a search (``lam_scale=s``): each term gets
``λ_t = s · N_t · P_t / tr F_t`` (``N_t`` the samples its curvature averages, ``P_t`` the
parameters it covers), i.e. the penalty is ``(s/2) N_t Δᵀ F̂_t Δ`` with ``F̂ = F / mean(diag F)``
the trace-normalised curvature. Online, ``N`` and ``F`` are the same decayed accumulation:
the fold ``F ← γ F + F_new`` comes with ``N ← γ N + N_new``, so the term is
``(s/2) (γ N_old + N_new) Δᵀ F̂ Δ`` for the folded ``F̂``; with ``γ = 1`` that is the
separate terms' total when the tasks' Fishers agree, and with ``γ = 0`` only the newest
task counts, in ``N`` as in ``F`` (the curvature's own ``n_samples`` still counts every
sample seen). ``P_t`` counts every covered parameter, those whose Fisher is zero
included: ``mean(diag F)`` is then a continuous function of the Fisher (a parameter
whose Fisher moves from 0 to 10⁻³⁰ does not change ``P``), and what counts is what the
curvature covers, which ``params=`` at estimation controls: leave out what the task does
not train (e.g. other tasks' heads), or ``P`` counts it. ``N_t Δᵀ F Δ`` is the Laplace posterior of task ``t``
(its ``N_t`` samples each add ``F``); dividing by the mean diagonal removes the Fisher's
loss scale (empirical Fishers of a well-fit model are tiny, ``exact``/``mc`` ones are not),
so ``s`` follows a change of label source or fit where a fixed ``λ`` does not. Numbers:
a task of ``N = 1000`` samples whose Fisher covers ``P = 10⁴`` parameters with trace
``tr F = 2`` gets ``λ = s · 1000 · 10⁴ / 2 = 5·10⁶ s``; the same task with ``tr F = 200``
(exact labels) gets ``λ = 5·10⁴ s``. :meth:`EWC.suggest_lambda` returns that number.
It does not see the number of tasks or the head structure: on five-task Split MNIST-1D
the best ``s`` ranged from about 5·10⁻⁸ to 5·10⁻⁵ (domain- vs task-incremental, docs
"Choosing λ and damping"), so use it to centre a validation grid, not instead of one.

Parameters absent at consolidation time (a head added later) or not covered by the
Fisher are left out of that task's term. Names are matched as in ``model.named_parameters()``;
a pruned parameter (``weight_orig`` from ``torch.nn.utils.prune``) is matched to a
Fisher or anchor entry named ``weight`` and vice versa. Online mode with diagonal
Fishers given as mappings folds a weight pruned between two tasks into one entry (the
same tensor); with :class:`natgrad.Curvature` terms it refuses such a rename, naming it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import nn

from natgrad.curvature.diagonal import check_fisher
from natgrad.curvature.protocol import Curvature, curvature_class, state_tensors
from natgrad.engine.checks import (
    check_all_finite,
    check_choice,
    check_finite,
    check_fisher_type,
    check_fisher_values,
    check_fraction,
    check_model,
    check_positive,
    check_same_structure,
)
from natgrad.engine.common import acc_dtype, with_autograd

__all__ = ["EWC"]

_MODES = ("separate", "online")
_ORIG = "_orig"


_ANCHOR_HINT = (
    "An anchor is the parameters after training a task; NaN/Inf there means that run "
    "diverged. Consolidate finite parameters (restore a finite checkpoint)."
)
_WEIGHT_HINT = (
    "The model being penalized has diverged: check the loss, lower the learning rate, or "
    "clip gradients (torch.nn.utils.clip_grad_norm_)."
)


def _model_view(
    names: Mapping[str, Any], named: Mapping[str, nn.Parameter]
) -> dict[str, nn.Parameter]:
    """``{stored name: the model's parameter}`` for the names the model has (pruned twins
    resolved); names it lacks are left out, so a structure check lists them."""
    out = {}
    for k in names:
        target = _resolve(k, named)
        if target is not None:
            out[k] = named[target]
    return out


def _resolve(name: str, named: Mapping[str, nn.Parameter]) -> str | None:
    """The model's name for a stored entry: itself, its ``_orig`` twin (pruning), or None."""
    if name in named:
        return name
    if name + _ORIG in named:
        return name + _ORIG
    if name.endswith(_ORIG) and name[: -len(_ORIG)] in named:
        return name[: -len(_ORIG)]
    return None


def _resolved(name: str, named: Mapping[str, nn.Parameter]) -> str:
    """:func:`_resolve` for a name already checked to be in the model (KeyError if not)."""
    target = _resolve(name, named)
    if target is None:
        raise KeyError(name)
    return target


class EWC:
    """Elastic weight consolidation: ``(λ/2) Σ_t Σ_i F_t,i (θ_i - θ*_t,i)²`` added to a loss.

    The first task is consolidated at construction (when ``fisher`` is given), with the
    model's current parameters as anchor. Call :meth:`consolidate` after each later task.
    Anchors are detached copies (never aliases of the live parameters); Fisher values
    are stored on each parameter's device in float32 (float64 models: float64), and a
    :class:`natgrad.Curvature` as a copy, so changing the object passed later (in place,
    e.g. ``ema_``) leaves the consolidated task as it was.

    Args:
        model: the model being trained; used for names, devices and default anchors.
        fisher: the first task's Fisher (a :class:`natgrad.DiagonalFisher`, any
            ``{name: tensor}`` of non-negative values, or any :class:`natgrad.Curvature`
            such as a Kronecker one), or None to start empty.
        lam: ``λ >= 0``, the penalty strength.
        mode: ``"separate"`` (one term per task) or ``"online"`` (``F ← γF + F_new``,
            newest anchor).
        gamma: ``γ`` in ``[0, 1]``, the decay of the online Fisher (ignored when separate).
        anchor: ``{name: tensor}`` for the first task (default: the model's parameters).
        lam_scale: ``s > 0``: ignore ``lam`` and weigh each term by
            ``λ_t = s · N_t · P_t / tr F_t`` (see the module docstring; online,
            ``N_t = γ N_old + N_new`` decays with the Fisher); needs curvatures that know
            ``n_samples``.

    Raises:
        ValueError: unknown mode, ``lam < 0``, ``gamma`` outside ``[0, 1]``, a Fisher or
            anchor entry the model lacks, or shapes that differ from the model's.
        FloatingPointError: NaN or Inf in the Fisher.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> ewc = EWC(model, {"weight": torch.tensor([[1.0, 4.0]])}, lam=2.0)
        >>> with torch.no_grad():
        ...     _ = model.weight.add_(1.0)
        >>> round(ewc.penalty(model).item(), 4)  # (2/2) * (1 * 1² + 4 * 1²)
        5.0
    """

    def __init__(
        self,
        model: nn.Module,
        fisher: Mapping[str, torch.Tensor] | Curvature | None = None,
        lam: float = 1.0,
        *,
        mode: Literal["separate", "online"] = "separate",
        gamma: float = 1.0,
        anchor: Mapping[str, torch.Tensor] | None = None,
        lam_scale: float | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        self.model = check_model(model, "EWC")
        self.lam = check_positive("lam", lam, allow_zero=True)
        self.mode = check_choice("mode", mode, _MODES)
        self.gamma = check_fraction("gamma", gamma, closed=True)
        self._tasks: list[dict[str, dict[str, torch.Tensor]]] = []
        self._consolidations = 0
        self.lam_scale = (
            None if lam_scale is None else check_positive("lam_scale", lam_scale)
        )
        self._curv_terms: list[dict[str, Any]] = []
        if fisher is not None:
            self.consolidate(fisher, anchor)
        elif anchor is not None:
            raise ValueError("An anchor was given without a Fisher: pass fisher=... as well.")

    # -- consolidation ---------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        """How many tasks have been consolidated (online mode folds them into one term)."""
        return self._consolidations

    @property
    def names(self) -> list[str]:
        """The parameter names the penalty covers (union over stored terms)."""
        seen: dict[str, None] = {}
        for t in self._tasks:
            seen.update(dict.fromkeys(t["fisher"]))
        for t in self._curv_terms:
            seen.update(dict.fromkeys(t["anchor"]))
        return list(seen)

    @with_autograd  # its copies must be ordinary tensors: the penalty is differentiated
    def consolidate(
        self,
        fisher: Mapping[str, torch.Tensor] | Curvature,
        anchor: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Add a task: store ``F_new`` and the anchor ``θ*`` (default: current parameters).

        ``separate``: appends a term. ``online``: ``F ← γF + F_new`` (names only in the
        old Fisher get ``γF``, names only in the new one get ``F_new``), and the anchor
        becomes the newest one for every covered name. A structured
        :class:`natgrad.Curvature` (or any curvature when ``lam_scale`` is set) is stored
        whole and folded online as ``(1 + γ) · F.ema_union(F_new, γ / (1 + γ))`` over the
        union of both's parameters (module docstring).

        Args:
            fisher: ``{name: tensor}`` (e.g. a :class:`natgrad.DiagonalFisher`); names must
                be parameters of the model, with the same shapes.
            anchor: ``{name: tensor}`` of anchor values; names it lacks take the model's
                current values. Stored as detached copies.

        Raises:
            TypeError: ``fisher`` is not a mapping of tensors (e.g. a list of Fishers).
            ValueError: names the model lacks, shape mismatches, negative Fisher values.
            FloatingPointError: NaN or Inf in the Fisher.
        """
        if isinstance(fisher, Curvature) and (
            self.lam_scale is not None or not isinstance(fisher, Mapping)
        ):
            self._consolidate_curvature(fisher, anchor)
            return
        if self.lam_scale is not None:
            raise ValueError(
                "lam_scale needs the number of samples of each curvature: pass a "
                "natgrad.DiagonalFisher (or another natgrad.Curvature), not a plain dict."
            )
        if self._curv_terms:
            raise ValueError(
                "This EWC holds structured curvatures; consolidate every task with a "
                "natgrad.Curvature (wrap diagonal values as natgrad.DiagonalFisher(values, n))."
            )
        check_fisher_type(fisher)
        named = dict(self.model.named_parameters())
        fisher = {k: torch.as_tensor(v).detach() for k, v in fisher.items()}
        unknown = [k for k in fisher if _resolve(k, named) is None]
        if unknown:
            raise ValueError(
                f"The Fisher has parameters the model lacks: {unknown[:8]}; the model has "
                f"{list(named)[:8]}. Estimate the Fisher on this model, or drop those entries."
            )
        check_same_structure(fisher, _model_view(fisher, named), "the Fisher", "the model")
        check_fisher(fisher)
        new_f: dict[str, torch.Tensor] = {}
        new_a: dict[str, torch.Tensor] = {}
        for k, v in fisher.items():
            target = _resolved(k, named)
            p = named[target]
            new_f[target] = v.to(device=p.device, dtype=acc_dtype(p.dtype)).clone()
            a = None if anchor is None else anchor.get(k, anchor.get(target))
            src = p if a is None else torch.as_tensor(a)
            if tuple(src.shape) != tuple(p.shape):
                raise ValueError(
                    f"Anchor entry for {k!r} has shape {tuple(src.shape)} but the parameter "
                    f"has {tuple(p.shape)}."
                )
            new_a[target] = src.detach().to(device=p.device, dtype=p.dtype).clone()
        check_all_finite(new_a, "the EWC anchor of parameter", _ANCHOR_HINT)
        if self.mode == "separate" or not self._tasks:
            self._tasks.append({"fisher": new_f, "anchor": new_a})
        else:
            old = self._tasks[0]
            # the folded entries under the model's names now: a weight pruned since
            # (``w`` -> ``w_orig``) is the same tensor and folds into one entry
            old_key = {k: _resolve(k, named) or k for k in old["fisher"]}
            merged_f = {old_key[k]: self.gamma * v for k, v in old["fisher"].items()}
            old_a = {old_key.get(k, k): v for k, v in old["anchor"].items()}
            for k, v in new_f.items():
                merged_f[k] = merged_f[k] + v if k in merged_f else v
            merged_a = {}
            for k in merged_f:
                if k in new_a:
                    merged_a[k] = new_a[k]
                elif anchor is None and k in named:
                    merged_a[k] = named[k].detach().clone()
                else:
                    merged_a[k] = old_a[k]
            self._tasks = [{"fisher": merged_f, "anchor": merged_a}]
        self._consolidations += 1

    # -- penalty -----------------------------------------------------------------------
    def penalty(self, model: nn.Module | None = None) -> torch.Tensor:
        """``(λ/2) Σ_t Σ_i F_t,i (θ_i - θ*_t,i)²``, differentiable in the model's parameters.

        Its gradient is ``λ Σ_t F_t (θ - θ*_t)``. Accumulated in float32 (float64 for
        float64 models) on the model's device.

        Args:
            model: the model to penalize (default: the one given at construction); it
                must hold every stored name (parameters added later are ignored).

        Returns:
            A 0-dim tensor; zero when nothing has been consolidated.

        Raises:
            ValueError: ``model`` lacks stored parameters or shapes them differently (every
                such name is listed).
            FloatingPointError: the penalty is NaN/Inf; names the parameter whose current
                values are not finite (one host sync per call, to check the total).
        """
        model = self.model if model is None else model
        named = dict(model.named_parameters())
        for t in self._tasks:
            check_same_structure(
                t["fisher"],
                _model_view(t["fisher"], named),
                "EWC's consolidated parameters",
                "the model",
            )
        total = None
        for t in self._tasks:
            for k, f in t["fisher"].items():
                p = named[_resolved(k, named)]
                acc = acc_dtype(p.dtype)
                d = p.to(acc) - t["anchor"][k].to(device=p.device, dtype=acc)
                term = (f.to(device=p.device, dtype=acc) * d * d).sum()
                total = term if total is None else total + term
        if total is not None:
            total = total * (0.5 * self.lam)
        for t in self._curv_terms:
            term = self._curvature_term(t, named)
            total = term if total is None else total + term
        if total is None:
            first = next(iter(named.values()), None)
            dev = first.device if first is not None else None
            dt = acc_dtype(first.dtype) if first is not None else torch.float32
            return torch.zeros((), device=dev, dtype=dt)
        if not bool(torch.isfinite(total)):
            # Fisher and anchors are checked when stored, so the model's values are at fault
            check_all_finite(
                {k: named[_resolved(k, named)] for k in self.names},
                "the current value of parameter",
                _WEIGHT_HINT,
            )
            raise FloatingPointError(
                f"The EWC penalty overflowed to {float(total)} (finite weights, Fisher and "
                "anchors): the model is far from its anchors; lower lam or check the run."
            )
        return total

    __call__ = penalty

    # -- any curvature -------------------------------------------------------------------
    @staticmethod
    def suggest_lambda(
        curvature: Curvature, lam_scale: float = 1.0, *, n_samples: float | None = None
    ) -> float:
        """The scale-free strength ``λ = s · N · P / tr F`` for ``curvature`` (``s = lam_scale``).

        ``N = curvature.n_samples``, ``P`` the number of covered parameters (zero-Fisher
        ones included) and ``tr F = Σ diag F``; see the module docstring for why and for
        numbers.

        Args:
            curvature: the task's :class:`natgrad.Curvature`.
            lam_scale: ``s > 0``.
            n_samples: ``N`` when it is not ``curvature.n_samples`` (online EWC passes its
                decayed count ``γ N_old + N_new``).

        Raises:
            ValueError: ``N`` is not positive or the trace is zero.

        Example:
            >>> import torch, natgrad
            >>> F = natgrad.DiagonalFisher({"w": torch.tensor([1.0, 3.0])}, n_samples=10)
            >>> EWC.suggest_lambda(F, lam_scale=0.5)  # 0.5 * 10 * 2 / 4
            2.5
        """
        s = check_positive("lam_scale", lam_scale)
        if not isinstance(curvature, Curvature):
            raise TypeError(
                f"suggest_lambda needs a natgrad.Curvature, got {type(curvature).__name__}; "
                "wrap diagonal values as natgrad.DiagonalFisher(values, n_samples)."
            )
        diag = curvature.diagonal()
        trace = sum(float(v.double().sum()) for v in diag.values())
        p = sum(v.numel() for v in diag.values())
        n = float(curvature.n_samples if n_samples is None else n_samples)
        if not n > 0 or not trace > 0:
            raise ValueError(
                f"Cannot scale λ by this curvature: n_samples={n:g}, trace={trace:g}; it must "
                "average at least one sample and have a positive trace."
            )
        return s * n * p / trace

    def _consolidate_curvature(
        self, curvature: Curvature, anchor: Mapping[str, torch.Tensor] | None
    ) -> None:
        """Store a structured term ``(curvature, anchor, λ_t)``; fold it in online mode."""
        if self._tasks:
            raise ValueError(
                "This EWC holds diagonal Fishers given as plain dicts; consolidate every task "
                "the same way, or pass natgrad.Curvature objects for all of them."
            )
        named = dict(self.model.named_parameters())
        targets = _curvature_targets(curvature, named, "the curvature")
        new_a = {}
        for k, target in targets.items():
            p = named[target]
            a = None if anchor is None else anchor.get(k, anchor.get(target))
            src = p if a is None else torch.as_tensor(a)
            if tuple(src.shape) != tuple(p.shape):
                raise ValueError(
                    f"Anchor entry for {k!r} has shape {tuple(src.shape)} but the parameter "
                    f"has {tuple(p.shape)}."
                )
            new_a[k] = src.detach().to(device=p.device, dtype=p.dtype).clone()
        check_all_finite(new_a, "the EWC anchor of parameter", _ANCHOR_HINT)
        if self.mode == "online" and self._curv_terms:
            old = self._curv_terms[0]
            old_kind = getattr(old["curvature"], "kind", "")
            if type(old["curvature"]) is not type(curvature) or old_kind != curvature.kind:
                raise ValueError(
                    "Online EWC folds curvatures of one kind; got "
                    f"{type(curvature).__name__} ({curvature.kind!r}) after "
                    f"{type(old['curvature']).__name__} ({old_kind!r}). "
                    "Use mode='separate' or estimate every task's curvature the same way."
                )
            old_of = {_resolve(k, named): k for k in old["curvature"].names()}
            renamed = [(old_of[t], j) for j in curvature.names()
                       for t in (_resolve(j, named),) if t is not None and old_of.get(t, j) != j]
            if renamed:  # pruned between the tasks: w and w_orig would be two parameters
                raise ValueError(
                    f"Online EWC: the new curvature names {renamed[0][1]!r} where the folded "
                    f"one names {renamed[0][0]!r}, the same parameter (torch.nn.utils.prune "
                    "renames a pruned weight to <name>_orig); folding them would count it "
                    "twice. Estimate every task's curvature with the same pruning state "
                    "(natgrad.make_permanent(model) before estimating), or use "
                    "mode='separate'."
                )
            g = self.gamma
            # over the union of the names: a late head enters with F_new alone, a name the
            # new task lacks keeps γ F_old (module docstring)
            folded = (1.0 + g) * old["curvature"].ema_union(curvature, g / (1.0 + g))
            n = g * old["n"] + curvature.n_samples  # decayed as F is (module docstring)
            for k, a_old in old["anchor"].items():  # names only the old term covers
                resolved = _resolve(k, named)
                if k in new_a:
                    continue
                if anchor is None and resolved is not None:  # the newest parameters
                    new_a[k] = named[resolved].detach().clone()
                else:  # an explicit anchor for the new task only: theirs stays
                    new_a[k] = a_old
            self._curv_terms = [self._term(folded, {k: new_a[k] for k in folded.names()}, n)]
        else:
            # a snapshot: the caller may go on updating its curvature in place (ema_, ...)
            snapshot = copy.deepcopy(curvature)
            self._curv_terms.append(self._term(snapshot, new_a, curvature.n_samples))
        self._consolidations += 1

    def _term(
        self, curvature: Curvature, anchor: dict[str, torch.Tensor], n: float
    ) -> dict[str, Any]:
        """A stored term; ``n`` is the sample count its ``λ`` scales by (online: decayed)."""
        lam = None
        if self.lam_scale is not None:
            lam = self.suggest_lambda(curvature, self.lam_scale, n_samples=n)
        return {"curvature": curvature, "anchor": anchor, "lam": lam, "n": float(n)}

    def _curvature_term(
        self, t: dict[str, Any], named: Mapping[str, nn.Parameter]
    ) -> torch.Tensor:
        """``(λ_t/2) Δᵀ F_t Δ`` (``Δ = θ - θ*_t``) with ``λ_t`` the term's own or ``self.lam``.

        Written ``λ_t (Δ·sg(FΔ) - ½ sg(Δ·FΔ))`` (``sg``: no gradient): the value is
        ``(λ_t/2) quad_t(Δ)`` and the gradient ``λ_t F_t Δ``; per layer from the factors
        for a Kronecker curvature (its ``mv`` is ``G V A``), never a ``P x P`` matrix.
        """
        diff = {}
        for k, a in t["anchor"].items():
            target = _resolve(k, named)
            if target is None:
                raise ValueError(
                    f"EWC covers parameter {k!r}, which this model lacks; the model has "
                    f"{list(named)[:8]}. Penalize the model that was consolidated."
                )
            p = named[target]
            acc = acc_dtype(p.dtype)
            diff[k] = p.to(acc) - a.to(device=p.device, dtype=acc)
        lam = self.lam if t["lam"] is None else t["lam"]
        # value (λ/2) Δᵀ F Δ and gradient λ F Δ from one product F Δ, without relying on
        # autograd through the curvature's internals (a structured mv may detach inputs)
        with torch.no_grad():
            fd = t["curvature"].mv({k: v.detach() for k, v in diff.items()})
        lin: torch.Tensor = sum((diff[k] * fd[k].to(diff[k])).sum() for k in diff)
        return (lin - 0.5 * lin.detach()) * lam

    # -- state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only; :meth:`load_state_dict` restores it exactly."""
        return {
            "lam": self.lam,
            "mode": self.mode,
            "gamma": self.gamma,
            "num_tasks": self._consolidations,
            "terms": [
                {
                    "fisher": {k: v.clone() for k, v in t["fisher"].items()},
                    "anchor": {k: v.clone() for k, v in t["anchor"].items()},
                }
                for t in self._tasks
            ],
            "lam_scale": self.lam_scale,
            "curvature_terms": [
                {
                    "kind": t["curvature"].kind,
                    "curvature": t["curvature"].state_dict(),
                    "anchor": {k: v.clone() for k, v in t["anchor"].items()},
                    "lam": t["lam"],
                    "n": t["n"],
                }
                for t in self._curv_terms
            ],
        }

    @with_autograd
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace this EWC's settings and stored tasks with those of ``state``.

        Everything is checked before anything is replaced: names and shapes of every
        term's Fisher and anchor against the model, and their values.

        Raises:
            ValueError: not an EWC state_dict; a term's Fisher or anchor names parameters
                the model lacks or shapes them differently (each listed); negative Fisher
                values; invalid settings.
            FloatingPointError: NaN or Inf in a stored Fisher or anchor (named).
        """
        if not isinstance(state, Mapping) or "terms" not in state:
            raise ValueError(
                "Not an EWC state_dict: expected a dict with 'terms' (from EWC.state_dict())."
            )
        lam = check_positive("lam", state.get("lam", self.lam), allow_zero=True)
        mode = check_choice("mode", state.get("mode", self.mode), _MODES)
        gamma = check_fraction("gamma", state.get("gamma", self.gamma), closed=True)
        named = dict(self.model.named_parameters())
        terms = []
        for i, t in enumerate(state["terms"]):
            f, a = dict(t["fisher"]), dict(t["anchor"])
            if set(f) != set(a):
                raise ValueError(
                    f"Corrupt EWC state_dict: term {i}'s Fisher and anchor names differ "
                    f"({sorted(set(f) ^ set(a))[:8]})."
                )
            what = f"the EWC state_dict's term {i}"
            check_same_structure(f, _model_view(f, named), f"{what} Fisher", "the model")
            check_same_structure(a, _model_view(a, named), f"{what} anchor", "the model")
            check_fisher_values(f, f"{what} Fisher")
            check_all_finite(a, f"{what} anchor of parameter", _ANCHOR_HINT)
            terms.append(
                {
                    "fisher": {k: v.detach().clone() for k, v in f.items()},
                    "anchor": {k: v.detach().clone() for k, v in a.items()},
                }
            )
        curv_terms = []
        for i, t in enumerate(state.get("curvature_terms", [])):
            what = f"the EWC state_dict's curvature term {i}"
            for path, v in state_tensors(t["curvature"]):
                check_finite(f"{what}'s {path}", v,
                             "The state is damaged: load one saved from a healthy run.")
            cls = curvature_class(t["kind"])
            curv = cls.from_state_dict(t["curvature"])
            _curvature_targets(curv, named, what)
            for k in t["anchor"]:
                target = _resolve(k, named)
                if target is None or tuple(t["anchor"][k].shape) != tuple(named[target].shape):
                    raise ValueError(
                        f"The EWC state_dict covers {k!r}, which this model lacks or shapes "
                        "differently; load it into an EWC built on the same architecture."
                    )
            anchor = {k: v.detach().clone() for k, v in t["anchor"].items()}
            n = float(t.get("n", curv.n_samples))  # states saved before "n": undecayed
            curv_terms.append({"curvature": curv, "anchor": anchor, "lam": t.get("lam"), "n": n})
        scale = state.get("lam_scale")
        lam_scale = None if scale is None else check_positive("lam_scale", scale)
        self.lam, self.mode, self.gamma, self.lam_scale = lam, mode, gamma, lam_scale
        self._curv_terms = curv_terms
        self._tasks = terms
        self._consolidations = int(state.get("num_tasks", len(terms)))

    def __repr__(self) -> str:
        return (
            f"EWC(mode={self.mode!r}, lam={self.lam}, gamma={self.gamma}, "
            f"tasks={self._consolidations}, params={len(self.names)})"
        )


def _curvature_targets(
    curvature: Curvature, named: Mapping[str, nn.Parameter], what: str
) -> dict[str, str]:
    """``{curvature name: model parameter name}``: every name the curvature covers is a
    parameter of the model (``w`` or its pruned ``w_orig``), of the same shape, with a
    finite diagonal; else a named error."""
    diag = curvature.diagonal()
    targets = {}
    for k in curvature.names():
        target = _resolve(k, named)
        if target is None:
            raise ValueError(
                f"{what[:1].upper()}{what[1:]} covers parameter {k!r}, which the model lacks; the model has "
                f"{list(named)[:8]}. Estimate the curvature on this model."
            )
        if tuple(diag[k].shape) != tuple(named[target].shape):
            raise ValueError(
                f"{what[:1].upper()}{what[1:]}'s entry {k!r} has shape {tuple(diag[k].shape)} but the parameter "
                f"has {tuple(named[target].shape)}. Estimate it on this model."
            )
        check_finite(f"{what}'s diagonal of {k!r}", diag[k])
        targets[k] = target
    return targets
