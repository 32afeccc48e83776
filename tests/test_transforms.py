"""networks.transforms against the MONAI transforms they stand in for."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import AsDiscreted, ScaleIntensityRanged

from networks.transforms import ArgmaxLabelsd, WindowIntensityd


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


@pytest.mark.parametrize("dims", [2, 3])
def test_keep_largest_component_per_label_equals_monai(dims):
    """Random blobs of several labels (each split into components, one label untouched, two extra islands of label
    4): the same label map as MONAI's KeepLargestConnectedComponentd, meta kept."""
    from monai.transforms import KeepLargestConnectedComponentd
    from scipy import ndimage

    from networks.transforms import KeepLargestComponentPerLabeld

    rng = np.random.default_rng(dims)
    shape = (40, 36, 12)[:dims]
    labels = ndimage.zoom(rng.integers(0, 6, (10, 9, 3)[:dims]), [s / t for s, t in zip(shape, (10, 9, 3))], order=0)
    labels[(slice(0, 2),) * dims] = 4  # an island of label 4 in a corner
    labels[(slice(-2, None),) * dims] = 4  # and a second one of the same size (not the largest: no tie decides)
    affine = torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0]))
    image = MetaTensor(torch.as_tensor(labels[None].astype(np.uint8)), affine=affine)
    applied = [1, 2, 4, 5]
    expected = KeepLargestConnectedComponentd("pred", applied_labels=applied, independent=True,
                                              connectivity=dims)({"pred": image.clone()})["pred"]
    kept = KeepLargestComponentPerLabeld("pred", applied)({"pred": image.clone()})["pred"]
    assert isinstance(kept, MetaTensor) and kept.dtype == torch.uint8 and torch.equal(kept.affine, image.affine)
    assert torch.equal(kept.as_tensor(), expected.as_tensor())
    assert not torch.equal(kept.as_tensor(), image.as_tensor())  # something was removed
    assert torch.equal(kept[image == 3], image[image == 3])  # label 3 not applied: untouched
    as_float = KeepLargestComponentPerLabeld("pred", applied)({"pred": image.float()})["pred"]
    assert as_float.dtype == torch.float32 and torch.equal(as_float.to(torch.uint8).as_tensor(), kept.as_tensor())


def test_keep_largest_component_per_label_breaks_ties_as_monai():
    """Two components of label 1 of equal size, the largest of that label: the same one survives as in MONAI's
    transform (which picks the last of the tied in its argsort), in 2D and 3D."""
    from monai.transforms import KeepLargestConnectedComponentd

    from networks.transforms import KeepLargestComponentPerLabeld

    for shape in ((12, 12), (8, 8, 8)):
        labels = np.zeros(shape, dtype=np.uint8)
        labels[(slice(1, 4),) * len(shape)] = 1
        labels[(slice(5, 8),) * len(shape)] = 1
        labels[(slice(0, 1),) * len(shape)] = 1  # a smaller third component
        labels[-1, -1] = 2
        image = MetaTensor(torch.as_tensor(labels[None]))
        expected = KeepLargestConnectedComponentd("pred", applied_labels=[1, 2], independent=True,
                                                  connectivity=1)({"pred": image.clone()})["pred"]
        kept = KeepLargestComponentPerLabeld("pred", [1, 2], connectivity=1)({"pred": image.clone()})["pred"]
        assert int((kept == 1).sum()) == 3 ** len(shape)  # exactly one of the two tied cubes
        assert torch.equal(kept.as_tensor(), expected.as_tensor())


def test_keep_largest_component_per_label_rejects_scores():
    from networks.transforms import KeepLargestComponentPerLabeld

    with pytest.raises(ValueError, match="label map"):
        KeepLargestComponentPerLabeld("pred", [1])({"pred": torch.zeros(3, 4, 4)})


@pytest.mark.parametrize("kind", ["metatensor", "numpy", "int16"])
def test_window_intensity_equals_scale_intensity_range_in_place(kind):
    hu = torch.randint(-1024, 2000, (1, 30, 20, 6)).float()
    hu[0, 0, 0, :3] = torch.tensor([-125.0, 275.0, 75.0])  # the window's ends and middle
    image = {"metatensor": MetaTensor(hu.clone(), affine=torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0]))),
             "numpy": hu.numpy().copy(), "int16": hu.to(torch.int16)}[kind]
    expected = ScaleIntensityRanged("image", -125, 275, 0.0, 1.0, clip=True)({"image": hu.clone()})["image"]
    out = WindowIntensityd("image", -125, 275)({"image": image})["image"]
    assert type(out) is type(image) and out.dtype in (torch.float32, np.float32)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-6)
    assert np.asarray(out)[0, 0, 0, :3].tolist() == pytest.approx([0.0, 1.0, 0.5])
    if kind != "int16":  # float input is windowed in place, no copy of the volume
        assert out is image
    if kind == "metatensor":
        assert torch.equal(out.affine, image.affine)


def test_window_intensity_rejects_an_empty_window():
    with pytest.raises(ValueError, match="a_max"):
        WindowIntensityd("image", 275, -125)
