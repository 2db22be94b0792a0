"""natgrad in the Hugging Face ``transformers.Trainer``, through its own extension points.

Install: ``pip install 'natgrad[integrations]'`` (or ``pip install transformers``).

* :class:`EWCLoss`: a ``compute_loss_func`` (``Trainer(compute_loss_func=EWCLoss(ewc))``)
  that returns the task loss plus the EWC penalty ``(λ/2) Σ_t Σ_i F_t,i (θ_i - θ*_t,i)²``.
* :class:`SaveFisherCallback`: at the end of training (and, optionally, at every
  checkpoint) estimates the diagonal Fisher on a given data loader, in eval mode, and
  saves it in ``output_dir`` with :meth:`natgrad.DiagonalFisher.save`; the path is logged.
* :class:`FisherMetricsCallback`: every ``every_n_steps`` optimizer steps, Fisher metrics
  (trace, per-layer totals, natural-gradient norms) on a fixed batch, sent through
  ``Trainer.log`` (so to every reporter in ``report_to`` and to ``state.log_history``).

No training loop of natgrad's own: the Trainer runs training, these plug into it.

Example:
    A sketch (see ``examples/hf_trainer.py`` for a complete script)::

        from natgrad import EWC, estimate_fisher
        from natgrad.integrations.huggingface import (
            EWCLoss, FisherMetricsCallback, SaveFisherCallback)

        ewc = EWC(model, fisher_task_a, lam=100.0)      # after task A
        trainer = Trainer(model, args, train_dataset=task_b,
                          compute_loss_func=EWCLoss(ewc),
                          callbacks=[SaveFisherCallback(fisher_loader)])
        trainer.add_callback(FisherMetricsCallback(trainer, probe_batch, every_n_steps=50))
        trainer.train()
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from natgrad.continual.ewc import EWC
from natgrad.curvature.diagonal import DiagonalFisher
from natgrad.engine.common import acc_dtype
from natgrad.integrations import require
from natgrad.integrations.common import (
    METRICS,
    FisherMetricsSchedule,
    save_fisher,
)

transformers = require("transformers", "transformers", "natgrad.integrations.huggingface")
if TYPE_CHECKING:
    from transformers import TrainerCallback
else:
    TrainerCallback = transformers.TrainerCallback

__all__ = ["EWCLoss", "SaveFisherCallback", "FisherMetricsCallback", "METRICS", "IGNORE_INDEX"]

#: The label value Hugging Face losses leave out (padding, special tokens).
IGNORE_INDEX = -100

LossFn = Callable[..., torch.Tensor]


def _cross_entropy(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
    """Hugging Face's classification loss: cross-entropy over the last logits axis, labels
    equal to -100 left out; summed and divided by ``num_items_in_batch`` when the Trainer
    gives it (the kept labels of the whole accumulated batch), else the mean."""
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    if labels.is_floating_point():
        raise TypeError(
            f"EWCLoss's default loss is cross-entropy over integer class labels, but the "
            f"labels are {labels.dtype} (a regression or multi-label task?). Pass the "
            "task loss: EWCLoss(ewc, loss_fn=lambda outputs, labels, num_items_in_batch=None: ...)."
        )
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_logits = flat_logits.to(acc_dtype(flat_logits.dtype))  # float64 stays float64
    flat_labels = labels.reshape(-1).to(flat_logits.device)
    if flat_labels.shape[0] != flat_logits.shape[0]:
        raise ValueError(
            f"EWCLoss's default cross-entropy needs one label per logits row: logits "
            f"{tuple(logits.shape)} give {flat_logits.shape[0]} rows but labels "
            f"{tuple(labels.shape)} give {flat_labels.shape[0]}. For a causal LM (labels "
            "shifted by one) pass the model's own loss: EWCLoss(ewc, loss_fn=...)."
        )
    if num_items_in_batch is None:
        return F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX)
    total = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / torch.as_tensor(num_items_in_batch, device=total.device, dtype=total.dtype)


class EWCLoss:
    """A ``compute_loss_func`` for ``transformers.Trainer``: the task loss plus EWC.

    Returns ``L(outputs, labels) + s · Ω(θ)`` with the EWC penalty
    ``Ω(θ) = (λ/2) Σ_t Σ_i F_t,i (θ_i - θ*_t,i)²`` (:meth:`natgrad.EWC.penalty`), so the
    gradient the Trainer takes is ``∇L + λ Σ_t F_t (θ - θ*_t)``.

    The share ``s`` makes the penalty count once per optimizer step, also with gradient
    accumulation: with a ``compute_loss_func`` the Trainer sums the micro-batch losses
    (each already divided by ``num_items_in_batch``, the kept labels of the whole
    accumulated batch), so ``s = (kept labels of this micro-batch) / num_items_in_batch``
    (summing to 1 over the micro-batches); ``s = 1`` when the Trainer gives no count.
    The penalty is added only while the model is in training mode, so evaluation losses
    stay the plain task loss.

    Args:
        ewc: a :class:`natgrad.EWC` built on the model the Trainer trains (the same
            module object, so the penalty follows its live parameters).
        loss_fn: the task loss ``loss_fn(outputs, labels, num_items_in_batch=None)``,
            Hugging Face's ``compute_loss_func`` signature. Default: cross-entropy over
            ``outputs.logits`` and integer labels (``-100`` left out), as Hugging Face's
            classification heads compute it; a causal LM needs its own (shifted) loss.

    Attributes:
        last_penalty: the unscaled penalty ``Ω(θ)`` of the latest training call (a
            detached 0-dim tensor), or None before the first.

    Raises:
        TypeError: ``ewc`` is not a :class:`natgrad.EWC`, ``loss_fn`` is not callable;
            at call time, float labels with the default loss.

    Example:
        >>> import torch
        >>> from natgrad import EWC
        >>> model = torch.nn.Linear(2, 3)
        >>> ewc = EWC(model, {"bias": torch.ones(3)}, lam=2.0)
        >>> with torch.no_grad():
        ...     _ = model.bias.add_(1.0)
        >>> logits, labels = model(torch.zeros(4, 2)), torch.tensor([0, 1, 2, 0])
        >>> loss = EWCLoss(ewc)((logits,), labels)
        >>> ce = torch.nn.functional.cross_entropy(logits, labels)
        >>> round((loss - ce).item(), 4)  # (2/2) * 3 * 1²
        3.0
    """

    def __init__(self, ewc: EWC, loss_fn: LossFn | None = None):
        if not isinstance(ewc, EWC):
            raise TypeError(
                f"ewc must be a natgrad.EWC, got {type(ewc).__name__}; build it with "
                "natgrad.EWC(model, fisher, lam=...)."
            )
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(
                f"loss_fn must be callable as loss_fn(outputs, labels, num_items_in_batch=None), "
                f"got {type(loss_fn).__name__}."
            )
        self.ewc = ewc
        self.loss_fn = _cross_entropy if loss_fn is None else loss_fn
        self.last_penalty: torch.Tensor | None = None

    def __call__(self, outputs: Any, labels: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        """``loss_fn(outputs, labels, num_items_in_batch) + s · Ω(θ)`` (see the class)."""
        loss = self.loss_fn(outputs, labels, num_items_in_batch=num_items_in_batch)
        if not self.ewc.model.training:
            return loss
        penalty = self.ewc.penalty()
        self.last_penalty = penalty.detach()
        share: float | torch.Tensor = 1.0
        if num_items_in_batch is not None and isinstance(labels, torch.Tensor):
            kept = (labels != IGNORE_INDEX).sum().to(penalty.dtype)
            share = kept.to(penalty.device) / torch.as_tensor(
                num_items_in_batch, dtype=penalty.dtype, device=penalty.device
            )
        # the wider of the two dtypes: a bf16 task loss does not round the penalty
        dtype = torch.promote_types(loss.dtype, penalty.dtype)
        return loss.to(dtype) + (share * penalty).to(device=loss.device, dtype=dtype)

    def __repr__(self) -> str:
        return f"EWCLoss({self.ewc!r})"


class SaveFisherCallback(TrainerCallback):
    """Estimate the diagonal Fisher at the end of training and save it in ``output_dir``.

    At ``on_train_end`` the model is put in eval mode (dropout off), the Fisher
    ``F_i = (1/N) Σ_n E_y[(∂l_n/∂θ_i)²]`` is estimated on ``data`` with
    :func:`natgrad.estimate_fisher`, and saved to ``<output_dir>/<filename>`` in natgrad's
    verified safetensors format (load it with :meth:`natgrad.DiagonalFisher.load`). With
    ``at_checkpoints=True`` it is also saved in every checkpoint folder the Trainer writes
    (``<output_dir>/checkpoint-<step>/<filename>``, at ``on_save``). The model's modes are
    restored afterwards. Under ``torch.distributed`` every rank estimates on its own
    shard (the sums are all-reduced) and the main process writes the file.

    Args:
        data: a DataLoader or iterable of batches (dicts with ``labels``, as the Trainer's
            collator makes them), or one batch. Batches are moved to the model's device.
        likelihood: the likelihood (``"categorical"`` for classification heads).
        filename: the file name (default ``"fisher.safetensors"``).
        at_checkpoints: also save into each checkpoint folder.
        **options: more keyword options of :func:`natgrad.estimate_fisher` (``labels``,
            ``mc_samples``, ``params``, ``max_batches``, ...).

    Attributes:
        path: where the latest Fisher was written (None before).
        fisher: the latest saved :class:`natgrad.DiagonalFisher` (None before).

    Raises:
        ValueError: an empty or path-like ``filename``.
    """

    def __init__(
        self,
        data: Any,
        likelihood: Any = "categorical",
        *,
        filename: str = "fisher.safetensors",
        at_checkpoints: bool = False,
        **options: Any,
    ):
        if not isinstance(filename, str) or not filename or os.path.basename(filename) != filename:
            raise ValueError(
                f"filename must be a plain file name such as 'fisher.safetensors', got "
                f"{filename!r}; the folder is the Trainer's output_dir."
            )
        self.data = data
        self.likelihood = likelihood
        self.filename = filename
        self.at_checkpoints = bool(at_checkpoints)
        self.options = options
        self.path: str | None = None
        self.fisher: DiagonalFisher | None = None

    def _save(self, folder: str, state: Any, model: Any) -> None:
        if model is None:
            raise ValueError("SaveFisherCallback: the Trainer passed no model to the callback.")
        path = os.path.join(folder, self.filename)
        write = bool(state.is_world_process_zero)
        self.fisher = save_fisher(
            model, self.data, path if write else None, self.likelihood, **self.options
        )
        if write:
            self.path = path

    def on_save(  # noqa: D102
        self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any
    ) -> None:
        if self.at_checkpoints:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            self._save(folder, state, model)

    def on_train_end(  # noqa: D102
        self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any
    ) -> None:
        self._save(args.output_dir, state, model)


class FisherMetricsCallback(FisherMetricsSchedule, TrainerCallback):
    """Log Fisher metrics through ``Trainer.log`` every ``every_n_steps`` optimizer steps.

    At ``on_step_end`` with ``global_step % every_n_steps == 0`` the model is put in eval
    mode, one Fisher is estimated on ``batch`` and the chosen metrics are computed from
    it (see :data:`natgrad.integrations.common.METRICS`): ``fisher/trace`` ``= Σ_i F_i``,
    ``fisher/layer/<module>`` (per-module totals), ``fisher/grad_norm``,
    ``fisher/natgrad_norm`` and ``fisher/natgrad_ratio`` (``‖g‖``, ``‖g/(F+λ)‖``).
    ``.grad`` is not touched and the model's modes are restored. The values go through
    ``trainer.log``, hence to every ``report_to`` integration and ``state.log_history``,
    which is why the callback holds the trainer (a callback alone cannot reach it).

    Args:
        trainer: the ``transformers.Trainer`` to log through; add the callback with
            ``trainer.add_callback(FisherMetricsCallback(trainer, batch))``.
        batch: one fixed batch (a dict with ``labels``, or ``(x, y)``), moved to the
            model's device.
        **settings: ``every_n_steps``, ``metrics``, ``likelihood``, ``damping``,
            ``prefix`` and estimator options, as in
            ``natgrad.integrations.common.FisherMetricsSchedule``.

    Attributes:
        last: the latest logged ``{key: value}`` (empty before the first).

    Raises:
        TypeError: ``trainer`` is not a ``transformers.Trainer``; ``metrics`` is a string.
        ValueError: ``every_n_steps < 1``; an unknown metric name.
    """

    def __init__(self, trainer: Any, batch: Any, **settings: Any):
        if not isinstance(trainer, transformers.Trainer):
            raise TypeError(
                f"trainer must be the transformers.Trainer to log through, got "
                f"{type(trainer).__name__}; write "
                "trainer.add_callback(FisherMetricsCallback(trainer, batch))."
            )
        FisherMetricsSchedule.__init__(self, **settings)
        self.trainer = trainer
        self.batch = batch

    def on_step_end(  # noqa: D102
        self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any
    ) -> None:
        model = self.trainer.model if model is None else model
        values = self.measure(model, self.batch, state.global_step)
        if values is not None:
            self.trainer.log(values)
