"""Small transformer and ConvNeXt models in plain PyTorch, for the patterns of issue 21.

Each builder is seeded, returns an eval-mode model small enough that a forward pass on a
batch of 2 takes a few milliseconds, and the model has ``example_input(batch, seed=0)``,
which returns a seeded input of the right shape and dtype (token ids are int64).

With ``spread=True`` (the default) the norm affines (gamma over two decades, a non-zero
beta) and the output rows of every Linear (over one decade) are spread, so that an
equalization has per-channel work to do on an untrained model; ``spread=False`` keeps
PyTorch's initialization (what the benchmark trains from).

The default sizes differ from each other (channels, tokens, vocabulary, hidden width), so
that an axis taken for another shows as a shape error instead of passing by chance.

The exact pairs of the issue's table that each holds, and the near misses that an
equalizer must refuse, are listed in each builder's docstring.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NORMS = (nn.LayerNorm, nn.RMSNorm)


def spread_channels(model: nn.Module, seed: int = 0) -> nn.Module:
    """Spread norm gammas over two decades (random sign kept positive: a norm's gamma is
    usually so), give every norm a non-zero beta where it has one, spread each Linear's
    output rows over one decade, and give ``nn.MultiheadAttention``'s in-projection a
    non-zero bias (it starts at zeros, and the dynamo exporter stores equal biases of
    several layers as one tensor, which no equalization may scale)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.MultiheadAttention) and m.in_proj_bias is not None:
                m.in_proj_bias.copy_(torch.randn(m.in_proj_bias.shape, generator=g) * 0.1)
            weight = getattr(m, "weight", None)
            if weight is None:
                continue
            if isinstance(m, (*NORMS, LayerNorm2d, RMSNorm)):
                c = weight.shape[0]
                weight.copy_(10 ** (torch.rand(c, generator=g) * 2 - 1))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(torch.randn(c, generator=g) * 0.5)
            elif isinstance(m, nn.Linear):
                rows = 10 ** (torch.rand(weight.shape[0], generator=g) - 0.5)
                weight.mul_(rows[:, None])
    return model


