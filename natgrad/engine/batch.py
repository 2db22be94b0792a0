"""Batches and model outputs: one normal form for tuples, bare inputs and dict batches.

Which tensors are per-sample: a batch holds ``N`` samples, where ``N`` is the first
dimension of the labels when the batch has labels, else of the first input tensor
(positional before keyword, in the dict's order). An input tensor whose first
dimension is ``N`` holds one row per sample and is split across samples; every other
input (a tensor of another leading size or a 0-d tensor, such as a ``(T, T)``
attention mask or a ``(3,)`` scale, and any non-tensor) is *shared*: each sample's
forward receives it whole and unchanged. A shared tensor whose first dimension
happens to equal ``N`` (a ``(T, T)`` mask with ``T == N``) cannot be told apart from
a per-sample one by its shape; wrap it with :func:`shared` to pass it whole. Without
labels, a shared tensor listed first (``position_ids`` of shape ``(1, T)`` before ``x``
of shape ``(N, T, D)``) is read as the batch, and the real per-sample inputs as shared:
the model's output then lacks one row per sample, or a probe of a few samples fails,
and the error names the entries passed whole (:meth:`Batch.shared_hint`) and the fixes
(:func:`shared`, a per-sample input listed first, or the labels).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from natgrad.engine.checks import check_not_python_numbers

LABEL_KEYS = ("labels", "label", "y", "targets")
#: inputs of an encoder-decoder model's decoder (Hugging Face names): with one of them in
#: a batch, the labels are the decoder's, and ``attention_mask`` (the encoder's) does not
#: mark their padding; ``decoder_attention_mask`` does, when given
DECODER_INPUTS = ("decoder_input_ids", "decoder_inputs_embeds")


def encoder_decoder(kwargs: Mapping[str, Any]) -> bool:
    """Whether a batch's keyword inputs are an encoder-decoder model's (one of
    :data:`DECODER_INPUTS` is present)."""
    return any(k in kwargs for k in DECODER_INPUTS)


@dataclass(frozen=True)
class Shared:
    """A batch entry passed whole to every sample (see :func:`shared`)."""

    tensor: torch.Tensor


def shared(tensor: torch.Tensor) -> Shared:
    """Mark a batch entry as shared by all samples, whatever its shape.

    Needed only when the entry's first dimension equals the batch size ``N`` (e.g. a
    ``(T, T)`` attention mask with ``T == N``); any other tensor without a leading
    batch dimension is shared already. natgrad unwraps it and hands the model the
    tensor itself.

    Args:
        tensor: the shared tensor.

    Returns:
        A :class:`Shared` wrapper to put in the batch in place of the tensor.

    Raises:
        TypeError: ``tensor`` is not a tensor.

    Example:
        >>> import torch
        >>> mask = torch.zeros(4, 4)
        >>> b = parse_batch({"x": torch.randn(4, 3), "mask": shared(mask), "labels": torch.zeros(4)})
        >>> b.kwargs["mask"] is mask, b.kw_dims
        (True, {'x': 0, 'mask': None})
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(
            f"natgrad.shared expects a tensor, got {type(tensor).__name__}; wrap the tensor "
            "that every sample should see whole, e.g. natgrad.shared(attention_mask)."
        )
    return Shared(tensor)


