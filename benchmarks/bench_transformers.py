"""Evidence from trained transformers and a ConvNeXt (issue 21, item 5).

Trains four small models here (seeded, deterministic data order, 0.2-0.4 M parameters,
the architectures of ``tests/helpers/transformer_models.py``):

- ``vit``: a pre-LN ViT-style encoder that tells which of the 20 scikit-image sample
  images a 32 x 32 crop comes from (the crops of ``bench_other_networks.crops``);
- ``llama``: a LLaMA-style decoder (RMSNorm, SwiGLU, rotary, grouped-query attention),
  a character-level language model of the docstrings of some standard-library modules
  (``inspect``, in a fixed order; the last 10 % of the text held out);
- ``bert``: a post-LN BERT-style encoder (``nn.TransformerEncoderLayer``) that tells
  which of 8 modules a 64-character window of that text comes from;
- ``convnext``: a ConvNeXt-style CNN on the crops of ``vit``.

Each prints its training loss and held-out accuracy (the LM: its next-character
accuracy). Each model is then exported to ONNX (TorchScript exporter, opset 17, and the
dynamo exporter) and quantized by onnxruntime's ``quantize_static`` as ``cle evaluate``
does it (``cle_onnx.evaluate_all``: QDQ, MinMax calibrated on 32 inputs, measured on 64
others; symmetric int8 weights, uint8 activations; W8: the weights on their grid,
activations in float). Printed per model and exporter, the output SQNR in dB against
the FP32 model, per-tensor and per-channel, W8 and W8A8, for

- ``none``: the model as trained;
- ``smoothquant``: SmoothQuant with alpha = 0.5 as its paper defines it, implemented
  here (:func:`smoothquant`): for each norm whose output feeds only Linears (the
  pre-LN norms before q / k / v, fc1, gate / up, and the final norm before the head),
  ``s_j = max|X_j|^a / max|W_:,j|^(1-a)`` with ``X`` the Linears' input measured on the
  calibration inputs and the max over all Linears reading the norm; gamma (and beta)
  divided by ``s``, the Linears' columns multiplied by it;
- ``ours``: ``cle_torch.equalize_model(model, input_shapes=..., calibration=...,
  deployment=...)``, once per deployment, with the number of regions it equalized;
- ``ours-onnx``: ``cle_onnx.equalize_model(exported, calibration=..., deployment=...)``
  on each exported model.

and the FP32 SQNR of ``smoothquant`` and ``ours`` against the original (exactness;
PyTorch and each exported model), and the seconds ``equalize_model`` takes on the ViT
against a plain CNN with as many parameters and weight layers (median of 5).

Run: ``python benchmarks/bench_transformers.py [--models vit llama ...] [--save DIR]
[--load DIR] [--quick]``. ``--save`` writes each trained state dict to DIR; ``--load``
reads those found in DIR back and trains the others; ``--quick`` trains 40 steps (a
smoke run). Measured on 2 cores shared with other jobs (load 5-9): training took 1 to 8
minutes a model (ViT 1, ConvNeXt and BERT 6-7, the LM 8), the measurements 2-4 minutes a
model; about 40 minutes in all, 12 with ``--load``.

What the figures show (docs/benchmarks.rst, "Transformers and ConvNeXt, trained here"):
every equalization is exact (128-135 dB); ours finds 17 / 16 / 7 / 7 regions (ViT /
LLaMA / BERT / ConvNeXt; on BERT, V -> O and Q -> K in its 3
``nn.TransformerEncoderLayer`` and the last norm -> head; ours-onnx 4 on BERT, Q -> K of
the packed in-projection being refused); no deployment is below no scaling (the
estimated W8A8 gains stay under the 1 dB rule, so those rows equal no scaling);
weights-only +2.1 / +2.5 / +2.8 dB on the ViT, the LM and BERT, nothing scaled on the
ConvNeXt; SmoothQuant moves W8A8 by 0.5 dB at most (BERT's two W8A8 cells, per
tensor and per channel, are the ones where it stays above ours: by 0.03 and 0.04 dB);
the LM's W8A8 (about 5 dB) is set by ``quantize_static``'s grid on the masked attention
scores (the causal mask's -inf makes that grid's scale infinite), which no scaling of
channels can change; the ViT's ``equalize_model`` takes 1.6x the time of the plain CNN
(0.082 s against 0.053 s, load about 1).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import io
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests package
import bench_other_networks as other  # noqa: E402

import cle_onnx  # noqa: E402
import cle_torch  # noqa: E402
from cle_core import Deployment  # noqa: E402
from cle_core._quality import sqnr_db  # noqa: E402
from tests.helpers import onnx_corpus  # noqa: E402
from tests.helpers import transformer_models as tm  # noqa: E402

ALPHA = 0.5
SEQ = 64
N_EVAL, N_CALIB = 64, 32

# Fixed order, so that the text (and every figure) is the same on each run of one Python.
DOC_MODULES = (
    "argparse",
    "collections",
    "csv",
    "dataclasses",
    "decimal",
    "email.message",
    "fractions",
    "functools",
    "inspect",
    "ipaddress",
    "itertools",
    "json",
    "logging",
    "pathlib",
    "random",
    "re",
    "shutil",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "textwrap",
    "typing",
    "unittest.case",
    "urllib.parse",
    "zipfile",
)
BERT_CLASSES = (
    "argparse",
    "decimal",
    "inspect",
    "logging",
    "pathlib",
    "typing",
    "unittest.case",
    "zipfile",
)
VOCAB = 97  # "\n", the 95 printable ASCII characters, and one for anything else


# --- data -----------------------------------------------------------------------------


def docstrings(module_name: str) -> str:
    """The docstrings of a module, its public functions and classes and their methods,
    in name order."""
    module = importlib.import_module(module_name)
    docs = [module.__doc__ or ""]
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj) or inspect.isclass(obj):
            docs.append(inspect.getdoc(obj) or "")
        if inspect.isclass(obj):
            for meth_name, meth in sorted(vars(obj).items()):
                if not meth_name.startswith("_") and inspect.isfunction(meth):
                    docs.append(inspect.getdoc(meth) or "")
    return "\n\n".join(d for d in docs if d)


def encode(text: str) -> torch.Tensor:
    codes = np.frombuffer(text.encode("ascii", "replace"), np.uint8).astype(np.int64)
    ids = np.where(codes == 10, 0, codes - 31)
    return torch.from_numpy(np.where((ids < 0) | (ids >= VOCAB), VOCAB - 1, ids))


def windows(ids: torch.Tensor, n: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - length, (n,), generator=g)
    return torch.stack([ids[s : s + length] for s in starts.tolist()])


def split(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first 90 % for training, the rest held out."""
    cut = len(ids) * 9 // 10
    return ids[:cut], ids[cut:]


