"""Write a MONAI datalist (and NIfTI volumes where needed) for the Synapse multi-organ CT bundle.

Every layout becomes the same thing: ``imagesTr/<case>.nii.gz`` in Hounsfield units (float32), ``labelsTr/<case>.nii.gz``
with the 8 Synapse organs in TransUNet order (uint8), and ``datalist.json`` with ``training`` and ``validation``
lists. Layouts:

* ``btcv``: the BTCV release (``img/img00XX.nii.gz``, ``label/label00XX.nii.gz``), labels mapped from BTCV ids.
* ``transunet``: TransUNet's preprocessed files (``train_npz/caseXXXX_sliceYYY.npz``, ``test_vol_h5/caseXXXX.npy.h5``);
  their images are the [-125, 275] HU window scaled to [0, 1] and carry no spacing (1 mm is written).
* ``sabs``: the SSL-ALPNet "SABS" sample in ../shared/data/synapse_sabs (PNG slices + BTCV 13-organ label volume).

Examples::

    python tools/prepare_synapse.py sabs ../shared/data/synapse_sabs data/synapse
    python tools/prepare_synapse.py btcv /data/BTCV/RawData/Training data/synapse
"""

from __future__ import annotations

import csv
import glob
import os
import re

import fire
import nibabel as nib
import numpy as np

from networks.data import btcv_to_synapse, write_datalist, write_nifti_atomic as _save

# TransUNet's split of the 30 BTCV training scans (Beckschen/TransUNet lists/lists_Synapse)
TRANSUNET_TRAIN = (5, 6, 7, 9, 10, 21, 23, 24, 26, 27, 28, 30, 31, 33, 34, 37, 39, 40)
TRANSUNET_TEST = (1, 2, 3, 4, 8, 22, 25, 29, 32, 35, 36, 38)
# validation cases held out of the 18 training cases for the shipped weights (all 8 organs labelled in each)
DEFAULT_VALIDATION = (6, 24, 31, 39)
HU_MIN, HU_MAX = -125.0, 275.0


def _unit_to_hu(image: np.ndarray) -> np.ndarray:
    """The [0, 1]-scaled [-125, 275] HU window back to HU, so every layout feeds the same preprocessing."""
    return (image.astype(np.float32) * (HU_MAX - HU_MIN) + HU_MIN).astype(np.float32)


def _split(cases: list[dict], validation: tuple[int, ...]) -> tuple[list[dict], list[dict]]:
    wanted = {int(v) for v in validation}
    found = {c["btcv_id"] for c in cases}
    missing = wanted - found
    if missing:
        raise ValueError(f"validation cases {sorted(missing)} are not among the cases found ({sorted(found)}).")
    return [c for c in cases if c["btcv_id"] not in wanted], [c for c in cases if c["btcv_id"] in wanted]


def _entry(out_dir: str, case: str, btcv_id: int, image: np.ndarray, label: np.ndarray, affine: np.ndarray) -> dict:
    return {
        "image": _save(image, affine, os.path.join(out_dir, "imagesTr", f"{case}.nii.gz")),
        "label": _save(label, affine, os.path.join(out_dir, "labelsTr", f"{case}.nii.gz")),
        "case": case,
        "btcv_id": btcv_id,
    }


def sabs(src: str, out_dir: str, validation: tuple[int, ...] = DEFAULT_VALIDATION) -> str:
    """Convert the SABS sample (``SABS_<k>/img/*.png`` + ``label_<k>.nii.gz`` and ``case_ids.tsv``).

    The padding row, column and slice of that preparation are dropped, the PNG grey value (the HU window scaled
    to 0-255) is mapped back to HU, and the stored affine's anterior-posterior axis is corrected: read as stored,
    the spine lies anterior to the liver and kidneys (checked on every case), so the second axis is reversed.
    """
    from PIL import Image

    table = os.path.join(src, "case_ids.tsv")
    if not os.path.isfile(table):
        raise FileNotFoundError(f"{table}: not found; is {src} the synapse_sabs folder?")
    with open(table) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    cases = []
    for row in rows:
        k, btcv_id = int(row["sabs_id"]), int(row["btcv_id"])
        label_img = nib.load(os.path.join(src, f"SABS_{k}", f"label_{k}.nii.gz"))
        label = np.asarray(label_img.dataobj)
        slices = sorted(glob.glob(os.path.join(src, f"SABS_{k}", "img", f"image_SABS_{k}_slice*.png")))
        if len(slices) != label.shape[2]:
            raise ValueError(f"SABS_{k}: {len(slices)} PNG slices but the label has {label.shape[2]} slices.")
        image = np.stack([np.asarray(Image.open(s).convert("L")) for s in slices], axis=-1)
        # drop the padding row, column and trailing slice of the SABS resampling
        image, label = image[:-1, :-1, :-1], label[:-1, :-1, :-1]
        affine = label_img.affine.copy()
        flip = np.eye(4)
        flip[1, 1], flip[1, 3] = -1.0, image.shape[1] - 1
        affine = affine @ flip
        cases.append(_entry(out_dir, f"btcv{btcv_id:04d}", btcv_id, _unit_to_hu(image / 255.0),
                            btcv_to_synapse(label), affine))
    training, valid = _split(cases, validation)
    path = os.path.join(out_dir, "datalist.json")
    write_datalist(path, training, valid, source=f"SABS sample ({src})", validation_cases=sorted(validation))
    return path