def _image_input(channels: int, size: int):
    def example_input(batch: int = 2, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(batch, channels, size, size, generator=g)

    return example_input


def _token_input(vocab: int, seq_len: int):
    def example_input(batch: int = 2, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab, (batch, seq_len), generator=g)

    return example_input


# --- ViT ------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention with separate q / k / v Linears, written out with matmul
    and softmax (``attention="manual"``) or ``F.scaled_dot_product_attention``
    (``"sdpa"``)."""

    def __init__(self, dim: int, heads: int, attention: str = "manual"):
        super().__init__()
        self.heads, self.head_dim, self.attention = heads, dim // heads, attention
        self.scale = self.head_dim**-0.5
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def _split(self, x):
        b, t, _ = x.shape
        return x.reshape(b, t, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        if self.attention == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
            y = attn @ v
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int, attention: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        if attention == "mha":
            self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        else:
            self.attn = Attention(dim, heads, attention)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim * mlp_ratio)
        self.fc2 = nn.Linear(dim * mlp_ratio, dim)

    def forward(self, x):
        h = self.norm1(x)
        if isinstance(self.attn, nn.MultiheadAttention):
            h = self.attn(h, h, h, need_weights=False)[0]
        else:
            h = self.attn(h)
        x = x + h
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    def __init__(
        self,
        image_size=32,
        patch=8,
        in_chans=3,
        dim=32,
        depth=2,
        heads=4,
        mlp_ratio=2,
        num_classes=10,
        attention="manual",
        pool="cls",
    ):
        super().__init__()
        if attention not in ("manual", "sdpa", "mha") or pool not in ("cls", "mean"):
            raise ValueError(f"attention={attention!r}, pool={pool!r}")
        self.pool = pool
        self.patch_embed = nn.Conv2d(in_chans, dim, patch, stride=patch)
        tokens = (image_size // patch) ** 2 + (pool == "cls")
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02) if pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(
            ViTBlock(dim, heads, mlp_ratio, attention) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.example_input = _image_input(in_chans, image_size)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        x = x[:, 0] if self.pool == "cls" else x.mean(dim=1)
        return self.head(x)


def vit(seed=0, attention="manual", pool="cls", spread=True, **sizes) -> ViT:
    """Pre-LN ViT-style encoder: patch embedding (Conv2d, stride = patch), class token or
    mean pool, blocks ``x + attn(LN(x))``, ``x + fc2(gelu(fc1(LN(x))))``, final LN, head.

    ``attention``: ``"manual"`` (separate q / k / v Linears, matmul, softmax),
    ``"sdpa"`` (``F.scaled_dot_product_attention``), ``"mha"`` (``nn.MultiheadAttention``,
    packed in-projection).

    Exact pairs of the issue's table: LayerNorm affine -> q, k, v (norm1, pre-LN: its
    output feeds only the attention); LayerNorm affine -> fc1 (norm2); V -> attention -> O
    (``proj`` / ``out_proj``); Q -> K inside each head (no rotary); final LayerNorm
    affine -> head (through the class token slice or the mean over tokens). Not exact:
    fc1 -> GELU -> fc2; the patch embedding (its output feeds the residual stream).
    """
    torch.manual_seed(seed)
    model = ViT(attention=attention, pool=pool, **sizes)
    if spread:
        spread_channels(model, seed)
    return model.eval()


# --- LLaMA ----------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """The usual hand-written RMSNorm (LLaMA's reference code)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class GQAttention(nn.Module):
    """Grouped-query causal attention with rotary embeddings (rotated pairs (i, i + D/2),
    the Hugging Face layout); K and V heads are repeated to the query heads."""

    def __init__(self, dim, n_heads, n_kv_heads, seq_len, kv_repeat="repeat_interleave"):
        super().__init__()
        if n_heads % n_kv_heads or kv_repeat not in ("repeat_interleave", "expand"):
            raise ValueError(f"n_heads={n_heads}, n_kv_heads={n_kv_heads}, {kv_repeat!r}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.kv_repeat = kv_repeat
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        inv_freq = 1.0 / 10000 ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim)
        angles = torch.outer(torch.arange(seq_len).float(), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        mask = torch.full((seq_len, seq_len), float("-inf")).triu(1)
        self.register_buffer("mask", mask, persistent=False)

    def _repeat(self, x):
        rep = self.n_heads // self.n_kv_heads
        if self.kv_repeat == "repeat_interleave":
            return x.repeat_interleave(rep, dim=1)
        b, h, t, d = x.shape
        return x[:, :, None].expand(b, h, rep, t, d).reshape(b, h * rep, t, d)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        # The buffers are used whole (the input is seq_len long): slicing them by a traced
        # length is what torch.fx cannot trace.
        q = q * self.cos + _rotate_half(q) * self.sin
        k = k * self.cos + _rotate_half(k) * self.sin
        k, v = self._repeat(k), self._repeat(v)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim) + self.mask
        y = scores.softmax(dim=-1) @ v
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class RopeAttention(nn.Module):
    """Attention with a rotary embedding on q and k written as ``form`` says: ``chunk``
    (LLaMA's rotate_half), ``slice`` (``x[..., :h]``, ``x[..., h:]``, the products'
    operands swapped), ``hf`` (Hugging Face's ``x[..., : x.shape[-1] // 2]``),
    ``gptj`` (GPT-J's rotate_every_two: pairs ``(2i, 2i + 1)``, tables repeated so),
    ``computed`` (its tables computed from the data, not constants:
    not translated as a rotary) or ``table`` (q and k only times a table: no rotary).
    ``sdpa``: the attention by ``F.scaled_dot_product_attention``."""

    def __init__(self, form, dim=16, heads=2, t=5, sdpa=False):
        super().__init__()
        self.form, self.heads, self.d, self.sdpa = form, heads, dim // heads, sdpa
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        angles = torch.outer(torch.arange(t).float(), torch.rand(self.d // 2) + 0.1)
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("angles", angles)
        self.register_buffer("cos", angles.cos())
        self.register_buffer("sin", angles.sin())
        every_two = angles[:, : self.d // 2].repeat_interleave(2, dim=-1)
        self.register_buffer("cos_every_two", every_two.cos())
        self.register_buffer("sin_every_two", every_two.sin())

    def _rope(self, x):
        h = self.d // 2
        if self.form == "chunk":
            return x * self.cos + _rotate_half(x) * self.sin
        if self.form == "slice":
            return self.sin * torch.cat((-x[..., h:], x[..., :h]), dim=-1) + self.cos * x
        if self.form == "gptj":
            rot = torch.stack((-x[:, :, :, 1::2], x[:, :, :, ::2]), dim=-1).flatten(-2)
            return x * self.cos_every_two + rot * self.sin_every_two
        if self.form == "hf":
            x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
            return (x * self.cos) + (torch.cat((-x2, x1), dim=-1) * self.sin)
        if self.form == "computed":  # angles that depend on the data
            a = self.angles * x.mean()
            return x * a.cos() + _rotate_half(x) * a.sin()
        return x * self.cos

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (
            f(x).view(b, t, self.heads, self.d).transpose(1, 2) for f in (self.q, self.k, self.v)
        )
        q, k = self._rope(q), self._rope(k)
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


class GQANoRotary(nn.Module):
    """Grouped-query attention without rotary embeddings: K is repeated as V is (the
    repeated K must be refused: Q -> K sums over its channels)."""

    def __init__(self, dim=16, heads=4, kv=2):
        super().__init__()
        self.heads, self.kv, self.d = heads, kv, dim // heads
        self.q, self.o = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.k, self.v = nn.Linear(dim, kv * self.d), nn.Linear(dim, kv * self.d)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.d).transpose(1, 2)
        k, v = (f(x).view(b, t, self.kv, self.d).transpose(1, 2) for f in (self.k, self.v))
        n = self.heads // self.kv
        k, v = k.repeat_interleave(n, dim=1), v.repeat_interleave(n, dim=1)
        y = torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class LlamaBlock(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads, hidden, seq_len, norm, kv_repeat):
        super().__init__()
        make_norm = RMSNorm if norm == "manual" else (lambda d: nn.RMSNorm(d, eps=1e-6))
        self.attn_norm = make_norm(dim)
        self.attn = GQAttention(dim, n_heads, n_kv_heads, seq_len, kv_repeat)
        self.mlp_norm = make_norm(dim)
        self.mlp = SwiGLU(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(
        self,
        vocab=50,
        dim=32,
        depth=2,
        n_heads=4,
        n_kv_heads=2,
        hidden=64,
        seq_len=16,
        norm="manual",
        kv_repeat="repeat_interleave",
    ):
        super().__init__()
        if norm not in ("manual", "torch"):
            raise ValueError(f"norm={norm!r}")
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            LlamaBlock(dim, n_heads, n_kv_heads, hidden, seq_len, norm, kv_repeat)
            for _ in range(depth)
        )
        self.norm = RMSNorm(dim) if norm == "manual" else nn.RMSNorm(dim, eps=1e-6)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.example_input = _token_input(vocab, seq_len)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


def llama(seed=0, norm="manual", kv_repeat="repeat_interleave", spread=True, **sizes) -> Llama:
    """LLaMA-style decoder (character-level LM): token embedding, blocks
    ``x + wo(attn(RMSNorm(x)))``, ``x + down(silu(gate(h)) * up(h))`` with
    ``h = RMSNorm(x)``, final RMSNorm, LM head. Grouped-query attention (``n_kv_heads``
    < ``n_heads``; K and V repeated by ``repeat_interleave`` or expand + reshape),
    rotary embeddings on q and k, causal mask. ``norm``: ``"manual"`` (hand-written
    RMSNorm) or ``"torch"`` (``nn.RMSNorm``). Input: int64 token ids (batch, seq_len),
    exactly ``seq_len`` long (torch.fx traces it so).

    Exact pairs of the issue's table: RMSNorm weight -> wq, wk, wv; RMSNorm weight ->
    gate, up; up (times silu(gate)) -> down; V -> attention -> O, grouped-query (one V
    channel feeds the O columns of ``n_heads / n_kv_heads`` heads); Q -> K only with equal
    scales on each rotated pair (i, i + head_dim / 2); final RMSNorm -> LM head. Not
    exact: gate -> SiLU; the embedding (feeds the residual stream).
    """
    torch.manual_seed(seed)
    model = Llama(norm=norm, kv_repeat=kv_repeat, **sizes)
    if spread:
        spread_channels(model, seed)
    return model.eval()


class RotaryEmbedding(nn.Module):
    """Hugging Face's ``LlamaRotaryEmbedding``: ``cos`` and ``sin`` computed in forward
    from the ``inv_freq`` buffer and the positions ``(B, T)``, as
    ``(inv_freq[None, :, None] @ position_ids[:, None, :].float()).transpose(1, 2)``
    (the positions' batch, or 1), the angles repeated for the two halves, cast to the
    dtype of ``x``."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x, position_ids):
        # (Hugging Face expands inv_freq to the batch first: torch.fx cannot trace that on
        # a buffer, which it reads as a tensor, not a proxy; the matmul broadcasts it.)
        freqs = (self.inv_freq[None, :, None] @ position_ids[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def _hf_rotate_half(x):
    """Hugging Face's ``rotate_half``: the halves cut by a bound read from the shape."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class HFAttention(nn.Module):
    """Hugging Face's ``LlamaAttention`` with its eager attention: q / k / v / o
    projections, the rotary's ``cos`` / ``sin`` ``(B, T, D)`` given by the model,
    unsqueezed for the heads (``apply_rotary_pos_emb``), K and V repeated by ``repeat_kv``
    (expand, reshape), ``softmax(q k^T / sqrt(D) + causal mask) v``. (Not
    ``F.scaled_dot_product_attention``: the dynamo exporter merges its batch with the
    repeated K heads, where Q -> K is lost whatever the rotary.)"""

    def __init__(self, dim, n_heads, n_kv_heads):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def _repeat_kv(self, x):
        b, h, t, d = x.shape
        rep = self.n_heads // self.n_kv_heads
        return x[:, :, None, :, :].expand(b, h, rep, t, d).reshape(b, h * rep, t, d)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = (q * cos) + (_hf_rotate_half(q) * sin)
        k = (k * cos) + (_hf_rotate_half(k) * sin)
        k, v = self._repeat_kv(k), self._repeat_kv(v)
        # Hugging Face's eager attention; the causal mask made for the input's length
        mask = torch.full((t, t), float("-inf"), device=x.device).triu(1)
        scores = q @ k.transpose(2, 3) * self.head_dim**-0.5 + mask
        y = scores.softmax(dim=-1) @ v
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class HFBlock(LlamaBlock):
    def __init__(self, dim, n_heads, n_kv_heads, hidden):
        nn.Module.__init__(self)
        self.attn_norm = RMSNorm(dim)
        self.attn = HFAttention(dim, n_heads, n_kv_heads)
        self.mlp_norm = RMSNorm(dim)
        self.mlp = SwiGLU(dim, hidden)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class LlamaHF(nn.Module):
    """A LLaMA-style decoder written as Hugging Face writes it: the rotary tables computed
    in forward (:class:`RotaryEmbedding`) from ``position_ids``, which are
    ``torch.arange(T).unsqueeze(0)`` of the input's length (``positions="arange"``) or
    the model's second input (``positions="input"``, int64 ``(B, T)``)."""

    def __init__(
        self, positions="arange", vocab=50, dim=32, depth=2, n_heads=4, n_kv_heads=2, hidden=64,
        seq_len=16,
    ):  # fmt: skip
        super().__init__()
        if positions not in ("arange", "input"):
            raise ValueError(f"positions={positions!r}")
        self.embed = nn.Embedding(vocab, dim)
        self.rotary = RotaryEmbedding(dim // n_heads)
        self.blocks = nn.ModuleList(HFBlock(dim, n_heads, n_kv_heads, hidden) for _ in range(depth))
        self.norm = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.example_input = _token_input(vocab, seq_len)

    def forward(self, tokens):
        position_ids = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
        return self.decode(tokens, position_ids)

    def decode(self, tokens, position_ids):
        x = self.embed(tokens)
        cos, sin = self.rotary(x, position_ids)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.lm_head(self.norm(x))


class LlamaHFPositions(LlamaHF):
    """:class:`LlamaHF` with ``position_ids`` as its second input."""

    def forward(self, tokens, position_ids):
        return self.decode(tokens, position_ids)


def llama_hf(seed=0, positions="arange", spread=True, **sizes) -> LlamaHF:
    """LLaMA-style decoder as Hugging Face writes it: :func:`llama`'s layers, but the
    rotary tables computed in forward from ``inv_freq`` and the positions (any sequence
    length runs), ``rotate_half`` cutting the halves at ``x.shape[-1] // 2``, ``repeat_kv``
    and the eager attention (a causal mask made for the input's length). ``positions``: ``"arange"``
    (one input, the token ids; any length) or ``"input"`` (a second input
    ``position_ids``, int64 ``(B, T)``).

    Exact pairs: :func:`llama`'s, Q -> K through the computed rotary tables with each
    rotated pair (i, i + head_dim / 2) tied.
    """
    torch.manual_seed(seed)
    model = (LlamaHF if positions == "arange" else LlamaHFPositions)(positions, **sizes)
    if spread:
        spread_channels(model, seed)
    return model.eval()


# --- BERT -----------------------------------------------------------------------------


class Bert(nn.Module):
    def __init__(
        self, vocab=50, dim=32, depth=2, heads=4, hidden=64, seq_len=16, num_classes=4, act="gelu"
    ):
        super().__init__()
        self.tok_embed = nn.Embedding(vocab, dim)
        self.pos_embed = nn.Embedding(seq_len, dim)
        self.register_buffer("positions", torch.arange(seq_len), persistent=False)
        self.emb_norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim, heads, hidden, dropout=0.0, activation=act, batch_first=True, norm_first=False
            )
            for _ in range(depth)
        )
        self.head = nn.Linear(dim, num_classes)
        self.example_input = _token_input(vocab, seq_len)

    def forward(self, tokens):
        x = self.tok_embed(tokens) + self.pos_embed(self.positions)
        x = self.emb_norm(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x[:, 0])


def bert(seed=0, act="gelu", spread=True, **sizes) -> Bert:
    """Post-LN BERT-style encoder: token + position embeddings, an embedding LayerNorm,
    ``nn.TransformerEncoderLayer(batch_first=True, norm_first=False)`` stacked (each
    ``x = LN1(x + attn(x))``, ``x = LN2(x + linear2(act(linear1(x))))``), a classifier
    head on the first token. Input: int64 token ids (batch, seq_len), exactly ``seq_len``
    long.

    Exact pairs of the issue's table: V -> attention -> O in each ``nn.MultiheadAttention``
    (packed in-projection); Q -> K inside each head (no rotary); the last layer's norm2
    affine -> head (the residual stream ends there). Refused: every other norm's output
    (post-LN: it feeds the next attention's q / k / v and the residual too); linear1 ->
    GELU -> linear2 (with ``act="relu"`` that pair is exact, through the ReLU).
    """
    torch.manual_seed(seed)
    model = Bert(act=act, **sizes)
    if spread:
        spread_channels(model, seed)
    return model.eval()


# --- ConvNeXt -------------------------------------------------------------------------


class LayerNorm2d(nn.Module):
    """Channels-first LayerNorm (over dim 1 of NCHW), as ConvNeXt's reference code."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, layer_scale: float = 1e-1):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim))

    def forward(self, x):
        h = self.dwconv(x).permute(0, 2, 3, 1)
        h = self.pwconv2(F.gelu(self.pwconv1(self.norm(h))))
        return x + (self.gamma * h).permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, in_chans=3, image_size=32, dims=(16, 32), depths=(1, 1), num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], 4, stride=4), LayerNorm2d(dims[0]))
        stages = []
        for i, (dim, depth) in enumerate(zip(dims, depths, strict=True)):
            down = [] if i == 0 else [LayerNorm2d(dims[i - 1]), nn.Conv2d(dims[i - 1], dim, 2, 2)]
            stages.append(nn.Sequential(*down, *(ConvNeXtBlock(dim) for _ in range(depth))))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)
        self.example_input = _image_input(in_chans, image_size)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.head(self.norm(x.mean(dim=(-2, -1))))


def convnext(seed=0, spread=True, **sizes) -> ConvNeXt:
    """ConvNeXt-style CNN: stem Conv 4x4 stride 4 + channels-first LayerNorm; blocks
    ``x + permute(gamma * pwconv2(gelu(pwconv1(LN(permute(dwconv7x7(x)))))))`` (NHWC
    inside, Linears on the last axis, layer scale gamma); downsampling channels-first
    LN + Conv 2x2 stride 2; global mean pool, LayerNorm, head.

    Exact pairs of the issue's table: LayerNorm affine -> pwconv1 (channel-last, after
    the NCHW -> NHWC permute); the downsampling LN affine -> its Conv 2x2 (a
    channels-first norm, like a GroupNorm with one group); final LayerNorm -> head.
    Not exact: dwconv -> LN (the normalization); pwconv1 -> GELU -> pwconv2; the stem
    LN (its output also feeds the residual stream).
    """
    torch.manual_seed(seed)
    model = ConvNeXt(**sizes)
    if spread:
        spread_channels(model, seed)
    return model.eval()


#: name -> builder(seed) of every variant, for parametrized tests.
VARIANTS = {
    "vit": lambda seed=0: vit(seed),
    "vit_mean_pool": lambda seed=0: vit(seed, pool="mean"),
    "vit_sdpa": lambda seed=0: vit(seed, attention="sdpa"),
    "vit_mha": lambda seed=0: vit(seed, attention="mha"),
    "llama": lambda seed=0: llama(seed),
    "llama_expand": lambda seed=0: llama(seed, kv_repeat="expand"),
    "llama_nn_rmsnorm": lambda seed=0: llama(seed, norm="torch"),
    "llama_hf": lambda seed=0: llama_hf(seed),
    "bert": lambda seed=0: bert(seed),
    "convnext": lambda seed=0: convnext(seed),
}
