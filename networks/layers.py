"""Small building blocks shared by the networks of this package."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ChannelLayerNorm", "pad_to_multiple", "check_input_rank", "is_exporting", "to_channels_last"]


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel dimension of a ``(B, C, H, W)`` tensor, applied at every pixel.

    Equal to ``nn.LayerNorm(C)`` on the channels-last view (``2C`` parameters), as in LiteNeXt and ConvNeXt.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps
        self.normalized_shape = [num_channels]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_exporting():
            # ONNX Runtime runs LayerNormalization over a 16-value channel axis slowly, between two transposes; the
            # same arithmetic as reductions over axis 1 made LiteNeXt 18% faster there (0.43 -> 0.35 s per batch of
            # 8 x 3 x 256 x 256, 2 threads). In eager PyTorch the layer_norm form is the faster one.
            mean = x.mean(1, keepdim=True)
            centred = x - mean
            variance = (centred * centred).mean(1, keepdim=True)
            return centred * torch.rsqrt(variance + self.eps) * self.weight[:, None, None] + self.bias[:, None, None]
        # the result keeps channels-last strides, which the following convolutions take without a copy
        normed = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return normed.permute(0, 3, 1, 2)


def check_input_rank(x: torch.Tensor, name: str) -> None:
    """Raise a clear error unless ``x`` is a batch of 2D images ``(B, C, H, W)``."""
    if x.dim() != 4:
        raise ValueError(f"{name} expects a 4D input (batch, channels, height, width), got shape {list(x.shape)}.")


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, int, int]:
    """Zero-pad the last two dimensions of ``x`` at the bottom/right up to a multiple of ``multiple``.

    Returns the padded tensor and the original height and width, so the caller can crop back.
    """
    height, width = x.shape[-2], x.shape[-1]
    pad_h = (multiple - height % multiple) % multiple
    pad_w = (multiple - width % multiple) % multiple
    if pad_h or pad_w:
        x = F.pad(x, [0, pad_w, 0, pad_h])
    return x, height, width


def is_exporting() -> bool:
    """True while traced or exported (ONNX, torch.export): shapes must not drive Python control flow there, and
    inference-time rewrites give way to the plain form, which the exporters optimise themselves."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` with the same values in channels-last memory, so that the convolutions after it run in oneDNN's native
    CPU layout (NHWC) and keep it: for the LTMedNeXt networks, 1.5-1.8x faster training and inference on CPU than
    NCHW (measured by hand, README "Benchmarks"). Also for one channel, where ``x.contiguous(memory_format=...)``
    leaves the strides alone because the layouts coincide. Exporters get ``x`` unchanged: memory layout is not part
    of a graph."""
    if is_exporting():
        return x
    return torch.empty_like(x, memory_format=torch.channels_last).copy_(x)
