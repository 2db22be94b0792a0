"""natgrad in Lightning (``lightning.pytorch``), through its own extension points.

Install: ``pip install 'natgrad[integrations]'`` (or ``pip install lightning``).

* :class:`EWCMixin`: a ``LightningModule`` mixin whose ``backward`` hook adds the EWC
  penalty ``(λ/2) Σ_t Σ_i F_t,i (θ_i - θ*_t,i)²`` to the loss ``training_step`` returned.
* :class:`SaveFisherCallback`: at the end of training estimates the diagonal Fisher on a
  given data loader, in eval mode, and saves it next to the checkpoints with
  :meth:`natgrad.DiagonalFisher.save`; the path is logged.
* :class:`FisherMetricsCallback`: every ``every_n_steps`` optimizer steps, Fisher metrics
  (trace, per-layer totals, natural-gradient norms) through ``LightningModule.log_dict``,
  so to the Trainer's loggers and ``trainer.callback_metrics``.
* Natural gradient: ``configure_optimizers`` returns ``natgrad.NaturalGradient(optimizer,
  FisherPreconditioner(..., source="backward"))`` (diag, K-FAC, EKFAC or low rank from
  Lightning's own forward and backward: no extra pass), or
  :class:`NaturalGradientCallback` for ``source="batch"`` (the ``mc``/``exact`` label
  sources, or layers the backward capture does not cover).

Why EWC is a mixin and not a callback: a callback cannot change the loss (its
``on_before_backward`` receives the loss but its return value is ignored), and a second
``backward`` of the penalty from a callback would break DDP (one gradient reduction per
forward) and escape mixed-precision loss scaling. ``LightningModule.backward`` is the
hook every loss passes through after Lightning has scaled it (``1/accumulate_grad_batches``
and the AMP scaler), so the mixin adds the penalty there, scaled the same way, and the
user's ``training_step`` stays unchanged.

No training loop of natgrad's own: the Lightning Trainer runs training, these plug into it.

Example:
    A sketch::

        from natgrad import EWC
        from natgrad.integrations.lightning import (
            EWCMixin, FisherMetricsCallback, SaveFisherCallback)

        class Classifier(EWCMixin, lightning.LightningModule):
            ...  # training_step returns the task loss, as usual

        module = Classifier()
        module.ewc = EWC(module, fisher_task_a, lam=100.0)
        trainer = lightning.Trainer(callbacks=[
            SaveFisherCallback(fisher_loader), FisherMetricsCallback(every_n_steps=50)])
        trainer.fit(module, task_b_loader)
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Any

import torch

from natgrad.continual.ewc import EWC
from natgrad.curvature.diagonal import DiagonalFisher
from natgrad.engine.common import evaluating
from natgrad.integrations import require
from natgrad.integrations.common import (
    METRICS,
    FisherMetricsSchedule,
    batch_to,
    model_device,
    save_fisher,
)
from natgrad.optim.precondition import FisherPreconditioner

pl = require("lightning.pytorch", "lightning", "natgrad.integrations.lightning")
if TYPE_CHECKING:
    from lightning.pytorch import Callback
else:
    Callback = pl.Callback

__all__ = [
    "EWCMixin",
    "SaveFisherCallback",
    "FisherMetricsCallback",
    "NaturalGradientCallback",
    "METRICS",
]


class EWCMixin:
    """A ``LightningModule`` mixin that adds the EWC penalty to the training loss.

    Put it before ``LightningModule`` in the bases (``class M(EWCMixin, LightningModule)``)
    and set ``self.ewc`` to a :class:`natgrad.EWC` of the module (or None to train without
    it). Its ``backward`` hook differentiates ``loss + s · Ω(θ)`` where ``loss`` is what
    Lightning passes (``training_step``'s loss divided by ``accumulate_grad_batches``,
    times the AMP scale when a ``GradScaler`` is active) and
    ``Ω(θ) = (λ/2) Σ_t Σ_i F_t,i (θ_i - θ*_t,i)²`` (:meth:`natgrad.EWC.penalty`), with
    ``s`` the same scaling, so one optimizer step adds exactly ``∇Ω = λ Σ_t F_t (θ - θ*_t)``
    to the gradient. It works under automatic and manual optimization
    (``self.manual_backward(loss)`` goes through the same hook). The logged training
    loss stays the task loss; :attr:`last_penalty` holds the penalty.

    A subclass that overrides ``backward`` itself must call ``super().backward(...)``.

    Attributes:
        ewc: the :class:`natgrad.EWC` (default None: no penalty).
        last_penalty: the unscaled ``Ω(θ)`` of the latest backward (detached), or None.

    Raises:
        TypeError: at backward time, ``ewc`` is set to something other than a
            :class:`natgrad.EWC`.
    """

    ewc: EWC | None = None
    last_penalty: torch.Tensor | None = None

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """``super().backward(loss + s · Ω(θ))`` (see the class docstring)."""
        ewc = self.ewc
        if ewc is not None:
            if not isinstance(ewc, EWC):
                raise TypeError(
                    f"EWCMixin.ewc must be a natgrad.EWC or None, got {type(ewc).__name__}; "
                    "set it with self.ewc = natgrad.EWC(self, fisher, lam=...)."
                )
            penalty = ewc.penalty()
            self.last_penalty = penalty.detach()
            scaled = penalty
            trainer = getattr(self, "_trainer", None)
            if trainer is not None:
                if self.automatic_optimization:  # type: ignore[attr-defined]
                    scaled = scaled / trainer.accumulate_grad_batches
                scaler = getattr(trainer.precision_plugin, "scaler", None)
                if scaler is not None:
                    scaled = scaler.scale(scaled)
            loss = loss + scaled.to(device=loss.device, dtype=loss.dtype)
        super().backward(loss, *args, **kwargs)  # type: ignore[misc]


def _checkpoint_dir(trainer: Any) -> str:
    """The folder of the Trainer's checkpoints: the ModelCheckpoint's ``dirpath`` when
    there is one, else the Trainer's ``default_root_dir``."""
    ckpt = getattr(trainer, "checkpoint_callback", None)
    dirpath = getattr(ckpt, "dirpath", None)
    return str(os.fspath(dirpath) if dirpath else os.fspath(trainer.default_root_dir))


