"""networks.transforms against the MONAI transforms they stand in for."""

import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import AsDiscreted

from networks.transforms import ArgmaxLabelsd


def test_argmax_labels_equal_asdiscreted_with_ties_and_meta():
    scores = MetaTensor(torch.randn(9, 20, 30, 7), affine=torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0])))
    scores[:, :3] = 0.0  # every class ties: label 0, as torch.argmax gives
    scores[4:6, 5] = 7.0  # classes 4 and 5 tie above the rest: label 4
    expected = AsDiscreted("pred", argmax=True, dtype=torch.uint8)({"pred": scores})["pred"]
    labels = ArgmaxLabelsd("pred")({"pred": scores, "image": torch.zeros(1)})["pred"]
    assert isinstance(labels, MetaTensor) and labels.dtype == torch.uint8 and labels.shape == (1, 20, 30, 7)
    assert torch.equal(labels.as_tensor(), expected.as_tensor())
    assert (labels[0, :3] == 0).all() and (labels[0, 5] == 4).all()
    assert torch.equal(labels.affine, scores.affine)


def test_argmax_labels_rejects_more_classes_than_uint8():
    with pytest.raises(ValueError, match="256 classes"):
        ArgmaxLabelsd("pred")({"pred": torch.zeros(256, 2, 2)})
