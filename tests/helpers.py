"""Paths and small data generators the tests share (the fixtures built on them are in ``conftest.py``)."""

import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.environ.get("LITEMED_SHARED_DATA", os.path.join(os.path.dirname(REPO), "shared", "data"))
BUNDLES = os.path.join(REPO, "bundles")
SYNAPSE = os.path.join(BUNDLES, "synapse_ltmednext_segmentation")
MONKEYPOX = os.path.join(BUNDLES, "monkeypox_ltmednext_classification")
SARSCOV2 = os.path.join(BUNDLES, "sarscov2_ct_ltmednext_classification")
COVID19_SLICES = os.path.join(BUNDLES, "covid19_ct_slices_ltmednext_classification")
CLASSIFICATION_BUNDLES = (MONKEYPOX, SARSCOV2, COVID19_SLICES)


def shared_data(*parts: str) -> str:
    """Path to a real sample under ../shared/data; skips outside CI when absent, fails in CI."""
    path = os.path.join(SHARED_DATA, *parts)
    if not os.path.exists(path):
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{path}: sample data missing in CI")
        pytest.skip(f"{path}: sample data not present")
    return path


def make_ct_volume(shape=(48, 40, 6), seed: int = 0):
    """A small CT-like volume in HU and a label with a few Synapse organs as blobs, RAS affine 1.5 mm x 1.5 mm x 3 mm."""
    import numpy as np

    rng = np.random.default_rng(seed)
    image = np.full(shape, -1000.0, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    body = (x - shape[0] / 2) ** 2 / (0.45 * shape[0]) ** 2 + (y - shape[1] / 2) ** 2 / (0.45 * shape[1]) ** 2 < 1
    image[body] = 30.0
    for organ, (cx, cy, r, hu) in {5: (0.3, 0.45, 0.18, 60.0), 1: (0.72, 0.6, 0.1, 45.0), 7: (0.5, 0.4, 0.05, 200.0)}.items():
        blob = (x - cx * shape[0]) ** 2 + (y - cy * shape[1]) ** 2 < (r * shape[0]) ** 2
        image[blob] = hu
        label[blob] = organ
    image += rng.normal(0, 10, shape).astype(np.float32)
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    return image, label, affine


def copy_with_random_weights(source_bundle: str, bundle, out_channels: int):
    """``bundle``: the configs of ``source_bundle`` with random LTMedNeXt-T weights (seed 0), for pipeline tests that
    need no trained model."""
    import shutil

    import torch

    from networks import LTMedNeXt

    shutil.copytree(os.path.join(source_bundle, "configs"), bundle / "configs")
    (bundle / "models").mkdir()
    torch.manual_seed(0)
    torch.save(LTMedNeXt(2, 1, out_channels, "T").state_dict(), str(bundle / "models" / "model.pt"))
    return bundle


def make_photo(path, label: int, seed: int = 0, size=(48, 40), mode: str = "RGB") -> str:
    """A small synthetic image whose class shows: class 0 a dark disc on grey, class 1 a bright square (any PIL mode)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size
    y, x = np.mgrid[:h, :w]
    image = np.full((h, w, 3), 120.0) + rng.normal(0, 8, (h, w, 3))
    cy, cx = rng.integers(h // 3, 2 * h // 3), rng.integers(w // 3, 2 * w // 3)
    if label == 0:
        image[(y - cy) ** 2 + (x - cx) ** 2 < (h // 5) ** 2] = (30, 40, 50)
    else:
        image[(abs(y - cy) < h // 5) & (abs(x - cx) < w // 5)] = (240, 200, 180)
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).convert(mode).save(str(path))
    return str(path)
