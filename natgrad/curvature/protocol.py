"""The ``Curvature`` protocol: one interface for every Fisher structure, and its registry.

A curvature is a symmetric positive semi-definite operator ``F`` over parameter dicts
``{name: tensor}`` (each tensor shaped like its parameter), stored as a per-sample mean
together with the number of samples ``N`` it averages. Every use of the Fisher
(preconditioning, EWC, damage, Laplace, OBS pruning, merging) talks to a curvature only
through this interface, so a new structure is one subclass in one file plus
``@register_curvature("kind")``, and every use accepts it unchanged.

Definitions every implementation follows (``λ >= 0`` is a damping added to the diagonal):

==========================  =================================================
``mv(v)``                   ``F v``
``solve(v, λ)``             ``(F + λ I)⁻¹ v``
``quad(v)``                 ``vᵀ F v`` (a 0-dim tensor)
``diagonal()``              ``diag F``
``inverse_diagonal(λ)``     ``diag (F + λ I)⁻¹``
``logdet(λ)``               ``log det (F + λ I)`` over the covered parameters
``a + b``                   sample-weighted mean ``(N_a F_a + N_b F_b) / (N_a + N_b)``
``c * a``                   ``c F`` (``c >= 0``), same ``N``
``a.ema(b, d)``             ``d F_a + (1 - d) F_b``, ``N = N_a + N_b``
``a.ema_union(b, d)``       ``ema`` over the union of both's parameters, each curvature
                            zero on the parameters it lacks
``structure()``             ``{parameter name: kind}`` ("diag", "kfac", "ekfac", "lowrank")
``restrict(names)``         ``F``'s block on ``names`` alone (block-diagonal kinds, whole
                            blocks; others refuse)
==========================  =================================================

Parameters a structured kind cannot cover are held as a diagonal inside the same object
(``structure()`` says ``"diag"`` for them).

A structure that the sample-weighted operator mean would leave (a mean of two Kronecker
products is no Kronecker product) pools its statistics instead, so that ``a + b`` is the
estimate on both sets of samples: see :class:`natgrad.KroneckerFisher`.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

__all__ = [
    "Curvature",
    "CURVATURE_KINDS",
    "curvature_class",
    "flat_inner",
    "refuse_pruning_rename",
    "register_curvature",
    "state_tensors",
]

Params = Mapping[str, torch.Tensor]
C = TypeVar("C", bound="type[Curvature]")

#: ``{kind: class}`` for every registered curvature; filled by :func:`register_curvature`.
CURVATURE_KINDS: dict[str, type[Curvature]] = {}

#: the ``structure()`` labels of block-diagonal parameters: ``F`` couples such a parameter
#: only within its own module (one diagonal entry, or one layer's Kronecker block), so
#: per-module solves and :meth:`Curvature.restrict` to whole modules are exact
BLOCK_KINDS = ("diag", "kfac", "ekfac")


def flat_inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``⟨a, b⟩ = Σ_i a_i b_i`` as a 0-dim tensor in ``b``'s dtype (no host sync).

    >>> flat_inner(torch.tensor([[1.0, 2.0]]), torch.tensor([3.0, 4.0]))
    tensor(11.)
    """
    return torch.dot(a.reshape(-1) if a.dtype == b.dtype else a.reshape(-1).to(b.dtype), b.reshape(-1))


