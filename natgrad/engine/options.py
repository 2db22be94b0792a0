"""The estimator options: one typed bundle for every function that computes a Fisher.

Every function that runs per-sample gradients (``estimate_fisher``,
``estimate_curvature``, ``per_sample_grads``, ``top_fisher_directions``, the damage,
uncertainty and structured-pruning functions, ``natural_gradient_norms``) takes the same
keyword options, typed by :class:`EstimatorOptions` (``**options:
Unpack[EstimatorOptions]``) and resolved, checked and defaulted in one place,
:meth:`Options.resolve`. So a new option is added here once, and every estimator takes
it, documents it and checks it the same way.

The likelihood stays the positional third argument of those functions; it is not an
option of this bundle.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal, TypedDict, get_args

import torch
from torch import nn

from natgrad.engine.batch import OutputFn
from natgrad.engine.checks import check_choice, check_int

__all__ = [
    "ENGINES",
    "LABEL_SOURCES",
    "OPTION_NAMES",
    "EngineName",
    "EstimatorOptions",
    "LabelSource",
    "Options",
    "ParamSpec",
]

#: The label sources: the data's labels, ``k`` seeded draws from the model, or the
#: closed-form expectation through a symmetric factor of the output Hessian.
LabelSource = Literal["empirical", "mc", "exact"]
LABEL_SOURCES: tuple[LabelSource, ...] = get_args(LabelSource)
#: The engines: the capture path where it applies (auto), or one engine for everything.
EngineName = Literal["auto", "vmap", "fast"]
ENGINES: tuple[EngineName, ...] = get_args(EngineName)
#: Which parameters: names, a predicate, modules, or None for all trainable ones.
ParamSpec = (
    None | Sequence[str] | Callable[[str, nn.Parameter], bool] | Sequence[nn.Module] | nn.Module
)


class EstimatorOptions(TypedDict, total=False):
    """The keyword options of every Fisher estimator (all optional).

    Attributes:
        labels: the label source of ``E_y``: ``"empirical"`` (the data's labels, the
            default), ``"mc"`` (``mc_samples`` draws from the model's predictive) or
            ``"exact"`` (the closed-form expectation over all labels).
        mc_samples: label draws per sample for ``labels="mc"`` (default 1; another
            value with another label source is ignored, with a warning).
        params: the parameters to cover (default all trainable ones; see
            :func:`natgrad.select_params`).
        chunk_size: samples per ``vmap`` chunk; memory ``≈ chunk_size × P`` floats
            (default: sized automatically).
        generator: the ``torch.Generator`` of the ``"mc"`` draws (default: one seeded
            with 0, so runs repeat).
        output_fn: maps the model's output to the output tensor (default: the tensor
            itself, or its ``.logits``).
        engine: ``"auto"`` (the capture path where it applies, ``vmap`` for the rest;
            the default), ``"fast"`` (the capture path, an error where none applies) or
            ``"vmap"`` (the general path for everything).

    Example:
        >>> import torch, natgrad
        >>> model = torch.nn.Linear(3, 2)
        >>> x = torch.randn(4, 3)
        >>> opts: natgrad.EstimatorOptions = {"labels": "mc", "mc_samples": 2}
        >>> natgrad.estimate_fisher(model, x, **opts).labels
        'mc'
    """

    labels: LabelSource
    mc_samples: int
    params: ParamSpec
    chunk_size: int | None
    generator: torch.Generator | None
    output_fn: OutputFn | None
    engine: EngineName


@dataclass(frozen=True)
class Options:
    """Resolved estimator options: every field set, checked once (see :meth:`resolve`)."""

    labels: LabelSource = "empirical"
    mc_samples: int = 1
    params: ParamSpec = None
    chunk_size: int | None = None
    generator: torch.Generator | None = None
    output_fn: OutputFn | None = None
    engine: EngineName = "auto"

    @classmethod
    def resolve(
        cls,
        where: str,
        options: Mapping[str, Any],
        *,
        unsupported: tuple[str, ...] = (),
        **defaults: Any,
    ) -> Options:
        """Check ``options`` (the ``**options`` of ``where``) and fill in the defaults.

        Args:
            where: the public function's name, for messages.
            options: the keyword options as passed.
            unsupported: option names ``where`` cannot honour (an error when given).
            **defaults: ``where``'s own defaults where they differ from the bundle's.

        Raises:
            TypeError: an unknown option (a misspelling would otherwise be ignored),
                or one that ``where`` does not take.
            ValueError: a bad value (unknown label source or engine, ``mc_samples``
                or ``chunk_size`` below 1).

        Warns:
            UserWarning: ``mc_samples`` other than 1 without ``labels="mc"`` (ignored).
        """
        unknown = sorted(set(options) - _OPTION_SET)
        if unknown:
            raise TypeError(
                f"{where}() got unknown option(s) {', '.join(map(repr, unknown))}; the "
                f"estimator options are {', '.join(OPTION_NAMES)} (natgrad.EstimatorOptions)."
            )
        refused = [k for k in unsupported if k in options]
        if refused:
            raise TypeError(
                f"{where}() does not take the option(s) {', '.join(map(repr, refused))}: "
                "drop them (they have no meaning for this function)."
            )
        opts = cls(**{**defaults, **options})  # every field has a default
        check_choice("labels", opts.labels, LABEL_SOURCES)
        check_int("mc_samples", opts.mc_samples, 1)
        if opts.mc_samples != 1 and opts.labels != "mc":
            # a warning, not an error: one mc_samples across a sweep of label sources is
            # a fair use; what must not happen is the ignoring going unsaid
            warnings.warn(
                f"{where}(): mc_samples={opts.mc_samples} is used only with labels='mc', "
                f"but labels={opts.labels!r}, so it is ignored; pass labels='mc' for "
                f"{opts.mc_samples} label draws per sample, or drop mc_samples.",
                UserWarning,
                stacklevel=3,
            )
        check_int("chunk_size", opts.chunk_size, 1, optional=True)
        check_choice("engine", opts.engine, ENGINES)
        if opts.generator is not None and not isinstance(opts.generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator, got {type(opts.generator).__name__}; "
                "pass e.g. torch.Generator().manual_seed(0)."
            )
        return opts

    def keywords(self) -> dict[str, Any]:
        """The options as keywords for another estimator (e.g. ``estimate_fisher``)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


OPTION_NAMES: tuple[str, ...] = tuple(EstimatorOptions.__annotations__)
_OPTION_SET = frozenset(OPTION_NAMES)
