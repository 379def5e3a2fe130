"""HTS-AT, the Swin-style audio transformer behind OPERA-CT, written from its published architecture.

Why our own module: the released OPERA-CT weights must load *strictly* (every key, every shape), and the
public code runs the encoder in train mode, pulls in torchlibrosa and has an off-by-one on long inputs
(see docs/paper.md §3). Module names equal the released checkpoint's keys minus the prefix
``encoder.encoder.htsat.``; the two spectrogram front-end blocks of the original are not modules here
(the front end runs outside the encoder) and are dropped explicitly by the loader.

Input handling (``spec`` is (B, T, mel_bins), values in [0, 1] from the OPERA front end):

* ``bn0`` normalises each mel bin (running statistics in eval mode).
* T <= 1024 (= spec_size * spec_size / mel_bins): bicubic resize of time to 1024 (align_corners=True;
  skipped when T == 1024), cut into 4 chunks of 256 frames stacked along frequency: a 256 x 256 image whose
  row is ``64 * chunk + mel`` and whose column is the frame inside the chunk.
* T > 1024, eval: 1024-frame windows starting at 0, 512, 1024, ... for every start s with s + 1024 <= T,
  and the window latents are averaged. OPERA's loop stops at s < T - 1025, so it crashes at T = 1025 and
  drops a window that fits exactly when T - 1024 is a multiple of 512 (or one more); we keep every window
  that fits, which equals OPERA whenever OPERA runs (e.g. T = 1600: starts 0 and 512). Frames after the
  last full window (at most 511) are ignored, as in OPERA.
* T > 1024, train mode (OPERA-style pretraining): one uniformly random 1024-frame crop per sample,
  start in [0, T - 1024], drawn with torch's global generator. Drop-path is active in train mode only.

Token grid (``forward_tokens``): the final-norm tokens on the 8 x 8 grid in row-major order, k = 8 i + j.
Token row i covers time chunk i // 2 (the 256-frame quarter of the resized clip) and mel half i % 2
(bins 32 (i % 2) .. +31); column j covers resized frames 256 (i // 2) + 32 j .. +31. Row-major order is
therefore NOT chronological. ``forward`` returns the mean of these 64 tokens (OPERA's latent); the
``tscam_conv``/``head`` modules exist only so the checkpoint loads strictly: they never affect it.

Two execution paths share the weights: ``fused=True`` (default) keeps the residual stream in each
block's window order (one gather per block instead of roll + partition + reverse + roll), runs attention
through ``F.scaled_dot_product_attention`` with relative bias and shift mask pre-summed into one cached
additive mask; ``fused=False`` is the literal reference computation (roll, partition, softmax(QK^T/sqrt(d)
+ B + M) V) used to check the fast path and as the benchmark baseline.
"""


from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from respiramfm.errors import ConfigError, DataError
from respiramfm.models.configuration import HTSATConfig
from respiramfm.models.htsat_layers import (PatchEmbed, Stage, WindowAttention, relative_position_index,
                                            shift_mask, window_order)

__all__ = ["HTSAT", "HTSATConfig", "relative_position_index", "shift_mask", "window_order"]


