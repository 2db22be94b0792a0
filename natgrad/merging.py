"""Fisher-weighted model merging: ``θ* = Σ_m w_m F_m θ_m / Σ_m w_m F_m``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from natgrad.engine.checks import (
    check_all_finite,
    check_finite,
    check_positive,
    check_same_structure,
)
from natgrad.engine.common import acc_dtype
from natgrad.pruning.pruned import deepcopy_model, mask_buffer_names, refresh_pruned

__all__ = ["fisher_weighted_merge"]

FisherLike = Mapping[str, torch.Tensor]


def fisher_weighted_merge(
    models: Sequence[nn.Module] | nn.Module,
    fishers: Sequence[FisherLike] | nn.Module,
    fisher_weights: Sequence[FisherLike] | None = None,
    *,
    weights: Sequence[float] | None = None,
    floor: float = 1e-8,
    normalize: bool = False,
) -> nn.Module:
    """Merge models by Fisher-weighted averaging into a NEW model (inputs untouched).

    For every parameter entry ``i``:
    ``θ*_i = Σ_m w_m F̃_m,i θ_m,i / Σ_m w_m F̃_m,i`` with ``F̃ = max(F, floor)``.
    Where the denominator is zero (every Fisher zero with ``floor=0``) the entry is the
    weighted mean ``Σ_m w_m θ_m,i``. Parameters that no Fisher covers get the weighted
    mean; floating buffers are averaged with the weights, other buffers (integer
    counters, bool flags, pruning ``*_mask`` buffers) are copied from the first model. The weights are rescaled to
    sum to one. ``normalize=True`` first divides each Fisher by its trace ``Σ_i F_m,i``
    (unit-trace Fishers: models then weigh equally overall, whatever their loss scale
    or number of samples); the floor applies after that.

    Two call forms:

    * ``fisher_weighted_merge([m1, m2, ...], [F1, F2, ...])``;
    * the two-model form ``fisher_weighted_merge(m1, m2, (F1, F2))``: when the first
      argument is a module, the second must be the other module and the third (or
      ``fisher_weights=``) the pair of Fishers.

    Args:
        models: models of one architecture (same parameter and buffer names and shapes).
            Models pruned by ``torch.nn.utils.prune`` are merged on their ``*_orig``
            parameters and the merge keeps the first model's ``*_mask`` buffers.
        fishers: one Fisher per model, ``{parameter name: F}`` (e.g. DiagonalFisher),
            all covering the same names.
        fisher_weights: the Fishers in the two-model form.
        weights: ``w_m >= 0`` (default equal); at least one must be positive.
        floor: ``ε >= 0``, the least value of every Fisher entry.
        normalize: use unit-trace Fishers.

    Returns:
        A deep copy of ``models[0]`` holding the merged parameters and buffers.

    Raises:
        ValueError: parameter names or shapes differ between models (named), Fishers that
            do not match the models, counts that disagree, bad weights or floor, or an
            all-zero Fisher with ``normalize=True``.
        TypeError: a two-model call whose second argument is not a module.

    Example:
        >>> import torch
        >>> a, b = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = a.weight.fill_(1.0), b.weight.fill_(4.0)
        >>> Fa, Fb = {"weight": torch.tensor([[3.0]])}, {"weight": torch.tensor([[1.0]])}
        >>> fisher_weighted_merge([a, b], [Fa, Fb]).weight.item()  # (3*1 + 1*4) / 4
        1.75
        >>> fisher_weighted_merge(a, b, (Fa, Fb)).weight.item()
        1.75
    """
    models, fishers = _dispatch(models, fishers, fisher_weights)
    w = _weights(weights, len(models))
    floor = check_positive("floor", floor, allow_zero=True)
    _check_models(models)
    fishers = _check_fishers(fishers, models[0], normalize)

    merged = deepcopy_model(models[0])
    params = [dict(m.named_parameters()) for m in models]
    with torch.no_grad():
        for name, target in merged.named_parameters():
            thetas = [p[name].detach() for p in params]
            if name in fishers[0]:
                value = _fisher_mean(thetas, [f[name] for f in fishers], w, floor)
            else:
                value = _mean(thetas, w)
            target.copy_(value.to(target.dtype))
        buffers = [dict(m.named_buffers()) for m in models]
        masks = mask_buffer_names(merged)
        for name, target in merged.named_buffers():
            if name not in masks and (target.is_floating_point() or target.is_complex()):
                target.copy_(_mean([b[name].detach() for b in buffers], w).to(target.dtype))
        refresh_pruned(merged)
    return merged


def _dispatch(models, fishers, fisher_weights):
    if isinstance(models, nn.Module):
        if not isinstance(fishers, nn.Module):
            raise TypeError(
                "Two-model form: fisher_weighted_merge(model1, model2, (fisher1, fisher2)); "
                f"the second argument must be a module, got {type(fishers).__name__}. Or "
                "pass lists: fisher_weighted_merge([model1, model2], [fisher1, fisher2])."
            )
        if fisher_weights is None:
            raise ValueError(
                "Two-model form needs the Fishers: fisher_weighted_merge(model1, model2, "
                "(fisher1, fisher2))."
            )
        return [models, fishers], list(fisher_weights)
    if fisher_weights is not None:
        raise ValueError(
            "fisher_weights is only for the two-model form fisher_weighted_merge(model1, "
            "model2, (fisher1, fisher2)); with a list of models pass the Fishers second."
        )
    models, fishers = list(models), list(fishers)
    if not models or not all(isinstance(m, nn.Module) for m in models):
        raise TypeError("models must be a non-empty list of nn.Module of one architecture.")
    if len(fishers) != len(models):
        raise ValueError(
            f"Got {len(models)} models but {len(fishers)} Fishers; give one Fisher per model."
        )
    return models, fishers


def _weights(weights, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    w = [check_positive(f"weights[{i}]", v, allow_zero=True) for i, v in enumerate(weights)]
    if len(w) != n:
        raise ValueError(f"Got {len(w)} weights for {n} models; give one weight per model.")
    total = sum(w)
    if total <= 0:
        raise ValueError(f"Invalid weights {list(weights)}: at least one must be positive.")
    return [v / total for v in w]


def _check_models(models: list[nn.Module]) -> None:
    first = dict(models[0].named_parameters())
    for i, m in enumerate(models[1:], start=1):
        check_same_structure(first, dict(m.named_parameters()), "models[0]", f"models[{i}]")
        check_same_structure(
            dict(models[0].named_buffers()), dict(m.named_buffers()), "models[0]", f"models[{i}]"
        )
    for i, m in enumerate(models):
        check_all_finite(
            dict(m.named_parameters()),
            f"models[{i}]'s parameter",
            "A merge of non-finite weights is not finite: merge finite checkpoints (this "
            "model's training has likely diverged).",
        )


def _check_fishers(fishers, model: nn.Module, normalize: bool) -> list[dict[str, torch.Tensor]]:
    named = dict(model.named_parameters())
    out = []
    for i, f in enumerate(fishers):
        if not isinstance(f, Mapping):
            raise TypeError(
                f"fishers[{i}] is a {type(f).__name__}; expected a DiagonalFisher or a dict "
                "{parameter name: tensor}."
            )
        unknown = [k for k in f if k not in named]
        if unknown:
            raise ValueError(
                f"fishers[{i}] has parameters the models lack: {unknown[:8]}; the models have "
                f"{list(named)[:8]}. Estimate the Fishers on these models."
            )
        check_same_structure(
            dict(f), {k: named[k] for k in f}, f"fishers[{i}]", "the models' parameters"
        )
        if i:
            check_same_structure(out[0], dict(f), "fishers[0]", f"fishers[{i}]")
        vals = {k: v.detach() for k, v in f.items()}
        for k, v in vals.items():
            check_finite(f"fishers[{i}][{k!r}]", v)
            if bool((v < 0).any()):
                raise ValueError(f"fishers[{i}][{k!r}] has negative entries; a Fisher is >= 0.")
        if normalize:
            total = sum(float(v.double().sum()) for v in vals.values())
            if total <= 0:
                raise ValueError(
                    f"fishers[{i}] is zero everywhere, so normalize=True cannot give it unit "
                    "trace; pass normalize=False (and floor > 0 or another Fisher)."
                )
            vals = {k: v / total for k, v in vals.items()}
        out.append(vals)
    return out


def _mean(thetas: list[torch.Tensor], w: list[float]) -> torch.Tensor:
    dt = acc_dtype(thetas[0].dtype)
    return sum(wm * t.to(dt) for wm, t in zip(w, thetas, strict=True))


def _fisher_mean(thetas, fs, w, floor: float) -> torch.Tensor:
    dt = torch.promote_types(acc_dtype(thetas[0].dtype), fs[0].dtype)
    dev = thetas[0].device
    num = torch.zeros(thetas[0].shape, dtype=dt, device=dev)
    den = torch.zeros_like(num)
    for wm, t, f in zip(w, thetas, fs, strict=True):
        fm = wm * f.to(dev, dt).clamp_min(floor)
        num += fm * t.to(dev, dt)
        den += fm
    fallback = _mean([t.to(dev) for t in thetas], w).to(dt)
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), fallback)
