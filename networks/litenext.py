"""LiteNeXt: a lightweight ConvMixer-style network for 2D medical image segmentation.

Tran, Tran, Nguyen, Vu, Pham, "LiteNeXt: A Novel Lightweight ConvMixer-based Model with Self-embedding
Representation Parallel for Medical Image Segmentation", arXiv 2405.15779, Biomedical Signal Processing and
Control 2025. Rebuilt block by block from the authors' released network (tranngocduvnvp/LiteNeXt.).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from networks.layers import ChannelLayerNorm, check_input_rank, is_exporting, pad_to_multiple

__all__ = ["LiteNeXt"]


class _ConvNormAct(nn.Sequential):
    """Conv -> channel LayerNorm -> GELU (the paper's CLG unit), with integer "same" padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1, groups: int = 1,
                 dilation: int = 1) -> None:
        padding = 0 if stride > 1 else (kernel_size // 2) * dilation
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, groups=groups,
                      dilation=dilation),
            ChannelLayerNorm(out_channels),
            nn.GELU(),
        )


class LGEMixer(nn.Module):
    """Local mixer (dense 3x3), far mixer (depth-wise kxk) with two residuals, then a 1x1 channel mixer."""

    def __init__(self, channels: int, far_kernel_size: int = 7, far_dilation: int = 1) -> None:
        super().__init__()
        self.local_mixer = _ConvNormAct(channels, channels, 3)
        self.far_mixer = _ConvNormAct(channels, channels, far_kernel_size, groups=channels, dilation=far_dilation)
        self.channel_mixer = _ConvNormAct(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.local_mixer(x)
        return self.channel_mixer(self.far_mixer(local) + local + x)


class _DownStage(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, far_kernel_size: int, far_dilation: int, depth: int):
        super().__init__(
            nn.MaxPool2d(2),
            _ConvNormAct(in_channels, out_channels, 1),
            *[LGEMixer(out_channels, far_kernel_size, far_dilation) for _ in range(depth)],
        )


class _ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_ConvNormAct(channels, channels, 3), _ConvNormAct(channels, channels, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + x


class _ScaleEncoder(nn.Module):
    """One input of the fusion decoder ("NormMode"): a value map ``GELU(LN(Conv1x1(x)))`` and a global key vector."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.value = _ConvNormAct(in_channels, channels, 1)
        self.key = nn.Sequential(nn.Conv2d(in_channels, in_channels, 1), nn.GELU(), nn.Conv2d(in_channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean((2, 3), keepdim=True) + x.amax((2, 3), keepdim=True)
        return self.key(pooled).flatten(1)

    def projected_value(self, x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
        """``projection @ value(x)`` per pixel, for a per-sample ``projection`` of shape ``(B, C_out, D)``.

        The wide value map is never materialised whole: pixels are processed in cache-sized chunks, which makes
        this several times faster on CPU than the layer-by-layer form while computing the same function.
        """
        conv = self.value[0]
        norm = self.value[1]
        batch, channels, height, width = x.shape
        pixels = x.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        weight = conv.weight.flatten(1)
        projection_t = projection.transpose(1, 2)
        chunk = height * width if is_exporting() else max(1, 8192 // batch)
        outputs: list[torch.Tensor] = []
        for start in range(0, height * width, chunk):
            value = F.linear(pixels[:, start : start + chunk], weight, conv.bias)
            value = F.gelu(F.layer_norm(value, norm.normalized_shape, norm.weight, norm.bias, norm.eps))
            outputs.append(torch.bmm(value, projection_t))
        return torch.cat(outputs, 1).view(batch, height, width, -1).permute(0, 3, 1, 2)


class LiteNeXt(nn.Module):
    """LiteNeXt segmentation network (2D).

    Encoder: a 2x2 stride-2 stem and four LGEMixer stages (widths C, 2C, 4C, 8C at 1/2 ... 1/16 resolution), a
    residual bottleneck, and a multi-scale fusion decoder: each encoder scale gives a value map and a key vector,
    the bottleneck key selects a softmax weight per channel and scale, and the weighted sum of the value maps,
    concatenated with the bottleneck's value map, is projected to C channels at 1/2 resolution and upsampled.

    The decoder is evaluated in an equivalent cheaper order: the final 1x1 projection, the per-channel scale
    weights and bilinear upsampling are all linear and commute, so every value map is projected to C channels
    *before* it is upsampled, instead of upsampling 8C-channel maps and concatenating them. The parameters are
    exactly those of the published network, and outputs equal the published evaluation order to float precision.

    Args:
        in_channels: input channels (3 for RGB; grey images are replicated to RGB in the paper).
        out_channels: output channels: 1 for binary segmentation (logits), N for N-class softmax logits.
        base_channels: width C of the first stage (16 in the paper).
        far_kernel_size: kernel of the depth-wise FarMixer convolution (7 in the paper configuration).
        far_dilation: dilation of the FarMixer convolution (1 in the released code).
        depths: number of LGEMixer blocks in each of the four stages (``(1, 1, 1, 1)`` in the paper).
        fused_decoder: evaluate the decoder in the cheaper order (default); ``False`` runs the published order,
            which the MAC count of the paper refers to. Both hold the same parameters and give the same outputs.

    Shapes:
        input ``(B, in_channels, H, W)``; output ``(B, out_channels, H, W)``. Sizes that are not multiples of 16
        are zero-padded at the bottom/right and the output is cropped back.

    The default ``LiteNeXt(in_channels=3, out_channels=1)`` is the paper configuration: 711,201 parameters and
    0.417 GMACs at 3x256x256 in the published order (ptflops, aten backend); the fused order needs 0.394 GMACs.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        base_channels: int = 16,
        far_kernel_size: int = 7,
        far_dilation: int = 1,
        depths: Sequence[int] = (1, 1, 1, 1),
        fused_decoder: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("base_channels", base_channels), ("far_dilation", far_dilation)):
            if value < 1:
                raise ValueError(f"LiteNeXt: {name} must be a positive integer, got {value}.")
        if far_kernel_size < 1 or far_kernel_size % 2 == 0:
            raise ValueError(f"LiteNeXt: far_kernel_size must be a positive odd integer, got {far_kernel_size}.")
        if len(depths) != 4 or min(depths) < 1:
            raise ValueError(f"LiteNeXt: depths must be four positive integers, got {tuple(depths)}.")
        widths = [base_channels * 2**i for i in range(4)]
        fused = widths[3]
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.fused_decoder = fused_decoder

        self.stem = _ConvNormAct(in_channels, widths[0], kernel_size=2, stride=2)
        self.stage1 = nn.Sequential(*[LGEMixer(widths[0], far_kernel_size, far_dilation) for _ in range(depths[0])])
        self.stage2 = _DownStage(widths[0], widths[1], far_kernel_size, far_dilation, depths[1])
        self.stage3 = _DownStage(widths[1], widths[2], far_kernel_size, far_dilation, depths[2])
        self.stage4 = _DownStage(widths[2], widths[3], far_kernel_size, far_dilation, depths[3])
        self.bottleneck = _ResidualBlock(widths[3])

        self.scale_encoders = nn.ModuleList([_ScaleEncoder(w, fused) for w in widths])
        self.bottleneck_encoder = _ScaleEncoder(widths[3], fused)
        self.scale_attention = nn.Linear(2 * fused, fused)
        # applied to concat[fused value map, bottleneck value map] in the published order
        self.fuse_projection = nn.Conv2d(2 * fused, base_channels, 1)
        self.fuse_norm = ChannelLayerNorm(base_channels)
        self.head = nn.Conv2d(base_channels, out_channels, 1)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features ``[e1, e2, e3, e4, bottleneck]`` at 1/2, 1/4, 1/8, 1/16, 1/16 of the padded input."""
        e1 = self.stage1(self.stem(x))
        e2 = self.stage2(e1)
        e3 = self.stage3(e2)
        e4 = self.stage4(e3)
        return [e1, e2, e3, e4, self.bottleneck(e4)]

    def scale_weights(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Softmax weights ``(B, 4, D)`` over the four encoder scales, per channel, selected by the bottleneck key."""
        keys = torch.stack([encoder(features[i]) for i, encoder in enumerate(self.scale_encoders)], 1)
        query = self.bottleneck_encoder(features[4])
        return self.scale_attention(torch.cat([keys, query[:, None].expand_as(keys)], -1)).softmax(1)

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Fusion decoder output at 1/2 resolution (``C`` channels, after its LayerNorm and GELU)."""
        weights = self.scale_weights(features)
        half_size = [features[0].shape[-2], features[0].shape[-1]]
        fused = self.scale_attention.out_features
        projection = self.fuse_projection.weight.flatten(1)  # (C, 2D): [fused value map | bottleneck value map]
        if self.fused_decoder:
            bias = self.fuse_projection.bias
            assert bias is not None
            out = bias[None, :, None, None]
            for i, encoder in enumerate(self.scale_encoders):
                # fold this scale's channel weights into the projection, project, then upsample C channels only
                per_sample = projection[None, :, :fused] * weights[:, i, None, :]
                out = out + self._upsample(encoder.projected_value(features[i], per_sample), half_size)
            per_sample = projection[None, :, fused:].expand(weights.shape[0], -1, -1)
            out = out + self._upsample(self.bottleneck_encoder.projected_value(features[4], per_sample), half_size)
        else:  # the published evaluation order
            values = [self._upsample(encoder.value(features[i]), half_size)
                      for i, encoder in enumerate(self.scale_encoders)]
            fused_value = torch.zeros_like(values[0])
            for i, value in enumerate(values):
                fused_value = fused_value + value * weights[:, i, :, None, None]
            bottleneck_value = self._upsample(self.bottleneck_encoder.value(features[4]), half_size)
            out = self.fuse_projection(torch.cat([fused_value, bottleneck_value], 1))
        return F.gelu(self.fuse_norm(out))

    @staticmethod
    def _upsample(x: torch.Tensor, size: list[int]) -> torch.Tensor:
        if x.shape[-2:] == size:
            return x
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def forward_with_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(B, out_channels, H, W)`` and the bottleneck feature map ``(B, 8C, H/16, W/16)`` (for SERP)."""
        check_input_rank(x, "LiteNeXt")
        x, height, width = pad_to_multiple(x, 16)
        features = self.encode(x)
        out = self.decode(features)
        full_size = [x.shape[-2], x.shape[-1]]
        if self.fused_decoder:  # the 1x1 head and bilinear upsampling commute: head first, at half resolution
            out = F.interpolate(self.head(out), size=full_size, mode="bilinear", align_corners=False)
        else:
            out = self.head(F.interpolate(out, size=full_size, mode="bilinear", align_corners=False))
        return out[..., :height, :width], features[4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_embedding(x)[0]
