"""Tests of the ONNX backend and the command line on ONNX files."""
