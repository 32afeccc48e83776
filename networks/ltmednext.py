"""LTMedNeXt: a lightweight transformer-style CNN for medical image classification and segmentation.

Our reconstruction of Xue, Pi, Liu, Zeng, Sun, "MedNeXt for accurate medical image classification and
segmentation: A lightweight transformer-style convolutional neural network", PLoS ONE 21(1): e0340108, 2026
(doi:10.1371/journal.pone.0340108). No code was published with the paper; the three named modules (Linear
Attention FFN, Spatial Encoding Module, Smooth DwConv FFN) are built from the public designs they describe
(Conv2Former's convolutional modulation, SegNeXt's multi-scale depth-wise encoding, Conv2Former's MLP) in a
MetaFormer block. The ``LT`` prefix keeps it apart from MONAI's own ``MedNeXt`` (Roy et al., 2023).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from networks.layers import ChannelLayerNorm, check_input_rank, is_exporting, pad_to_multiple, to_channels_last

__all__ = ["LTMedNeXtBlock", "LTMedNeXtEncoder", "LTMedNeXt", "LTMedNeXtClassifier", "LTMEDNEXT_SIZES"]

# size -> (stage widths, stage depths)
LTMEDNEXT_SIZES: dict[str, tuple[tuple[int, int, int, int], tuple[int, int, int, int]]] = {
    "T": ((32, 64, 128, 256), (2, 2, 4, 2)),
    "S": ((48, 96, 192, 384), (2, 2, 6, 2)),
    "B": ((64, 128, 256, 512), (2, 2, 8, 2)),
}


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return ChannelLayerNorm(channels)
    raise ValueError(f"LTMedNeXt: norm must be 'batch' or 'layer', got {kind!r}.")


def _dwconv(channels: int, kernel_size: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)


class _DropPath(nn.Module):
    """Stochastic depth: drops the residual branch per sample during training."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device) >= self.rate
        return x * keep.to(x.dtype) / (1.0 - self.rate)


class LTMedNeXtBlock(nn.Module):
    """Spatial Encoding Module, Linear Attention FFN and Smooth DwConv FFN, each with a residual.

    * SEM: ``x + PW(DW3(x) + DW5(x) + DW7(x))`` (multi-scale depth-wise spatial encoding, computed as one merged
      7x7 depth-wise convolution).
    * LA-FFN: ``x + g1 * PW(DW_k(GELU(PW(n))) * PW(n))`` with ``n = Norm(x)``: a convolutional attention map
      applied by a Hadamard product, linear in the number of pixels.
    * Smooth DwConv FFN: ``t = GELU(PW_up(Norm(x)))``, ``t = t + GELU(DW3(t))``, ``x + g2 * PW_down(t)``.

    ``g1``, ``g2`` are per-channel layer scales. 12c^2 + 263c parameters for the defaults.
    """

    def __init__(self, channels: int, attention_kernel_size: int = 11, mlp_ratio: int = 4, norm: str = "batch",
                 layer_scale_init: float = 1e-6, drop_path: float = 0.0) -> None:
        super().__init__()
        self.sem_branches = nn.ModuleList([_dwconv(channels, k) for k in (3, 5, 7)])
        self.sem_proj = nn.Conv2d(channels, channels, 1)
        self.attn_norm = _norm(norm, channels)
        self.attn_gate = nn.Conv2d(channels, channels, 1)
        self.attn_dw = _dwconv(channels, attention_kernel_size)
        self.attn_value = nn.Conv2d(channels, channels, 1)
        self.attn_proj = nn.Conv2d(channels, channels, 1)
        hidden = channels * mlp_ratio
        self.mlp_norm = _norm(norm, channels)
        self.mlp_up = nn.Conv2d(channels, hidden, 1)
        self.mlp_dw = _dwconv(hidden, 3)
        self.mlp_down = nn.Conv2d(hidden, channels, 1)
        self.gamma_attn = nn.Parameter(torch.full((channels, 1, 1), layer_scale_init))
        self.gamma_mlp = nn.Parameter(torch.full((channels, 1, 1), layer_scale_init))
        self.drop_path = _DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.sem_proj(self._spatial_encoding(x))

        n = self.attn_norm(x)
        attention = self.attn_dw(F.gelu(self.attn_gate(n)))
        x = x + self.drop_path(self.gamma_attn * self.attn_proj(attention * self.attn_value(n)))

        t = F.gelu(self.mlp_up(self.mlp_norm(x)))
        t = t + F.gelu(self.mlp_dw(t))
        return x + self.drop_path(self.gamma_mlp * self.mlp_down(t))


    def _spatial_encoding(self, x: torch.Tensor) -> torch.Tensor:
        """``DW3(x) + DW5(x) + DW7(x)`` as one 7x7 depth-wise convolution: the three kernels, zero-padded to 7x7,
        summed (convolution is linear). One pass over the feature map instead of three, same parameters."""
        if is_exporting():
            return self.sem_branches[0](x) + self.sem_branches[1](x) + self.sem_branches[2](x)
        weights: list[torch.Tensor] = []
        biases: list[torch.Tensor] = []
        for branch in self.sem_branches:
            pad = (7 - branch.weight.shape[-1]) // 2
            weights.append(F.pad(branch.weight, [pad, pad, pad, pad]))
            bias = branch.bias
            assert bias is not None
            biases.append(bias)
        return F.conv2d(x, torch.stack(weights).sum(0), torch.stack(biases).sum(0), padding=3, groups=x.shape[1])


