"""Skip this folder when the ``torch`` extra is not installed (tests that also need
onnx skip themselves)."""

from importlib.util import find_spec

if find_spec("torch") is None:
    collect_ignore_glob = ["test_*.py"]
