"""Marginal Weight Loss (LiteNeXt): a boundary-aware weighted cross-entropy plus soft Dice.

The weight map follows the authors' released code (tranngocduvnvp/LiteNeXt.: mwl.py); how the map enters the loss
is not published, and we use the natural reading: a pixel-wise weighted BCE (binary) or CE (multi-class) plus
soft Dice.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import DiceLoss

__all__ = ["marginal_weight_map", "MarginalWeightLoss"]


def marginal_weight_map(mask: torch.Tensor, kernel_size: int = 7, w_object: float = 3.0,
                        w_background: float = 5.0, w_margin: float = 2.0) -> torch.Tensor:
    """Per-pixel weights for binary masks ``(B, K, H, W)`` (K one-hot channels or 1), shape ``(B, 1, H, W)``.

    With a k x k box sum S of each mask (zero padding): dilation D = min(1, S), erosion E = floor(S / k^2 + 0.01),
    margin band M = D - E. Pixels in any band get ``w_margin``, the interior of any object ``w_object``, and far
    background ``w_background``.
    """
    if mask.dim() != 4:
        raise ValueError(f"marginal_weight_map expects (B, K, H, W) masks, got shape {list(mask.shape)}.")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}.")
    mask = mask.float()
    box = F.avg_pool2d(mask, kernel_size, stride=1, padding=kernel_size // 2, count_include_pad=True)
    dilated = (box > 1e-6).float()
    eroded = torch.floor(box + 0.01).clamp(max=1.0)
    margin = (dilated - eroded).amax(1, keepdim=True)
    interior = eroded.amax(1, keepdim=True) * (1.0 - margin)
    background = 1.0 - dilated.amax(1, keepdim=True)
    return w_margin * margin + w_object * interior + w_background * background


class MarginalWeightLoss(nn.Module):
    """Weighted cross-entropy with the marginal weight map, plus soft Dice.

    Args:
        kernel_size: window of the dilation/erosion (7 in the released code).
        w_object, w_background, w_margin: weights of the object interior, far background and margin band
            (3, 5, 2 in the released code).
        ce_weight, dice_weight: weights of the two terms.
        to_onehot_y: the target holds class indices ``(B, 1, H, W)`` (multi-class) rather than one-hot/binary masks.
        softmax: multi-class logits (softmax + CE); otherwise binary logits (sigmoid + BCE) for 1 channel.
        batch: compute the Dice term over the whole batch instead of per image and average (MONAI ``DiceLoss``'s
            ``batch``). Per image, a class absent from an image scores a Dice loss near 1 for any probability mass
            on it, which can teach a network to never predict small organs; see the Synapse bundle's docs.

    Shapes: ``input`` logits ``(B, C, H, W)``; ``target`` ``(B, 1, H, W)`` indices (``to_onehot_y``) or ``(B, C, H, W)``.
    """

    def __init__(self, kernel_size: int = 7, w_object: float = 3.0, w_background: float = 5.0, w_margin: float = 2.0,
                 ce_weight: float = 1.0, dice_weight: float = 1.0, to_onehot_y: bool = False,
                 softmax: bool = False, batch: bool = False) -> None:
        super().__init__()
        self.map_args = dict(kernel_size=kernel_size, w_object=w_object, w_background=w_background, w_margin=w_margin)
        self.ce_weight = ce_weight
        self.dice_weight = dice_weight
        self.to_onehot_y = to_onehot_y
        self.softmax = softmax
        self.dice = DiceLoss(to_onehot_y=to_onehot_y, softmax=softmax, sigmoid=not softmax, batch=batch)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if input.dim() != 4 or target.dim() != 4:
            raise ValueError(f"MarginalWeightLoss expects 4D input and target, got {list(input.shape)} and "
                             f"{list(target.shape)}.")
        if self.softmax:
            if self.to_onehot_y:
                indices = target[:, 0].long()
                onehot = F.one_hot(indices, input.shape[1]).permute(0, 3, 1, 2).float()
            else:
                onehot = target.float()
                indices = onehot.argmax(1)
            weights = marginal_weight_map(onehot[:, 1:], **self.map_args)[:, 0]
            ce = F.cross_entropy(input, indices, reduction="none")
        else:
            if input.shape[1] != 1:
                raise ValueError("MarginalWeightLoss: binary mode expects 1 output channel; set softmax=True for "
                                 f"{input.shape[1]} classes.")
            weights = marginal_weight_map(target, **self.map_args)
            ce = F.binary_cross_entropy_with_logits(input, target.float(), reduction="none")
        weighted_ce = (weights * ce).sum() / weights.sum().clamp(min=1e-6)
        return self.ce_weight * weighted_ce + self.dice_weight * self.dice(input, target)
