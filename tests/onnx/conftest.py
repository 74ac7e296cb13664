"""Skip this folder when the ``onnx`` extra (onnx, onnxruntime) is not installed."""

from importlib.util import find_spec

if find_spec("onnx") is None or find_spec("onnxruntime") is None:
    collect_ignore_glob = ["test_*.py"]
