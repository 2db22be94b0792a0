"""Statistics recorded from the user's own forward and backward (``source="backward"``).

:class:`BackwardCapture` hooks the K-FAC-coverable layers of a model (``nn.Linear``,
``nn.Conv1d``/``nn.Conv2d``, transformers' ``Conv1D``, ``nn.Embedding``; see
:func:`natgrad.curvature.kfac.kfac_coverage`): while armed, a forward hook records each
layer's input and a tensor hook on its output records the output gradient of whatever loss
the user back-propagates. :meth:`BackwardCapture.take` turns the records into a
:class:`~natgrad.curvature.kfac.Captured`, the same per-layer statistics an extra
forward/backward pass (``source="batch"``) would give, from which a curvature class builds
itself (``Curvature.from_capture``) without another pass.

Convention (the empirical Fisher). With ``l_n`` the per-sample loss of sample ``n`` and
``b_nt = ∂l_n/∂s_nt`` the gradient at the layer output ``s_nt`` (position ``t``):

* ``loss_reduction="mean"`` (torch's default, ``L = (1/N) Σ_n l_n``): the recorded output
  gradient is ``b_nt / N``; it is multiplied by ``N``, the number of samples of all the
  forwards recorded since the last refresh;
* ``loss_reduction="sum"`` (``L = Σ_n l_n``): it is used as is;
* ``loss_reduction="element_mean"`` (``L = (1/(N D)) Σ_n Σ_d l_nd``, the mean over every
  output value: what ``nn.MSELoss()`` and ``nn.BCEWithLogitsLoss()`` compute with their
  default ``reduction="mean"`` on a model with ``D`` outputs per sample): the recorded
  output gradient is multiplied by ``N D``, so that ``l_n = Σ_d l_nd`` is a sample's loss
  (the per-sample term of the ``gaussian`` and ``bernoulli`` Fisher). ``D`` is read at
  each call of the model itself from the output the loss reads (the output tensor, a
  model output object's ``logits``, or the preconditioner's ``output_fn``):
  ``out.numel() / out.shape[0]``; an output none of these reads, or a step that calls the
  model's parts, is refused by name at the refresh. The curvature is that of the loss back-propagated:
  ``MSELoss`` is the Gaussian negative log-likelihood with ``σ² = 1/2``, so its curvature
  is ``4σ⁴`` (4 for ``σ = 1``) times that of ``½ Σ_d (f_d - y_d)² / σ²``. With
  ``"mean"``, a preconditioner whose likelihood is ``gaussian`` or ``bernoulli`` warns once
  at a model call whose output has more than one value per sample (``"mean"`` reads the
  loss as summed over the outputs and averaged over the samples, which a default
  ``MSELoss``/``BCEWithLogitsLoss`` is not: its curvature would come out ``1/D²`` of the
  right one);
* ``loss_reduction="token_mean"`` (``L = (1/K) Σ_n Σ_t l_nt`` over the ``K`` kept tokens,
  labels ``≠ -100``: what Hugging Face token models compute): the recorded output gradient
  is ``b_nt / K``; it is multiplied by ``K``, so that ``l_n = Σ_t l_nt`` is a sequence's
  loss (the per-sample term of the ``token_categorical`` Fisher) and ``N`` counts
  sequences. ``K`` is read at each call of the model from its keywords, as Hugging Face
  models take them (or from the entries of a dict argument, for a wrapper whose
  ``forward(batch)`` calls ``model(**batch)``): ``num_items_in_batch`` when given (the Hugging Face Trainer's count of
  the kept labels of the whole accumulated step, which the model divides by), else the
  kept entries of ``labels`` (forwards whose counts differ are read as one mean over all
  their kept tokens). A recorded forward without either keyword is refused by name at
  the refresh;
* ``loss_reduction="shifted_token_mean"``: the same for a causal language model whose
  loss shifts its labels (the logits at ``t`` score ``labels[:, t + 1]``, as Hugging Face
  ``*ForCausalLM`` / ``GPT2LMHeadModel`` called with ``labels=input_ids`` do): the kept
  entries of ``labels[..., 1:]`` are counted. Which of the two a model computes cannot
  be read reliably from the model (a wrapper, a subclass), so it is the caller's choice;
  with ``num_items_in_batch`` both read that count.

Losses these readings do not describe: a class-weighted cross-entropy
(``F.cross_entropy(weight=w)`` with ``"mean"`` divides by ``Σ_n w_{y_n}``, not ``N``: the
curvature comes out ``(N / Σ_n w_{y_n})²`` too small; write it as
``(w[y] * F.cross_entropy(..., reduction="none")).sum() / N``, or sum it and pass
``"sum"``); a label-smoothed cross-entropy (``label_smoothing=ε``), whose gradients
are those of a loss mixing the label with the uniform distribution, not of the
categorical negative log-likelihood (the recorded curvature is that loss's: ``ε = 0.1``
moved a small MLP's by about 20%; ``source="batch"`` gives the model's own Fisher); and a
model with BatchNorm in training mode, whose batch statistics make each
``l_n`` depend on the other samples: the recorded ``N ∂L/∂s_n`` of a layer before the
BatchNorm is then not ``∂l_n/∂s_n`` (the K-FAC practice for such networks, but not the
exact per-sample gradient; ``source="batch"`` refreshes in eval mode, where it is exact).

Only backwards that write a selected parameter's ``.grad`` count: the output gradients of
a ``torch.autograd.grad`` through the model (an adversarial example's input gradient, a
gradient-norm probe with ``retain_graph=True``) are left out, unless no backward since the
last refresh wrote ``.grad`` (a loop that assigns ``p.grad`` from ``torch.autograd.grad``).

Under ``torch.distributed`` with ``num_items_in_batch``, the Hugging Face Trainer's
``average_tokens_across_devices=True`` (its default) passes the count of all processes and
multiplies each process's loss by their number ``P``, so the curvature comes out ``P²``
too large; a one-time warning (on rank 0) says so when the count is not this process's
own, the kept labels of the step's recorded forwards, unshifted or shifted (or when the
calls carried no labels to count), so not with ``average_tokens_across_devices=False``,
whose per-process count this reading matches.

So several forwards before one optimizer step (gradient accumulation) are read as one
batch of all their samples whose loss is the mean over all of them: each micro-batch's
mean loss divided by the number of micro-batches (equal sizes), which is what Lightning
back-propagates, and the Hugging Face Trainer when ``trainer.model_accepts_loss_kwargs`` is
False (for a model whose ``forward`` takes ``**kwargs`` it is True and the Trainer leaves
the micro-batch means undivided; see docs/integrations.md: a step of several forwards
called with ``num_items_in_batch`` under ``"mean"`` warns once); likewise one backward through
``(loss(x1) + loss(x2)) / 2``. With micro-batches of unequal sizes the two readings differ
(the mean over all samples is what is used): a warning says so once. A loop that adds the micro-batches' mean losses without
dividing by their number ``k`` back-propagates ``k`` times that mean, and its curvature
comes out ``k²`` times too large: divide the loss by ``k``, as the trainers do. A loss
multiplied by a constant before ``backward`` is divided back by
:attr:`BackwardCapture.loss_scale`; with a ``torch.amp.GradScaler`` that scale is read from
the scaler at each recorded forward (:attr:`BackwardCapture.scale_source`).

What counts as one forward (one set of samples). A call of the model itself
(``model(x)``) is one forward, and while any such call was recorded since the last refresh
only the layer calls made inside it (or while a backward recomputes checkpointed layers)
are kept: a layer the model shares with another model, run by that model, is left out with
a one-time warning (its rows are not this model's samples). When the model itself is never
called, as when a training step calls its parts (``model.net(x)``, or
``model.head(model.body(x))``: a LightningModule's ``training_step`` often does), the layer
calls between two backwards form one forward, so micro-batches under gradient accumulation
stay separate samples; there, several forwards before one backward read as one forward
(their rows as positions of the same samples), and a layer shared with another model
cannot be told apart: call the model itself for those. A call under ``torch.no_grad()``
(evaluation) starts no forward. A layer recomputed inside a backward (reentrant gradient
checkpointing) belongs to the forward that backward runs through; one backward through
several forwards with such layers is refused (``use_reentrant=False`` has no such limit).
A forward whose loss is back-propagated in several calls (``retain_graph=True``) gets
the sum of their output gradients. Only the hooked model's own modules are recorded: a
``copy.deepcopy`` of the model made while the hooks are on carries them, but its passes
are ignored. ``nn.DataParallel`` (threads running copies of the layers) is refused;
use ``DistributedDataParallel``. Every forward's rows
count as samples: a loss that couples several forwards per sample (a
siamese or contrastive loss on ``model(x1)`` and ``model(x2)``) has no per-sample
gradients to read off this way; use ``source="batch"`` with a model that takes both inputs.

The labels are the data's (the user's loss), so this is the empirical Fisher. A loss
averaged over tokens rather than samples (a language-model or token-classification loss
over ``K`` kept tokens) scales the gradients by ``1/K``, not ``1/N``: read as ``"mean"``,
its curvature comes out ``(N/K)²`` times too small (``1/T²`` without padding). Use
``loss_reduction="token_mean"`` or ``"shifted_token_mean"`` there (or ``"sum"`` with a
summed loss); with ``"mean"``, a model call given token labels (a ``labels`` keyword or
dict entry with a time axis) warns once. A module called several times in one forward
contributes every call's positions. A layer whose weight or bias the forward also reads outside the layer's own
calls (``F.linear(h, emb.weight)``, ``layer.forward(x)``) has gradient terms no hook sees:
the first refresh re-runs the model on (a copy of) the inputs of its first recorded call,
once, as natgrad's own pass (the model's mode, no backward; the random state and the
buffers restored; your own forward hooks see this call) under
:class:`~natgrad.curvature.kfac.OutsideUses`, and refuses such a layer by name (and
removes this capture's hooks). The check sees the model's forward only: a weight tied in
the loss outside the model (``F.linear(model(x), emb.weight)``), by an outer model around
the preconditioned one, or in a training step that calls the model's parts instead of
the model, is not seen; leave such layers out of ``params``.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Literal, get_args

import torch
from torch import nn

from natgrad.curvature.kfac import (
    OUTSIDE_REASON,
    Captured,
    KFACLayer,
    OutsideUses,
    kfac_coverage,
    layer_patches,
    out_grads,
    per_sample_blocks,
)
from natgrad.engine.batch import default_output_fn
from natgrad.engine.checks import check_choice
from natgrad.engine.common import (
    current_backward_id,
    global_forward_hooks,
    in_internal_pass,
    internal_pass,
    to_acc,
)
from natgrad.engine.distributed import is_distributed, rank_and_world
from natgrad.engine.likelihoods import IGNORE_INDEX

__all__ = ["BackwardCapture", "LOSS_REDUCTIONS", "per_sample_gradients"]

LossReduction = Literal["mean", "sum", "element_mean", "token_mean", "shifted_token_mean"]
LOSS_REDUCTIONS: tuple[LossReduction, ...] = get_args(LossReduction)
_TOKEN_MEANS = ("token_mean", "shifted_token_mean")


#: the live capture of each model (see BackwardCapture.__init__)
_LIVE: weakref.WeakKeyDictionary[nn.Module, weakref.ReferenceType[BackwardCapture]] = (
    weakref.WeakKeyDictionary()
)


class BackwardCapture:
    """Record K-FAC layer inputs and output gradients during the user's forward/backward.

    Args:
        model: the model (the hooks go on its submodules; a DDP wrapper's inner module
            works the same).
        params: ``{name: parameter}`` selected parameters; every one must lie in a covered
            layer.
        loss_reduction: ``"mean"``, ``"sum"``, ``"element_mean"``, ``"token_mean"`` or
            ``"shifted_token_mean"`` (see the module doc).
        per_output_loss: whether the loss is the negative log-likelihood of one value per
            output (a ``gaussian`` or ``bernoulli`` likelihood): with ``"mean"``, a model
            call whose output has several values per sample then warns once (a default
            ``MSELoss``/``BCEWithLogitsLoss`` averages over them too: use
            ``"element_mean"``).
        output_fn: the model output -> the tensor the loss reads (``D`` for
            ``"element_mean"``); default: the tensor itself, or its ``logits`` entry.

    Raises:
        ValueError: a selected parameter outside every covered layer (named, with the
            reason), or an unknown ``loss_reduction``.

    Warns:
        UserWarning: once, at a recorded forward while a global forward hook is
            registered (it runs before the layer hooks: a replaced output's gradient
            would be recorded as the layer's); once, with ``"mean"`` and
            ``per_output_loss``, at a model call with several outputs per sample.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Mapping[str, nn.Parameter],
        *,
        loss_reduction: LossReduction = "mean",
        per_output_loss: bool = False,
        output_fn: Callable[[Any], torch.Tensor] | None = None,
    ):
        self.loss_reduction = check_choice("loss_reduction", loss_reduction, LOSS_REDUCTIONS)
        self.per_output_loss = bool(per_output_loss)
        self.output_fn = output_fn or default_output_fn
        layers, reasons = kfac_coverage(model, params, masked=True)
        if reasons:
            raise ValueError(
                "source='backward' records only the inputs and output gradients of "
                "nn.Linear, nn.Conv1d/2d, transformers' Conv1D and nn.Embedding layers, so it "
                "cannot give these selected parameters a Fisher: "
                + "; ".join(f"{k} ({why})" for k, why in list(reasons.items())[:8])
                + ". Select only such layers' parameters (params=...) or use source='batch'."
            )
        self.layers: dict[str, KFACLayer] = dict(layers)
        self.order = list(params)
        self._params = dict(params)
        # autograd ids of the backwards that accumulated into a selected parameter's .grad
        # (a torch.autograd.grad call, e.g. FGSM's input gradient or a gradient-norm
        # probe, does not: its output gradients are not the training step's; see _build)
        self._grad_tasks: set[int] = set()
        self._model = model
        self._pass = 0
        # {layer: [[pass id, input, {backward id: output grad} or None, made inside a model
        #           call, recomputed inside a backward through several forwards], ...]}
        self._records: dict[str, list[list[Any]]] = {k: [] for k in self.layers}
        self._inside = False  # a call of the model itself is running
        self._backward_since_pass = False  # a recorded output gradient arrived since
        self._forwards_since_backward = 0  # forwards started since the last backward began
        self._forwards_in_backward = 0  # of the backward running now (or the last one)
        self._backward_task = -1  # autograd's id of that backward
        self._warned_outside = False  # the shared-layer warning was given
        self._warned_sizes = False  # the unequal-micro-batch warning was given
        self._forwards_per_step: int | None = None  # forwards recorded for the last refresh
        self._warned_windows = False  # the changed-accumulation warning was given
        self._batch_sizes: dict[int, int | None] = {}
        # {pass id: ("step", num_items_in_batch) or ("tokens", kept-label count)}, from each
        # model call's keywords (or its dict argument); read by the token means, and under
        # "mean" only to see that the Trainer passed num_items_in_batch (no "tokens")
        self._divisors: dict[int, tuple[str, Any]] = {}
        self._warned_accumulation = False  # the undivided-micro-batch-means warning was given
        self._warned_processes = False  # the num_items_in_batch-under-DDP check was made
        # under torch.distributed, token means with num_items_in_batch: {pass id: the call's
        # kept labels, unshifted and shifted} (see _counts_all_processes)
        self._local_counts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._warned_tokens = False  # the token-labels-under-"mean" warning was given
        self._warned_counts = False  # the unequal-token-counts warning was given
        # loss_reduction="element_mean": {pass id: output values per sample, or None when
        # the model's output is not a tensor with a batch axis}, read at each model call
        self._elements: dict[int, int | None] = {}
        self._warned_elements = False  # the several-outputs-under-"mean" warning was given
        self._handles: list[Any] = []
        self._removed = False
        # one live capture per model: an older one (its preconditioner rebuilt, e.g. a
        # second Trainer.fit calling configure_optimizers) kept its hooks and recorded
        # every later batch, its records never taken (found by review)
        older = _LIVE.get(model)
        if older is not None and older() is not None and not older()._removed:  # type: ignore[union-attr]
            older().remove()  # type: ignore[union-attr]
            warnings.warn(
                "FisherPreconditioner(source='backward'): this model already had one; the "
                "older one's hooks are removed (one per model; its step() now finds nothing "
                "recorded). Call pre.close() on a preconditioner you stop using.",
                UserWarning,
                stacklevel=4,
            )
        _LIVE[model] = weakref.ref(self)
        self._layer_hooks = {k: self._hook(k) for k in self.layers}  # the same on every arming
        self._warned_global = False  # the global-forward-hook warning was given
        # the inputs of the first recorded model call, re-run under OutsideUses at the
        # first refresh: a layer whose parameters the forward also reads outside the
        # layer's own calls is refused
        self._check_inputs: tuple[Any, Any] | None = None
        self._stash_handle: Any = None
        self._uses_checked = False
        #: the constant the loss was multiplied by before ``backward``; :meth:`take`
        #: divides the recorded output gradients by it
        self.loss_scale = 1.0
        #: a loss scaler's ``get_scale`` (``torch.amp.GradScaler``), or None: read at each
        #: recorded forward into :attr:`loss_scale`; a change of scale means the scaler
        #: skipped the step of the records made before it, which are then dropped
        self.scale_source: Callable[[], float] | None = None

    @property
    def params(self) -> Mapping[str, nn.Parameter]:
        """The selected parameters the capture records for, by name."""
        return self._params

    @property
    def armed(self) -> bool:
        """Whether the coming forwards and backwards are recorded.

        The hooks are on the model only while armed (a hooked module's call costs more
        even when its hook does nothing: about 10% of a small MLP's forward and backward),
        each put first among the module's hooks, so it sees the layer's own output even
        when a later hook of the user's replaces it.
        """
        return bool(self._handles)

    @armed.setter
    def armed(self, value: bool) -> None:
        if value and not self._handles and not self._removed:
            self._handles = [
                self._model.register_forward_pre_hook(
                    self._new_pass, with_kwargs=True, prepend=True),
                self._model.register_forward_hook(self._end_pass, always_call=True),
            ]
            if not self._uses_checked and self._check_inputs is None:
                self._stash_handle = self._model.register_forward_pre_hook(
                    self._stash_inputs, with_kwargs=True)
            self._handles += [
                lay.module.register_forward_hook(self._layer_hooks[k], prepend=True)
                for k, lay in self.layers.items()
            ]
            self._handles += [
                p.register_post_accumulate_grad_hook(self._accumulated)  # type: ignore[no-untyped-call]  # torch: unannotated
                for p in self._params.values() if p.requires_grad
            ]
        elif not value:
            for h in self._handles:
                h.remove()
            self._handles = []
            if self._stash_handle is not None:
                self._stash_handle.remove()
                self._stash_handle = None

    def backpropagated(self) -> bool:
        """Whether a backward through the model ran since the last take/clear while armed
        (a recorded output gradient, or a selected parameter's ``.grad`` written)."""
        return bool(self._grad_tasks) or any(
            r[2] is not None for v in self._records.values() for r in v)

    def _accumulated(self, param: torch.Tensor) -> None:
        """A backward wrote a selected parameter's ``.grad``: its records count."""
        self._grad_tasks.add(current_backward_id())

    def _end_pass(self, module: nn.Module, args: Any, output: Any) -> None:
        if module is not self._model:
            return
        was_inside, self._inside = self._inside, False
        if not was_inside or in_internal_pass():
            return
        if self.loss_reduction != "element_mean" and (
                self.loss_reduction != "mean" or not self.per_output_loss
                or self._warned_elements):
            return
        try:  # the output the loss reads (a model output object's logits)
            out = self.output_fn(output)
        except (TypeError, KeyError, AttributeError, IndexError):
            out = None  # not readable: element_mean refuses it by name at the refresh
        d = (out[0].numel() if isinstance(out, torch.Tensor) and out.dim() >= 1
             and out.shape[0] > 0 else None)  # values per sample
        if self.loss_reduction == "element_mean":
            self._elements[self._pass] = d
        elif d is not None and d > 1 and isinstance(out, torch.Tensor) and out.dim() >= 2:
            self._warned_elements = True  # once per capture
            warnings.warn(
                f"source='backward' with loss_reduction='mean' reads the loss as summed over "
                f"each sample's {d} outputs and averaged over the samples, "
                "but torch's default nn.MSELoss() / nn.BCEWithLogitsLoss() "
                "(reduction='mean') also average over the outputs, which makes the recorded "
                f"curvature 1/{d}² of the right one. With such a loss pass "
                "loss_reduction='element_mean' to FisherPreconditioner (or sum the loss over "
                "the outputs and divide by the batch size).",
                UserWarning,
                stacklevel=5,
            )

    def _stash_inputs(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        """Keep the first recorded model call's inputs for :meth:`_check_outside_uses`
        (a hook of its own, removed at once: the per-call hooks stay free of this state)."""
        if (in_internal_pass() or module is not self._model or not torch.is_grad_enabled()
                or self._check_inputs is not None):
            return
        self._check_inputs = (  # copies: the caller may reuse its input buffers
            tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args),
            {k: v.detach().clone() if isinstance(v, torch.Tensor) else v
             for k, v in kwargs.items()},
        )
        if self._stash_handle is not None:
            self._stash_handle.remove()
            self._stash_handle = None

    def _check_outside_uses(self) -> None:
        """Re-run the model on its first recorded call's inputs under
        :class:`~natgrad.curvature.kfac.OutsideUses` (natgrad's own pass: the layer hooks
        ignore it; the model's mode, no backward, the random state and the buffers
        restored), once; refuse the layers whose parameters it reads outside their own
        calls."""
        assert self._check_inputs is not None
        args, kwargs = self._check_inputs
        self._check_inputs = None
        uses = OutsideUses(self.layers)
        marks = uses.hooks()
        for k, lay in self.layers.items():
            if lay.module is self._model:  # a bare layer as the model: its call is running,
                uses.active[k] += 1  # and its pre-hooks were read before this one ran
        devices = sorted({p.device.index or 0 for p in self._model.parameters()
                          if p.device.type == "cuda"})
        # the model's own mode (a branch taken in training only reads weights too); the
        # buffers a training-mode forward updates (BatchNorm statistics) are put back
        buffers = [(b, b.detach().clone()) for b in self._model.buffers()]
        try:
            with torch.random.fork_rng(devices=devices), internal_pass(), \
                    torch.enable_grad(), uses:
                self._model(*args, **kwargs)
        finally:
            for h in marks:
                h.remove()
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
        if not uses.outside:
            self._uses_checked = True
            return
        self.remove()  # this capture cannot be used: leave the model as it was
        raise ValueError(
            f"source='backward' cannot record the layers {sorted(uses.outside)}: "
            f"{OUTSIDE_REASON}, so their recorded statistics would silently leave those "
            "gradient terms out. Build the preconditioner again with them left out of "
            "params=..., or use source='batch', which keeps such layers diagonal (exact)."
        )

    def _new_pass(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        if in_internal_pass():  # natgrad's own pass (a Fisher, a probe): not the user's
            return
        if module is not self._model:  # a deep copy of the model carries the hooks
            return
        if not torch.is_grad_enabled():  # records nothing (evaluation): no forward to count
            return
        # a new forward at every call of the model (a flag, not a depth: torch skips the
        # closing hook on a KeyboardInterrupt, and the next call must still start afresh)
        self._inside = True
        if global_forward_hooks() and not self._warned_global:
            self._warned_global = True  # once per capture
            warnings.warn(
                "A global forward hook is registered (register_module_forward_hook): it runs "
                "before source='backward''s layer hooks, so if it replaces a layer's output, "
                "the recorded output gradient is the replaced output's, not the layer's (a "
                "wrong K-FAC G or diagonal Fisher). Remove the hook while the preconditioner "
                "records, or use source='batch' with kind='diag' (whose capture path then "
                "runs on vmap).",
                UserWarning,
                stacklevel=2,
            )
        # the model's batch size: of its first tensor input (None: unknown)
        first = next((a for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor)), None)
        self._start_pass(int(first.shape[0]) if first is not None and first.dim() else None)
        self._read_divisor(args, kwargs)

    def _read_divisor(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        """Token means: keep the number of tokens this call's loss is divided by (see the
        module doc); ``mean``: warn once if the call got token labels. The keywords, or
        else the entries of a dict argument (a wrapper whose ``forward(batch)`` calls
        ``model(**batch)``)."""
        if "labels" not in kwargs and "num_items_in_batch" not in kwargs:
            kwargs = next((a for a in args if isinstance(a, Mapping)), kwargs)
        labels = kwargs.get("labels")
        items = kwargs.get("num_items_in_batch")
        if self.loss_reduction == "mean" and items is not None:
            self._divisors[self._pass] = ("step", items)  # see _warn_undivided
        if self.loss_reduction in _TOKEN_MEANS:
            if items is not None:
                if isinstance(items, torch.Tensor) and items.numel() != 1:
                    raise ValueError(
                        f"loss_reduction={self.loss_reduction!r} reads num_items_in_batch as the "
                        "one number of kept tokens this call's loss is divided by, but it is a "
                        f"tensor of shape {tuple(items.shape)} (one count per device: "
                        "DataParallel). Pass one count per call (a Python int or a 0-d "
                        "tensor); under torch.nn.DataParallel use DistributedDataParallel."
                    )
                self._divisors[self._pass] = ("step", items)
                if isinstance(labels, torch.Tensor) and rank_and_world(is_distributed())[1] > 1:
                    self._local_counts[self._pass] = (
                        labels.ne(IGNORE_INDEX).sum(), labels[..., 1:].ne(IGNORE_INDEX).sum()
                    )
            elif isinstance(labels, torch.Tensor):
                shifted = self.loss_reduction == "shifted_token_mean"
                kept = labels[..., 1:] if shifted else labels
                self._divisors[self._pass] = ("tokens", kept.ne(IGNORE_INDEX).sum())
        elif (self.loss_reduction == "mean" and not self._warned_tokens
              and isinstance(labels, torch.Tensor) and labels.dim() >= 2
              and not labels.is_floating_point() and labels.shape[1] > 1):
            self._warned_tokens = True  # once per capture
            warnings.warn(
                f"source='backward' with loss_reduction='mean' reads the loss as a mean over "
                f"the {labels.shape[0]} samples of the batch, but the model was called with "
                f"token labels {tuple(labels.shape)}: a model whose loss is a mean over the "
                "kept tokens (Hugging Face language and token-classification models) makes "
                "the recorded curvature (N/K)² too small (K kept tokens; 1/T² without "
                "padding). Pass loss_reduction='token_mean' to FisherPreconditioner "
                "('shifted_token_mean' for a causal LM whose loss shifts its labels).",
                UserWarning,
                stacklevel=5,  # the user's model call
            )

    def _start_pass(self, model_n: int | None, by_model: bool = True) -> None:
        """A new forward: read the loss scale, number it, count it for the backward."""
        if self.scale_source is not None:
            scale = float(self.scale_source())
            if scale != self.loss_scale:
                # the loss scaler changed its scale since the records: it skipped the step
                # they belong to (an overflow), which no refresh may count
                self.drop_backpropagated()
                self.loss_scale = scale
        self._pass += 1
        self._backward_since_pass = False
        self._forwards_since_backward += 1
        if by_model:
            self._batch_sizes[self._pass] = model_n

    def _backward_seen(self) -> None:
        """At a backward's first hook: how many forwards it back-propagates (at most)."""
        task = current_backward_id()
        if task != self._backward_task:
            self._backward_task = task
            self._forwards_in_backward = self._forwards_since_backward
            self._forwards_since_backward = 0

    def _hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        layer = self.layers[name].module

        def fn(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not torch.is_grad_enabled() or in_internal_pass():
                return
            if module is not layer and getattr(module, "_is_replica", False):
                raise RuntimeError(
                    "nn.DataParallel runs copies of the model's layers in threads, which "
                    "source='backward' cannot record; use DistributedDataParallel (one "
                    "process per device) or source='batch'."
                )
            # not a deep copy of the layer (copy.deepcopy(model) while armed copies the
            # hooks, whose passes would count as this model's samples)
            if module is not layer:
                return
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                return
            inside, unsure = self._inside, False
            if not inside and current_backward_id() != -1:
                # a layer recomputed inside a backward (reentrant checkpointing): it belongs
                # to the forward being back-propagated, the latest one, unless the backward
                # runs through several forwards (then which one is unknown)
                self._backward_seen()
                unsure = self._forwards_in_backward > 1
                inside = self._pass in self._batch_sizes
            elif not inside and (self._backward_since_pass or self._pass in self._batch_sizes
                                 or not self._pass):
                # the model's parts called without the model: a backward ends a forward
                self._start_pass(None, by_model=False)
            rec = [self._pass, args[0].detach(), None, inside, unsure]
            self._records[name].append(rec)

            def grad_hook(g: torch.Tensor) -> None:
                self._backward_seen()
                g = g.detach()  # a forward back-propagated in several calls: their sum
                task = current_backward_id()
                if rec[2] is None:
                    rec[2] = {task: g}
                else:
                    rec[2][task] = g if task not in rec[2] else rec[2][task] + g
                self._backward_since_pass = True

            output.register_hook(grad_hook)  # type: ignore[no-untyped-call]  # torch: unannotated

        return fn

    def clear(self) -> None:
        """Forget every record."""
        for v in self._records.values():
            v.clear()
        self._grad_tasks.clear()
        for d in self._per_pass():
            d.clear()
        self._inside = False

    def drop_backpropagated(self) -> None:
        """Forget the records whose backward has run (their gradients are being zeroed,
        e.g. after a step that was skipped); a forward still waiting for its backward
        keeps its record."""
        for v in self._records.values():
            v[:] = [r for r in v if r[2] is None]
        live = {r[0] for v in self._records.values() for r in v}
        for d in self._per_pass():
            for pid in [p for p in d if p not in live]:
                del d[pid]

    def _per_pass(self) -> tuple[dict[int, Any], ...]:
        """The dicts keyed by pass id (what each recorded forward was called with)."""
        return (self._batch_sizes, self._divisors, self._elements, self._local_counts)

    def remove(self) -> None:
        """Remove the hooks (the capture records nothing afterwards: ``armed`` stays
        False, setting it is ignored)."""
        self.armed = False
        self._removed = True
        self.clear()

    def take(self) -> Captured:
        """The records since the last :meth:`take` / :meth:`clear` as a ``Captured``
        (records without a gradient, i.e. forwards never back-propagated, are dropped),
        then clear.

        Returns:
            ``Captured`` with ``n`` the number of samples, ``inputs[layer]``
            ``(n, T, groups, d_A)``, ``grads[layer] = [(1.0, (n, T, groups, d_G))]`` (the
            per-sample-loss output gradients, see the module doc).

        Raises:
            ValueError: nothing was recorded (no forward and backward since the last
                step); a layer called without the batch as its first dimension; layers that
                disagree on the samples of a forward.
        """
        try:
            if self._check_inputs is not None:  # the first refresh (see the module doc)
                self._check_outside_uses()
            return self._build()
        finally:
            self.clear()

    def _counted(self) -> list[tuple[str, list[Any]]]:
        """``(layer, record)`` of every back-propagated record, its gradient the sum over
        the backwards that wrote ``.grad`` (in their order). A ``torch.autograd.grad``
        through the model (FGSM's input gradient, a gradient-norm probe with
        ``retain_graph=True``) writes none, so its output gradients are left out, and a
        forward only it back-propagated is dropped. When no backward wrote ``.grad`` (a
        loop that assigns ``p.grad`` from ``torch.autograd.grad`` itself), every backward
        counts."""
        recs = [(name, r) for name, v in self._records.items() for r in v if r[2] is not None]
        tasks = {t for _, r in recs for t in r[2]}
        use = tasks & self._grad_tasks or tasks
        out = []
        for name, r in recs:
            parts = [g for t, g in r[2].items() if t in use]
            if parts:
                g = parts[0]
                for more in parts[1:]:
                    g = g + more
                out.append((name, [r[0], r[1], g, r[3], r[4]]))
        return out

    def _build(self) -> Captured:
        done = self._counted()
        unsure = sorted({name for name, r in done if r[4]})
        if unsure:
            raise ValueError(
                f"source='backward': layers {unsure[:8]} were recomputed (reentrant gradient "
                "checkpointing) inside one backward through several forwards, so which "
                "forward's samples they belong to is unknown. Back-propagate each forward "
                "on its own (gradient accumulation does), or checkpoint with "
                "use_reentrant=False."
            )
        if any(r[3] for _, r in done) and not all(r[3] for _, r in done):
            # the model was called, so calls made outside it are another model's
            outside = sorted({name for name, r in done if not r[3]})
            done = [(name, r) for name, r in done if r[3]]
            if not self._warned_outside:
                self._warned_outside = True
                warnings.warn(
                    f"source='backward': layers {outside[:8]} also ran outside the model's "
                    "own forward (shared with another model?); only their calls inside the "
                    "model's forward are recorded. If those calls were the model's own "
                    "samples, call the model itself (model(x)) for them.",
                    UserWarning,
                    stacklevel=4,
                )
        per_pass: dict[int, dict[str, list[tuple[torch.Tensor, torch.Tensor]]]] = {}
        for name, (pid, x, g, _, _) in done:
            per_pass.setdefault(pid, {}).setdefault(name, []).append((x, g))
        if not per_pass:
            raise ValueError(
                "source='backward' found no recorded forward and backward for this refresh: "
                "call the model and loss.backward() (with grad enabled) before pre.step(), "
                "or use source='batch' and pass the batch."
            )
        pass_scale = (self._token_scales(sorted(per_pass))
                      if self.loss_reduction in _TOKEN_MEANS else {})
        inputs: dict[str, list[torch.Tensor]] = {k: [] for k in self.layers}
        grads: dict[str, list[torch.Tensor]] = {k: [] for k in self.layers}
        n_total = 0
        sizes_seen: list[int] = []
        pcache: dict[Any, torch.Tensor] = {}  # layers reading one input share its patches
        for pid in sorted(per_pass):
            calls = per_pass[pid]
            sizes = {k: {int(x.shape[0]) if x.dim() else -1 for x, _ in v} for k, v in calls.items()}
            n_set = set().union(*sizes.values())
            bad = [k for k, v in calls.items() if any(x.dim() == 0 or g.shape[0] != x.shape[0]
                                                      for x, g in v)]
            model_n = self._batch_sizes.get(pid)
            if model_n is not None and n_set != {model_n}:
                bad = bad or [k for k, v in sizes.items() if v != {model_n}]
            if bad or len(n_set) != 1:
                raise ValueError(
                    f"source='backward' needs every K-FAC layer called with the batch as first "
                    f"dimension; in one forward (model batch size {model_n}) the layers saw "
                    f"batch sizes {sizes} "
                    f"(layers {bad[:8]} disagree with their outputs). Use source='batch'."
                )
            n = n_set.pop()
            for k in self.layers:
                if k not in calls:
                    continue
                lay = self.layers[k]
                a = layer_patches(lay, [x for x, _ in calls[k]], pcache)
                bs = [out_grads(lay, g) for _, g in calls[k]]
                inputs[k].append(a)
                b = bs[0] if len(bs) == 1 else torch.cat(bs, 1)
                grads[k].append(b * pass_scale[pid] if pid in pass_scale else b)
            n_total += n
            sizes_seen.append(n)
        means = ("mean", "element_mean")  # a mean over the samples (and their outputs)
        if self.loss_reduction in means and len(set(sizes_seen)) > 1 and not self._warned_sizes:
            self._warned_sizes = True  # once per capture
            warnings.warn(
                f"source='backward' recorded forwards of unequal sizes {sizes_seen} for one "
                "step and reads their loss as the mean over all their samples (each "
                "micro-batch's summed loss divided by the total count). If each micro-batch's "
                "mean loss was divided by the number of micro-batches instead (Lightning's "
                "accumulate_grad_batches, a plain loop), micro-batch i's samples weigh "
                "(N/(k·n_i))² times what they should in the curvature (4/9 and 4 for sizes "
                "6 and 2): use drop_last=True on the training DataLoader, or equal "
                "micro-batches.",
                UserWarning,
                stacklevel=4,
            )
        k_now = len(sizes_seen)
        if (self.loss_reduction in means and self._forwards_per_step is not None
                and k_now != self._forwards_per_step and not self._warned_windows):
            self._warned_windows = True  # once per capture
            warnings.warn(
                f"source='backward' recorded {k_now} forward(s) for this step but "
                f"{self._forwards_per_step} for an earlier one. If every micro-batch's mean "
                f"loss was divided by {self._forwards_per_step} (gradient accumulation: "
                "Lightning's accumulate_grad_batches with an incomplete last window, or a "
                "micro-batch skipped by returning None), this step's curvature is "
                f"({k_now}/{self._forwards_per_step})² of the right one: make the batches per "
                "epoch a multiple of the accumulation count (limit_train_batches) and skip "
                "no micro-batch.",
                UserWarning,
                stacklevel=4,
            )
        self._forwards_per_step = k_now
        self._warn_undivided(sorted(per_pass))
        # the per-sample-loss gradients: L = (1/N) Σ_n l_n over every recorded sample
        # (token means: each forward's own count, applied above)
        if self.loss_reduction == "element_mean":
            scale = float(n_total * self._output_values(sorted(per_pass))) / self.loss_scale
        else:
            scale = (float(n_total) if self.loss_reduction == "mean" else 1.0) / self.loss_scale
        out_in = {k: v[0] if len(v) == 1 else torch.cat(v, 0) for k, v in inputs.items() if v}
        partial = [k for k, v in out_in.items() if v.shape[0] != n_total]
        if partial:
            raise ValueError(
                f"Layers {partial[:8]} were reached in some forwards but not others since the "
                "last refresh; source='backward' needs the same layers in every forward. "
                "Use source='batch'."
            )
        out_g: dict[str, list[tuple[float, torch.Tensor]]] = {}
        for k, v in grads.items():
            if v:
                b = v[0] if len(v) == 1 else torch.cat(v, 0)
                out_g[k] = [(1.0, b * scale if scale != 1.0 else b)]
        return Captured(n_total, out_in, out_g, [])

    def _output_values(self, passes: list[int]) -> int:
        """``element_mean``: the model output's values per sample ``D``, one for every
        recorded forward (see the module doc)."""
        values = {self._elements.get(p) for p in passes}
        if None in values:
            raise ValueError(
                "loss_reduction='element_mean' reads the number of outputs per sample the "
                "loss averages over from the output of each call of the model given to the "
                "preconditioner, but a recorded forward returned something other than a "
                "tensor with a batch axis (a tuple, a dict, a model output object) or the "
                "training step called the model's parts, not the model. Call the model "
                "itself and return its output tensor, or sum the loss over the outputs, "
                "divide it by the batch size and use loss_reduction='mean'."
            )
        if len(values) > 1:
            raise ValueError(
                f"loss_reduction='element_mean': the recorded forwards' outputs have "
                f"{sorted(v for v in values if v is not None)} values per sample, so no one "
                "mean over N·D values describes their loss. Keep the output size fixed "
                "within an optimizer step, or use a summed loss and loss_reduction='sum'."
            )
        d = values.pop()
        assert d is not None
        return d

    def _warn_undivided(self, passes: list[int]) -> None:
        """``"mean"``: warn once when the forwards of one step (more than one) were called
        with ``num_items_in_batch``.

        The Hugging Face Trainer passes that keyword exactly when
        ``trainer.model_accepts_loss_kwargs`` is True (a model whose ``forward`` takes
        ``**kwargs``), and then takes the loss as normalized over the whole step: it does
        not divide the ``k`` micro-batch losses by ``k``. A model whose loss is the mean
        over its own micro-batch, ignoring the keyword (``BertForSequenceClassification``
        and the other heads with their own ``CrossEntropyLoss``), then back-propagates
        ``Σ_i mean_i = k`` times the step's mean, and ``"mean"`` reads a curvature ``k²``
        too large (a scale only, with equal micro-batches). A model that divides by the
        keyword back-propagates the step's mean, which ``"mean"`` reads right; natgrad
        cannot tell the two apart, so it warns and names both fixes.
        """
        given = [p for p in passes if self._divisors.get(p, ("",))[0] == "step"]
        k = len(passes)
        if self.loss_reduction != "mean" or k < 2 or not given or self._warned_accumulation:
            return
        self._warned_accumulation = True  # once per capture
        warnings.warn(
            f"source='backward' with loss_reduction='mean' recorded {k} forwards for one "
            "step, called with num_items_in_batch=: the Hugging Face Trainer passes it when "
            "trainer.model_accepts_loss_kwargs is True, and then does not divide the "
            "micro-batch losses by gradient_accumulation_steps. A model whose loss is the "
            "mean over its own micro-batch and ignores num_items_in_batch "
            "(BertForSequenceClassification and other heads with their own "
            f"CrossEntropyLoss) then back-propagates {k} times the step's mean loss: the "
            f"gradient is {k}x and the recorded curvature {k * k}x too large. Set "
            "trainer.model_accepts_loss_kwargs = False after building the Trainer (it then "
            "divides; exact), or, if the model's loss divides by num_items_in_batch, pass "
            "loss_reduction='token_mean', which reads that count (exact).",
            UserWarning,
            stacklevel=5,
        )

    def _counts_all_processes(self, steps: Mapping[int, float]) -> bool:
        """Whether the ``num_items_in_batch`` of the passes ``steps`` (``{pass id: count}``,
        one step's forwards) is not this process's own count: the kept labels of those
        forwards, summed, unshifted or shifted (either may be the loss's). True also when
        a forward carried no labels to count (it cannot be told)."""
        if any(p not in self._local_counts for p in steps):
            return True
        own = [sum(float(self._local_counts[p][i]) for p in steps) for i in (0, 1)]
        return all(abs(count - o) > 0.5 for count in set(steps.values()) for o in own)

    def _token_scales(self, passes: list[int]) -> dict[int, float]:
        """Token means: each forward's multiplier ``K`` (see the module doc)."""
        missing = [p for p in passes if p not in self._divisors]
        if missing:
            raise ValueError(
                f"loss_reduction={self.loss_reduction!r} reads the number of kept tokens the loss is "
                "averaged over from each call of the model given to the preconditioner, from "
                "its num_items_in_batch= or labels= keyword or the entries of its dict "
                "argument (as Hugging Face models take them), but a recorded forward had "
                "neither (or the training step called the model's parts, not the model). "
                "Pass labels=... (ignore_index -100) to that model's call, or use "
                "loss_reduction='sum' with a summed loss."
            )
        steps = {p: float(self._divisors[p][1]) for p in passes if self._divisors[p][0] == "step"}
        rank, world = rank_and_world(is_distributed())
        if steps and not self._warned_processes and world > 1:
            self._warned_processes = True  # checked once per capture (one setting per run)
            if rank == 0 and self._counts_all_processes(steps):
                warnings.warn(
                    "source='backward' reads num_items_in_batch as the count this process's "
                    "loss is divided by, but it is not this process's count of kept labels "
                    "(or the calls had no labels to count). The Hugging Face Trainer with "
                    "average_tokens_across_devices=True (its default) passes the count of all "
                    f"{world} processes and multiplies each process's loss by {world}, which "
                    f"makes the recorded curvature {world}² too large: set "
                    "average_tokens_across_devices=False in TrainingArguments (exact).",
                    UserWarning,
                    stacklevel=5,
                )
        counts = {p: float(self._divisors[p][1]) for p in passes if self._divisors[p][0] == "tokens"}
        if len(set(counts.values())) > 1 and not self._warned_counts:
            self._warned_counts = True  # once per capture
            warnings.warn(
                f"source='backward' with loss_reduction={self.loss_reduction!r} recorded forwards with "
                f"{sorted(counts.values())} kept tokens for one step and reads their loss as "
                "the mean over all their kept tokens. If each forward's own token mean was "
                "divided by the number of forwards (gradient accumulation without "
                "num_items_in_batch), their tokens are weighed unequally in the curvature: "
                "pass num_items_in_batch= to the model (the Hugging Face Trainer does when "
                "the model accepts loss kwargs), or use equal micro-batches.",
                UserWarning,
                stacklevel=5,
            )
        total = sum(counts.values())
        out = {**steps, **dict.fromkeys(counts, total)}
        if any(v <= 0 for v in out.values()):
            raise ValueError(
                f"loss_reduction={self.loss_reduction!r}: a recorded forward's loss averages over no "
                "token (every label is -100, or num_items_in_batch is 0), so its gradient "
                "is not a token mean; leave such batches out of training."
            )
        return out


def per_sample_gradients(
    layers: Mapping[str, KFACLayer], cap: Captured, *, max_floats: int = 2**24
) -> dict[str, torch.Tensor]:
    """Exact per-sample gradients of the covered parameters from a ``Captured``.

    For a layer ``s_nt = W ã_nt`` the gradient of the per-sample loss ``l_n`` with respect
    to the block matrix ``[W, b]`` is ``g_n = Σ_t b_nt ã_ntᵀ`` (``b_nt = ∂l_n/∂s_nt``, as
    :meth:`BackwardCapture.take` records it), so the records of one forward and backward
    hold every sample's gradient without another pass.

    Args:
        layers: ``{layer name: KFACLayer}`` (e.g. ``BackwardCapture.layers``).
        cap: the records (``BackwardCapture.take()``); only its first label column is used.
        max_floats: block-matrix floats formed at once (the work is chunked over samples).

    A layer pruned by ``torch.nn.utils.prune`` (parameters ``weight_orig`` /
    ``bias_orig``, computing with ``W_orig ⊙ M``) gets ``M ⊙ g_n``, the gradient of its
    parameters (zero at the pruned entries).

    Returns:
        ``{parameter name: (N, *parameter shape)}`` for the weight and covered bias of every
        layer (zeros for a layer the forward never reached), in the accumulation dtype.
    """
    out: dict[str, torch.Tensor] = {}
    for k, lay in layers.items():
        w = lay.module_weight
        g, dG, dA = lay.dims()
        shape = tuple(w.shape)
        dt = cap.grads[k][0][1].dtype if cap.grads.get(k) else to_acc(w.detach()).dtype
        V = torch.zeros(cap.n, g, dG, dA, dtype=dt, device=w.device)
        if k in cap.inputs:
            a, (_, b) = cap.inputs[k], cap.grads[k][0]
            step = max(1, max_floats // max(g * dG * dA, 1))
            for i in range(0, cap.n, step):
                V[i : i + step] = per_sample_blocks(lay, a[i : i + step], b[i : i + step])
            mask = lay.mask_block(dt)
            if mask is not None:
                V *= mask
        Wn = V[..., :-1] if lay.bias is not None else V
        if lay.transposed:  # the block is Wᵀ: (N, 1, d_out, d_in) -> (N, d_in, d_out)
            out[lay.weight] = Wn[:, 0].transpose(1, 2).contiguous()
        else:
            out[lay.weight] = Wn.reshape(cap.n, *shape)
        if lay.bias is not None:
            out[lay.bias] = V[..., -1].reshape(cap.n, -1).contiguous()
    return out