# --- models and training --------------------------------------------------------------


class Task(NamedTuple):
    """A model to train, its data and loss; the held-out inputs and labels; the
    calibration inputs (from the training data)."""

    model: nn.Module
    steps: int
    batch: Callable[[int], tuple]  # step -> the arguments of loss after the model
    loss: Callable[..., torch.Tensor]
    test_x: torch.Tensor
    test_y: torch.Tensor
    calib: torch.Tensor


def classification_loss(model, x, y):
    return F.cross_entropy(model(x), y)


def image_task(name: str, quick: bool) -> Task:
    """``vit`` or ``convnext``: which of the 20 sample images a 32 x 32 crop is of."""
    if name == "vit":
        model = tm.vit(0, spread=False, patch=8, dim=96, depth=4, heads=4, num_classes=20)
    else:
        model = tm.convnext(0, spread=False, dims=(32, 64, 128), depths=(1, 1, 2), num_classes=20)
    steps = 40 if quick else 400
    x, y = other.crops(steps * 64, seed=1)
    test_x, test_y = other.crops(256, seed=2)
    calib = other.crops(N_CALIB, seed=3)[0]

    def batch(s):
        return x[s * 64 : (s + 1) * 64], y[s * 64 : (s + 1) * 64]

    return Task(model, steps, batch, classification_loss, test_x, test_y, calib)


def llama_task(quick: bool) -> Task:
    """Next character of the docstrings; accuracy: of the next character."""
    model = tm.llama(
        0, spread=False, vocab=VOCAB, dim=96, depth=3, n_heads=4, n_kv_heads=2, hidden=256,
        seq_len=SEQ,
    )  # fmt: skip
    text = "\n\n".join(docstrings(m) for m in DOC_MODULES)
    train_ids, test_ids = split(encode(text))
    steps = 40 if quick else 600
    x = windows(train_ids, steps * 16, SEQ + 1, seed=1)

    def loss(m, xb):
        return F.cross_entropy(m(xb[:, :-1]).reshape(-1, VOCAB), xb[:, 1:].reshape(-1))

    def batch(s):
        return (x[s * 16 : (s + 1) * 16],)

    test = windows(test_ids, 256, SEQ + 1, seed=2)
    calib = windows(train_ids, N_CALIB, SEQ, seed=3)
    return Task(model, steps, batch, loss, test[:, :-1], test[:, 1:], calib)


