"""Tests of the core alone: numpy and pluggy (and matplotlib for plots)."""