class LTMedNeXtEncoder(nn.Module):
    """Four stages at 1/4, 1/8, 1/16 and 1/32 of the input; returns the output of every stage."""

    def __init__(self, in_channels: int, widths: tuple[int, ...], depths: tuple[int, ...], norm: str = "batch",
                 drop_path: float = 0.0, attention_kernel_size: int = 11, layer_scale_init: float = 1e-6) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0] // 2, 3, stride=2, padding=1),
            _norm(norm, widths[0] // 2),
            nn.GELU(),
            nn.Conv2d(widths[0] // 2, widths[0], 3, stride=2, padding=1),
            _norm(norm, widths[0]),
        )
        rates = torch.linspace(0, drop_path, sum(depths)).tolist()
        # stage i > 0 starts with its downsampling (norm, 2x2 stride-2 convolution)
        self.stages = nn.ModuleList()
        block_index = 0
        for i, (width, depth) in enumerate(zip(widths, depths)):
            layers: list[nn.Module] = []
            if i > 0:
                layers.append(nn.Sequential(_norm(norm, widths[i - 1]), nn.Conv2d(widths[i - 1], width, 2, stride=2)))
            layers += [LTMedNeXtBlock(width, attention_kernel_size, norm=norm, layer_scale_init=layer_scale_init,
                                      drop_path=rates[block_index + j]) for j in range(depth)]
            self.stages.append(nn.Sequential(*layers))
            block_index += depth

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(to_channels_last(x))
        features: list[torch.Tensor] = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class _DecoderLevel(nn.Module):
    """Upsample and project the deeper map, concatenate the skip, fuse with a 1x1 conv, refine with one block."""

    def __init__(self, deep_channels: int, channels: int, norm: str, layer_scale_init: float = 1e-6) -> None:
        super().__init__()
        self.project = nn.Conv2d(deep_channels, channels, 1)
        self.fuse = nn.Conv2d(2 * channels, channels, 1)
        self.block = LTMedNeXtBlock(channels, norm=norm, layer_scale_init=layer_scale_init)

    def forward(self, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        deep = F.interpolate(self.project(deep), size=[skip.shape[-2], skip.shape[-1]], mode="bilinear",
                             align_corners=False)
        return self.block(self.fuse(torch.cat([deep, skip], 1)))


def _check_args(name: str, in_channels: int, out_channels: int, size: str) -> None:
    if in_channels < 1 or out_channels < 1:
        raise ValueError(f"{name}: in_channels and the number of outputs must be positive, got {in_channels}, "
                         f"{out_channels}.")
    if size not in LTMEDNEXT_SIZES:
        raise ValueError(f"{name}: size must be one of {sorted(LTMEDNEXT_SIZES)}, got {size!r}.")


class LTMedNeXt(nn.Module):
    """U-shaped LTMedNeXt for 2D segmentation.

    The LTMedNeXt encoder (stages at 1/4 ... 1/32), a decoder that at each level upsamples, projects, concatenates
    the skip connection, fuses it with a 1x1 convolution and refines it with one LTMedNeXt block, and a head of two
    2x2 transposed convolutions back to full resolution. No code was published with the paper: this is our
    reconstruction (see the module docstring).

    Args:
        spatial_dims: only 2 is supported (the paper's networks are 2D; 3D volumes are segmented slice by slice).
        in_channels: input channels (1 for CT/MRI slices).
        out_channels: number of classes including background (logits out).
        size: "T", "S" or "B" (widths 32/48/64 times 1, 2, 4, 8; depths (2,2,4,2), (2,2,6,2), (2,2,8,2)).
        norm: "batch" (default) or "layer" normalisation inside the blocks.
        drop_path: largest stochastic depth rate (linearly increasing over the encoder blocks).
        layer_scale_init: initial value of the per-channel layer scales ``g1``, ``g2`` of every block (the spec's
            1e-6 by default, as ConvNeXt; a larger value such as 0.1 lets the attention and FFN branches contribute
            from the first step, see the ACDC bundle's docs for the measured effect).
        full_resolution_skip: an option outside the spec (default off): a 3x3 convolution block on the input at full
            resolution, concatenated with the head's upsampled features and fused by a 3x3 block before the 1x1
            classifier, because the spec's decoder has no skip finer than 1/4 (see the ACDC bundle's docs).

    Shapes:
        input ``(B, in_channels, H, W)``; output ``(B, out_channels, H, W)``. Sizes that are not multiples of 32
        are zero-padded at the bottom/right and the output is cropped back.

    Parameters with 9 classes: T 3.39 M, S 8.32 M, B 16.20 M; MACs at 1x224x224: 0.80 / 1.87 / 3.54 G.
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, out_channels: int = 9, size: str = "S",
                 norm: str = "batch", drop_path: float = 0.0, layer_scale_init: float = 1e-6,
                 full_resolution_skip: bool = False) -> None:
        super().__init__()
        if spatial_dims != 2:
            raise ValueError(f"LTMedNeXt: only spatial_dims=2 is supported, got {spatial_dims}.")
        _check_args("LTMedNeXt", in_channels, out_channels, size)
        widths, depths = LTMEDNEXT_SIZES[size]
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.encoder = LTMedNeXtEncoder(in_channels, widths, depths, norm, drop_path, layer_scale_init=layer_scale_init)
        self.decoder = nn.ModuleList([_DecoderLevel(widths[i + 1], widths[i], norm, layer_scale_init)
                                      for i in (2, 1, 0)])
        half = widths[0] // 2
        self.full_resolution_skip = full_resolution_skip
        self.head = nn.Sequential(
            nn.ConvTranspose2d(widths[0], half, 2, stride=2),
            _norm(norm, half),
            nn.GELU(),
            nn.ConvTranspose2d(half, half, 2, stride=2),
            nn.Identity() if full_resolution_skip else nn.Conv2d(half, out_channels, 1),
        )
        # option (not in the spec): a full-resolution branch from the input, fused before the classifier
        self.full_resolution: nn.Module = nn.Identity()
        self.classifier: nn.Module = nn.Identity()
        if full_resolution_skip:
            self.full_resolution = nn.Sequential(nn.Conv2d(in_channels, half, 3, padding=1), _norm(norm, half),
                                                 nn.GELU())
            self.classifier = nn.Sequential(nn.Conv2d(2 * half, half, 3, padding=1), _norm(norm, half), nn.GELU(),
                                            nn.Conv2d(half, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_rank(x, "LTMedNeXt")
        x, height, width = pad_to_multiple(x, 32)
        features = self.encoder(x)
        y = features[3]
        for level, decoder_level in enumerate(self.decoder):
            y = decoder_level(y, features[2 - level])
        y = self.head(y)
        if self.full_resolution_skip:
            y = self.classifier(torch.cat([y, self.full_resolution(x)], 1))
        return y[..., :height, :width]


class LTMedNeXtClassifier(nn.Module):
    """LTMedNeXt image classifier: the LTMedNeXt encoder, global average pooling, LayerNorm and a linear layer.

    Our reconstruction of the paper's classification backbone (no code was published; see the module docstring).

    Args:
        in_channels: input channels (3 for RGB).
        num_classes: number of classes (logits out).
        size: "T", "S" or "B". Parameters with 3 classes: 2.98 M, 7.45 M, 14.70 M; MACs at 3x224x224 0.53 / 1.31 /
            2.58 G.
        dropout: dropout before the linear layer.
        norm, drop_path: as in :class:`LTMedNeXt`.
        layer_scale_init: initial value of the blocks' per-channel layer scales. 1e-6 (ConvNeXt's choice for long
            ImageNet schedules) leaves the blocks almost silent for the first thousands of steps; a few hundred steps
            on a small dataset need a larger start, such as 0.1.

    Shapes:
        input ``(B, in_channels, H, W)`` with H, W at least 32; output ``(B, num_classes)``.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 2, size: str = "S", dropout: float = 0.0,
                 norm: str = "batch", drop_path: float = 0.0, layer_scale_init: float = 1e-6) -> None:
        super().__init__()
        _check_args("LTMedNeXtClassifier", in_channels, num_classes, size)
        widths, depths = LTMEDNEXT_SIZES[size]
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.encoder = LTMedNeXtEncoder(in_channels, widths, depths, norm, drop_path,
                                        layer_scale_init=layer_scale_init)
        self.norm = nn.LayerNorm(widths[-1])
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_rank(x, "LTMedNeXtClassifier")
        if x.shape[-1] < 32 or x.shape[-2] < 32:
            raise ValueError(f"LTMedNeXtClassifier expects images of at least 32x32, got {list(x.shape[-2:])}.")
        pooled = self.encoder(x)[-1].mean((2, 3))
        return self.fc(self.dropout(self.norm(pooled)))
