"""The shipped LiteNeXt weights (DSB2018, GlaS, ISIC 2018, PH2, Sunnybrook) on their unseen test images, through
tools/infer.py's 2D path: masks of each image's size that match the real annotations (a regression guard well below
the measured test Dice, see the bundles' docs/README.md)."""

import os

import numpy as np
import pytest
from PIL import Image

from helpers import BUNDLES, shared_data

from networks.segmentation2d import binary_metrics, read_mask
from tools.prepare_litenext import (dsb2018_pairs, glas_pairs, isic2018_pairs, ph2_pairs, resize_nearest, split_of,
                                  sunnybrook_pairs)
from networks.batch.runners import run

CASES = {  # bundle, sample folder, pairs of its layout, split fractions of the bundle's datalist, guard on mean Dice
    "dsb2018": ("dsb2018_litenext_segmentation", "dsb2018", dsb2018_pairs, (0.8, 0.1, 0.1), 0.75),
    "glas": ("glas_litenext_segmentation", "glas", glas_pairs, (0.8, 0.1, 0.1), 0.62),  # test: GlaS's own testB images
    "isic2018": ("isic2018_litenext_segmentation", "isic2017", isic2018_pairs, (0.8, 0.1, 0.1), 0.78),
    "ph2": ("ph2_litenext_segmentation", "ph2", ph2_pairs, (0.6, 0.2, 0.2), 0.85),
}


@pytest.mark.parametrize("dataset", sorted(CASES))
def test_shipped_weights_on_unseen_test_images(dataset, tmp_path):
    bundle, sample, pairs_of, fractions, guard = CASES[dataset]
    pairs = {p["case"]: p for p in pairs_of(shared_data(sample))}
    test_cases = split_of(list(pairs.values()), fractions, seed=42)[2]  # the split seed of the bundle's docs
    assert test_cases
    inputs = tmp_path / "in"
    inputs.mkdir()
    for case in test_cases:
        image = pairs[case]["image"]
        os.symlink(image, inputs / f"{case}{os.path.splitext(image)[1]}")
    assert run(os.path.join(BUNDLES, bundle), str(inputs), str(tmp_path / "out")) == 0
    dice = []
    for case in test_cases:
        pred = np.asarray(Image.open(tmp_path / "out" / f"{case}_seg.png"))
        gt = read_mask(pairs[case]["masks"][0])
        if pairs[case].get("resize_mask") and gt.shape != pred.shape:  # ISIC 2017 copy: masks at the original size
            gt = resize_nearest(gt, pred.shape)
        assert pred.shape == gt.shape and set(np.unique(pred)) <= {0, 1}
        dice.append(binary_metrics(pred, gt)["dice"])
    assert np.mean(dice) >= guard, dice


def test_sunnybrook_weights_on_dicom_frames(tmp_path):
    """The Sunnybrook network on the DICOM frames of SC-HF-I-5, the patient that chose its checkpoint (no patient is
    untouched: the card's headline is the cross-validation): LV cavity masks of each frame's size, 0.902 measured."""
    import pydicom

    pairs = [p for p in sunnybrook_pairs(shared_data("sunnybrook")) if p["group"] == "SC-HF-I-5"]
    assert len(pairs) == 18
    inputs = tmp_path / "in"
    inputs.mkdir()
    for pair in pairs:
        os.symlink(pair["image"], inputs / f"{pair['case']}.dcm")
    assert run(os.path.join(BUNDLES, "sunnybrook_litenext_segmentation"), str(inputs), str(tmp_path / "out")) == 0
    dice = []
    for pair in pairs:
        pred = np.asarray(Image.open(tmp_path / "out" / f"{pair['case']}_seg.png"))
        header = pydicom.dcmread(pair["image"], stop_before_pixels=True)
        gt = pair["masks"]((header.Rows, header.Columns))
        assert pred.shape == gt.shape and set(np.unique(pred)) <= {0, 1}
        dice.append(binary_metrics(pred, gt > 0)["dice"])
    assert np.mean(dice) >= 0.85, dice
