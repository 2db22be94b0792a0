"""``EWC``: the elastic-weight-consolidation penalty, a forgetting regularizer for any loss.

For stored tasks ``t`` with diagonal Fisher ``F_t`` (the per-sample mean of docs/design.md)
and anchor ``θ*_t`` (the parameters after training on ``t``), the penalty is

    ``Ω(θ) = Σ_t (λ/2) Σ_i F_t,i (θ_i - θ*_t,i)²``          (``mode="separate"``)

Online EWC keeps one Fisher and one anchor: at each consolidation
``F ← γ F + F_new`` and ``θ* ← θ_new`` (the newest anchor), and
``Ω(θ) = (λ/2) Σ_i F_i (θ_i - θ*_i)²``.

Parameters absent at consolidation time (a head added later) or not covered by the
Fisher are left out of the penalty. Names are matched as in ``model.named_parameters()``;
a pruned parameter (``weight_orig`` from ``torch.nn.utils.prune``) is matched to a
Fisher or anchor entry named ``weight`` and vice versa.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import nn

from natgrad.curvature.diagonal import check_fisher
from natgrad.engine.checks import (
    check_all_finite,
    check_choice,
    check_fisher_type,
    check_fisher_values,
    check_fraction,
    check_model,
    check_positive,
    check_same_structure,
)
from natgrad.engine.common import acc_dtype

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


class EWC:
    """Elastic weight consolidation: ``(λ/2) Σ_t Σ_i F_t,i (θ_i - θ*_t,i)²`` added to a loss.

    The first task is consolidated at construction (when ``fisher`` is given), with the
    model's current parameters as anchor. Call :meth:`consolidate` after each later task.
    Anchors are detached copies (never aliases of the live parameters); Fisher values
    are stored on each parameter's device in float32 (float64 models: float64).

    Args:
        model: the model being trained; used for names, devices and default anchors.
        fisher: the first task's Fisher (a :class:`natgrad.DiagonalFisher` or any
            ``{name: tensor}`` of non-negative values), or None to start empty.
        lam: ``λ >= 0``, the penalty strength.
        mode: ``"separate"`` (one term per task) or ``"online"`` (``F ← γF + F_new``,
            newest anchor).
        gamma: ``γ`` in ``[0, 1]``, the decay of the online Fisher (ignored when separate).
        anchor: ``{name: tensor}`` for the first task (default: the model's parameters).

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
        fisher: Mapping[str, torch.Tensor] | None = None,
        lam: float = 1.0,
        *,
        mode: Literal["separate", "online"] = "separate",
        gamma: float = 1.0,
        anchor: Mapping[str, torch.Tensor] | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        self.model = check_model(model, "EWC")
        self.lam = check_positive("lam", lam, allow_zero=True)
        self.mode = check_choice("mode", mode, _MODES)
        self.gamma = check_fraction("gamma", gamma, closed=True)
        self._tasks: list[dict[str, dict[str, torch.Tensor]]] = []
        self._consolidations = 0
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
        return list(seen)

    def consolidate(
        self,
        fisher: Mapping[str, torch.Tensor],
        anchor: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Add a task: store ``F_new`` and the anchor ``θ*`` (default: current parameters).

        ``separate``: appends a term. ``online``: ``F ← γF + F_new`` (names only in the
        old Fisher get ``γF``, names only in the new one get ``F_new``), and the anchor
        becomes the newest one for every covered name.

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
        new_f, new_a = {}, {}
        for k, v in fisher.items():
            target = _resolve(k, named)
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
            merged_f = {k: self.gamma * v for k, v in old["fisher"].items()}
            for k, v in new_f.items():
                merged_f[k] = merged_f[k] + v if k in merged_f else v
            merged_a = {}
            for k in merged_f:
                if k in new_a:
                    merged_a[k] = new_a[k]
                elif anchor is None and k in named:
                    merged_a[k] = named[k].detach().clone()
                else:
                    merged_a[k] = old["anchor"][k]
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
                p = named[_resolve(k, named)]
                acc = acc_dtype(p.dtype)
                d = p.to(acc) - t["anchor"][k].to(device=p.device, dtype=acc)
                term = (f.to(device=p.device, dtype=acc) * d * d).sum()
                total = term if total is None else total + term
        if total is None:
            p = next(iter(named.values()), None)
            dev = p.device if p is not None else None
            dt = acc_dtype(p.dtype) if p is not None else torch.float32
            return torch.zeros((), device=dev, dtype=dt)
        if not bool(torch.isfinite(total)):
            # Fisher and anchors are checked when stored, so the model's values are at fault
            check_all_finite(
                {k: named[_resolve(k, named)] for k in self.names},
                "the current value of parameter",
                _WEIGHT_HINT,
            )
            raise FloatingPointError(
                f"The EWC penalty overflowed to {float(total)} (finite weights, Fisher and "
                "anchors): the model is far from its anchors; lower lam or check the run."
            )
        return total * (0.5 * self.lam)

    __call__ = penalty

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
        }

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
        self.lam, self.mode, self.gamma = lam, mode, gamma
        self._tasks = terms
        self._consolidations = int(state.get("num_tasks", len(terms)))

    def __repr__(self) -> str:
        return (
            f"EWC(mode={self.mode!r}, lam={self.lam}, gamma={self.gamma}, "
            f"tasks={self._consolidations}, params={len(self.names)})"
        )