def btcv(src: str, out_dir: str, validation: tuple[int, ...] = DEFAULT_VALIDATION, protocol: str = "transunet") -> str:
    """Convert the BTCV release. ``protocol="transunet"`` keeps the 18 TransUNet training cases (minus
    ``validation``) for training and lists the 12 TransUNet test cases under ``test``."""
    cases = []
    for image_path in sorted(glob.glob(os.path.join(src, "img", "img*.nii.gz"))):
        btcv_id = int(re.findall(r"img(\d+)", os.path.basename(image_path))[0])
        label_path = os.path.join(src, "label", f"label{btcv_id:04d}.nii.gz")
        if not os.path.isfile(label_path):
            raise FileNotFoundError(f"{label_path}: label for {image_path} not found.")
        image_img, label_img = nib.load(image_path), nib.load(label_path)
        cases.append(_entry(out_dir, f"btcv{btcv_id:04d}", btcv_id, np.asarray(image_img.dataobj, dtype=np.float32),
                            btcv_to_synapse(np.asarray(label_img.dataobj)), image_img.affine))
    if not cases:
        raise FileNotFoundError(f"{src}: no img/img*.nii.gz files found.")
    test = [c for c in cases if c["btcv_id"] in TRANSUNET_TEST] if protocol == "transunet" else []
    pool = [c for c in cases if c not in test]
    training, valid = _split(pool, validation)
    path = os.path.join(out_dir, "datalist.json")
    write_datalist(path, training, valid, test, source=f"BTCV ({src})", validation_cases=sorted(validation))
    return path


def transunet(src: str, out_dir: str, validation: tuple[int, ...] = DEFAULT_VALIDATION) -> str:
    """Convert TransUNet's ``train_npz`` slices (stacked back into volumes) and ``test_vol_h5`` volumes.

    The label values are written as stored: check their organ order against TransUNet's class list before
    naming per-organ scores (public reproductions disagree on it).
    """
    import h5py

    by_case: dict[int, list[tuple[int, str]]] = {}
    for path in glob.glob(os.path.join(src, "train_npz", "case*_slice*.npz")):
        case, index = map(int, re.findall(r"case(\d+)_slice(\d+)", os.path.basename(path))[0])
        by_case.setdefault(case, []).append((index, path))
    pool = []
    for case, slices in sorted(by_case.items()):
        arrays = [np.load(p) for _, p in sorted(slices)]
        image = np.stack([a["image"] for a in arrays], -1)
        label = np.stack([a["label"] for a in arrays], -1).astype(np.uint8)
        pool.append(_entry(out_dir, f"btcv{case:04d}", case, _unit_to_hu(image), label, np.eye(4)))
    test = []
    for path in sorted(glob.glob(os.path.join(src, "test_vol_h5", "case*.npy.h5"))):
        case = int(re.findall(r"case(\d+)", os.path.basename(path))[0])
        with h5py.File(path) as f:  # (slices, H, W) -> (H, W, slices)
            image = np.transpose(f["image"][()], (1, 2, 0))
            label = np.transpose(f["label"][()], (1, 2, 0)).astype(np.uint8)
        test.append(_entry(out_dir, f"btcv{case:04d}", case, _unit_to_hu(image), label, np.eye(4)))
    if not pool and not test:
        raise FileNotFoundError(f"{src}: no train_npz/*.npz or test_vol_h5/*.npy.h5 files found.")
    training, valid = _split(pool, validation) if pool else ([], [])
    path = os.path.join(out_dir, "datalist.json")
    write_datalist(path, training, valid, test, source=f"TransUNet preprocessed ({src})",
                   validation_cases=sorted(validation))
    return path


if __name__ == "__main__":
    fire.Fire({"sabs": sabs, "btcv": btcv, "transunet": transunet})
