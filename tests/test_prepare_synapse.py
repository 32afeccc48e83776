"""Converters from the three Synapse layouts to one datalist of HU volumes with 8-organ labels."""

import json
import os

import h5py
import nibabel as nib
import numpy as np
import pytest

from helpers import shared_data

from networks.data import btcv_to_synapse, load_datalist
from tools import prepare_synapse


def test_btcv_to_synapse_mapping():
    btcv = np.arange(14)
    assert btcv_to_synapse(btcv).tolist() == [0, 1, 2, 3, 4, 0, 5, 6, 7, 0, 0, 8, 0, 0]
    with pytest.raises(ValueError, match="0..13"):
        btcv_to_synapse(np.array([14]))


def test_sabs_sample(tmp_path):
    src = shared_data("synapse_sabs")
    subset = tmp_path / "sabs"
    subset.mkdir()
    with open(os.path.join(src, "case_ids.tsv")) as f:
        lines = f.read().splitlines()
    rows = [line for line in lines[1:] if line.split("\t")[0] in ("4", "5")]  # BTCV 5 and 6
    (subset / "case_ids.tsv").write_text("\n".join([lines[0], *rows]) + "\n")
    for k in (4, 5):
        os.symlink(os.path.join(src, f"SABS_{k}"), subset / f"SABS_{k}")
    path = prepare_synapse.sabs(str(subset), str(tmp_path / "out"), validation=(6,))
    training, validation = load_datalist(path, "training"), load_datalist(path, "validation")
    assert [c["btcv_id"] for c in training] == [5] and [c["btcv_id"] for c in validation] == [6]
    image, label = nib.load(training[0]["image"]), nib.load(training[0]["label"])
    assert image.shape == label.shape == (256, 256, 117)  # padding row, column and slice dropped
    hu = np.asarray(image.dataobj)
    assert hu.min() == pytest.approx(-125) and hu.max() == pytest.approx(275)
    assert set(np.unique(np.asarray(label.dataobj))) == set(range(9))
    # anatomy in RAS after the AP correction: kidneys posterior to the liver, liver on the patient's right
    canonical = np.asarray(nib.as_closest_canonical(label).dataobj)
    liver, kidney_r, spleen = (np.argwhere(canonical == v).mean(0) for v in (5, 2, 1))
    assert kidney_r[1] < liver[1] and liver[0] > spleen[0]


def test_btcv_layout(tmp_path):
    src = tmp_path / "btcv"
    for sub in ("img", "label"):
        (src / sub).mkdir(parents=True)
    for case in (1, 5, 6):
        label = np.zeros((8, 8, 4), np.uint8)
        label[2:4, 2:4, 1] = 6  # liver
        label[5, 5, 2] = 11  # pancreas
        label[6, 6, 3] = 9  # IVC -> background
        nib.save(nib.Nifti1Image(np.full((8, 8, 4), 40, np.int16), np.eye(4)), str(src / "img" / f"img{case:04d}.nii.gz"))
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(src / "label" / f"label{case:04d}.nii.gz"))
    path = prepare_synapse.btcv(str(src), str(tmp_path / "out"), validation=(6,))
    with open(path) as f:
        datalist = json.load(f)
    assert [c["btcv_id"] for c in datalist["training"]] == [5]
    assert [c["btcv_id"] for c in datalist["test"]] == [1]  # a TransUNet test case
    label = np.asarray(nib.load(load_datalist(path, "training")[0]["label"]).dataobj)
    assert label[2, 2, 1] == 5 and label[5, 5, 2] == 8 and label[6, 6, 3] == 0


def test_transunet_layout(tmp_path):
    src = tmp_path / "transunet"
    (src / "train_npz").mkdir(parents=True)
    (src / "test_vol_h5").mkdir()
    for case in (5, 6):
        for z in range(3):
            np.savez(src / "train_npz" / f"case{case:04d}_slice{z:03d}.npz", image=np.full((8, 8), 0.5, np.float32),
                     label=np.full((8, 8), z, np.uint8))
    with h5py.File(src / "test_vol_h5" / "case0001.npy.h5", "w") as f:
        f["image"] = np.zeros((3, 8, 8), np.float32)
        f["label"] = np.ones((3, 8, 8), np.uint8)
    path = prepare_synapse.transunet(str(src), str(tmp_path / "out"), validation=(6,))
    training = load_datalist(path, "training")
    image = np.asarray(nib.load(training[0]["image"]).dataobj)
    label = np.asarray(nib.load(training[0]["label"]).dataobj)
    assert image.shape == (8, 8, 3) and np.allclose(image, 75.0)  # 0.5 of the [-125, 275] window
    assert label[0, 0].tolist() == [0, 1, 2]
    assert nib.load(load_datalist(path, "test")[0]["image"]).shape == (8, 8, 3)


def test_missing_validation_case_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"\[99\]"):
        prepare_synapse._split([{"btcv_id": 5}], (99,))


def test_datalist_paths_given_relative_to_the_working_directory(tmp_path, monkeypatch):
    from networks.data import write_datalist

    (tmp_path / "out" / "imagesTr").mkdir(parents=True)
    (tmp_path / "out" / "imagesTr" / "a.nii.gz").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    path = str(tmp_path / "out" / "datalist.json")
    write_datalist(path, [{"image": "out/imagesTr/a.nii.gz", "case": "a"}])
    with open(path) as f:
        assert json.load(f)["training"] == [{"image": "imagesTr/a.nii.gz", "case": "a"}]
    assert os.path.isfile(load_datalist(path, "training")[0]["image"])
