"""The ONNX backend for cross-layer equalization (a cle_core plugin).

``equalize_model`` equalizes a ``ModelProto`` or an ``.onnx`` file; ``equalize_file``
goes file to file with external data streamed. ``cle_core.equalize_model`` dispatches
``ModelProto`` objects here.
"""

from ._backend import OnnxBackend, equalize_file, equalize_model
from ._io import ModelFileError, load, save

__all__ = [
    "ModelFileError",
    "OnnxBackend",
    "equalize_file",
    "equalize_model",
    "evaluate",
    "evaluate_all",
    "load",
    "save",
]


def __getattr__(name: str):
    # evaluate needs onnxruntime, which equalizing does not: imported on first use.
    if name in ("evaluate", "evaluate_all"):
        from . import _evaluate

        return getattr(_evaluate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