class HTSAT(nn.Module):
    """HTS-AT backbone; ``forward(spec (B, T, mel_bins)) -> (B, 8 * embed_dim)`` latent."""

    def __init__(self, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (4, 8, 16, 32), window_size: int = 8, spec_size: int = 256,
                 patch_size: int = 4, mel_bins: int = 64, drop_path_rate: float = 0.1,
                 num_classes: int = 527, fused: bool = True):
        super().__init__()
        depths, num_heads = tuple(int(d) for d in depths), tuple(int(h) for h in num_heads)
        n = len(depths)
        grid = spec_size // patch_size
        if (n == 0 or len(num_heads) != n or spec_size % mel_bins or spec_size % patch_size
                or grid % (2 ** (n - 1)) or any(embed_dim * 2**i % h for i, h in enumerate(num_heads))
                or any(grid >> i > window_size and (grid >> i) % window_size for i in range(n))):
            raise ConfigError(f"inconsistent HTS-AT sizes: embed_dim={embed_dim} depths={depths} "
                              f"num_heads={num_heads} window_size={window_size} spec_size={spec_size} "
                              f"patch_size={patch_size} mel_bins={mel_bins}")
        self.embed_dim, self.depths, self.num_heads, self.window_size = embed_dim, depths, num_heads, window_size
        self.spec_size, self.patch_size, self.mel_bins, self.num_classes = spec_size, patch_size, mel_bins, num_classes
        self.freq_ratio = spec_size // mel_bins
        self.crop_frames = spec_size * self.freq_ratio  # 1024: the clip length the image holds
        self.hop_frames = self.crop_frames // 2  # 512: eval sliding-window hop for longer clips
        self.num_features = embed_dim * 2 ** (n - 1)
        self.fused = fused
        self.drop_path_rate = drop_path_rate

        self.bn0 = nn.BatchNorm2d(mel_bins)
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList(
            Stage(embed_dim * 2**i, grid // 2**i, depths[i], num_heads[i], window_size,
                  dpr[sum(depths[:i]) : sum(depths[: i + 1])], downsample=i < n - 1)
            for i in range(n)
        )
        self.norm = nn.LayerNorm(self.num_features)
        sf = spec_size // 2 ** (n - 1) // patch_size // self.freq_ratio
        self.tscam_conv = nn.Conv2d(self.num_features, num_classes, kernel_size=(sf, 3), padding=(0, 1))
        self.head = nn.Linear(num_classes, num_classes)
        self.apply(_init_weights)
        self._plan_layouts()

    @classmethod
    def from_config(cls, cfg: HTSATConfig) -> "HTSAT":
        return cls(**dataclasses.asdict(cfg))

    @property
    def config(self) -> HTSATConfig:
        return HTSATConfig(embed_dim=self.embed_dim, depths=self.depths, num_heads=self.num_heads,
                           window_size=self.window_size, spec_size=self.spec_size, patch_size=self.patch_size,
                           mel_bins=self.mel_bins, drop_path_rate=self.drop_path_rate,
                           num_classes=self.num_classes, fused=self.fused)

    def _plan_layouts(self) -> None:
        """Precompute the gathers that move the residual stream between consecutive window orders."""
        inv = None  # inverse of the current order (None: row-major)
        for i, stage in enumerate(self.layers):
            r = stage.resolution
            for blk in stage.blocks:
                order = window_order(r, r, blk.window_size, blk.shift_size)
                gather = order if inv is None else inv[order]
                blk.layout_index = None if torch.equal(gather, torch.arange(r * r)) else gather
                inv = torch.argsort(order)
            if stage.downsample is not None:
                nxt = self.layers[i + 1].blocks[0]
                order = window_order(r // 2, r // 2, nxt.window_size, nxt.shift_size)
                rows, cols = order // (r // 2), order % (r // 2)
                src = [(2 * rows + dr) * r + 2 * cols + dc for dr, dc in ((0, 0), (1, 0), (0, 1), (1, 1))]
                stage.downsample.layout_index = inv[torch.stack(src, -1).reshape(-1)]
                inv = torch.argsort(order)
        self.register_buffer("final_index", None if inv is None or torch.equal(inv, torch.arange(inv.numel()))
                             else inv, persistent=False)

    # ---------------------------------------------------------------- input handling
    def window_starts(self, frames: int) -> list[int]:
        """Eval-mode crop starts for a clip of ``frames`` frames (see the module docstring)."""
        if frames <= self.crop_frames:
            return [0]
        return list(range(0, frames - self.crop_frames + 1, self.hop_frames))

    def _check(self, spec: torch.Tensor) -> torch.Tensor:
        if not isinstance(spec, torch.Tensor):
            spec = torch.as_tensor(spec)
        if spec.dim() != 3 or spec.shape[-1] != self.mel_bins or spec.shape[1] < 1 or spec.shape[0] < 1:
            raise DataError(f"expected a spectrogram batch (B, T, {self.mel_bins}), got {tuple(spec.shape)}")
        if not spec.is_floating_point():
            raise DataError(f"expected a floating-point spectrogram, got {spec.dtype}")
        if not bool(torch.isfinite(spec).all()):
            raise DataError("spectrogram contains NaN or infinite values")
        return spec.to(self.bn0.weight.dtype)

    def fold(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T <= 1024, mel) -> (N, 1, spec_size, spec_size) image (resize, chunk, stack on frequency)."""
        x = x.unsqueeze(1)
        if x.shape[2] < self.crop_frames:
            x = F.interpolate(x, size=(self.crop_frames, self.mel_bins), mode="bicubic", align_corners=True)
        n = x.shape[0]
        x = x.transpose(2, 3).reshape(n, 1, self.mel_bins, self.freq_ratio, self.spec_size)
        return x.permute(0, 1, 3, 2, 4).reshape(n, 1, self.spec_size, self.spec_size)

    def _images(self, spec: torch.Tensor) -> tuple[torch.Tensor, int]:
        spec = self._check(spec)
        b, t, m = spec.shape
        x = self.bn0(spec.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)  # per-mel BatchNorm
        if t <= self.crop_frames:
            return self.fold(x), 1
        if self.training:
            starts = torch.randint(0, t - self.crop_frames + 1, (b,), device=x.device)
            idx = starts[:, None] + torch.arange(self.crop_frames, device=x.device)
            return self.fold(x.gather(1, idx[:, :, None].expand(-1, -1, m))), 1
        starts = self.window_starts(t)
        crops = torch.stack([x[:, s : s + self.crop_frames] for s in starts], 1)
        return self.fold(crops.reshape(b * len(starts), self.crop_frames, m)), len(starts)

    def _tokens(self, img: torch.Tensor, row_major: bool) -> torch.Tensor:
        fused = self.fused
        x = self.patch_embed(img)
        for stage in self.layers:
            x = stage(x, fused)
        x = self.norm(x)
        if fused and row_major and self.final_index is not None:
            x = x.index_select(1, self.final_index)
        return x

    def forward_tokens(self, spec: torch.Tensor) -> torch.Tensor:
        """(B, T, mel) -> (B, 64, 8 * embed_dim) final-norm token grid, row-major (averaged over windows)."""
        img, nw = self._images(spec)
        tok = self._tokens(img, row_major=True)
        return tok.view(-1, nw, *tok.shape[1:]).mean(1)

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        img, nw = self._images(spec)
        lat = self._tokens(img, row_major=False).mean(1)  # token order is irrelevant to the mean
        return lat.view(-1, nw, lat.shape[-1]).mean(1)


def _init_weights(m: nn.Module) -> None:
    """Initialisation for training from scratch (Swin convention); loading a checkpoint overrides it."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, WindowAttention):
        nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)