class SaveFisherCallback(Callback):
    """Estimate the diagonal Fisher at the end of training and save it beside the checkpoints.

    At ``on_train_end`` the module is put in eval mode (dropout off), the Fisher
    ``F_i = (1/N) Σ_n E_y[(∂l_n/∂θ_i)²]`` of the LightningModule (its ``forward``) is
    estimated on ``data`` with :func:`natgrad.estimate_fisher`, and saved to
    ``<dirpath>/<filename>`` in natgrad's verified safetensors format (load it with
    :meth:`natgrad.DiagonalFisher.load`); modes are restored afterwards. ``dirpath``
    defaults to the ``ModelCheckpoint`` folder, or ``default_root_dir`` without one. Under
    ``torch.distributed`` every rank estimates on its own shard (all-reduced) and rank 0
    writes.

    Args:
        data: a DataLoader or iterable of batches (``(x, y)`` or dicts with labels), or
            one batch; moved to the module's device.
        likelihood: the likelihood.
        dirpath: the folder (default: as above).
        filename: the file name (default ``"fisher.safetensors"``).
        **options: more keyword options of :func:`natgrad.estimate_fisher`.

    Attributes:
        path: where the Fisher was written (None before).
        fisher: the saved :class:`natgrad.DiagonalFisher` (None before).

    Raises:
        ValueError: an empty or path-like ``filename``.
    """

    def __init__(
        self,
        data: Any,
        likelihood: Any = "categorical",
        *,
        dirpath: str | os.PathLike[str] | None = None,
        filename: str = "fisher.safetensors",
        **options: Any,
    ):
        if not isinstance(filename, str) or not filename or os.path.basename(filename) != filename:
            raise ValueError(
                f"filename must be a plain file name such as 'fisher.safetensors', got "
                f"{filename!r}; give the folder as dirpath=..."
            )
        self.data = data
        self.likelihood = likelihood
        self.dirpath = None if dirpath is None else os.fspath(dirpath)
        self.filename = filename
        self.options = options
        self.path: str | None = None
        self.fisher: DiagonalFisher | None = None

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:  # noqa: D102
        folder = self.dirpath or _checkpoint_dir(trainer)
        path = os.path.join(folder, self.filename)
        write = bool(trainer.is_global_zero)
        self.fisher = save_fisher(
            pl_module, self.data, path if write else None, self.likelihood, **self.options
        )
        if write:
            self.path = path


