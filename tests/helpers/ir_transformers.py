"""Transformer blocks written directly in the IR, for the core's tests: a norm's affine
feeding projections, attention (heads split with Reshape / Transpose, ``softmax(Q K^T)
@ V``, heads merged back), a gated MLP, and a channel-last MLP reached through a
Transpose (ConvNeXt). Random weights; tokens ``(B, T, C)`` have their channels last."""

from __future__ import annotations

import numpy as np

from cle_core import Graph, Layout


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class TokenBuilder:
    """Adds nodes to a graph over ``(B, T, C)`` tokens, keeping every value's shape."""

    def __init__(self, seed: int, batch: int = 2, tokens: int = 5):
        self.rng = np.random.default_rng(seed)
        self.g = Graph("tokens")
        self.batch, self.tokens = batch, tokens
        self.count = 0

    def name(self, kind: str) -> str:
        self.count += 1
        return f"{kind}{self.count}"

    def shaped(self, value: str, shape, axes=None) -> str:
        v = self.g.values[value]
        v.shape = tuple(shape)
        if axes is not None:
            v.channel_axes = tuple(axes)
        return value

    def input(self, c: int) -> str:
        v = self.g.add_input("x", c)
        v.shape, v.channel_axes = (self.batch, self.tokens, c), (2,)
        return "x"

    def input_like(self, name: str, shape) -> str:
        """A graph input of unknown channels (attention weights given from outside)."""
        v = self.g.add_input(name, None)
        v.shape = tuple(shape)
        return name

    def spread(self, n: int) -> np.ndarray:
        """Values over a few decades, signs mixed: what equalization has to work on."""
        return self.rng.standard_normal(n) * 10.0 ** self.rng.uniform(-1.5, 1.5, n)

    def linear(self, x: str, fin: int, fout: int, bias: bool = True) -> str:
        w = self.rng.standard_normal((fout, fin)) * 10.0 ** self.rng.uniform(-1, 1, (fout, 1))
        n = self.g.add_node(
            "linear",
            [x],
            name=self.name("fc"),
            params={"weight": w, "bias": self.spread(fout) if bias else None},
            attrs={"layout": Layout(0, 1)},
        )
        shape = self.g.values[x].shape
        return self.shaped(n.outputs[0].name, (*shape[:-1], fout))

    def norm(self, x: str, c: int, kind: str = "layer", beta: bool = True) -> str:
        shape = self.g.values[x].shape
        axis = len(shape) - 1 if kind != "group" else 1
        attrs = {"kind": kind, "axis": axis, "eps": 1e-5}
        if kind == "group":
            attrs["groups"] = 2
        n = self.g.add_node(
            "norm",
            [x],
            name=self.name(f"{kind}norm"),
            params={"gamma": self.spread(c), "beta": self.spread(c) if beta else None},
            attrs=attrs,
        )
        return self.shaped(n.outputs[0].name, shape)

    def op(self, op: str, inputs: list[str], out_shape=None, **attrs) -> str:
        n = self.g.add_node(op, inputs, name=self.name(op), attrs=attrs)
        out = n.outputs[0].name
        return self.shaped(out, out_shape) if out_shape is not None else out

    def opaque(self, inputs: list[str], fn, shape, kind: str, channels=None) -> str:
        n = self.g.add_node(
            "opaque",
            inputs,
            name=self.name(kind),
            attrs={"kind": kind, "fn": fn, "channels": channels},
        )
        return self.shaped(n.outputs[0].name, shape)

    def heads(self, x: str, h: int, d: int, perm=(0, 2, 1, 3)) -> str:
        """``(B, T, H * D) -> (B, T, H, D) -> transpose(perm)``."""
        b, t = self.batch, self.tokens
        shape4 = (b, t, h, d)
        split = self.op("reshape", [x], out_shape=shape4, shape=shape4)
        return self.op("transpose", [split], out_shape=tuple(shape4[p] for p in perm), perm=perm)

    def attention(self, x: str, c: int, h: int, perm=(0, 2, 1, 3)) -> str:
        """Multi-head self-attention of ``x`` (tokens): q, k, v projections, heads moved
        by ``perm`` (a permutation that keeps the batch first and puts the tokens and the
        head dimension last, in some order of the two head axes), ``softmax(q k^T) @ v``,
        heads merged back, the out projection."""
        d = c // h
        b, t = self.batch, self.tokens
        q = self.heads(self.linear(x, c, c), h, d, perm)
        k = self.heads(self.linear(x, c, c), h, d, perm)
        v = self.heads(self.linear(x, c, c), h, d, perm)
        qs, ks = self.g.values[q].shape, self.g.values[k].shape
        kt = self.op("transpose", [k], out_shape=(*ks[:-2], ks[-1], ks[-2]), perm=(0, 1, 3, 2))
        scores = self.op("matmul", [q, kt], out_shape=(*qs[:-1], ks[-2]))
        p = self.opaque([scores], _softmax, (*qs[:-1], ks[-2]), "softmax")
        mixed = self.op("matmul", [p, v], out_shape=self.g.values[v].shape)
        inverse = tuple(int(i) for i in np.argsort(perm))
        back = self.op(
            "transpose",
            [mixed],
            out_shape=tuple(self.g.values[mixed].shape[i] for i in inverse),
            perm=inverse,
        )
        merged = self.op("reshape", [back], out_shape=(b, t, c), shape=(b, t, c))
        return self.linear(merged, c, c)

    def repeat_heads(self, x: str, n: int, how: str = "interleave") -> str:
        """Each head of ``x`` (B, H, T, D) repeated ``n`` times in a row, as grouped-query
        attention repeats K / V: one ``repeat`` of the head axis (``repeat_interleave``),
        or ``x[:, :, None]``, the new axis repeated (an expand or tile) and merged into
        the head axis by a reshape (``"expand"``: what LLaMA code and ONNX exports write)."""
        bs, h, t, d = self.g.values[x].shape
        if how == "interleave":
            return self.op("repeat", [x], out_shape=(bs, h * n, t, d), axis=1, repeats=n)
        five = (bs, h, 1, t, d)
        x = self.op("reshape", [x], out_shape=five, shape=five)
        x = self.op("repeat", [x], out_shape=(bs, h, n, t, d), axis=2, repeats=n)
        return self.op("reshape", [x], out_shape=(bs, h * n, t, d), shape=(bs, h * n, t, d))

    def gqa_attention(self, x: str, c: int, h: int, kv: int, how: str = "interleave") -> str:
        """Grouped-query attention: ``kv`` K / V heads, each repeated for ``h / kv`` query
        heads (:meth:`repeat_heads`), then as :meth:`attention`."""
        d = c // h
        q = self.heads(self.linear(x, c, c), h, d)
        k = self.repeat_heads(self.heads(self.linear(x, c, kv * d), kv, d), h // kv, how)
        v = self.repeat_heads(self.heads(self.linear(x, c, kv * d), kv, d), h // kv, how)
        return self._attend(q, k, v, c, h)

    def _attend(self, q: str, k: str, v: str, c: int, h: int) -> str:
        """Heads ``(B, H, T, D)`` of q, k, v -> softmax(q k^T) v, heads merged, then the
        out projection."""
        d, b, t = c // h, self.batch, self.tokens
        qs, ks = self.g.values[q].shape, self.g.values[k].shape
        kt = self.op("transpose", [k], out_shape=(*ks[:-2], ks[-1], ks[-2]), perm=(0, 1, 3, 2))
        scores = self.op("matmul", [q, kt], out_shape=(*qs[:-1], ks[-2]))
        p = self.opaque([scores], _softmax, (*qs[:-1], ks[-2]), "softmax")
        mixed = self.op("matmul", [p, v], out_shape=self.g.values[v].shape)
        back = self.op("transpose", [mixed], out_shape=(b, t, h, d), perm=(0, 2, 1, 3))
        merged = self.op("reshape", [back], out_shape=(b, t, c), shape=(b, t, c))
        return self.linear(merged, c, c)

    def packed_attention(self, x: str, c: int, h: int, cut: str = "last") -> str:
        """Attention whose q, k and v are cut from one packed projection ``(B, T, 3C)``:
        by positions of its last axis (``"last"``: GPT's ``c_attn(x).split(C, dim=2)``,
        ONNX Split / Slice), or by a position of the axis that holds the three after
        ``(B, T, 3, C)`` is moved in front (``"front"``: what ``nn.MultiheadAttention``
        and PP-OCR's SVTR exports write, a Gather of axis 0)."""
        d = c // h
        b, t = self.batch, self.tokens
        qkv = self.linear(x, c, 3 * c)
        if cut == "last":
            thirds = [slice(i * c, (i + 1) * c) for i in range(3)]
            cuts = [self.op("select", [qkv], out_shape=(b, t, c), axis=2, index=i) for i in thirds]
        else:
            four = self.op("reshape", [qkv], out_shape=(b, t, 3, c), shape=(b, t, 3, c))
            front = self.op("transpose", [four], out_shape=(3, b, t, c), perm=(2, 0, 1, 3))
            cuts = [
                self.op("select", [front], out_shape=(b, t, c), axis=0, index=i) for i in (0, 1, 2)
            ]
        q, k, v = (self.heads(z, h, d) for z in cuts)
        return self._attend(q, k, v, c, h)

    def gated_mlp(self, x: str, c: int, hidden: int, up_first: bool = False) -> str:
        """``down(silu(gate(x)) * up(x))``; ``up_first`` writes the product ``up * silu``."""
        gate = self.linear(x, c, hidden, bias=False)
        up = self.linear(x, c, hidden, bias=False)
        shape = self.g.values[up].shape
        act = self.opaque([gate], lambda z: z / (1.0 + np.exp(-z)), shape, "silu", channels=hidden)
        prod = self.op("mul", [up, act] if up_first else [act, up], out_shape=shape)
        return self.linear(prod, hidden, c, bias=False)

    def add(self, a: str, b: str) -> str:
        return self.op("add", [a, b], out_shape=self.g.values[a].shape)

    def build(self, outputs: list[str]) -> Graph:
        self.g.set_outputs(outputs)
        self.g.validate()
        return self.g


def pre_ln_block(seed: int = 0, c: int = 8, h: int = 2, norm: str = "layer", perm=(0, 2, 1, 3)):
    """A pre-LN transformer block with a gated MLP: ``x + attn(norm(x))``, then
    ``y + mlp(norm(y))``."""
    b = TokenBuilder(seed)
    x = b.input(c)
    y = b.add(x, b.attention(b.norm(x, c, norm, beta=norm == "layer"), c, h, perm))
    z = b.add(y, b.gated_mlp(b.norm(y, c, norm, beta=norm == "layer"), c, 2 * c))
    return b.build([z])


def feed_tokens(graph: Graph, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {v.name: rng.standard_normal(v.shape) for v in graph.inputs}


class _RandomScales:
    """Every region's channels scaled by ``10 ** uniform(-1, 1)`` (seeded): exact
    whatever the scales, so a test's way to force every region's write-back with scales
    far from 1 in both directions."""

    name = "random-scales-for-test"
    description = "random scales over two decades"

    def choose(self, problem):
        from cle_core import ScaleOutcome

        rng = np.random.default_rng(0)
        scales = {r.id: 10.0 ** rng.uniform(-1, 1, r.size) for r in problem.regions}
        return ScaleOutcome(scales, 1, True, 0.0)


def random_scales_objective() -> str:
    """The name of the test objective of random scales, registered once."""
    from cle_core import objective_names, register_objective

    if _RandomScales.name not in objective_names():
        register_objective(_RandomScales())
    return _RandomScales.name


def packed_projections(
    ws: list[np.ndarray], group: str | None = "in_proj", bias: bool = False
) -> Graph:
    """``x`` read by one linear per row block of a packed tensor (q, k, v), each an
    output, the three in one ``weight_group`` (none for ``group=None``); zero biases
    with ``bias``."""
    g = Graph("packed")
    g.add_input("x", ws[0].shape[1])
    attrs = {"layout": Layout(0, 1)} | ({"weight_group": group} if group else {})
    for name, w in zip("qkv", ws, strict=True):
        g.add_node(
            "linear",
            ["x"],
            name=name,
            outputs=[f"y{name}"],
            params={"weight": w, "bias": np.zeros(w.shape[0]) if bias else None},
            attrs=dict(attrs),
        )
    g.set_outputs([f"y{n}" for n in "qkv"])
    g.validate()
    return g
