"""``DiagonalFisher``: the diagonal Fisher as a mapping from parameter name to tensor.

Stored as the per-sample mean ``F_i = (1/N) Σ_n E_y[(∂l_n/∂θ_i)²]`` together with
``N`` (``n_samples``), the label source and the likelihood. Values are float32
whatever the model's dtype (float64 is kept as float64).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from natgrad.curvature.protocol import Curvature, Params, refuse_pruning_rename, register_curvature
from natgrad.engine.checks import (
    check_fisher_values,
    check_fraction,
    check_int,
    check_model_to_match,
    check_names_in,
    check_positive,
    check_same_structure,
)
from natgrad.engine.common import acc_dtype, mix, module_of, to_acc
from natgrad.engine.files import (
    CorruptFileError,
    find_invalid,
    load_tensors,
    meta_int,
    save_tensors,
)

__all__ = ["DiagonalFisher", "top_coordinates", "check_fisher"]

_FORMAT = "natgrad.DiagonalFisher"
_FIX = "Estimate the Fisher again and write it with DiagonalFisher.save."


def _as_acc(t: torch.Tensor) -> torch.Tensor:
    return to_acc(t.detach())


@register_curvature("diag")
class DiagonalFisher(Curvature, Mapping[str, torch.Tensor]):
    """A diagonal Fisher: ``{name: F}`` with ``F_i = (1/N) Σ_n E_y[(∂l_n/∂θ_i)²]``.

    Args:
        values: ``{parameter name: tensor}`` of per-sample means.
        n_samples: ``N``, the number of samples averaged.
        labels: label source (``"empirical"``, ``"mc"``, ``"exact"``, or ``"mixed"``).
        likelihood: likelihood name.

    Raises:
        ValueError: ``n_samples < 0``, or a negative entry (named, with its index).
        FloatingPointError: a NaN or infinite entry (named, with its index).

    Arithmetic: ``a + b`` is the sample-weighted mean ``(N_a F_a + N_b F_b)/(N_a + N_b)``
    with ``N = N_a + N_b``; ``c * a`` scales the values (``c`` finite and ``>= 0``);
    ``a.ema(b, d) = d a + (1-d) b``.

    Every entry is finite and ``>= 0`` (a mean of squares). This is checked once, when a
    Fisher is built (and when loaded, scaled or cast, which could break it); ``+``,
    ``ema`` and ``normalize`` of valid Fishers are valid and not checked again.

    As a :class:`~natgrad.Curvature`: ``mv(v) = F ⊙ v``, ``solve(v, λ) = v / (F + λ)``,
    ``quad(v) = Σ F v²``, ``inverse_diagonal(λ) = 1 / (F + λ)``,
    ``logdet(λ) = Σ log(F + λ)``.

    Example:
        >>> import torch
        >>> f = DiagonalFisher({"w": torch.tensor([1.0, 3.0])}, n_samples=2)
        >>> g = DiagonalFisher({"w": torch.tensor([4.0, 0.0])}, n_samples=1)
        >>> (f + g)["w"], (f + g).n_samples
        (tensor([2., 2.]), 3)
        >>> f.normalize()["w"]
        tensor([0.2500, 0.7500])
    """

    def __init__(
        self,
        values: Mapping[str, torch.Tensor],
        n_samples: int,
        *,
        labels: str = "empirical",
        likelihood: str = "categorical",
    ):
        if int(n_samples) < 0:
            raise ValueError(f"Invalid n_samples: {n_samples!r}; it must be >= 0.")
        self._values = {k: _as_acc(v) for k, v in values.items()}
        check_fisher_values(self._values, "DiagonalFisher")
        self.n_samples = int(n_samples)
        self.labels = str(labels)
        self.likelihood = str(likelihood)

    @classmethod
    def from_checked(
        cls, values: dict[str, torch.Tensor], n_samples: int, labels: str, likelihood: str
    ) -> DiagonalFisher:
        """A Fisher of ``values`` without a second check: no copy when they are already in
        the accumulation dtype (converted otherwise).

        For estimators that have already checked their values are finite and ``>= 0``
        (sums of squares are ``>= 0`` by construction); the constructor checks them again.

        Args:
            values: ``{parameter name: F_i}``, finite and ``>= 0``.
            n_samples: the number of samples behind the values.
            labels: the label source they came from.
            likelihood: the likelihood's name.

        Returns:
            The :class:`DiagonalFisher` holding ``values`` (themselves, when already in the
            accumulation dtype).
        """
        f = cls.__new__(cls)
        f._values = {
            k: v if v.dtype == acc_dtype(v.dtype) and not v.requires_grad else _as_acc(v)
            for k, v in values.items()
        }  # the tensors themselves when already so (no conversion call)
        f.n_samples, f.labels, f.likelihood = n_samples, labels, likelihood
        return f

    # -- mapping -------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self._values[name]
        except KeyError:
            raise KeyError(
                f"{name!r} is not in this Fisher; it holds {list(self._values)[:10]}"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        numel = sum(v.numel() for v in self._values.values())
        return (
            f"DiagonalFisher({len(self)} tensors, {numel} entries, n_samples={self.n_samples}, "
            f"labels={self.labels!r}, likelihood={self.likelihood!r})"
        )

    def _like(
        self,
        values: Mapping[str, torch.Tensor],
        n: int | None = None,
        labels: str | None = None,
        *,
        check: bool = False,
    ) -> DiagonalFisher:
        """A Fisher with this one's metadata; ``check`` re-validates the values (for the
        operations that can make a valid Fisher invalid: scaling, casting)."""
        n = self.n_samples if n is None else n
        labels = labels or self.labels
        if check:
            return DiagonalFisher(values, n, labels=labels, likelihood=self.likelihood)
        return DiagonalFisher.from_checked(dict(values), n, labels, self.likelihood)

    # -- arithmetic ----------------------------------------------------------------
    def __add__(self, other: Curvature) -> DiagonalFisher:
        if not isinstance(other, DiagonalFisher):
            return NotImplemented
        refuse_pruning_rename(self, other, "add", "DiagonalFisher")
        check_same_structure(self, other, "left Fisher", "right Fisher")
        n = self.n_samples + other.n_samples
        if n == 0:
            raise ValueError("Cannot combine two Fishers that both have n_samples=0.")
        wa, wb = self.n_samples / n, other.n_samples / n
        vals = {k: wa * self[k] + wb * other[k].to(self[k].device) for k in self}
        return self._like(vals, n, self.labels if self.labels == other.labels else "mixed")

    def __mul__(self, scalar: float) -> DiagonalFisher:
        if not isinstance(scalar, (int, float)) or isinstance(scalar, bool):
            return NotImplemented
        c = check_positive("scale of a Fisher", scalar, allow_zero=True)
        return self._like({k: v * c for k, v in self.items()}, check=True)

    __rmul__ = __mul__

    def _averaging(self, other: Curvature, decay: float, op: str) -> tuple[DiagonalFisher, float]:
        """The checks every average (``ema``, ``ema_``, ``ema_union``) makes first: another
        DiagonalFisher, ``decay`` in ``[0, 1]``, no pruning rename between the two."""
        if not isinstance(other, DiagonalFisher):
            raise TypeError(
                f"{op} needs another DiagonalFisher, got {type(other).__name__}; estimate "
                "both with kind='diag'."
            )
        decay = check_fraction("decay", decay, closed=True)
        refuse_pruning_rename(self, other, "average", "DiagonalFisher")
        return other, decay

    def ema(self, other: Curvature, decay: float) -> DiagonalFisher:
        """Exponential moving average ``decay * self + (1 - decay) * other``.

        ``n_samples`` of the result counts every sample seen (``N_self + N_other``).
        """
        other, decay = self._averaging(other, decay, "ema")
        check_same_structure(self, other, "current Fisher", "new Fisher")
        vals = {k: mix(self[k], other[k], 1 - decay) for k in self}
        return self._like(
            vals,
            self.n_samples + other.n_samples,
            self.labels if self.labels == other.labels else "mixed",
        )

    def ema_union(self, other: Curvature, decay: float) -> DiagonalFisher:
        """``d F_self + (1 - d) F_other`` over the union of the names (exact): a name only
        one Fisher holds gets ``d F_self`` or ``(1 - d) F_other``; ``N = N_self + N_other``.

        Raises:
            TypeError: ``other`` is not a DiagonalFisher.
            ValueError: a shared name shaped differently, or one named ``w`` in one and
                ``w_orig`` in the other (pruned in between).
        """
        other, decay = self._averaging(other, decay, "ema_union")
        shared = [k for k in self if k in other]
        check_same_structure(
            {k: self[k] for k in shared}, {k: other[k] for k in shared},
            "current Fisher", "new Fisher",
        )
        vals = {}
        for k, v in self.items():
            vals[k] = mix(v, other[k], 1 - decay) if k in other else decay * v
        for k, v in other.items():
            if k not in vals:
                vals[k] = (1 - decay) * v
        return self._like(
            vals,
            self.n_samples + other.n_samples,
            self.labels if self.labels == other.labels else "mixed",
        )

    def ema_(self, other: Curvature, decay: float) -> DiagonalFisher:
        """:meth:`ema` written into this Fisher's own tensors (``F.lerp_(F_other, 1 -
        decay)``, no new tensors); returns ``self``. Use it only on a Fisher nothing else
        refers to. A subclass that redefines :meth:`ema` gets its ``ema`` (a new Fisher).
        """
        if type(self).ema is not DiagonalFisher.ema:
            return self.ema(other, decay)
        other, decay = self._averaging(other, decay, "ema_")
        check_same_structure(self, other, "current Fisher", "new Fisher")
        for k, v in self._values.items():
            v.lerp_(other[k].to(v.device, v.dtype), 1 - decay)
        self.n_samples += other.n_samples
        self.labels = self.labels if self.labels == other.labels else "mixed"
        return self

    def total(self) -> float:
        """Sum of every entry, ``Σ_i F_i`` (the trace of the diagonal Fisher)."""
        return float(sum(v.sum().item() for v in self._values.values()))

    def normalize(self) -> DiagonalFisher:
        """The unit-trace Fisher ``F / Σ_i F_i`` (its entries sum to one).

        Raises:
            ValueError: when every entry is zero.
        """
        t = self.total()
        if t <= 0:
            raise ValueError("Cannot normalize a Fisher whose entries are all zero.")
        return self._like({k: v / t for k, v in self.items()})

    def layer_totals(self) -> dict[str, float]:
        """``Σ_i F_i`` per module (parameter names up to the last dot)."""
        out: dict[str, float] = {}
        for k, v in self.items():
            mod = module_of(k)
            out[mod] = out.get(mod, 0.0) + float(v.sum())
        return out

    def to(self, *args: Any, **kwargs: Any) -> DiagonalFisher:
        """Move / cast every tensor like ``Tensor.to``; returns a new Fisher.

        Raises:
            FloatingPointError: a cast to a narrower dtype overflows an entry to Inf.
        """
        return self._like({k: v.to(*args, **kwargs) for k, v in self.items()}, check=True)

    # -- curvature ---------------------------------------------------------------------
    kind = "diag"
    CAPTURE_KINDS = ("diag",)
    file_format = _FORMAT
    CHECKS_MODEL = True  # estimate_fisher runs check_fixed_model

    @classmethod
    def from_capture(cls, capture: Any, *, kind: str = "diag", likelihood: str = "categorical",
                     **options: Any) -> DiagonalFisher:
        """The diagonal empirical Fisher ``F = (1/N) Σ_n g_n²`` from the user's own
        forward/backward: per covered layer the exact per-sample gradients
        ``g_n = Σ_t b_nt ã_ntᵀ`` of the recorded inputs and per-sample-loss output
        gradients (see :mod:`natgrad.curvature.backward`), squared in chunks. A layer
        pruned by ``torch.nn.utils.prune`` gets ``M ⊙ F`` on ``weight_orig`` /
        ``bias_orig`` (their per-sample gradients are ``M ⊙ g_n``).

        Raises:
            ValueError: nothing recorded (see ``BackwardCapture.take``).
            FloatingPointError: NaN or Inf in the result.
        """
        from natgrad.curvature.kfac import per_sample_blocks, split_weight_blocks

        cap = capture.take()
        values: dict[str, torch.Tensor] = {}
        for k, lay in capture.layers.items():
            w = lay.module.weight
            g_, dG, dA = lay.dims()
            acc = torch.zeros(g_, dG, dA, dtype=_as_acc(w.detach()).dtype, device=w.device)
            if k in cap.inputs:
                a, (_, b) = cap.inputs[k], cap.grads[k][0]
                step = max(1, 2**24 // max(acc.numel(), 1))
                for i in range(0, cap.n, step):
                    M = per_sample_blocks(lay, a[i : i + step], b[i : i + step])
                    acc += (M * M).sum(0)
            mask = lay.mask_block(acc.dtype)  # pruned: the gradient of W_orig is M ⊙ g_n
            if mask is not None:
                acc *= mask
            W, bias = split_weight_blocks(tuple(w.shape), lay.transposed, lay.bias is not None,
                                          acc / max(cap.n, 1))
            values[lay.weight] = W
            if lay.bias is not None and bias is not None:
                values[lay.bias] = bias
        names = [k for k in capture.order if k in values]
        check_fisher_values({k: values[k] for k in names}, "the diagonal Fisher from the backward")
        return cls({k: values[k] for k in names}, cap.n, labels="empirical",
                   likelihood=str(likelihood))

    @classmethod
    def estimate(
        cls, model: nn.Module, data: Any, likelihood: Any = "categorical", **options: Any
    ) -> DiagonalFisher:
        """``estimate_fisher(model, data, likelihood, **options)``."""
        from natgrad.curvature.estimate import estimate_fisher

        options.pop("kind", None)
        return estimate_fisher(model, data, likelihood, **options)

    def _each(
        self, v: Params, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        missing = [k for k in v if k not in self._values]
        if missing:
            raise ValueError(
                f"The vector has names this Fisher does not cover: {missing[:8]}; it covers "
                f"{list(self._values)[:8]}. Pass only the Fisher's parameters."
            )
        return {k: fn(self._values[k], v[k]) for k in v}

    def mv(self, v: Params) -> dict[str, torch.Tensor]:
        """``F ⊙ v`` for the names in ``v`` (each must be in the Fisher)."""
        return self._each(v, lambda f, x: f.to(x) * x)

    def solve(self, v: Params, damping: float) -> dict[str, torch.Tensor]:
        """``v / (F + λ)`` for the names in ``v``."""
        lam = _damping(damping)
        return self._each(v, lambda f, x: x / (f.to(x) + lam))

    def quad(self, v: Params) -> torch.Tensor:
        """``Σ_i F_i v_i²`` over the names in ``v``."""
        terms = self._each(v, lambda f, x: (f.to(x) * x * x).sum())
        return torch.stack(list(terms.values())).sum() if terms else torch.zeros(())

    def diagonal(self) -> dict[str, torch.Tensor]:
        """The values themselves (copies)."""
        return {k: v.clone() for k, v in self._values.items()}

    def inverse_diagonal(self, damping: float) -> dict[str, torch.Tensor]:
        """``1 / (F + λ)``."""
        lam = _damping(damping)
        return {k: 1.0 / (v + lam) for k, v in self._values.items()}

    def logdet(self, damping: float) -> torch.Tensor:
        """``Σ_i log(F_i + λ)``."""
        lam = _damping(damping)
        if not self._values:
            return torch.zeros(())
        return torch.stack([torch.log(v + lam).sum() for v in self._values.values()]).sum()

    def structure(self) -> dict[str, str]:
        """Every parameter is ``"diag"``."""
        return {k: "diag" for k in self._values}

    def restrict(self, names: Sequence[str]) -> DiagonalFisher:
        """The Fisher of ``names`` alone (their values, shared, in this Fisher's order).

        Raises:
            ValueError: a name this Fisher does not cover.
        """
        unknown = [k for k in names if k not in self._values]
        if unknown:
            raise ValueError(
                f"Cannot restrict the Fisher to {unknown[:8]}: it does not cover them; it "
                f"covers {list(self._values)[:8]}."
            )
        keep = set(names)
        return self._like({k: v for k, v in self._values.items() if k in keep})

    def all_reduce(self, group: object | None = None) -> DiagonalFisher:
        """The sample-weighted mean over ranks: sums ``N_r F_r`` and ``N_r`` (one process:
        a copy)."""
        from natgrad.engine.distributed import all_reduce_sums

        sums = {k: v * self.n_samples for k, v in self._values.items()}
        total, n = all_reduce_sums(sums, self.n_samples, group)
        if n == 0:
            return self._like({k: torch.zeros_like(v) for k, v in self._values.items()}, 0)
        return self._like({k: total[k].to(self._values[k].dtype) / n for k in total}, n)

    # -- state -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only; round-trips through :meth:`load_state_dict`."""
        return {
            "values": {k: v.clone() for k, v in self.items()},
            "n_samples": self.n_samples,
            "labels": self.labels,
            "likelihood": self.likelihood,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace this Fisher's contents; names and shapes must match when non-empty.

        Raises:
            ValueError: not a state_dict, names or shapes that differ, negative values, a
                missing or non-integer (or negative) ``n_samples``.
            FloatingPointError: NaN or Inf values. (Nothing is replaced when it raises.)
        """
        try:
            values = state["values"]
        except (KeyError, TypeError):
            raise ValueError("Not a DiagonalFisher state_dict: it has no 'values'.") from None
        n = state.get("n_samples") if isinstance(state, Mapping) else None
        if isinstance(n, torch.Tensor) and n.numel() == 1:
            n = n.item()
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(
                f"Not a DiagonalFisher state_dict: its n_samples is {n!r}, not an integer "
                ">= 0 (the state_dict of DiagonalFisher.state_dict() has one)."
            )
        if self._values:
            check_same_structure(self._values, values, "this Fisher", "the state_dict")
        values = {k: _as_acc(v).clone() for k, v in values.items()}
        check_fisher_values(values, "the state_dict's Fisher")
        # every check passed: only now is anything replaced
        self._values = values
        self.n_samples = n
        self.labels = str(state.get("labels", "empirical"))
        self.likelihood = str(state.get("likelihood", "categorical"))

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> DiagonalFisher:
        f = cls({}, 0)
        f.load_state_dict(state)
        return f

    def check_model(self, model: nn.Module, *, strict: bool = False) -> None:
        """Raise ValueError naming every parameter whose name or shape differs from ``model``.

        With ``strict=False`` the Fisher may cover a subset of the model's parameters.
        """
        named = {k: p for k, p in model.named_parameters()}
        ref = named if strict else {k: named[k] for k in named if k in self._values}
        check_names_in(self._values, named)
        check_same_structure(self._values, ref, "the Fisher", "the model")

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """Write a verified ``safetensors`` file, atomically and durably.

        The file format is :mod:`natgrad.engine.files`: metadata ``n_samples``, ``labels``,
        ``likelihood``, plus the names, shapes, dtypes, format version and a SHA-256 per
        tensor. The data goes to a temporary file in the same folder, is synced to disk,
        then renamed into place; a failed write leaves no temporary file and ``path``
        unchanged.

        Args:
            path: the file to write.
            overwrite: replace a file at ``path`` that natgrad did not write (one natgrad
                wrote is always replaced).

        Raises:
            ValueError: a value is NaN, Inf or negative (a Fisher is finite and ``>= 0``);
                nothing is written.
            FileExistsError: ``path`` holds a file natgrad did not write and ``overwrite``
                is not set.
        """
        problem = find_invalid(self._values, nonnegative=True)
        if problem:
            raise ValueError(
                f"Cannot save this Fisher: {problem}. Check how it was computed (NaN/Inf in "
                "the data or the model, or arithmetic with negative weights)."
            )
        save_tensors(
            path,
            self._values,
            _FORMAT,
            {
                "n_samples": str(self.n_samples),
                "labels": self.labels,
                "likelihood": self.likelihood,
            },
            overwrite=overwrite,
        )

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        model: nn.Module | None = None,
        *,
        device: str | torch.device = "cpu",
        strict: bool = False,
    ) -> DiagonalFisher:
        """Read and verify a file written by :meth:`save`; with ``model``, check names and
        shapes.

        Every tensor's SHA-256 checksum, shape and dtype are verified, and the values
        must be finite and ``>= 0``.

        Dtype rule: without ``model`` the values keep the file's dtypes. With ``model``
        each value takes the dtype a Fisher computed on that model would have, the
        accumulation dtype of its parameter (float64 for a float64 parameter, float32 for
        every other), so a float32 file loaded into a float64 model gives float64 values
        (the exact float64 cast of the stored ones) and a float64 file loaded into a
        float32 model gives float32 values.

        Raises:
            FileNotFoundError: no such file.
            natgrad.CorruptFileError: (a ValueError) damaged bytes, malformed metadata,
                non-float tensors, NaN/Inf or negative values.
            ValueError: not a natgrad Fisher file, a format this version cannot read, or
                names/shapes that differ from ``model``.
        """
        check_model_to_match(model, "DiagonalFisher.load's model")
        path = os.fspath(path)
        tensors, meta = load_tensors(path, _FORMAT, fix=_FIX, what="Fisher", device=device)
        n_samples = meta_int(path, meta, "n_samples", 0, _FIX)
        problem = find_invalid(tensors, nonnegative=True)
        if problem:
            raise CorruptFileError(path, problem, _FIX)
        fisher = cls(
            tensors,
            n_samples,
            labels=meta.get("labels", "empirical"),
            likelihood=meta.get("likelihood", "categorical"),
        )
        if model is not None:
            fisher.check_model(model, strict=strict)
            fisher = fisher.to_model_dtypes(dict(model.named_parameters()))
        return fisher

    def to_model_dtypes(self, params: Mapping[str, torch.Tensor]) -> DiagonalFisher:
        """Each value in its parameter's accumulation dtype, as an estimate has it (see
        :meth:`Curvature.to_model_dtypes`)."""
        return self._like({k: v.to(acc_dtype(params[k].dtype)) for k, v in self._values.items()})


def _damping(damping: float) -> float:
    lam = float(damping)
    if not lam >= 0 or lam != lam or lam == float("inf"):
        raise ValueError(f"Invalid damping: {damping!r}; it must be a finite number >= 0.")
    return lam


def check_fisher(fisher: Mapping[str, torch.Tensor], what: str = "the Fisher") -> None:
    """Raise unless a Fisher given as ``{name: tensor}`` is finite and ``>= 0`` everywhere.

    A :class:`DiagonalFisher` was checked when it was built and is not checked again;
    any other mapping is checked with :func:`natgrad.engine.checks.check_fisher_values`.

    Raises:
        FloatingPointError: NaN or Inf (the entry and index are named).
        ValueError: negative values (the entry and index are named).
    """
    if not isinstance(fisher, DiagonalFisher):
        check_fisher_values({k: torch.as_tensor(v) for k, v in fisher.items()}, what)


def top_coordinates(
    fisher: Mapping[str, torch.Tensor], k: int
) -> list[tuple[str, tuple[int, ...], float]]:
    """The ``k`` largest entries of a Fisher (or any name -> tensor map), largest first.

    Returns:
        ``[(name, index, value), ...]`` where ``index`` is a tuple into ``fisher[name]``.
        Ties are broken by position (parameter order, then flat index).

    Example:
        >>> import torch
        >>> top_coordinates({"a": torch.tensor([0.1, 5.0]), "b": torch.tensor([[2.0]])}, 2)
        [('a', (1,), 5.0), ('b', (0, 0), 2.0)]
    """
    k = check_int("k", k, 1)
    names = list(fisher)
    if not names:
        raise ValueError("The Fisher is empty: there are no coordinates to rank.")
    flat = torch.cat([fisher[n].detach().reshape(-1).cpu().double() for n in names])
    k = min(int(k), flat.numel())
    # stable descending sort: equal values keep their position order
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    offsets = torch.tensor([0] + [fisher[n].numel() for n in names]).cumsum(0)
    out = []
    for i in order.tolist():
        j = int(torch.searchsorted(offsets, i, right=True)) - 1
        shape = fisher[names[j]].shape
        idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i - int(offsets[j])), shape))
        out.append((names[j], idx, float(flat[i])))
    return out
