"""Framework-agnostic cross-layer equalization.

The core holds the layer-graph IR, a NumPy reference executor, the CLE math as pure
functions, the passes, the report and the plugin host. Backends (``cle_torch``,
``cle_onnx`` and third-party plugins) translate models to and from the IR.
"""

from . import hookspecs
from ._backend import (
    ENTRY_POINT_GROUP,
    Backend,
    FileBackend,
    Translated,
    equalize_model,
    get_backend,
    get_plugin_manager,
)
from ._check import OutputCheck, Probe
from ._deployment import Deployment, QuantizerProfile, profile_names, register_profile
from ._equalize import equalize
from ._errors import (
    CLEError,
    ExecutionError,
    InvalidGraphError,
    NonFiniteError,
    UnsupportedModelError,
)
from ._executor import run_graph
from ._files import OutputPathError
from ._ir import Graph, Node, Value, unique_name
from ._math import Layout
from ._objectives import (
    Objective,
    ScaleOutcome,
    ScaleProblem,
    objective_names,
    register_objective,
)
from ._objectives import balance as _balance_objective  # noqa: F401  (registers itself)
from ._objectives import noise as _noise_objective  # noqa: F401  (registers itself)
from ._report import (
    BiasCorrectionRecord,
    EqualizeOptions,
    EqualizeResult,
    FoldRecord,
    HighBiasRecord,
    LayerRecord,
    PassResult,
    RegionRecord,
    Report,
    SkipRecord,
)
from .hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = [
    "ENTRY_POINT_GROUP",
    "Backend",
    "BiasCorrectionRecord",
    "CLEError",
    "Deployment",
    "EqualizeOptions",
    "EqualizeResult",
    "ExecutionError",
    "FileBackend",
    "FoldRecord",
    "Graph",
    "HighBiasRecord",
    "InvalidGraphError",
    "LayerRecord",
    "Layout",
    "Node",
    "NonFiniteError",
    "Objective",
    "OutputCheck",
    "OutputPathError",
    "PassResult",
    "Probe",
    "QuantizerProfile",
    "RegionRecord",
    "Report",
    "ScaleOutcome",
    "ScaleProblem",
    "SkipRecord",
    "Translated",
    "UnsupportedModelError",
    "Value",
    "equalize",
    "equalize_model",
    "get_backend",
    "get_plugin_manager",
    "hookimpl",
    "hookspecs",
    "objective_names",
    "profile_names",
    "register_objective",
    "register_profile",
    "run_graph",
    "unique_name",
]
