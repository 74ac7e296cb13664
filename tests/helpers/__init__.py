"""Shared test helpers: model builders, strategies, the toy backend, the ONNX corpus."""