@dataclass
class Batch:
    """A parsed batch: positional args and keyword args for the model, target, size.

    ``target`` is None when the batch carries no labels. ``mask`` is a dict batch's
    per-sample ``attention_mask`` (the inputs' padding, which layer-wise code such as
    pruning's re-fit reads), None for an encoder-decoder batch (its decoder layers run on
    other positions); the labels' padding is :meth:`label_mask`. ``arg_dims`` /
    ``kw_dims`` give each input's batch axis: ``0`` for
    per-sample tensors, ``None`` for shared entries (the ``in_dims`` of ``vmap``);
    they are decided once, for the whole batch, and kept by :meth:`select`.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    target: torch.Tensor | None
    mask: torch.Tensor | None
    size: int
    arg_dims: tuple[int | None, ...] | None = None
    kw_dims: dict[str, int | None] | None = None

    def __post_init__(self) -> None:
        if self.arg_dims is None:
            self.arg_dims = tuple(batch_dim(a, self.size) for a in self.args)
        if self.kw_dims is None:
            self.kw_dims = {k: batch_dim(v, self.size) for k, v in self.kwargs.items()}

    def dims(self) -> tuple[tuple[int | None, ...], dict[str, int | None]]:
        """``(arg_dims, kw_dims)``: each input's batch axis (both set by construction)."""
        assert self.arg_dims is not None and self.kw_dims is not None  # set in __post_init__
        return self.arg_dims, self.kw_dims

    def shared_hint(self) -> str:
        """A sentence for errors about the batch's rows: which tensors reached every
        sample whole (shared, their first axis is not the batch axis) and where ``N``
        was read from; ``""`` when no tensor with dimensions is shared.

        Without labels ``N`` is the first dimension of the first input tensor, so a
        shared tensor listed first (``position_ids`` of shape ``(1, T)`` before ``x`` of
        shape ``(N, T, D)``) makes ``N`` its own first dimension and turns the real
        per-sample inputs into shared ones; the model's output then does not have one row
        per sample, or a probe of a few samples cannot run.
        """
        arg_dims, kw_dims = self.dims()
        named = [(f"input {i}", a, d) for i, (a, d) in enumerate(zip(self.args, arg_dims, strict=True))]
        named += [(repr(k), v, kw_dims[k]) for k, v in self.kwargs.items()]
        whole = [k for k, v, d in named if d is None and isinstance(v, torch.Tensor) and v.dim() > 0]
        if not whole:
            return ""
        source = next((k for k, _, d in named if d == 0), None)
        if self.target is not None:
            read = "the labels"
        elif source is not None:
            read = f"{source}, the first input tensor (a batch without labels takes N from it)"
        else:
            read = "the batch"
        return (
            f" The batch's {', '.join(whole)} reached every sample whole (shared): "
            f"{'its' if len(whole) == 1 else 'their'} first axis is not the batch axis, whose size N was read from {read}. If one "
            "of them holds the samples, list it first (or pass the labels) or wrap the "
            "shared entries in natgrad.shared(...)."
        )
    def label_mask(self) -> tuple[str, torch.Tensor] | None:
        """``(key, mask)``: the per-sample mask over the labels' positions, or None.

        It is ``attention_mask`` for encoder-only and decoder-only models, whose labels
        are aligned with the inputs. In an encoder-decoder batch (one holding
        :data:`DECODER_INPUTS`) the labels are the decoder's and ``attention_mask`` is
        the encoder's: the mask is then ``decoder_attention_mask`` when the batch has one,
        else None (the labels' ``-100`` entries carry the padding). A mask without the batch
        dimension (a shared ``(T, T)`` mask) is not a padding mask: None.
        """
        key = "decoder_attention_mask" if encoder_decoder(self.kwargs) else "attention_mask"
        mask = self.kwargs.get(key)
        if not isinstance(mask, torch.Tensor) or self.dims()[1].get(key) != 0:
            return None
        return key, mask

    def to(self, device: torch.device) -> Batch:
        """The batch with its tensors on ``device`` (itself when they all are there)."""
        def mv(t: Any) -> Any:
            return t.to(device) if isinstance(t, torch.Tensor) else t

        if all(
            not isinstance(t, torch.Tensor) or t.device == device
            for t in (*self.args, *self.kwargs.values(), self.target, self.mask)
        ):
            return self
        arg_dims, kw_dims = self.dims()
        return Batch(
            tuple(mv(a) for a in self.args),
            {k: mv(v) for k, v in self.kwargs.items()},
            mv(self.target),
            mv(self.mask),
            self.size,
            arg_dims,
            dict(kw_dims),
        )

    def select(self, start: int, stop: int) -> Batch:
        """Samples ``start:stop``: per-sample inputs, target and mask are sliced,
        shared entries are kept whole."""
        def sl(t: Any, d: int | None) -> Any:
            return t[start:stop] if d == 0 and t is not None else t

        arg_dims, kw_dims = self.dims()
        return Batch(
            tuple(sl(a, d) for a, d in zip(self.args, arg_dims, strict=True)),
            {k: sl(v, kw_dims[k]) for k, v in self.kwargs.items()},
            sl(self.target, 0),
            sl(self.mask, 0),
            min(stop, self.size) - start,
            arg_dims,
            dict(kw_dims),
        )

    def take(self, index: torch.Tensor) -> Batch:
        """The samples at ``index`` (a 1-D long tensor; repeats allowed), without labels."""
        def tk(t: Any, d: int | None) -> Any:
            return t[index.to(t.device)] if d == 0 else t

        arg_dims, kw_dims = self.dims()
        return Batch(
            tuple(tk(a, d) for a, d in zip(self.args, arg_dims, strict=True)),
            {k: tk(v, kw_dims[k]) for k, v in self.kwargs.items()},
            None,
            None,
            len(index),
            arg_dims,
            dict(kw_dims),
        )


