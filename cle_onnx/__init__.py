"""The onnx backend for cross-layer equalization (a cle_core plugin).

The translation to and from the IR arrives with its own issue; until then this package
registers a plugin that claims no model.
"""

__all__: list[str] = []