def bert_task(quick: bool) -> Task:
    """Which of BERT_CLASSES a window of SEQ characters of docstrings comes from."""
    model = tm.bert(
        0, spread=False, vocab=VOCAB, dim=96, depth=3, heads=4, hidden=384, seq_len=SEQ,
        num_classes=len(BERT_CLASSES),
    )  # fmt: skip
    parts = [split(encode(docstrings(m))) for m in BERT_CLASSES]

    def labelled(held_out: bool, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(0, len(parts), (n,), generator=g)
        starts = torch.rand(n, generator=g)
        xs = []
        for c, u in zip(y.tolist(), starts.tolist(), strict=True):
            ids = parts[c][held_out]
            s = int(u * (len(ids) - SEQ))
            xs.append(ids[s : s + SEQ])
        return torch.stack(xs), y

    steps = 40 if quick else 400
    x, y = labelled(False, steps * 32, seed=1)

    def batch(s):
        return x[s * 32 : (s + 1) * 32], y[s * 32 : (s + 1) * 32]

    test_x, test_y = labelled(True, 256, seed=2)
    calib = labelled(False, N_CALIB, seed=3)[0]
    return Task(model, steps, batch, classification_loss, test_x, test_y, calib)


def train(task: Task, lr: float = 2e-3) -> nn.Module:
    """AdamW with a one-cycle schedule; prints the loss every quarter."""
    model = task.model
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=task.steps, pct_start=0.1)
    model.train()
    losses = []
    for step in range(task.steps):
        loss = task.loss(model, *task.batch(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if (step + 1) % (task.steps // 4) == 0:
            print(f"    step {step + 1:4d}  loss {statistics.mean(losses[-20:]):.3f}", flush=True)
    return model.eval()


def build(name: str, load: Path | None, save: Path | None, quick: bool = False):
    """``(model, eval inputs, calibration inputs, accuracy line)``, trained or loaded."""
    torch.manual_seed(0)
    if name == "llama":
        task = llama_task(quick)
    elif name == "bert":
        task = bert_task(quick)
    else:
        task = image_task(name, quick)
    model = task.model
    if load is not None and (load / f"{name}.pt").exists():
        model.load_state_dict(torch.load(load / f"{name}.pt"))
    else:
        train(task)
    if save is not None:
        save.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), save / f"{name}.pt")
    model.eval()
    with torch.no_grad():
        acc = float((model(task.test_x).argmax(-1) == task.test_y).float().mean())
    params = sum(p.numel() for p in model.parameters())
    line = f"{params / 1e6:.2f} M parameters, held-out accuracy {acc:.3f}"
    return model, task.test_x[:N_EVAL], task.calib, line


# --- SmoothQuant ----------------------------------------------------------------------


def smooth_pairs(name: str, model) -> list[tuple[nn.Module, list[nn.Linear]]]:
    """(norm, the Linears that read only its output) for SmoothQuant. A post-LN norm
    (BERT's, but the last) also feeds the residual stream: dividing its gamma would
    change the model, so it is not a pair."""
    if name == "vit":
        pairs = [(b.norm1, [b.attn.q, b.attn.k, b.attn.v]) for b in model.blocks]
        pairs += [(b.norm2, [b.fc1]) for b in model.blocks]
        return [*pairs, (model.norm, [model.head])]
    if name == "llama":
        pairs = [(b.attn_norm, [b.attn.wq, b.attn.wk, b.attn.wv]) for b in model.blocks]
        pairs += [(b.mlp_norm, [b.mlp.gate, b.mlp.up]) for b in model.blocks]
        return [*pairs, (model.norm, [model.lm_head])]
    if name == "bert":
        return [(model.layers[-1].norm2, [model.head])]
    blocks = [m for m in model.modules() if isinstance(m, tm.ConvNeXtBlock)]
    return [*((b.norm, [b.pwconv1]) for b in blocks), (model.norm, [model.head])]


def smoothquant(name: str, model, calib: torch.Tensor, alpha: float = ALPHA):
    """A copy of ``model`` smoothed as the SmoothQuant paper defines it (see the module
    docstring), and the number of norms smoothed."""
    model = copy.deepcopy(model)
    pairs = smooth_pairs(name, model)
    amax: dict[int, torch.Tensor] = {}

    def hook(i):
        def record(_module, args):
            a = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0)
            amax[i] = a if i not in amax else torch.maximum(amax[i], a)

        return record

    handles = [
        linears[0].register_forward_pre_hook(hook(i)) for i, (_, linears) in enumerate(pairs)
    ]
    with torch.no_grad():
        model(calib)
    for h in handles:
        h.remove()
    with torch.no_grad():
        for i, (norm, linears) in enumerate(pairs):
            w_max = torch.stack([lin.weight.abs().amax(0) for lin in linears]).amax(0)
            s = (amax[i].pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)
            norm.weight.div_(s)
            if getattr(norm, "bias", None) is not None:
                norm.bias.div_(s)
            for lin in linears:
                lin.weight.mul_(s)
    return model, len(pairs)