def state_tensors(state: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """Every floating tensor of a nested state (dicts, lists and tuples, e.g. a
    curvature's ``state_dict()``), named by its path (``layers.0.A``, ``terms[1]``)."""
    if isinstance(state, torch.Tensor):
        return [(prefix or "tensor", state)] if state.is_floating_point() else []
    if isinstance(state, Mapping):
        return [t for k, v in state.items()
                for t in state_tensors(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(state, (list, tuple)):
        return [t for i, v in enumerate(state) for t in state_tensors(v, f"{prefix}[{i}]")]
    return []


def refuse_pruning_rename(mine: Iterable[str], theirs: Iterable[str], what: str, cls: str) -> None:
    """Raise when one curvature names ``<p>`` where the other names ``<p>_orig``: the same
    parameter, renamed by ``torch.nn.utils.prune`` between the two estimates (combined
    as they are, the two names would be two parameters, or a layout mismatch would hide
    the cause).

    >>> refuse_pruning_rename(["w"], ["w"], "average", "DiagonalFisher")  # no rename
    """
    a, b = set(mine), set(theirs)
    for k in sorted(a):
        twin = k[: -len("_orig")] if k.endswith("_orig") else k + "_orig"
        if k not in b and twin in b and twin not in a:
            raise ValueError(
                f"Cannot {what} these {cls}s: one names {k!r} where the other names "
                f"{twin!r}, the same parameter (torch.nn.utils.prune renames a pruned weight "
                "to <name>_orig). Estimate both with the same pruning state "
                "(natgrad.make_permanent(model) before estimating). If the model really has "
                f"both {k!r} and {twin!r} as parameters, estimate both curvatures over the "
                "same parameters (a curvature alone cannot tell the two cases apart)."
            )


def register_curvature(*kinds: str) -> Callable[[C], C]:
    """Class decorator: make a :class:`Curvature` subclass available under ``kinds``.

    ``estimate_curvature(model, data, kind=k)`` then calls ``cls.estimate(model, data,
    ..., kind=k)``. A kind may be registered once.
    """

    def deco(cls: C) -> C:
        for k in kinds:
            if k in CURVATURE_KINDS and CURVATURE_KINDS[k] is not cls:
                raise ValueError(
                    f"Curvature kind {k!r} is already registered by "
                    f"{CURVATURE_KINDS[k].__name__}; pick another name."
                )
            CURVATURE_KINDS[k] = cls
        return cls

    return deco


def curvature_class(kind: str) -> type[Curvature]:
    """The class registered for ``kind``; a ValueError lists the valid kinds."""
    try:
        return CURVATURE_KINDS[kind]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown curvature kind {kind!r}; valid kinds: {sorted(CURVATURE_KINDS)}."
        ) from None


class Curvature(ABC):
    """A symmetric PSD operator over ``{parameter name: tensor}`` dicts (see the module doc).

    Subclasses implement the abstract methods; :meth:`quad` has a default through
    :meth:`mv`. ``n_samples`` is the ``N`` the stored per-sample mean averages.
    """

    #: the kinds this class was registered under, first one is the default
    # The registered kind; a class serving several kinds (kfac/ekfac) sets it per instance.
    kind: str = ""
    n_samples: int
    #: kinds this class can build from a :class:`natgrad.curvature.backward.BackwardCapture`
    #: (``FisherPreconditioner(source="backward")``) through :meth:`from_capture`
    CAPTURE_KINDS: ClassVar[tuple[str, ...]] = ()
    #: True when a refresh of ``FisherPreconditioner`` replaces the curvature instead of
    #: folding it into an EMA (a curvature whose ``ema`` grows with every call, as the
    #: stacked rows of a low-rank Fisher do); such a kind is not refreshed during warmup
    REFRESH_REPLACES: ClassVar[bool] = False
    #: True when :meth:`estimate` itself runs :func:`natgrad.engine.checks.check_fixed_model`
    #: on the model; :func:`natgrad.estimate_curvature` then leaves the check to it, so a
    #: call checks the model once. A subclass that defines its own :meth:`estimate` is
    #: reset to False (the dispatcher checks for it) unless it sets the flag itself: the
    #: flag is read from the class that defines the ``estimate`` the subclass resolves to
    #: (a mixin's ``estimate`` without the flag is checked by the dispatcher).
    CHECKS_MODEL: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        owner = next(c for c in cls.__mro__ if "estimate" in vars(c))
        cls.CHECKS_MODEL = bool(vars(owner).get("CHECKS_MODEL", False))

    # -- construction ------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def estimate(cls, model: nn.Module, data: Any, likelihood: Any = "categorical",
                 **options: Any) -> Curvature:
        """Estimate this curvature of ``model`` on ``data`` (a batch or an iterable)."""

    @classmethod
    def from_capture(cls, capture: Any, *, kind: str, **options: Any) -> Curvature:
        """Build this curvature from the statistics of the user's own forward/backward
        (``capture``: a :class:`natgrad.curvature.backward.BackwardCapture`).

        Only kinds listed in :attr:`CAPTURE_KINDS` implement it.

        Raises:
            ValueError: this kind cannot be built exactly from the recorded statistics.
        """
        raise ValueError(
            f"kind={kind!r} cannot be built from source='backward' (the recorded layer "
            "inputs and output gradients do not determine it exactly); use source='batch'."
        )

    # -- linear algebra ------------------------------------------------------------------
    @abstractmethod
    def mv(self, v: Params) -> dict[str, torch.Tensor]:
        """``F v`` for ``v = {name: tensor shaped like the parameter}``."""

    @abstractmethod
    def solve(self, v: Params, damping: float) -> dict[str, torch.Tensor]:
        """``(F + λ I)⁻¹ v`` with ``λ = damping`` (> 0 unless ``F`` is invertible)."""

    def solve_inner(
        self, v: Params, damping: float, weights: Mapping[str, float]
    ) -> tuple[dict[str, torch.Tensor], list[tuple[float, torch.Tensor]]]:
        """:meth:`solve`, ``Δ = (F + λI)⁻¹ v``, together with the pieces of
        ``Σ_k w_k ⟨v_k, Δ_k⟩``, for a trust region on the step ``Δ``.

        The pieces are ``(w, ⟨v_S, Δ_S⟩)`` pairs over groups ``S`` of names of equal
        weight (a Kronecker layer's weight and bias form one group when their weights
        agree), the inner products 0-dim tensors, so that the caller reads them all with
        one host sync: ``Σ w · ⟨v_S, Δ_S⟩`` over the pairs is the weighted sum. A NaN or
        Inf in ``v`` or ``Δ`` makes its piece non-finite. ``Δ`` may hold views into one
        block per layer (not contiguous).

        Args:
            v: ``{name: tensor shaped like the parameter}``.
            damping: ``λ``, as for :meth:`solve`.
            weights: ``{name: w}`` for every name of ``v``.

        Returns:
            ``(Δ in v's names and dtypes, [(w, ⟨v_S, Δ_S⟩), ...])``.
        """
        deltas = self.solve(v, damping)
        return deltas, [(weights[k], flat_inner(v[k], d)) for k, d in deltas.items()]

    def prepare_solve(self, group: object | None = None) -> None:
        """Precompute what :meth:`solve` needs (e.g. eigendecompositions), spreading the
        work over the ranks of ``torch.distributed`` where the class can; every rank ends
        with the same result. Default: nothing (solve computes lazily)."""
        return None

    def quad(self, v: Params) -> torch.Tensor:
        """``vᵀ F v`` as a 0-dim tensor (differentiable in ``v``)."""
        fv = self.mv(v)
        return sum((v[k] * fv[k]).sum() for k in fv)  # type: ignore[return-value]

    @abstractmethod
    def diagonal(self) -> dict[str, torch.Tensor]:
        """``diag F`` as ``{name: tensor}``."""

    @abstractmethod
    def inverse_diagonal(self, damping: float) -> dict[str, torch.Tensor]:
        """``diag (F + λ I)⁻¹`` as ``{name: tensor}``."""

    @abstractmethod
    def logdet(self, damping: float) -> torch.Tensor:
        """``log det (F + λ I)`` over the covered parameters, a 0-dim tensor."""

    @abstractmethod
    def structure(self) -> dict[str, str]:
        """``{parameter name: kind}`` for every covered parameter."""

    def names(self) -> list[str]:
        """The covered parameter names, in model order."""
        return list(self.structure())

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """``{name: shape}`` of every covered parameter, in model order (read off
        :meth:`diagonal` unless a subclass knows them without computing it)."""
        return {k: tuple(v.shape) for k, v in self.diagonal().items()}

    def restrict(self, names: Sequence[str]) -> Curvature:
        """The curvature of the parameters ``names`` alone: ``F``'s block on them.

        Only a kind whose ``F`` does not couple ``names`` to the other parameters can
        give it: the block-diagonal kinds (``"diag"``, ``"kfac"``, ``"ekfac"``),
        restricted to whole blocks. Every method of the result is then the block's own,
        e.g. ``logdet`` is ``log det (F_{names} + λ I)`` (what a last-layer Laplace
        marginal likelihood needs). This default refuses (a coupled kind such as
        ``"lowrank"``, or one that does not implement it).

        Args:
            names: the parameter names to keep.

        Returns:
            A new curvature over ``names`` (in model order), sharing this one's tensors.

        Raises:
            ValueError: always, here: this kind cannot be restricted.
        """
        raise ValueError(
            f"A {self.kind!r} curvature cannot be restricted to some of its parameters "
            f"({list(names)[:8]}): its block on them is not theirs alone (it couples them to "
            "the others), or the kind does not implement restrict(). Estimate the curvature "
            "on those parameters only (params=...)."
        )

    # -- combination -----------------------------------------------------------------------
    @abstractmethod
    def __add__(self, other: Curvature) -> Curvature: ...

    @abstractmethod
    def __mul__(self, scalar: float) -> Curvature: ...

    def __rmul__(self, scalar: float) -> Curvature:
        return self.__mul__(scalar)

    @abstractmethod
    def ema(self, other: Curvature, decay: float) -> Curvature:
        """``decay * self + (1 - decay) * other``, ``N = N_self + N_other``."""

    def ema_union(self, other: Curvature, decay: float) -> Curvature:
        """``decay · F_self + (1 - decay) · F_other`` over the union of both curvatures'
        parameters, each taken as zero on (and uncoupled to) the parameters it does not
        cover; ``N = N_self + N_other``.

        On parameters both cover this is :meth:`ema` (with its approximation, for a kind
        whose ``ema`` averages statistics rather than operators); a block only ``self``
        covers is ``decay · F_self``'s, one only ``other`` covers ``(1 - decay) ·
        F_other``'s. Online EWC folds a task that adds a head with it. This default
        handles only curvatures over the same parameters (it is :meth:`ema` then); a kind
        implements the general case in its own file.

        Args:
            other: a curvature of the same kind.
            decay: ``d`` in ``[0, 1]``.

        Returns:
            A new curvature over ``self``'s parameters followed by ``other``'s new ones.

        Raises:
            ValueError: the parameters differ and this kind does not implement it.
        """
        if set(other.names()) == set(self.names()):
            return self.ema(other, decay)
        raise ValueError(
            f"A {self.kind!r} curvature cannot be averaged with one over other parameters "
            f"({self.names()[:4]} vs {other.names()[:4]}): the kind does not implement "
            "ema_union(). Estimate both over the same parameters (params=...)."
        )

    def ema_(self, other: Curvature, decay: float) -> Curvature:
        """:meth:`ema` that may overwrite this curvature's statistics in place (no new
        tensors for them) and return ``self``; for a curvature nothing else refers to
        (:class:`natgrad.FisherPreconditioner` uses it on the one it holds).

        This default returns ``self.ema(other, decay)``, a new curvature; kinds that can
        update in place override it (and fall back to :meth:`ema` in a subclass that
        redefines :meth:`ema`).
        """
        return self.ema(other, decay)

    @abstractmethod
    def to(self, *args: Any, **kwargs: Any) -> Curvature:
        """Move / cast every tensor like ``Tensor.to``; returns a new curvature."""

    def to_model_dtypes(self, params: Mapping[str, torch.Tensor]) -> Curvature:
        """This curvature in the dtypes one estimated on a model with ``params`` would
        have: the accumulation dtype (float64 for a float64 parameter, float32 for any
        other; :func:`natgrad.engine.common.acc_dtype`) of the parameters each tensor
        covers. Returns a new curvature (values cast, never otherwise changed).

        This default serves kinds whose tensors span every covered parameter: one dtype
        for all when they share one, and a refusal when they do not. Kinds with blocks
        of their own (a layer's, a parameter's) override it to cast each block.

        Args:
            params: ``{name: parameter}`` holding every name the curvature covers (e.g.
                ``dict(model.named_parameters())``).

        Raises:
            ValueError: covered parameters of several accumulation dtypes, which one
                tensor of this kind cannot follow.
        """
        from natgrad.engine.common import acc_dtype

        dtypes = {acc_dtype(params[k].dtype) for k in self.names()}
        if len(dtypes) > 1:
            raise ValueError(
                f"A {type(self).__name__} holds its covered parameters in one tensor, but "
                f"they have several dtypes ({', '.join(sorted(map(str, dtypes)))}): cast "
                "the model to one floating dtype, or cover the parameters of each dtype "
                "with a curvature of their own (params=...)."
            )
        return self.to(dtypes.pop()) if dtypes else self

    # -- state ---------------------------------------------------------------------------------
    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only; round-trips exactly through load_state_dict."""

    @abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the contents; names and shapes are checked against the current ones."""

    @classmethod
    @abstractmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> Curvature:
        """A new curvature holding ``state`` (what :meth:`state_dict` returned)."""

    #: the ``format`` tag of this kind's files; :meth:`save` and :meth:`load` check it
    file_format: ClassVar[str] = ""

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """Write :meth:`state_dict` to a verified safetensors file (format tag, format
        version, per-tensor SHA-256), atomically.

        A file at ``path`` that natgrad did not write is left alone (``FileExistsError``)
        unless ``overwrite=True``."""
        from natgrad.curvature.statefile import save_state

        save_state(path, self.state_dict(), self.file_format, overwrite=overwrite)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        model: nn.Module | None = None,
        *,
        device: str | torch.device = "cpu",
    ) -> Curvature:
        """Read a file written by :meth:`save` (format, checksums and values checked);
        with ``model``, check the curvature's names and shapes against its parameters.

        ``natgrad.Curvature.load`` reads every registered kind: the file's format tag
        names the class that wrote it (``natgrad.CURVATURE_KINDS``), whose ``load`` runs.

        Dtype rule: without ``model`` the tensors keep the file's dtypes. With ``model``
        the curvature takes the accumulation dtype of the parameters it covers (float64
        for float64 parameters, float32 for any other), as one estimated on that model
        would (:meth:`to_model_dtypes`): a float32 file loaded for a float64 model holds
        the exact float64 cast of the stored values, and with covered parameters of
        several dtypes each block follows its own parameters (a K-FAC layer its weight's,
        a low-rank curvature's rows the promoted dtype of them all).

        Args:
            path: the file.
            model: when given, every name the curvature covers must be one of its
                parameters, with the same shape.
            device: where the tensors go after verification.

        Returns:
            The curvature, of the class the file holds.

        Raises:
            FileNotFoundError: no such file.
            ValueError: not a safetensors file; a file of another kind (or of no
                curvature kind, for ``Curvature.load``); a format this version cannot
                read; names or shapes that differ from ``model``; covered parameters of
                several dtypes for a kind that cannot follow them (:meth:`to_model_dtypes`);
                :class:`natgrad.CorruptFileError` (a ValueError): a checksum, shape,
                dtype or metadata entry that does not verify.
        """
        from natgrad.curvature.ops import check_curvature
        from natgrad.curvature.statefile import load_state
        from natgrad.engine.checks import check_model_to_match

        check_model_to_match(model, f"{cls.__name__}.load's model")
        holder = cls._class_of_file(path)
        if holder is not cls:
            return holder.load(path, model, device=device)
        curvature = cls.from_state_dict(load_state(path, cls.file_format, device))
        if model is not None:
            check_curvature(curvature, model, f"the curvature in {os.fspath(path)!r}")
            curvature = curvature.to_model_dtypes(dict(model.named_parameters()))
        return curvature

    @classmethod
    def _class_of_file(cls, path: str | os.PathLike[str]) -> type[Curvature]:
        """The class whose :meth:`save` wrote ``path`` (by its format tag): ``cls`` or a
        registered subclass of it; else a ValueError naming the class to load it with."""
        from natgrad.engine.files import read_format

        found = read_format(path, "curvature")
        if cls.file_format and found == cls.file_format:
            return cls
        writers = {c.file_format: c for c in CURVATURE_KINDS.values() if c.file_format}
        holder = writers.get(found or "")
        if holder is not None and issubclass(holder, cls):
            return holder
        where = os.fspath(path)
        if holder is not None:
            raise ValueError(
                f"{where!r} holds a natgrad.{holder.__name__}, not a natgrad.{cls.__name__}: "
                f"load it with natgrad.{holder.__name__}.load, or with natgrad.Curvature.load "
                "(which loads every curvature kind)."
            )
        known = ", ".join(
            sorted(f"natgrad.{c.__name__}" for c in writers.values() if issubclass(c, cls))
        )
        holds = f"holds a {found}" if found else "has no natgrad format tag"
        raise ValueError(
            f"{where!r} {holds}, not a curvature file: natgrad.{cls.__name__}.load reads the "
            f"files that the save() of {known} writes."
        )

    @abstractmethod
    def all_reduce(self, group: object | None = None) -> Curvature:
        """The sample-weighted mean over all ranks of ``torch.distributed`` (a new object;
        identity when not distributed)."""