def batch_dim(t: Any, n: int) -> int | None:
    """``0`` when ``t`` is a tensor whose first dimension is the batch size ``n``, else None."""
    return 0 if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == n else None


def add_batch_axis(
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    arg_dims: tuple[int | None, ...],
    kw_dims: dict[str, int | None],
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Inside ``vmap`` (or a per-sample loop), give each per-sample input back a batch
    axis of size 1; shared entries stay as they are."""

    def up(t: Any, d: int | None) -> Any:
        return t.unsqueeze(0) if d == 0 else t

    return (
        tuple(up(a, d) for a, d in zip(args, arg_dims, strict=True)),
        {k: up(v, kw_dims[k]) for k, v in kwargs.items()},
    )


def parse_batch(batch: Any) -> Batch:
    """Normalize ``(x, y)``, ``(x,)``, ``x`` or a Hugging Face style dict.

    ``(inputs, y)`` with ``inputs`` a dict (a DataLoader over ``(dict, label)`` pairs) is
    the dict batch ``{**inputs, "labels": y}``: the model is called as ``model(**inputs)``.
    A dict's entries are always keyword arguments (the Hugging Face convention), never
    one positional dict: a model whose ``forward(self, batch)`` takes the dict itself
    fails that call, and :func:`natgrad.engine.checks.forward_failed` names both
    conventions and the fix (a parameter per key, or a wrapper module whose
    ``forward(self, **inputs)`` returns ``model(inputs)``).

    The batch size ``N`` and which inputs are per-sample follow the module docstring:
    inputs whose first dimension is ``N`` are per-sample, all others (and entries
    wrapped in :func:`shared`) are passed whole to every sample. Tensors made under
    ``torch.inference_mode`` (cached evaluation features), which autograd cannot save
    for backward, are copied into ordinary tensors.

    Raises:
        ValueError: for an empty batch, one whose tensors disagree on the batch size, a
            batch without labels whose first tensor looks shared (see the module
            docstring), or ``(inputs, y)`` whose dict holds labels too.
        TypeError: for anything that is not a tensor, tuple/list or mapping, and for
            inputs given as Python lists of numbers or NumPy arrays (labels may be lists:
            they are converted with ``torch.as_tensor``).
    """
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    target: Any
    if isinstance(batch, torch.Tensor):
        args, kwargs, target = (batch,), {}, None
    elif isinstance(batch, (tuple, list)) and 1 <= len(batch) <= 2 and isinstance(batch[0], Mapping):
        # (inputs, y) with the inputs as a dict of the model's keyword arguments, as a
        # DataLoader over (dict, label) pairs collates them: the dict batch with its labels
        inputs = dict(batch[0])
        if len(batch) == 2:
            twice = [k for k in LABEL_KEYS if k in inputs]
            if twice:
                raise ValueError(
                    f"The batch (inputs, y) has labels twice: y and the inputs' {twice[0]!r}; "
                    f"drop one (pass the dict alone, or remove {twice[0]!r} from it)."
                )
            inputs["labels"] = batch[1]
        return parse_batch(inputs)
    elif isinstance(batch, (tuple, list)):
        check_not_python_numbers(batch, "The batch")
        if len(batch) == 0:
            raise ValueError("Empty batch: expected (x, y), (x,) or x.")
        if len(batch) > 2:
            raise ValueError(
                f"A tuple batch must be (x, y) or (x,), got {len(batch)} items; pass a dict "
                "for models with several inputs."
            )
        args = (batch[0],)
        target = batch[1] if len(batch) == 2 else None
        kwargs = {}
    elif isinstance(batch, Mapping):
        kwargs = dict(batch)
        target = None
        for key in LABEL_KEYS:
            if key in kwargs:
                target = kwargs.pop(key)
                break
        args = ()
    else:
        raise TypeError(
            f"Unsupported batch type {type(batch).__name__}: expected a tensor, (x, y), (x,) "
            "or a dict of tensors."
        )
    for a in args:
        check_not_python_numbers(a, "The batch's input")
    for k, v in kwargs.items():
        check_not_python_numbers(v, f"Batch entry {k!r}")
    marked = {i for i, a in enumerate(args) if isinstance(a, Shared)}
    marked_kw = {k for k, v in kwargs.items() if isinstance(v, Shared)}
    args = tuple(a.tensor if isinstance(a, Shared) else a for a in args)
    kwargs = {k: v.tensor if isinstance(v, Shared) else v for k, v in kwargs.items()}
    candidates: list[tuple[str, torch.Tensor]] = [
        (f"input {i}", t)
        for i, t in enumerate(args)
        if i not in marked and isinstance(t, torch.Tensor) and t.dim() > 0
    ] + [
        (repr(k), t)
        for k, t in kwargs.items()
        if k not in marked_kw and isinstance(t, torch.Tensor) and t.dim() > 0
    ]
    leading = [t.shape[0] for _, t in candidates]
    if not leading:
        raise ValueError(
            "The batch holds no input tensor with a batch dimension (tensors wrapped in "
            "natgrad.shared do not count)."
        )
    n = leading[0]
    if n == 0:
        raise ValueError("Empty batch (0 samples): there is nothing to estimate from.")
    if target is not None:
        if not isinstance(target, torch.Tensor):
            target = torch.as_tensor(target)
        if target.dim() > 0 and target.shape[0] in leading:
            n = target.shape[0]  # a shared input listed before the per-sample ones
        else:
            raise ValueError(
                f"Labels have shape {tuple(target.shape)} but the inputs hold {n} samples; "
                "the labels' first dimension must be the batch size."
            )
    if n == 0:
        raise ValueError("Empty batch (0 samples): there is nothing to estimate from.")
    # tensors made under torch.inference_mode cannot be saved for backward: copy them
    if any(
        isinstance(t, torch.Tensor) and t.is_inference()
        for t in (*args, *kwargs.values(), target)
    ):
        with torch.inference_mode(False):
            args = tuple(ordinary(a) for a in args)
            kwargs = {k: ordinary(v) for k, v in kwargs.items()}
            target = ordinary(target)
    arg_dims = tuple(None if i in marked else batch_dim(a, n) for i, a in enumerate(args))
    kw_dims = {k: None if k in marked_kw else batch_dim(v, n) for k, v in kwargs.items()}
    # the inputs' padding mask (the pruning re-fit drops padded rows by it); not for an
    # encoder-decoder batch, whose decoder layers run on other positions than the mask's
    mask = (kwargs.get("attention_mask")
            if kw_dims.get("attention_mask") == 0 and not encoder_decoder(kwargs) else None)
    return Batch(args, kwargs, target, mask, n, arg_dims, kw_dims)


def kept_positions(key: str, mask: torch.Tensor) -> torch.Tensor:
    """The ``(N, T)`` boolean of the positions a padding mask keeps (nonzero entries).

    Reads an ``(N, T)`` mask of any dtype, and the ``(N, 1, 1, T)`` boolean or integer
    key mask that a Hugging Face encoder takes in place of it (``mask[:, None, None, :]``,
    the same positions broadcast over heads and queries). Additive float 4-D masks
    (``0`` / ``-inf``) and masks that differ per query (a causal ``(N, 1, T, T)``) mark no
    single set of padded positions and are refused.

    Args:
        key: the batch entry's name, for the message.
        mask: the per-sample mask.

    Raises:
        ValueError: a mask of another shape or a float 4-D mask.

    Example:
        >>> m = torch.tensor([[1, 1, 0]])
        >>> kept_positions("attention_mask", m[:, None, None, :].bool())
        tensor([[ True,  True, False]])
    """
    if mask.dim() == 2:
        return mask != 0
    key_mask = mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1
    if key_mask and not mask.is_floating_point() and not mask.is_complex():
        return mask[:, 0, 0, :] != 0
    raise ValueError(
        f"The batch's {key!r} has shape {tuple(mask.shape)} ({mask.dtype}); natgrad reads it "
        "to leave padded label positions out, and takes an (N, T) mask (nonzero = kept) or "
        "a boolean (N, 1, 1, T) key mask, mask[:, None, None, :].bool(). Pass one of those "
        "(a model that needs another form can build it from the (N, T) mask), or mark the "
        "padded positions in the labels with ignore_index=-100 and pass the mask under "
        "another name."
    )


def ordinary(t: Any) -> Any:
    """A copy of ``t`` when it is an inference tensor (made under ``torch.inference_mode``,
    which autograd cannot save for backward), else ``t`` itself. Call with inference
    mode off, so that the copy is an ordinary tensor."""
    return t.clone() if isinstance(t, torch.Tensor) and t.is_inference() else t


def default_output_fn(out: Any) -> torch.Tensor:
    """Model output -> logits tensor: tensors as is, ``.logits`` or ``["logits"]`` otherwise."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) and "logits" in out:
        logits_entry: torch.Tensor = out["logits"]
        return logits_entry
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(
        f"Cannot read logits from a model output of type {type(out).__name__}: pass "
        "output_fn=lambda out: ... that returns the output tensor."
    )


OutputFn = Callable[[Any], torch.Tensor]