# --- export and measurement -----------------------------------------------------------


def quiet():
    """The exporters' and this library's logs, warnings and prints off (errors stay)."""
    return onnx_corpus.quiet(("cle_torch", "cle_core"), stderr=False)


def export(model, x: torch.Tensor, exporter: str) -> onnx.ModelProto:
    """``model`` in ONNX with a dynamic batch axis (not under no_grad: there
    nn.TransformerEncoderLayer takes a fused fast path that no exporter writes)."""
    buf = io.BytesIO()
    with quiet():
        if exporter == "dynamo":
            program = torch.onnx.export(
                model,
                (x[:2],),
                dynamo=True,
                input_names=["x"],
                dynamic_shapes=({0: torch.export.Dim("N")},),
                verbose=False,
            )
            return program.model_proto
        torch.onnx.export(
            model,
            (x[:2],),
            buf,
            dynamo=False,
            opset_version=17,
            input_names=["x"],
            dynamic_axes={"x": {0: "N"}},
        )
    return onnx.load_from_string(buf.getvalue())


def equalized(model, x, calib, deployment: Deployment, failures: set[str]):
    """``equalize_model`` with the calibration inputs; where that fails (recorded in
    ``failures``), data-free, so that the table still has a row."""
    shapes = tuple(x[:1].shape)
    with quiet():
        try:
            eq, report = cle_torch.equalize_model(
                copy.deepcopy(model), input_shapes=shapes, calibration=calib, deployment=deployment
            )
        except Exception as exc:  # noqa: BLE001 - a failure is a result here
            failures.add(f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            eq, report = cle_torch.equalize_model(
                copy.deepcopy(model), input_shapes=shapes, deployment=deployment
            )
    return eq, len(report.regions)


def torch_sqnr(model, candidate, x) -> float:
    with torch.no_grad():
        return sqnr_db(model(x).numpy(), candidate(x).numpy())


def measure(name, model, x, calib, exporters) -> list[str]:
    lines = []
    sq, n_pairs = smoothquant(name, model, calib)
    ours = {}
    failures: set[str] = set()
    for pc in (False, True):
        for w8 in (False, True):
            dep = Deployment(per_channel=pc, activation_bits=None if w8 else 8)
            ours[pc, w8] = equalized(model, x, calib, dep, failures)
    lines += [f"  ours with calibration failed, data-free instead: {f}" for f in sorted(failures)]
    regions = sorted({n for _, n in ours.values()})
    lines.append(
        f"  smoothquant: {n_pairs} norms smoothed; ours: {'/'.join(map(str, regions))} regions; "
        f"FP32 SQNR vs original in PyTorch: smoothquant {torch_sqnr(model, sq, x):.1f} dB, "
        f"ours {min(torch_sqnr(model, m, x) for m, _ in ours.values()):.1f} dB"
    )
    cols = f"{'W8':>6s} {'W8A8':>6s} {'W8/ch':>6s} {'W8A8/ch':>7s} {'FP32':>6s}"
    lines.append(f"  {'exporter':11s} {'scales':12s} {cols}")
    xs, cs = x.numpy(), calib.numpy()
    for exporter in exporters:
        try:
            original = export(model, x, exporter)
            models = {"smoothquant": export(sq, x, exporter)}
            models.update({f"ours{k}": export(m, x, exporter) for k, (m, _) in ours.items()})
        except Exception as exc:  # noqa: BLE001 - the exporter's failure is a result
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:150]}"
            lines.append(f"  {exporter:11s} export failed: {why}")
            continue
        # the ONNX backend on the exported model
        found = set()
        for pc in (False, True):
            for w8 in (False, True):
                dep = Deployment(per_channel=pc, activation_bits=None if w8 else 8)
                with quiet():
                    eq, report = cle_onnx.equalize_model(original, calibration=cs, deployment=dep)
                models[f"ours-onnx{(pc, w8)}"] = eq
                found.add(len(report.regions))
        lines.append(f"  {exporter:11s} ours-onnx: {'/'.join(map(str, sorted(found)))} regions")
        labels = ("none", "smoothquant", "ours", "ours-onnx")
        rows = {k: {} for k in labels}
        for pc in (False, True):
            col = "/ch" if pc else ""
            with quiet():
                r = cle_onnx.evaluate_all(
                    original,
                    [
                        None,
                        models["smoothquant"],
                        models[f"ours{(pc, False)}"],
                        models[f"ours-onnx{(pc, False)}"],
                    ],
                    xs,
                    deployment=Deployment(per_channel=pc),
                    calibration=cs,
                )
            for label, res in zip(labels, r, strict=True):
                rows[label][f"W8{col}"] = res["w8_sqnr"]
                rows[label][f"W8A8{col}"] = res["w8a8_sqnr"]
                rows[label]["FP32"] = min(res["fp32_sqnr"], rows[label].get("FP32", np.inf))
            for label in ("ours", "ours-onnx"):  # scales chosen for weights only
                with quiet():
                    r_w8 = cle_onnx.evaluate(
                        original,
                        models[f"{label}{(pc, True)}"],
                        xs,
                        deployment=Deployment(per_channel=pc, activation_bits=None),
                    )
                rows[label][f"W8{col}"] = r_w8["w8_sqnr"]
                rows[label]["FP32"] = min(rows[label]["FP32"], r_w8["fp32_sqnr"])
        for label, row in rows.items():
            fp32 = "exact" if np.isinf(row["FP32"]) else f"{row['FP32']:.1f}"
            lines.append(
                f"  {exporter:11s} {label:12s} {row['W8']:6.1f} {row['W8A8']:6.1f} "
                f"{row['W8/ch']:6.1f} {row['W8A8/ch']:7.1f} {fp32:>6s}"
            )
    return lines


