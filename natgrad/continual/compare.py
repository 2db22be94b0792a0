"""Compare two tasks' diagonal Fishers: similarity, Task2Vec distance, Fréchet overlap, top-k.

For diagonal Fishers ``F¹, F²`` flattened over the shared parameters:

* ``cosine = ⟨F¹, F²⟩ / (‖F¹‖ ‖F²‖)``, in ``[0, 1]`` for non-negative Fishers;
* ``task2vec_distance``: the symmetric cosine distance of Task2Vec (Achille et al.,
  2019): ``1 - cos(F¹ / (F¹ + F²), F² / (F¹ + F²))`` elementwise, coordinates where
  ``F¹ + F² = 0`` left out; ``0`` for proportional Fishers (``F² = cF¹``) and ``1`` for
  disjoint supports;
* ``frechet_overlap``: with unit-trace ``F̂ = F / Σ_i F_i``, the Fréchet distance of the
  Gaussians ``N(0, F̂¹)`` and ``N(0, F̂²)`` is ``d² = ½ tr(F̂¹ + F̂² - 2 (F̂¹ F̂²)^½)``, which
  for diagonal matrices is ``½ Σ_i (√F̂¹_i - √F̂²_i)²``; the overlap (Kirkpatrick et al.,
  2017) is ``1 - d² = Σ_i √(F̂¹_i F̂²_i)``, 1 for equal normalized Fishers, 0 for disjoint;
* ``topk_jaccard``: ``|T¹ ∩ T²| / |T¹ ∪ T²|`` for the sets of the ``k`` largest coordinates
  (ties broken by position), of the positive ones only: a Fisher with fewer than ``k``
  non-zeros contributes all of them, never zeros ranked by position.

Per-layer values apply the same formulas within each module (parameter names up to the
last dot), each layer normalized on its own. Values are clipped to their ranges
(``[0, 1]``) against rounding; a layer whose Fisher is zero in either task
gives NaN for cosine, overlap and Jaccard.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from natgrad.engine.checks import check_fisher_type, check_same_structure
from natgrad.engine.common import module_of
from natgrad.engine.report import Report

__all__ = ["FisherComparison", "LayerComparison", "compare_task_fisher"]


@dataclass
class LayerComparison(Report):
    """The comparison measures of a set of coordinates (see :func:`compare_task_fisher`).

    Attributes:
        cosine: cosine similarity of the flattened Fishers.
        task2vec_distance: ``1 - cos(F¹/(F¹+F²), F²/(F¹+F²))``.
        frechet_overlap: ``1 - ½ Σ (√F̂¹ - √F̂²)²`` for unit-trace ``F̂``.
        topk_jaccard: Jaccard overlap of the ``top_k`` largest coordinates.
        top_k: the number of coordinates ranked (after resolving a fraction).
        numel: the number of coordinates compared.
    """

    cosine: float
    task2vec_distance: float
    frechet_overlap: float
    topk_jaccard: float
    top_k: int
    numel: int


@dataclass
class FisherComparison(LayerComparison):
    """Similarity of two tasks' diagonal Fishers over all shared parameters.

    Attributes:
        The measures of :class:`LayerComparison` over every coordinate, and
        per_layer: ``{module: LayerComparison}`` (the same measures within each module).
    """

    per_layer: dict[str, LayerComparison] = field(default_factory=dict)


def _resolve_k(top_k: int | float, numel: int) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, (int, float)):
        raise TypeError(f"top_k must be an int or a float fraction, got {type(top_k).__name__}.")
    if isinstance(top_k, int):
        if top_k < 1:
            raise ValueError(
                f"Invalid top_k: {top_k!r}; an integer top_k is a count and must be >= 1."
            )
        return min(top_k, numel)
    if not 0.0 < top_k <= 1.0:
        raise ValueError(
            f"Invalid top_k: {top_k!r}; a float top_k is a fraction of the coordinates in "
            "(0, 1]. Pass an int for a count."
        )
    return max(1, min(numel, math.ceil(top_k * numel)))


def _measures(a: torch.Tensor, b: torch.Tensor, k: int) -> tuple[float, float, float, float]:
    """(cosine, task2vec distance, Fréchet overlap, top-k Jaccard) of flat float64 a, b."""
    na, nb = a.norm(), b.norm()
    cos = min(1.0, float(a @ b / (na * nb))) if na > 0 and nb > 0 else math.nan
    s = a + b
    keep = s > 0
    if keep.any():
        ua, ub = a[keep] / s[keep], b[keep] / s[keep]
        t2v = max(0.0, 1.0 - float(ua @ ub / (ua.norm() * ub.norm())))
    else:
        t2v = math.nan
    ta, tb = a.sum(), b.sum()
    if ta > 0 and tb > 0:
        d2 = 0.5 * float(((a / ta).sqrt() - (b / tb).sqrt()).pow(2).sum())
        overlap = min(1.0, max(0.0, 1.0 - d2))
    else:
        overlap = math.nan
    # only positive coordinates rank: zeros past a Fisher's support would fill both sets
    # by position and count as shared (disjoint supports gave 1.0; found by review)
    ia = set(torch.sort(a, descending=True, stable=True).indices[: min(k, int((a > 0).sum()))]
             .tolist())
    ib = set(torch.sort(b, descending=True, stable=True).indices[: min(k, int((b > 0).sum()))]
             .tolist())
    jac = len(ia & ib) / len(ia | ib) if ia and ib else math.nan
    return cos, t2v, overlap, jac


def compare_task_fisher(
    fisher1: Mapping[str, torch.Tensor],
    fisher2: Mapping[str, torch.Tensor],
    *,
    top_k: int | float = 0.05,
) -> FisherComparison:
    """Compare two tasks' diagonal Fishers globally and per layer.

    Formulas (module docstring): ``cosine = ⟨F¹,F²⟩/(‖F¹‖‖F²‖)``; Task2Vec distance
    ``1 - cos(F¹/(F¹+F²), F²/(F¹+F²))``; Fréchet overlap ``1 - ½ Σ_i (√F̂¹_i - √F̂²_i)²``
    with ``F̂ = F/Σ F``; Jaccard ``|T¹∩T²|/|T¹∪T²|`` of the top-``k`` coordinate sets.

    Args:
        fisher1: ``{name: tensor}`` (e.g. :class:`natgrad.DiagonalFisher`).
        fisher2: ``{name: tensor}`` with the same names and shapes as ``fisher1``.
        top_k: an ``int`` is a count of coordinates (per layer: ``min(top_k, layer size)``);
            a ``float`` in ``(0, 1]`` is a fraction of the coordinates (globally and per layer).

    Returns:
        :class:`FisherComparison` with ``per_layer`` keyed by module name.

    Raises:
        TypeError: a Fisher that is not a mapping of tensors (e.g. a list).
        ValueError: names or shapes differ; an empty or all-zero Fisher; bad ``top_k``.

    Example:
        >>> import torch
        >>> f = {"w": torch.tensor([1.0, 2.0, 0.0]), "b": torch.tensor([0.5])}
        >>> r = compare_task_fisher(f, f, top_k=2)
        >>> round(r.cosine, 6), round(r.frechet_overlap, 6), r.topk_jaccard, r.task2vec_distance
        (1.0, 1.0, 1.0, 0.0)
    """
    check_fisher_type(fisher1, "fisher1")
    check_fisher_type(fisher2, "fisher2")
    check_same_structure(fisher1, fisher2, "fisher1", "fisher2")
    names = list(fisher1)
    if not names:
        raise ValueError("The Fishers are empty: there is nothing to compare.")

    flat1, flat2 = (
        {k: torch.as_tensor(f[k]).detach().double().cpu().reshape(-1) for k in names}
        for f in (fisher1, fisher2)
    )
    a, b = torch.cat(list(flat1.values())), torch.cat(list(flat2.values()))
    for what, v in (("fisher1", a), ("fisher2", b)):
        if not torch.isfinite(v).all() or (v < 0).any():
            raise ValueError(f"{what} has negative or non-finite values; a Fisher is >= 0.")
        if not (v > 0).any():
            raise ValueError(
                f"{what} is zero everywhere, so similarities are undefined; estimate it on "
                "data where the model's loss has a gradient."
            )
    k = _resolve_k(top_k, a.numel())
    cos, t2v, overlap, jac = _measures(a, b, k)
    modules: dict[str, list[str]] = {}
    for n in names:
        modules.setdefault(module_of(n), []).append(n)
    per_layer = {}
    for mod, ks in modules.items():
        la, lb = torch.cat([flat1[n] for n in ks]), torch.cat([flat2[n] for n in ks])
        lk = _resolve_k(top_k, la.numel())
        per_layer[mod] = LayerComparison(*_measures(la, lb, lk), top_k=lk, numel=la.numel())
    return FisherComparison(
        cosine=cos,
        task2vec_distance=t2v,
        frechet_overlap=overlap,
        topk_jaccard=jac,
        top_k=k,
        numel=a.numel(),
        per_layer=per_layer,
    )
