"""Tests of the PyTorch backend (and of what needs both backends)."""
