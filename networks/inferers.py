"""Inferers the bundles need beyond MONAI's."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from monai.inferers import Inferer

from networks.training import as_bool

__all__ = ["DihedralAverageInferer"]


class DihedralAverageInferer(Inferer):
    """Test-time augmentation: the mean of the class probabilities that ``inferer`` gives for the symmetries of the
    square in-plane grid (4 rotations by 90 degrees, each with and without a flip: 8), each mapped back to the input's
    orientation. For networks trained with random 90-degree rotations and flips (the ACDC bundle's), or for images
    with no natural orientation (histology, dermoscopy).

    Args:
        inferer: the inferer run on each transformed input (e.g. ``SliceInferer`` over a volume's slices).
        spatial_axes: the two in-plane axes of the input tensor, which must be equally long (``(2, 3)`` for
            ``(B, C, H, W, D)`` volumes sliced along D, and for ``(B, C, H, W)`` images).
        rotations: the 4 rotations by 90 degrees (else the identity only). This and ``flip`` also take the
            command line's ``"false"``/``"true"`` (``networks.training.as_bool``).
        flip: each orientation also flipped along ``spatial_axes[0]``. With ``rotations`` and ``flip`` both False
            this is ``inferer`` alone (and its activation).
        activation: how logits become probabilities before they are averaged: ``"softmax"`` over the channel axis
            (mutually exclusive classes) or ``"sigmoid"`` per channel (a binary network with one output channel).

    A classifier's ``(B, classes)`` logits are averaged as they are: with ``spatial_axes=(3, 2)`` and
    ``rotations=False`` that is the mean over the image and its left-right mirror (the flip of a training
    augmentation along the width).

    Shapes:
        ``inputs`` ``(B, C, *spatial)``; ``inferer`` gives logits, ``(B, C, *spatial)`` or ``(B, classes)``; the output
        has their shape, probabilities (softmax: summing to 1 over the channel axis). Costs one run of ``inferer`` per
        symmetry (8 by default).
    """

    def __init__(self, inferer: Inferer, spatial_axes: Sequence[int] = (2, 3), rotations: bool | str = True,
                 flip: bool | str = True, activation: str = "softmax") -> None:
        if len(spatial_axes) != 2 or spatial_axes[0] == spatial_axes[1] or min(spatial_axes) < 2:
            raise ValueError(f"DihedralAverageInferer: spatial_axes must be two different axes after batch and "
                             f"channel (>= 2), got {tuple(spatial_axes)}.")
        if activation not in ("softmax", "sigmoid"):
            raise ValueError(f"DihedralAverageInferer: activation must be 'softmax' or 'sigmoid', got {activation!r}.")
        self.inferer = inferer
        self.activation = activation
        self.spatial_axes = (int(spatial_axes[0]), int(spatial_axes[1]))
        self.turns = range(4) if as_bool(rotations) else range(1)
        self.flips = (False, True) if as_bool(flip) else (False,)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        axes = self.spatial_axes
        if max(axes) >= inputs.dim():
            raise ValueError(f"DihedralAverageInferer: spatial_axes {axes} do not exist in an input of shape "
                             f"{list(inputs.shape)}.")
        if len(self.turns) > 1 and inputs.shape[axes[0]] != inputs.shape[axes[1]]:
            raise ValueError(f"DihedralAverageInferer: input of shape {list(inputs.shape)} is not square on axes "
                             f"{axes}; rotations by 90 degrees need a square plane (resize it first, or rotations=False).")
        total = torch.zeros(())
        for turns in self.turns:
            for flip in self.flips:
                view = torch.rot90(inputs, turns, axes)
                view = view.flip(axes[0]) if flip else view
                logits = self.inferer(view, network, *args, **kwargs)
                output = logits.softmax(1) if self.activation == "softmax" else logits.sigmoid()
                if output.dim() > max(axes):  # a map: back to the input's orientation; a class vector stays
                    output = torch.rot90(output.flip(axes[0]) if flip else output, -turns, axes)
                total = total + output
        return total / (len(self.turns) * len(self.flips))
