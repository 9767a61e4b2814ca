"""ifjax: Intra-Fusion (structured pruning with optimal transport) for Flax models.

Pure functions over Flax variable trees: discover the coupled channel groups of a model,
fold BatchNorm, score channels, prune groups with Default pruning or Intra-Fusion, and
fuse models trained apart (OTFusion).
"""

from ifjax._batchnorm import fold_batchnorm, recalibrate_batchnorm
from ifjax._channels import channel_features
from ifjax._fusion import FUSION_METHODS, align, average_variables, fuse
from ifjax._graph import (
    GROUP_KINDS,
    BatchNormRef,
    GraphError,
    Group,
    Partition,
    Reader,
    SizeOf,
    Writer,
    discover_groups,
)
from ifjax._importance import (
    IMPORTANCES,
    PAPER_IMPORTANCES,
    TAYLOR_BATCH_SIZE,
    TAYLOR_BATCHES,
    accumulate_gradients,
    group_importance,
    lamp_transform,
    paper_scoring,
)
from ifjax._merge import merge_group
from ifjax._model import model_for, variables_of
from ifjax._prune import (
    HEAD_MERGES,
    PrunePlan,
    Pruner,
    default_pruning,
    intra_fusion,
    keep_count,
    prune,
)
from ifjax._transport import (
    ExactSolver,
    SinkhornSolver,
    Solver,
    TransportProblem,
    TransportResult,
    l1_cost,
    make_solver,
    marginals,
    normalize_rows,
    transport_map,
    transport_problem,
)
from ifjax._validate import check_variables_finite, check_variables_match
from ifjax._widths import register_width_rule

__version__ = "0.1.0"

__all__ = [
    "FUSION_METHODS",
    "GROUP_KINDS",
    "HEAD_MERGES",
    "IMPORTANCES",
    "PAPER_IMPORTANCES",
    "TAYLOR_BATCHES",
    "TAYLOR_BATCH_SIZE",
    "BatchNormRef",
    "ExactSolver",
    "GraphError",
    "Group",
    "Partition",
    "PrunePlan",
    "Pruner",
    "Reader",
    "SinkhornSolver",
    "SizeOf",
    "Solver",
    "TransportProblem",
    "TransportResult",
    "Writer",
    "accumulate_gradients",
    "align",
    "average_variables",
    "channel_features",
    "check_variables_finite",
    "check_variables_match",
    "default_pruning",
    "discover_groups",
    "fold_batchnorm",
    "fuse",
    "group_importance",
    "intra_fusion",
    "keep_count",
    "l1_cost",
    "lamp_transform",
    "make_solver",
    "marginals",
    "merge_group",
    "model_for",
    "normalize_rows",
    "paper_scoring",
    "prune",
    "recalibrate_batchnorm",
    "register_width_rule",
    "transport_map",
    "transport_problem",
    "variables_of",
]
