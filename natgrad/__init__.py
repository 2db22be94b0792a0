"""natgrad: Fisher information from exact per-sample gradients, and its uses.

The public API, grouped by layer (see DESIGN.md):
"""

from natgrad._version import __version__
from natgrad.engine import LABEL_SOURCES, per_sample_grads, select_params
from natgrad.estimate import estimate_fisher
from natgrad.fisher import DiagonalFisher, top_coordinates
from natgrad.likelihoods import (
    Bernoulli,
    Categorical,
    CustomLikelihood,
    Gaussian,
    Likelihood,
    TokenCategorical,
    get_likelihood,
)
from natgrad.tracker import FisherTracker

# -- scale (issue 3): fast path, distributed, checkpoints --
from natgrad.checkpoint import load_checkpoint
from natgrad.distributed import all_reduce_sums, is_distributed
from natgrad.fast import ENGINES
# -- end scale --
# -- uses: natural gradient (issue 4) --
from natgrad.natural_gradient import NaturalGradient
from natgrad.precondition import FisherPreconditioner
from natgrad.scale import scale_by_fisher
# -- end natural gradient --
# -- uses: forgetting (issue 5) --
from natgrad.compare import FisherComparison, LayerComparison, compare_task_fisher
from natgrad.damage import (
    AsymmetryReport,
    DamageReport,
    fisher_damage_asymmetry,
    fisher_weighted_damage,
)
from natgrad.ewc import EWC
# -- end forgetting --
# -- uses: pruning and merging (issue 6) --
from natgrad.masks import MaskOverlap, SetOverlap, apply_masks, fisher_overlap, make_permanent
from natgrad.merge import fisher_weighted_merge
from natgrad.prune import fisher_importance, fisher_pruning_masks
# -- end pruning and merging --
# -- uses: uncertainty and directions (issue 7) --
from natgrad.directions import FisherDirections, top_fisher_directions
from natgrad.uncertainty import (
    PriorPrecisionResult,
    UncertaintyReport,
    fisher_uncertainty,
    optimize_prior_precision,
)
# -- end uncertainty and directions --

__all__ = [
    "__version__",
    # engine
    "per_sample_grads",
    "select_params",
    "LABEL_SOURCES",
    # likelihoods
    "Likelihood",
    "Categorical",
    "Gaussian",
    "Bernoulli",
    "TokenCategorical",
    "CustomLikelihood",
    "get_likelihood",
    # curvature
    "DiagonalFisher",
    "estimate_fisher",
    "FisherTracker",
    "top_coordinates",
    # -- __all__ scale (issue 3) --
    "ENGINES",
    "all_reduce_sums",
    "is_distributed",
    "load_checkpoint",
    # -- __all__ natural gradient (issue 4) --
    "scale_by_fisher",
    "FisherPreconditioner",
    "NaturalGradient",
    # -- __all__ forgetting (issue 5) --
    "EWC",
    "fisher_weighted_damage",
    "fisher_damage_asymmetry",
    "DamageReport",
    "AsymmetryReport",
    "compare_task_fisher",
    "FisherComparison",
    "LayerComparison",
    # -- __all__ pruning and merging (issue 6) --
    "fisher_importance",
    "fisher_pruning_masks",
    "apply_masks",
    "make_permanent",
    "fisher_overlap",
    "MaskOverlap",
    "SetOverlap",
    "fisher_weighted_merge",
    # -- __all__ uncertainty and directions (issue 7) --
    "fisher_uncertainty",
    "optimize_prior_precision",
    "UncertaintyReport",
    "PriorPrecisionResult",
    "top_fisher_directions",
    "FisherDirections",
]


def __getattr__(name: str):
    # `natgrad.metrics` is imported lazily: only the CLI and users import the registry.
    if name == "metrics":
        import importlib

        return importlib.import_module("natgrad.metrics")
    raise AttributeError(f"module 'natgrad' has no attribute {name!r}")