# --- speed ----------------------------------------------------------------------------


def plain_cnn(params: int, layers: int) -> nn.Module:
    """Conv3x3-BN-ReLU x ``layers`` (the first from 3 channels), a global pool and a
    Linear, as wide as makes ``params`` parameters."""
    width = max(4, round((params / (9 * layers)) ** 0.5))
    mods: list[nn.Module] = []
    cin = 3
    for _ in range(layers - 1):
        mods += [nn.Conv2d(cin, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        cin = width
    mods += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 20)]
    return nn.Sequential(*mods).eval()


def speed(vit, vit_x, repeats: int = 5) -> str:
    n_params = sum(p.numel() for p in vit.parameters())
    n_layers = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in vit.modules())
    cnn = plain_cnn(n_params, n_layers)
    cnn_params = sum(p.numel() for p in cnn.parameters())
    shapes = {"vit": tuple(vit_x[:1].shape), "cnn": (1, 3, 32, 32)}
    times: dict[str, list[float]] = {"vit": [], "cnn": []}
    for _ in range(repeats):  # alternated, so that both see the same load
        for key, model in (("vit", vit), ("cnn", cnn)):
            m = copy.deepcopy(model)
            t0 = time.perf_counter()
            with quiet():
                cle_torch.equalize_model(m, input_shapes=shapes[key])
            times[key].append(time.perf_counter() - t0)
    t_vit, t_cnn = statistics.median(times["vit"]), statistics.median(times["cnn"])
    return (
        f"equalize_model (data-free, median of {repeats}): ViT {n_params / 1e3:.0f} k parameters, "
        f"{n_layers} layers: {t_vit:.3f} s; plain CNN {cnn_params / 1e3:.0f} k parameters, "
        f"{n_layers} layers: {t_cnn:.3f} s; ratio {t_vit / t_cnn:.2f}"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vit", "llama", "bert", "convnext"])
    parser.add_argument("--exporters", nargs="+", default=["torchscript", "dynamo"])
    parser.add_argument("--save", type=Path, help="write the trained state dicts here")
    parser.add_argument(
        "--load", type=Path, help="read the state dicts found here (the others are trained)"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: 40 training steps")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    out = []
    vit_model = None
    for name in args.models:
        t0 = time.perf_counter()
        print(f"{name}:", flush=True)
        model, x, calib, line = build(name, args.load, args.save, args.quick)
        print(f"  {line} ({time.perf_counter() - t0:.0f} s)", flush=True)
        lines = [f"{name}: {line}", *measure(name, model, x, calib, args.exporters)]
        print("\n".join(lines[1:]), flush=True)
        out += lines
        if name == "vit":
            vit_model, vit_x = model, x
    if vit_model is not None:
        out.append(speed(vit_model, vit_x))
    print("\n" + "\n".join(out))


if __name__ == "__main__":
    main()
