"""Building blocks of HTS-AT: Swin window attention, patch merging, drop-path and a fused linear.

Split from :mod:`respiramfm.models.htsat` (which assembles them); the window/shift layout helpers
here define the token orders that module documents.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


MASK_VALUE = -100.0  # what Swin adds to attention logits between tokens of different shifted regions


def relative_position_index(ws: int) -> torch.Tensor:
    """(N, N) index into the (2ws-1)^2 bias table: (dh + ws - 1) * (2ws - 1) + (dw + ws - 1)."""
    hh, ww = torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")
    coords = torch.stack([hh.flatten(), ww.flatten()])  # 2, N
    rel = coords[:, :, None] - coords[:, None, :] + (ws - 1)
    return rel[0] * (2 * ws - 1) + rel[1]


def window_order(h: int, w: int, ws: int, shift: int) -> torch.Tensor:
    """Row-major token index held by each (window, position) slot after a cyclic shift by -shift."""
    rows = (torch.arange(h) + shift) % h
    cols = (torch.arange(w) + shift) % w
    grid = rows[:, None] * w + cols[None, :]
    return grid.view(h // ws, ws, w // ws, ws).permute(0, 2, 1, 3).reshape(-1)


def shift_mask(h: int, w: int, ws: int, shift: int) -> torch.Tensor:
    """(nW, N, N) additive mask: MASK_VALUE between tokens that the cyclic shift made neighbours."""

    def regions(n: int) -> torch.Tensor:
        lab = torch.zeros(n, dtype=torch.long)
        lab[n - ws : n - shift] = 1
        lab[n - shift :] = 2
        return lab

    lab = regions(h)[:, None] * 3 + regions(w)[None, :]
    win = lab.view(h // ws, ws, w // ws, ws).permute(0, 2, 1, 3).reshape(-1, ws * ws)
    differs = win[:, None, :] != win[:, :, None]
    return torch.zeros(differs.shape).masked_fill(differs, MASK_VALUE)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch of a sample with probability p (train only)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


try:  # oneDNN's fused linear, the op torch's own CPU compiler emits for Linear(+GELU)(+add)
    _ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
except (AttributeError, RuntimeError):
    _ONEDNN = False


def fast_linear(x: torch.Tensor, layer: nn.Linear, gelu: bool = False,
                residual: torch.Tensor | None = None) -> torch.Tensor:
    """``residual + gelu?(layer(x))`` with bias, GELU and residual add fused into oneDNN's GEMM epilogue.

    Saves the bias broadcast, the GELU pass and the add pass; oneDNN's fp32 GEMM is also much faster than
    MKL's on some CPUs (AMD). Exact fp32 math. Used for contiguous float32 CPU tensors when no gradient is
    needed; otherwise (or without oneDNN) it is the plain F.linear (+ F.gelu) (+ residual).
    """
    global _ONEDNN
    ts = (x,) if residual is None else (x, residual)
    if (_ONEDNN and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in ts)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (*ts, layer.weight)))
            and not (gelu and residual is not None)):
        w, b = layer.weight, layer.bias
        try:
            if residual is not None:
                return torch.ops.mkldnn._linear_pointwise.binary(x, residual, w, b, "add")
            return torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu" if gelu else "none", [], "none" if gelu else "")
        except RuntimeError:  # unsupported by this build/CPU: fall back for good
            _ONEDNN = False
    y = F.linear(x, layer.weight, layer.bias)
    y = F.gelu(y) if gelu else y
    return y if residual is None else residual + y


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(1, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, img: torch.Tensor) -> torch.Tensor:  # (B, 1, S, S) -> (B, L, C), row-major
        return self.norm(self.proj(img).flatten(2).transpose(1, 2))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, fused: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
        if fused:
            return fast_linear(fast_linear(x, self.fc1, gelu=True), self.fc2, residual=residual)
        y = self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as nn.GELU()
        return y if residual is None else residual + y


class WindowAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, ws: int):
        super().__init__()
        self.num_heads, self.ws = num_heads, ws
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(ws))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def position_bias(self) -> torch.Tensor:
        n = self.ws * self.ws
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, self.num_heads).permute(2, 0, 1)  # heads, N, N

    def _heads(self, x: torch.Tensor, fused: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        bw, n, c = x.shape
        qkv = fast_linear(x, self.qkv) if fused else self.qkv(x)
        qkv = qkv.view(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]  # each (Bw, heads, N, head_dim)

    def forward_reference(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        bw, n, c = x.shape
        q, k, v = self._heads(x)
        attn = (q * self.scale) @ k.transpose(-2, -1) + self.position_bias().unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = (attn.view(bw // nw, nw, self.num_heads, n, n) + mask[None, :, None]).view(bw, -1, n, n)
        out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))

    def forward_fused(self, x: torch.Tensor, attn_bias: torch.Tensor,
                      residual: torch.Tensor | None = None) -> torch.Tensor:
        bw, n, c = x.shape
        q, k, v = self._heads(x, fused=True)  # strided views of one (Bw, N, 3, heads, hd) buffer
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias.to(q.dtype), scale=self.scale)
        # SDPA keeps the query's memory layout, so merging heads back is a free reshape
        return fast_linear(out.transpose(1, 2).reshape(bw, n, c), self.proj, residual=residual)


class SwinBlock(nn.Module):
    def __init__(self, dim: int, resolution: int, num_heads: int, ws: int, shift: int, drop_prob: float):
        super().__init__()
        if resolution <= ws:  # one window covers the grid: no partition, no shift (Swin's rule)
            ws, shift = resolution, 0
        self.resolution, self.window_size, self.shift_size, self.drop_prob = resolution, ws, shift, drop_prob
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, ws)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)
        # Registered only on shifted blocks, so the state-dict keys match the released checkpoint.
        self.register_buffer("attn_mask", shift_mask(resolution, resolution, ws, shift) if shift else None)
        self.register_buffer("layout_index", None, persistent=False)  # set by HTSAT._plan_layouts
        self._bias_cache: tuple[tuple, torch.Tensor] | None = None

    def _attn_bias(self, batch: int) -> torch.Tensor:
        """Relative bias (+ shift mask), shaped to broadcast over the (batch * windows) axis.

        Cached when no gradient can flow (the table's version counter invalidates it after any update).
        """
        table = self.attn.relative_position_bias_table
        cacheable = not torch.is_grad_enabled()
        try:
            version = table._version
        except RuntimeError:  # an inference tensor: immutable, so it has no version counter
            version = -1
        key = (batch, version, table.device, table.dtype, torch.is_inference_mode_enabled())
        if cacheable and self._bias_cache is not None and self._bias_cache[0] == key:
            return self._bias_cache[1]
        bias = self.attn.position_bias().unsqueeze(0)  # 1, heads, N, N
        if self.attn_mask is not None:
            bias = bias + self.attn_mask.unsqueeze(1)  # nW, heads, N, N
            bias = bias.unsqueeze(0).expand(batch, *bias.shape).reshape(-1, *bias.shape[1:])
        bias = bias.contiguous()
        if cacheable:
            self._bias_cache = (key, bias)
        return bias

    def forward(self, x: torch.Tensor, fused: bool) -> torch.Tensor:
        stochastic = self.training and self.drop_prob > 0
        if not fused:
            x = x + drop_path(self._attention_reference(x), self.drop_prob, self.training)
            return x + drop_path(self.mlp(self.norm2(x)), self.drop_prob, self.training)
        if self.layout_index is not None:  # x arrives in the previous block's window order
            x = x.index_select(1, self.layout_index)
        b, l, c = x.shape
        n = self.window_size**2
        y = self.norm1(x).view(-1, n, c)
        if stochastic:
            x = x + drop_path(self.attn.forward_fused(y, self._attn_bias(b)).view(b, l, c), self.drop_prob, True)
            return x + drop_path(self.mlp(self.norm2(x), True), self.drop_prob, True)
        x = self.attn.forward_fused(y, self._attn_bias(b), residual=x.view(-1, n, c)).view(b, l, c)
        return self.mlp(self.norm2(x), True, residual=x)

    def _attention_reference(self, x: torch.Tensor) -> torch.Tensor:  # x row-major (B, H*W, C)
        b, l, c = x.shape
        h = w = self.resolution
        ws, s = self.window_size, self.shift_size
        y = self.norm1(x).view(b, h, w, c)
        if s:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
        y = y.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
        y = self.attn.forward_reference(y, self.attn_mask)
        y = y.view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
        if s:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        return y.reshape(b, l, c)


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated as (even,even), (odd,even), (even,odd), (odd,odd); LN; Linear 4C->2C."""

    def __init__(self, dim: int, resolution: int):
        super().__init__()
        self.resolution = resolution
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.register_buffer("layout_index", None, persistent=False)  # set by HTSAT._plan_layouts

    def forward(self, x: torch.Tensor, fused: bool) -> torch.Tensor:
        b, l, c = x.shape
        if fused:  # one gather straight into the next stage's first window order
            return fast_linear(self.norm(x.index_select(1, self.layout_index).view(b, l // 4, 4 * c)), self.reduction)
        g = x.view(b, self.resolution, self.resolution, c)
        x = torch.cat([g[:, 0::2, 0::2], g[:, 1::2, 0::2], g[:, 0::2, 1::2], g[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(b, l // 4, 4 * c)))


class Stage(nn.Module):
    def __init__(self, dim, resolution, depth, num_heads, ws, drop_probs: Sequence[float], downsample: bool):
        super().__init__()
        self.resolution = resolution
        self.blocks = nn.ModuleList(
            SwinBlock(dim, resolution, num_heads, ws, 0 if i % 2 == 0 else ws // 2, drop_probs[i])
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim, resolution) if downsample else None

    def forward(self, x: torch.Tensor, fused: bool) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x, fused)
        return self.downsample(x, fused) if self.downsample is not None else x
