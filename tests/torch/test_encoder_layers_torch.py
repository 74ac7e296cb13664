"""cle_torch on ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` (issue 21):
traced as the computation their documentation gives (``cle_torch._decompose``), their
pairs found and written back into the layer's own parameters, which the fused fast path
reads too; exact with and without ``torch.no_grad()`` (the fast path runs under it).

Exactness: FP32 output SQNR >= 90 dB against the original model, with every region
forced to scale (the noise objective's 1 dB threshold lowered).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cle_torch
from cle_core import CLEError
from cle_core._cli import format_inspection
from tests.helpers import transformer_models as tm

MIN_SQNR_DB = 90.0


@pytest.fixture
def always_scale(monkeypatch):
    monkeypatch.setattr("cle_core._objectives.noise.MIN_GAIN_DB", -np.inf)


def _sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.detach().double(), out.detach().double()
    noise = float(((ref - out) ** 2).sum())
    return 10 * np.log10(float((ref**2).sum()) / max(noise, 1e-300))


def _snapshot(model: nn.Module):
    """Every parameter and buffer (object and bytes) and every training flag."""
    tensors = list(model.named_parameters(remove_duplicate=False))
    tensors += list(model.named_buffers(remove_duplicate=False))
    return (
        [(n, id(t), t.dtype, t.detach().numpy().tobytes()) for n, t in tensors],
        [(n, m.training) for n, m in model.named_modules()],
    )


class _Encoder(nn.Module):
    """A Linear into one ``nn.TransformerEncoderLayer`` or a two-layer
    ``nn.TransformerEncoder`` (pre-LN ones with a final norm), a key padding mask, and a
    head on the first token. ``batch_first=False`` layers get ``(T, B, E)``."""

    def __init__(self, norm_first, batch_first, act, stack, dim=16, heads=4, bias=True):
        super().__init__()
        self.batch_first = batch_first
        self.inp = nn.Linear(8, dim)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 2 * dim, dropout=0.1, activation=act, batch_first=batch_first,
            norm_first=norm_first, bias=bias,
        )  # fmt: skip
        if stack:
            final = nn.LayerNorm(dim) if norm_first else None
            # nested tensors (the encoder's own fast path) where torch takes it
            nested = batch_first and not norm_first
            layer = nn.TransformerEncoder(layer, 2, norm=final, enable_nested_tensor=nested)
        self.enc = layer
        self.head = nn.Linear(dim, 3)

    def forward(self, x, pad):
        h = self.inp(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.enc(h, src_key_padding_mask=pad)
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(h[:, 0])


def _spread(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(10 ** (torch.rand(m.weight.shape, generator=g) * 2 - 1))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, nn.Linear):
                rows = 10 ** (torch.rand(m.weight.shape[0], generator=g) - 0.5)
                m.weight.mul_(rows[:, None])
    return model.eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 6, 8, generator=g)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[1, 4:] = True  # the second sequence is 4 tokens long
    return x, pad


def _expected(norm_first: bool, act: str, stack: bool):
    """The regions, in the report's order: Q -> K, V -> O and (ReLU) linear1 ->
    linear2 in every layer; pre-LN: norm1 -> q, k, v and norm2 -> linear1 in every layer, the final
    norm -> head (a single pre-LN layer ends in a residual Add: none); post-LN: only
    the last norm2 -> head (the others feed residuals)."""
    layers = ["enc.layers.0.", "enc.layers.1."] if stack else ["enc."]
    out = []
    for p in layers:
        if norm_first:
            out.append(("norm", (f"{p}norm1",), tuple(f"{p}self_attn.{c}" for c in "qkv")))
        out.append(("qk", (f"{p}self_attn.k",), (f"{p}self_attn.q",)))
        out.append(("attention", (f"{p}self_attn.v",), (f"{p}self_attn.out_proj",)))
        if norm_first:
            out.append(("norm", (f"{p}norm2",), (f"{p}linear1",)))
        if act == "relu":
            out.append(("pair", (f"{p}linear1",), (f"{p}linear2",)))
    if norm_first and not stack:
        return out
    last = "enc.norm" if norm_first else f"{layers[-1]}norm2"
    return [*out, ("norm", (last,), ("head",))]


@pytest.mark.usefixtures("always_scale")
@pytest.mark.parametrize("stack", [False, True], ids=["layer", "encoder"])
@pytest.mark.parametrize("act", ["relu", "gelu"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("norm_first", [True, False], ids=["pre_ln", "post_ln"])
def test_encoder_layers_are_equalized_exactly_in_place(norm_first, batch_first, act, stack):
    model = _spread(_Encoder(norm_first, batch_first, act, stack))
    x, pad = _inputs()
    with torch.no_grad():  # the fused fast path (batch_first) and nested tensors
        ref_fast = model(x, pad)
    ref = model(x, pad)
    params = {n: p for n, p in model.named_parameters()}
    eq, report = cle_torch.equalize_model(model, dummy_input=(x, pad))
    assert eq is model and type(eq.enc) is type(model.enc)  # the module tree is kept
    assert {n: p for n, p in eq.named_parameters()} == params  # written in place
    assert [(r.kind, r.sources, r.sinks) for r in report.regions] == _expected(
        norm_first, act, stack
    )
    assert min(r.scales.max() / r.scales.min() for r in report.regions) > 1.01
    with torch.no_grad():
        assert _sqnr_db(ref_fast, eq(x, pad)) >= MIN_SQNR_DB
    assert _sqnr_db(ref, eq(x, pad)) >= MIN_SQNR_DB


def test_bert_lists_its_pairs_and_the_refused_ones_with_reasons():
    """What ``cle inspect`` prints for the BERT-style model of the helpers (post-LN,
    GELU): Q -> K and V -> O in each layer and the last norm -> head through ``x[:,
    0]``; every other norm and linear1 -> GELU -> linear2 refused, each with its
    reason."""
    model = tm.bert(0)
    _, report = cle_torch.equalize_model(model, dummy_input=model.example_input(2))
    text = format_inspection(report)
    for b in (0, 1):
        p = f"layers.{b}"
        assert f"attention, 32 channels: {p}.self_attn.v -> {p}.self_attn.out_proj" in text
        assert f"[scale] {p}.linear1 -> ?: 'layers_{b}_linear1' is read by gelu" in text
        assert f"qk, 32 channels: {p}.self_attn.k -> {p}.self_attn.q" in text
    assert "norm, 32 channels: layers.1.norm2 -> head" in text
    # post-LN: the norms' outputs also feed the residual, which the next norm normalizes
    assert "[scale] layers.0.norm1, layers.0.linear2 -> layers.0.linear1: 'add_2' is " in text
    assert "is normalized by layers.0.norm2 (norm)" in text
    relu = tm.bert(0, act="relu")
    _, report = cle_torch.equalize_model(relu, dummy_input=relu.example_input(2))
    pairs = [(r.kind, r.sources, r.sinks) for r in report.regions if r.kind == "pair"]
    assert pairs == [("pair", (f"layers.{b}.linear1",), (f"layers.{b}.linear2",)) for b in (0, 1)]


def test_a_refusal_leaves_the_model_byte_identical():
    """An encoder in training mode (its dropouts active), and a result that needs a
    GraphModule where none is allowed, are refused with the reason, and every
    parameter, buffer and training flag is as it was."""
    model = _spread(_Encoder(True, True, "relu", True)).train()
    x, pad = _inputs()
    before = _snapshot(model)
    with pytest.raises(CLEError, match=r"training mode \(\(root\), inp, enc"):
        cle_torch.equalize_model(model, dummy_input=(x, pad), calibration=[(x, pad)])
    assert _snapshot(model) == before
    # a result that needs graph edits (ReLU6's per-channel bounds), GraphModules refused:
    # the packed in-projection's rows were once written before the refusal
    model = _spread(_Encoder(False, True, F.relu6, True))
    before = _snapshot(model)
    with pytest.raises(cle_torch.NotInPlaceError, match="needs per-channel bounds"):
        cle_torch.equalize_model(
            model, dummy_input=(x, pad), objective="balance", allow_graph_module=False
        )
    assert _snapshot(model) == before


def test_a_graph_module_result_leaves_the_model_byte_identical():
    """A ReLU6 activation becomes a per-channel clamp (a graph edit): the result is a
    GraphModule that runs the documented computation, and the caller's model is as it
    was."""
    torch.manual_seed(0)
    model = _spread(_Encoder(False, True, F.relu6, True))
    x, pad = _inputs()
    ref = model(x, pad)
    before = _snapshot(model)
    eq, report = cle_torch.equalize_model(model, dummy_input=(x, pad), objective="balance")
    assert isinstance(eq, torch.fx.GraphModule)
    assert ("pair", ("enc.layers.0.linear1",), ("enc.layers.0.linear2",)) in [
        (r.kind, r.sources, r.sinks) for r in report.regions
    ]
    assert _snapshot(model) == before
    assert _sqnr_db(ref, eq(x, pad)) >= MIN_SQNR_DB


def test_masks_and_causal_flags_it_follows_and_those_it_refuses():
    """An additive or boolean attn_mask (a buffer or an input of the model), a causal
    hint with its mask: followed exactly. ``is_causal=True`` without a mask (torch
    raises on it) is refused with the reason."""
    torch.manual_seed(0)

    class Causal(nn.Module):
        def __init__(self, how):
            super().__init__()
            self.how = how
            self.inp = nn.Linear(8, 16)
            self.enc = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
            causal = nn.Transformer.generate_square_subsequent_mask(6)
            self.register_buffer("mask", causal if how == "float" else causal < 0)

        def forward(self, x, given):
            mask = given if self.how == "input" else self.mask
            return self.enc(self.inp(x), src_mask=mask, is_causal=self.how == "hint")

    x, _ = _inputs()
    given = nn.Transformer.generate_square_subsequent_mask(6)
    for how in ("float", "bool", "hint", "input"):
        model = _spread(Causal(how))
        ref = model(x, given)
        eq, report = cle_torch.equalize_model(copy.deepcopy(model), dummy_input=(x, given))
        assert ("attention", ("enc.self_attn.v",), ("enc.self_attn.out_proj",)) in [
            (r.kind, r.sources, r.sinks) for r in report.regions
        ], how
        assert _sqnr_db(ref, eq(x, given)) >= MIN_SQNR_DB, how

    class NoMask(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.attn = nn.Linear(8, 16), nn.MultiheadAttention(16, 4, batch_first=True)

        def forward(self, x):
            h = self.inp(x)
            return self.attn(h, h, h, is_causal=True, need_weights=False)[0]

    _, report = cle_torch.equalize_model(NoMask().eval(), input_shapes=(1, 6, 8))
    reasons = {s.candidate: s.reason for s in report.skipped if s.stage == "translate"}
    assert "is_causal=True without attn_mask" in reasons["attn"], reasons


@pytest.mark.parametrize("mask", ["bool", "float"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("norm_first", [True, False], ids=["pre_ln", "post_ln"])
def test_the_ir_computes_what_the_encoder_computes(norm_first, batch_first, mask):
    """The core's executor runs the translated encoder as torch does (slow path), the key
    padding mask fed as a graph input: it is in float64 there, so a boolean one is told
    apart by its dtype in the shape run."""
    from cle_core import run_graph
    from cle_torch._translate import capture

    model = _spread(_Encoder(norm_first, batch_first, "gelu", True))
    x, pad = _inputs()
    if mask == "float":
        pad = torch.zeros(pad.shape).masked_fill(pad, float("-inf"))
    cap = capture(model, dummy_input=(x, pad))
    (out,) = run_graph(cap.ir, {"x": x.numpy(), "pad": pad.numpy()}).values()
    assert _sqnr_db(model(x, pad), torch.from_numpy(out)) >= MIN_SQNR_DB


def test_an_encoder_layer_kept_whole_says_why():
    """A subclass that overrides the feed-forward block, and a layer the caller makes a
    leaf, are kept whole, each with its reason."""

    class Gated(nn.TransformerEncoderLayer):
        def _ff_block(self, x):
            return self.dropout2(self.linear2(self.linear1(x) * torch.sigmoid(x)))

    x = torch.randn(2, 5, 8)
    for layer, leaves, why in [
        (Gated(8, 2, 8, batch_first=True), (), "Gated overrides a method of torch's"),
        (
            nn.TransformerEncoderLayer(8, 2, 16, batch_first=True),
            (nn.TransformerEncoderLayer,),
            "TransformerEncoderLayer is a leaf module (leaf_modules): kept whole",
        ),
    ]:
        model = nn.Sequential(nn.Linear(8, 8), layer).eval()
        _, report = cle_torch.equalize_model(model, dummy_input=x, leaf_modules=leaves)
        assert [r for r in report.regions] == []
        reasons = {s.candidate: s.reason for s in report.skipped if s.stage == "translate"}
        assert why in reasons["1"], reasons


class _Decoder(nn.Module):
    """Tokens and a memory into one ``nn.TransformerDecoderLayer`` or a two-layer
    ``nn.TransformerDecoder`` with a final norm, a causal target mask (a constant), a
    head on the last token."""

    def __init__(self, norm_first, stack, dim=16):
        super().__init__()
        self.inp, self.mem = nn.Linear(8, dim), nn.Linear(8, dim)
        layer = nn.TransformerDecoderLayer(
            dim, 4, 2 * dim, dropout=0.1, activation="relu", batch_first=True,
            norm_first=norm_first,
        )  # fmt: skip
        self.dec = nn.TransformerDecoder(layer, 2, norm=nn.LayerNorm(dim)) if stack else layer
        self.head = nn.Linear(dim, 3)

    def forward(self, x, memory):
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return self.head(self.dec(self.inp(x), self.mem(memory), tgt_mask=mask)[:, -1])


@pytest.mark.usefixtures("always_scale")
@pytest.mark.parametrize("stack", [False, True], ids=["layer", "decoder"])
@pytest.mark.parametrize("norm_first", [True, False], ids=["pre_ln", "post_ln"])
def test_decoder_layers_are_equalized_exactly_but_the_cross_attention(norm_first, stack):
    """Self-attention V -> O, norms (pre-LN) and linear1 -> ReLU -> linear2 of every
    layer; the cross-attention on the memory is refused with the reason."""
    model = _spread(_Decoder(norm_first, stack))
    g = torch.Generator().manual_seed(2)
    x, memory = torch.randn(2, 6, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    ref = model(x, memory)
    eq, report = cle_torch.equalize_model(model, dummy_input=(x, memory))
    assert eq is model
    layers = ["dec.layers.0.", "dec.layers.1."] if stack else ["dec."]
    expected = []
    for p in layers:
        if norm_first:
            expected.append(("norm", (f"{p}norm1",), tuple(f"{p}self_attn.{c}" for c in "qkv")))
        expected.append(("qk", (f"{p}self_attn.k",), (f"{p}self_attn.q",)))
        expected.append(("attention", (f"{p}self_attn.v",), (f"{p}self_attn.out_proj",)))
        if norm_first:
            expected.append(("norm", (f"{p}norm3",), (f"{p}linear1",)))
        expected.append(("pair", (f"{p}linear1",), (f"{p}linear2",)))
    if stack or not norm_first:
        expected.append(("norm", ("dec.norm" if stack else "dec.norm3",), ("head",)))
    assert [(r.kind, r.sources, r.sinks) for r in report.regions] == expected
    reasons = {s.candidate: s.reason for s in report.skipped if s.stage == "translate"}
    assert "not self-attention" in reasons[f"{layers[0]}multihead_attn"]
    assert _sqnr_db(ref, eq(x, memory)) >= MIN_SQNR_DB


@pytest.mark.usefixtures("always_scale")
@pytest.mark.parametrize("kind", ["layer", "encoder", "decoder"])
def test_a_bare_transformer_module_is_equalized_as_the_model(kind):
    """The model itself an encoder layer, an encoder or a decoder: traced as its parts
    (called without masks), written in place, its class as it was; exact, also when run
    with a key padding mask afterwards."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True, activation="relu")
    model = {
        "layer": lambda: layer,
        "encoder": lambda: nn.TransformerEncoder(layer, 2, enable_nested_tensor=True),
        "decoder": lambda: nn.TransformerDecoder(
            nn.TransformerDecoderLayer(16, 4, 32, batch_first=True, activation="relu"), 2
        ),
    }[kind]()
    model, cls = _spread(model), type(model)
    x, pad = _inputs()
    args = (torch.randn(3, 6, 16),) + ((torch.randn(3, 5, 16),) if kind == "decoder" else ())
    masked = {} if kind == "decoder" else {"src_key_padding_mask": pad}
    with torch.no_grad():
        ref, ref_masked = model(*args), model(*args, **masked)
    eq, report = cle_torch.equalize_model(model, dummy_input=args)
    assert eq is model and type(eq) is cls
    prefix = "" if kind == "layer" else "layers.0."
    assert ("attention", (f"{prefix}self_attn.v",), (f"{prefix}self_attn.out_proj",)) in [
        (r.kind, r.sources, r.sinks) for r in report.regions
    ]
    with torch.no_grad():
        assert _sqnr_db(ref, eq(*args)) >= MIN_SQNR_DB
        assert _sqnr_db(ref_masked, eq(*args, **masked)) >= MIN_SQNR_DB