class FisherMetricsCallback(FisherMetricsSchedule, Callback):
    """Log Fisher metrics with ``LightningModule.log_dict`` every ``every_n_steps`` steps.

    At ``on_train_batch_end`` with ``trainer.global_step % every_n_steps == 0`` (the
    count of optimizer steps taken), the module is put in eval mode, one Fisher is
    estimated on ``batch`` (default: the training batch of this step) and the chosen
    metrics are computed from it (see :data:`natgrad.integrations.common.METRICS`):
    ``fisher/trace`` ``= Σ_i F_i``, ``fisher/layer/<module>``, ``fisher/grad_norm``,
    ``fisher/natgrad_norm``, ``fisher/natgrad_ratio``. ``.grad`` is not touched and the
    modes are restored. Values are logged ``on_step=True, on_epoch=False``, so they reach
    the Trainer's loggers (subject to ``log_every_n_steps``) and
    ``trainer.callback_metrics``.

    Args:
        batch: a fixed batch to measure on, or None for each step's training batch.
        **settings: ``every_n_steps``, ``metrics``, ``likelihood``, ``damping``,
            ``prefix`` and estimator options, as in
            ``natgrad.integrations.common.FisherMetricsSchedule``.

    Attributes:
        last: the latest logged ``{key: value}`` (empty before the first).

    Raises:
        TypeError: ``metrics`` is a string.
        ValueError: ``every_n_steps < 1``; an unknown metric name.
    """

    def __init__(self, batch: Any = None, **settings: Any):
        FisherMetricsSchedule.__init__(self, **settings)
        self.batch = batch

    def on_train_batch_end(  # noqa: D102
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        probe = batch if self.batch is None else self.batch
        values = self.measure(pl_module, probe, trainer.global_step)
        if values is not None:
            pl_module.log_dict(values, on_step=True, on_epoch=False)


class NaturalGradientCallback(Callback):
    """Precondition the gradients with a :class:`natgrad.FisherPreconditioner` before each
    optimizer step, under automatic optimization, for any ``source`` and kind.

    ``on_train_batch_start`` keeps the batch; ``on_before_optimizer_step`` (after
    Lightning's backward, before its ``optimizer.step``) calls
    ``preconditioner.step(batch, lr=preconditioner.group_lrs(optimizer.param_groups))``
    (each parameter's group lr, for ``kl_clip``) with the module in eval mode (modes restored),
    which rewrites ``.grad`` with ``(F + λI)^-1 g``. This covers what
    ``NaturalGradient`` in ``configure_optimizers`` cannot: ``source="batch"``, so the
    ``"mc"``/``"exact"`` label sources and parameters outside the layers the backward
    capture covers (LayerNorm, ...). With
    ``accumulate_grad_batches > 1`` a ``source="batch"`` refresh sees the last
    micro-batch only. Gradient clipping configured on the Trainer
    (``gradient_clip_val``) acts after this hook, on the preconditioned gradient.

    The preconditioner's state (step count, curvature, generator) is saved in Lightning's
    checkpoints through the callback's ``state_dict`` and restored by
    ``Trainer.fit(..., ckpt_path=...)``, so a resumed run continues the same schedule and
    curvature as the uninterrupted one.

    Args:
        preconditioner: the :class:`natgrad.FisherPreconditioner` of the module;
            ``configure_optimizers`` returns a plain optimizer.

    Raises:
        TypeError: ``preconditioner`` is not a :class:`natgrad.FisherPreconditioner`.
    """

    def __init__(self, preconditioner: FisherPreconditioner):
        if not isinstance(preconditioner, FisherPreconditioner):
            raise TypeError(
                f"preconditioner must be a natgrad.FisherPreconditioner, got "
                f"{type(preconditioner).__name__}."
            )
        self.preconditioner = preconditioner
        self._batch: Any = None
        self.last: Any = None

    def on_train_batch_start(  # noqa: D102
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batch = batch
        self._written: list[tuple[torch.Tensor, int] | None] | None = None  # see _grad_marks

    @property
    def state_key(self) -> str:
        """The key of this callback's state in Lightning's checkpoints: per preconditioned
        parameter set, so that two callbacks (an encoder's and a head's preconditioner)
        can share a Trainer."""
        return self._generate_state_key(params=tuple(self.preconditioner.params))

    def on_load_checkpoint(  # noqa: D102
        self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]
    ) -> None:
        if self.state_key not in checkpoint.get("callbacks", {}):
            warnings.warn(
                "NaturalGradientCallback: the checkpoint holds no state of this callback "
                "(written without it, or with other preconditioned parameters), so the "
                "preconditioner starts afresh: step 0, no curvature. Resume from a "
                "checkpoint written with this callback to continue its schedule.",
                stacklevel=2,
            )

    def state_dict(self) -> dict[str, Any]:
        """``{"preconditioner": FisherPreconditioner.state_dict()}``, which Lightning
        writes into its checkpoints."""
        return {"preconditioner": self.preconditioner.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the preconditioner from :meth:`state_dict`'s output (Lightning calls it
        when resuming from a checkpoint).

        Raises:
            ValueError: not this callback's state, or a preconditioner state of another
                kind or model (see :meth:`natgrad.FisherPreconditioner.load_state_dict`).
        """
        if not isinstance(state_dict, dict) or "preconditioner" not in state_dict:
            got = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(
                f"Not a NaturalGradientCallback state: expected the key 'preconditioner', "
                f"got {got}; resume from a checkpoint written with this callback."
            )
        self.preconditioner.load_state_dict(state_dict["preconditioner"])

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:  # noqa: D102
        # Several optimizers stepped after one backward: precondition once. The gradients
        # this callback wrote are the same tensors at the same versions until a backward
        # (or zero_grad) changes them; a second optimizer's step then finds them as left.
        written = self._written
        if written is not None and all(
            (p.grad is None and w is None) or (w is not None and p.grad is w[0] and p.grad._version == w[1])
            for p, w in zip(self.preconditioner.params.values(), written, strict=True)
        ):
            return
        batch = None
        if self.preconditioner.source == "batch":
            batch = batch_to(self._batch, model_device(pl_module))
        with evaluating(pl_module):
            lrs = self.preconditioner.group_lrs(optimizer.param_groups)
            self.last = self.preconditioner.step(batch, lr=lrs)
        self._written = self._grad_marks()

    def _grad_marks(self) -> list[tuple[torch.Tensor, int] | None]:
        """Each preconditioned parameter's ``.grad`` (kept) and its version (None: none)."""
        return [None if p.grad is None else (p.grad, p.grad._version)
                for p in self.preconditioner.params.values()]
