"""What both framework integrations share: eval-mode passes, metric names, saved Fishers.

Nothing here imports a framework.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from natgrad.curvature.diagonal import DiagonalFisher
from natgrad.curvature.estimate import estimate_fisher, is_single_batch
from natgrad.engine.checks import check_choice, check_int
from natgrad.engine.common import evaluating
from natgrad.optim.scale import natural_gradient_norms

__all__ = [
    "METRICS",
    "FisherMetricsSchedule",
    "batch_to",
    "batches_to",
    "check_every",
    "check_metrics",
    "fisher_metrics",
    "save_fisher",
]

logger = logging.getLogger("natgrad.integrations")

#: The Fisher metrics a metrics callback can log, and the keys each adds (``<prefix>`` is
#: the callback's ``prefix``, ``"fisher/"`` by default).
METRICS = {
    "trace": "<prefix>trace: Σ_i F_i, the trace of the diagonal Fisher",
    "layer_totals": "<prefix>layer/<module>: Σ_i F_i over each module's parameters",
    "natural_gradient_norms": (
        "<prefix>grad_norm, <prefix>natgrad_norm, <prefix>natgrad_ratio: ‖g‖, "
        "‖g / (F + damping)‖ and their ratio on the same batch"
    ),
}


def check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    """The metric names, each checked against :data:`METRICS`.

    Raises:
        TypeError: ``metrics`` is a single string (wrap it in a list).
        ValueError: an unknown name, or no names at all.
    """
    if isinstance(metrics, str):
        raise TypeError(
            f"metrics must be a list of names, got the string {metrics!r}; "
            f"write metrics=[{metrics!r}]."
        )
    names = tuple(metrics)
    if not names:
        raise ValueError(f"metrics is empty; choose from {sorted(METRICS)}.")
    for m in names:
        check_choice("metrics", m, tuple(METRICS))
    return names


def check_every(every_n_steps: int) -> int:
    """``every_n_steps`` as an int ``>= 1`` (an error names the bad value)."""
    return check_int("every_n_steps", every_n_steps, 1)


class FisherMetricsSchedule:
    """When and what a Fisher-metrics callback measures; both frameworks' callbacks are one.

    Every ``every_n_steps`` optimizer steps, :meth:`measure` estimates one Fisher on a
    batch and computes the chosen metrics from it with :func:`fisher_metrics`
    (``<prefix>trace`` ``= Σ_i F_i``, ``<prefix>layer/<module>``, ``<prefix>grad_norm``,
    ``<prefix>natgrad_norm``, ``<prefix>natgrad_ratio``; see :data:`METRICS`), in eval
    mode, without touching ``.grad``.

    Args:
        every_n_steps: the interval in optimizer steps (``>= 1``).
        metrics: names among ``"trace"``, ``"layer_totals"``, ``"natural_gradient_norms"``.
        likelihood: the likelihood.
        damping: ``λ`` of the natural gradient.
        prefix: prepended to every logged key.
        **options: more keyword options of :func:`natgrad.estimate_fisher`.

    Attributes:
        last: the latest measured ``{key: value}`` (empty before the first).

    Raises:
        TypeError: ``metrics`` is a string.
        ValueError: ``every_n_steps < 1``; an unknown metric name.
    """

    def __init__(
        self,
        *,
        every_n_steps: int = 50,
        metrics: Sequence[str] = ("trace", "layer_totals", "natural_gradient_norms"),
        likelihood: Any = "categorical",
        damping: float = 1e-3,
        prefix: str = "fisher/",
        **options: Any,
    ):
        self.every_n_steps = check_every(every_n_steps)
        self.metrics = check_metrics(metrics)
        self.likelihood = likelihood
        self.damping = damping
        self.prefix = prefix
        self.options = options
        self.last: dict[str, float] = {}

    def measure(self, model: nn.Module, batch: Any, step: int) -> dict[str, float] | None:
        """The metrics of ``model`` on ``batch`` when ``step`` is due, else None."""
        if step % self.every_n_steps:
            return None
        self.last = fisher_metrics(
            model, batch, self.metrics, self.likelihood, damping=self.damping,
            prefix=self.prefix, **self.options,
        )  # fmt: skip
        logger.debug("Fisher metrics at step %d: %s", step, self.last)
        return dict(self.last)


def batch_to(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor moved to ``device`` (tuples, lists and dicts kept)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: batch_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(batch_to(v, device) for v in batch)
    return batch


def batches_to(data: Any, device: torch.device) -> Any:
    """One batch moved to ``device``, or a generator moving each batch of an iterable."""
    if is_single_batch(data):
        return batch_to(data, device)

    def gen(it: Iterable[Any]) -> Iterator[Any]:
        for b in it:
            yield batch_to(b, device)

    return gen(data)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without any)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def fisher_metrics(
    model: nn.Module,
    batch: Any,
    metrics: Sequence[str],
    likelihood: Any = "categorical",
    *,
    damping: float = 1e-3,
    prefix: str = "fisher/",
    **options: Any,
) -> dict[str, float]:
    """Compute the chosen Fisher metrics of ``model`` on ``batch``, as ``{key: float}``.

    The model is put in eval mode for the pass (and restored); ``.grad`` is not touched.
    One Fisher ``F`` is estimated (:func:`natgrad.estimate_fisher` with ``options``) and
    shared by the metrics: ``trace`` is ``Σ_i F_i``, ``layer_totals`` is
    :meth:`natgrad.DiagonalFisher.layer_totals`, and ``natural_gradient_norms`` is
    :func:`natgrad.optim.scale.natural_gradient_norms` with ``damping`` (its ratio is
    left out when ``‖g‖ = 0``).

    Args:
        model: the model, on any device (the batch is moved to it).
        batch: one batch (``(x, y)`` or a dict with labels).
        metrics: names from :data:`METRICS`.
        likelihood: the likelihood of the Fisher and of the gradient.
        damping: ``λ`` of the natural gradient ``g / (F + λ)``.
        prefix: prepended to every key.
        **options: more keyword options of :func:`natgrad.estimate_fisher` (``labels``,
            ``params``, ``output_fn``, ...).

    Returns:
        ``{key: value}`` of Python floats, keys as in :data:`METRICS`.
    """
    names = check_metrics(metrics)
    batch = batch_to(batch, model_device(model))
    out: dict[str, float] = {}
    with evaluating(model), torch.enable_grad():
        fisher = estimate_fisher(model, batch, likelihood, **options)
        if "trace" in names:
            out[f"{prefix}trace"] = fisher.total()
        if "layer_totals" in names:
            for mod, v in fisher.layer_totals().items():
                out[f"{prefix}layer/{mod or '<root>'}"] = v
        if "natural_gradient_norms" in names:
            r = natural_gradient_norms(
                model,
                batch,
                fisher,
                likelihood,
                damping=damping,
                output_fn=options.get("output_fn"),
            )
            out[f"{prefix}grad_norm"] = r.total_grad_norm
            out[f"{prefix}natgrad_norm"] = r.total_natgrad_norm
            if r.total_ratio is not None:
                out[f"{prefix}natgrad_ratio"] = r.total_ratio
    return out


def save_fisher(
    model: nn.Module,
    data: Any,
    path: str | os.PathLike[str] | None,
    likelihood: Any = "categorical",
    **options: Any,
) -> DiagonalFisher:
    """Estimate the diagonal Fisher of ``model`` on ``data`` in eval mode and save it.

    The file is natgrad's verified safetensors format (:meth:`natgrad.DiagonalFisher.save`;
    read it back with :meth:`natgrad.DiagonalFisher.load`). The folder is created if
    needed, and the path is logged (INFO, logger ``natgrad.integrations``).

    Args:
        model: the trained model (its train/eval flags are restored afterwards).
        data: a batch, an iterable of batches or a DataLoader (batches are moved to the
            model's device).
        path: the file to write; None estimates without writing (the other ranks of a
            distributed run, whose sums the all-reduce needs).
        likelihood: the likelihood.
        **options: more keyword options of :func:`natgrad.estimate_fisher`.

    Returns:
        The saved :class:`natgrad.DiagonalFisher`.
    """
    with evaluating(model), torch.enable_grad():
        fisher = estimate_fisher(model, batches_to(data, model_device(model)), likelihood, **options)
    if path is None:
        return fisher
    path = os.fspath(path)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    fisher.save(path)
    logger.info(
        "Saved the Fisher (N=%d samples, trace %.6g) to %s", fisher.n_samples, fisher.total(), path
    )
    return fisher
