"""natgrad: Fisher information from exact per-sample gradients, and its uses.

The public API, grouped by layer as in docs/design.md (engine -> curvature -> uses); the
metrics registry lives in :mod:`natgrad.metrics`, imported on first access.
"""

from types import ModuleType

from natgrad._version import __version__
from natgrad.continual.compare import FisherComparison, LayerComparison, compare_task_fisher
from natgrad.continual.damage import (
    AsymmetryReport,
    DamageReport,
    fisher_damage_asymmetry,
    fisher_weighted_damage,
)
from natgrad.continual.ewc import EWC
from natgrad.curvature.diagonal import DiagonalFisher, top_coordinates
from natgrad.curvature.estimate import estimate_curvature, estimate_fisher
from natgrad.curvature.kronecker import KroneckerFisher
from natgrad.curvature.lowrank import LowRankFisher
from natgrad.curvature.protocol import CURVATURE_KINDS, Curvature, register_curvature
from natgrad.curvature.tracker import FisherTracker
from natgrad.directions import FisherDirections, top_fisher_directions
from natgrad.engine.batch import Shared, shared
from natgrad.engine.checkpoint import (
    CheckpointLockedError,
    CheckpointMismatchError,
    load_checkpoint,
)
from natgrad.engine.distributed import DistributedError, all_reduce_sums, is_distributed
from natgrad.engine.files import CorruptFileError
from natgrad.engine.likelihoods import (
    Bernoulli,
    Categorical,
    CustomLikelihood,
    Gaussian,
    Likelihood,
    TokenCategorical,
    get_likelihood,
)
from natgrad.engine.options import ENGINES, LABEL_SOURCES, EstimatorOptions
from natgrad.engine.per_sample import per_sample_grads, select_params
from natgrad.laplace import (
    PriorPrecisionResult,
    UncertaintyReport,
    fisher_uncertainty,
    optimize_prior_precision,
)
from natgrad.merging import fisher_weighted_merge, regmean_merge
from natgrad.optim.natural_gradient import NaturalGradient
from natgrad.optim.precondition import FisherPreconditioner
from natgrad.optim.scale import scale_by_fisher
from natgrad.pruning.masks import (
    MaskOverlap,
    SetOverlap,
    apply_masks,
    fisher_overlap,
    make_permanent,
    mask_overlap,
)
from natgrad.pruning.obs import ObsReport, obs_prune, obs_saliency
from natgrad.pruning.prune import fisher_importance, fisher_pruning_masks
from natgrad.pruning.structured import StructuredPruningReport, prune_structured

__all__ = [
    "__version__",
    # engine
    "per_sample_grads",
    "shared",
    "Shared",
    "select_params",
    "LABEL_SOURCES",
    "EstimatorOptions",
    # likelihoods
    "Likelihood",
    "Categorical",
    "Gaussian",
    "Bernoulli",
    "TokenCategorical",
    "CustomLikelihood",
    "get_likelihood",
    # curvature
    "Curvature",
    "CURVATURE_KINDS",
    "register_curvature",
    "estimate_curvature",
    "DiagonalFisher",
    "KroneckerFisher",
    "LowRankFisher",
    "estimate_fisher",
    "FisherTracker",
    "top_coordinates",
    # engine: scale (fast path, distributed, checkpoints)
    "ENGINES",
    "all_reduce_sums",
    "is_distributed",
    "load_checkpoint",
    # named errors of files, checkpoints and distributed passes
    "CorruptFileError",
    "CheckpointMismatchError",
    "CheckpointLockedError",
    "DistributedError",
    # uses: natural gradient
    "scale_by_fisher",
    "FisherPreconditioner",
    "NaturalGradient",
    # uses: forgetting
    "EWC",
    "fisher_weighted_damage",
    "fisher_damage_asymmetry",
    "DamageReport",
    "AsymmetryReport",
    "compare_task_fisher",
    "FisherComparison",
    "LayerComparison",
    # uses: pruning and merging
    "fisher_importance",
    "fisher_pruning_masks",
    "obs_prune",
    "obs_saliency",
    "ObsReport",
    "apply_masks",
    "make_permanent",
    "mask_overlap",
    "fisher_overlap",
    "MaskOverlap",
    "SetOverlap",
    "fisher_weighted_merge",
    "regmean_merge",
    # uses: uncertainty and directions
    "fisher_uncertainty",
    "optimize_prior_precision",
    "UncertaintyReport",
    "PriorPrecisionResult",
    "top_fisher_directions",
    "FisherDirections",
    # uses: structured pruning
    "prune_structured",
    "StructuredPruningReport",
]


def __getattr__(name: str) -> ModuleType:
    # `natgrad.metrics` is imported lazily: only the CLI and users import the registry.
    if name == "metrics":
        import importlib

        return importlib.import_module("natgrad.metrics")
    raise AttributeError(f"module 'natgrad' has no attribute {name!r}")
