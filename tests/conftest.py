"""pytest fixtures shared by the tests; paths and plain helpers are in ``helpers.py``."""

import os

import pytest

from helpers import MONKEYPOX, SYNAPSE, copy_with_random_weights, make_ct_volume, make_photo


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


@pytest.fixture
def random_weight_bundle(tmp_path):
    """A copy of the Synapse bundle with random LTMedNeXt-T weights."""
    return copy_with_random_weights(SYNAPSE, tmp_path / "bundle", 9)


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
