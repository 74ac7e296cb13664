"""A complete, minimal CLE backend for a toy model format, used by the plugin tests and
shown in the plugin-author docs.

The format: a :class:`ToyMLP` is a list of steps, each a dict (in a ``.toy`` file: JSON,
arrays as lists). ``{"op": "dense", "w":
(out, in) array, "b": (out,) array}``, ``{"op": "bn", "mean", "var", "gamma", "beta",
"eps"}``, ``{"op": "relu"}`` and ``{"op": "clip", "lo", "hi"}``. Inputs are ``(N,
features)``.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import cle_core
from cle_core import CLEError, FileBackend, Graph, Layout, UnsupportedModelError


@dataclass
class ToyMLP:
    steps: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        for s in self.steps:
            if s["op"] == "dense":
                x = x @ s["w"].T + s["b"]
            elif s["op"] == "bn":
                x = (x - s["mean"]) / np.sqrt(s["var"] + s["eps"]) * s["gamma"] + s["beta"]
            elif s["op"] == "relu":
                x = np.maximum(x, 0.0)
            elif s["op"] == "clip":
                x = np.clip(x, s["lo"], s["hi"])
        return x


class ToyBackend(FileBackend):
    name = "toy"

    def to_ir(self, model: ToyMLP, **options: Any) -> Graph:
        if options:
            raise TypeError(f"unexpected options {sorted(options)}")
        g = Graph("toy")
        prev = g.add_input("x")
        for i, s in enumerate(model.steps):
            name = f"step{i}"
            op = s["op"]
            if op == "dense":
                params = {"weight": s["w"].copy(), "bias": s["b"].copy()}
                node = g.add_node(
                    "linear",
                    [prev],
                    name=name,
                    params=params,
                    attrs={"layout": Layout(0, 1)},
                    handle=i,
                )
            elif op == "bn":
                params = {k: np.asarray(s[k]).copy() for k in ("mean", "var", "gamma", "beta")}
                node = g.add_node(
                    "batchnorm", [prev], name=name, params=params, attrs={"eps": s["eps"]}, handle=i
                )
            elif op == "relu":
                node = g.add_node("relu", [prev], name=name, handle=i)
            elif op == "clip":
                params = {"lo": np.asarray(s["lo"], float), "hi": np.asarray(s["hi"], float)}
                node = g.add_node("clip", [prev], name=name, params=params, handle=i)
            else:
                raise UnsupportedModelError(f"step {i}: unknown op {op!r}")
            prev = node.outputs[0]
        g.set_outputs([prev])
        return g

    def apply(self, model: ToyMLP, result: cle_core.EqualizeResult, **options: Any) -> ToyMLP:
        # Work on a copy: the caller's model is never touched.
        steps = copy.deepcopy(model.steps)
        by_handle = {n.handle: n for n in result.graph.nodes}
        for name in result.changed:
            node = result.graph.node(name)
            if node.op == "linear":
                steps[node.handle].update(w=node.weight.copy(), b=node.bias.copy())
            elif node.op == "clip":
                steps[node.handle] = {
                    "op": "clip",
                    "lo": node.params["lo"].copy(),
                    "hi": node.params["hi"].copy(),
                }
        kept = [s for i, s in enumerate(steps) if i in by_handle]
        return ToyMLP(kept)

    # The file format: all the command line needs (equalize, inspect) comes from these.
    def load(self, path: Path) -> ToyMLP:
        try:
            data = json.loads(Path(path).read_text())
            steps = [
                {k: np.asarray(v) if isinstance(v, list) else v for k, v in step.items()}
                for step in data["steps"]
            ]
        except FileNotFoundError:
            raise CLEError(f"{path}: no such file") from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CLEError(f"{path}: not a toy model ({exc})") from None
        return ToyMLP(steps)

    def save(self, model: ToyMLP, file) -> None:
        steps = [
            {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in step.items()}
            for step in model.steps
        ]
        file.write(json.dumps({"steps": steps}).encode())


@cle_core.hookimpl
def cle_backend_for(model: Any):
    return ToyBackend() if isinstance(model, ToyMLP) else None


suffixes = (".toy",)


@cle_core.hookimpl
def cle_backend_for_file(path: Path):
    return ToyBackend() if path.suffix in suffixes else None
