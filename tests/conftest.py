import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.environ.get("LITEMED_SHARED_DATA", os.path.join(os.path.dirname(REPO), "shared", "data"))


def shared_data(*parts: str) -> str:
    """Path to a real sample under ../shared/data; skips outside CI when absent, fails in CI."""
    path = os.path.join(SHARED_DATA, *parts)
    if not os.path.exists(path):
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{path}: sample data missing in CI")
        pytest.skip(f"{path}: sample data not present")
    return path


BUNDLES = os.path.join(REPO, "bundles")
SYNAPSE = os.path.join(BUNDLES, "synapse_ltmednext_segmentation")


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


@pytest.fixture
def synthetic_synapse(tmp_path):
    """A datalist folder with 4 synthetic cases (2 training, 2 validation) in the layout prepare_synapse writes."""
    import nibabel as nib

    from networks.data import write_datalist

    root = tmp_path / "synapse"
    items = []
    for i in range(4):
        image, label, affine = make_ct_volume(seed=i)
        for kind, array in (("imagesTr", image), ("labelsTr", label)):
            (root / kind).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(array, affine), str(root / kind / f"case{i}.nii.gz"))
        items.append({"image": str(root / "imagesTr" / f"case{i}.nii.gz"),
                      "label": str(root / "labelsTr" / f"case{i}.nii.gz")})
    write_datalist(str(root / "datalist.json"), items[:2], items[2:])
    return root


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


@pytest.fixture
def random_weight_bundle(tmp_path):
    """A copy of the Synapse bundle with random LTMedNeXt-T weights."""
    return copy_with_random_weights(SYNAPSE, tmp_path / "bundle", 9)


MONKEYPOX = os.path.join(BUNDLES, "monkeypox_ltmednext_classification")
SARSCOV2 = os.path.join(BUNDLES, "sarscov2_ct_ltmednext_classification")
COVID19_SLICES = os.path.join(BUNDLES, "covid19_ct_slices_ltmednext_classification")
CLASSIFICATION_BUNDLES = (MONKEYPOX, SARSCOV2, COVID19_SLICES)


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


@pytest.fixture
def synthetic_photos(tmp_path):
    """A datalist folder with 12 synthetic 2-class images of 6 patients (training 8, validation 2, test 2)."""
    from networks.data import write_datalist

    root = tmp_path / "photos"
    items = []
    for i in range(12):
        label = i % 2
        items.append({"image": make_photo(root / f"class{label}" / f"p{i // 2}_{i}.png", label, seed=i),
                      "label": label, "class_name": ["others", "monkeypox"][label], "group": f"p{i // 2}"})
    write_datalist(str(root / "datalist.json"), items[:8], items[8:10], items[10:], classes=["others", "monkeypox"])
    return root


@pytest.fixture
def random_weight_classifier(tmp_path):
    """A copy of the Monkeypox bundle (configs, docs, LICENSE) with random LTMedNeXtClassifier-T weights."""
    import shutil

    import torch

    from networks import LTMedNeXtClassifier

    bundle = tmp_path / "classifier"
    for name in ("configs", "docs"):
        shutil.copytree(os.path.join(MONKEYPOX, name), bundle / name)
    shutil.copy(os.path.join(MONKEYPOX, "LICENSE"), bundle / "LICENSE")
    (bundle / "models").mkdir()
    torch.manual_seed(0)
    torch.save(LTMedNeXtClassifier(3, 2, "T", dropout=0.1).state_dict(), str(bundle / "models" / "model.pt"))
    return bundle
