"""Which bundles the MONAI Label and export tests cover, and real labelled volumes for them from ../shared/data.

A bundle is covered when it is a segmentation bundle with weights (``*_segmentation/models/model.pt``). Volume
bundles (3D networks, or 2D networks that slice a volume inside the bundle with ``SliceInferer``) are served by MONAI
Label's monaibundle app and get a real sample chosen by the input modality in their metadata. A new volume bundle
whose modality has no sample here fails the tests, naming this file, rather than being silently skipped.
"""

from __future__ import annotations

import atexit
import functools
import glob
import json
import os
import shutil
import tempfile

import numpy as np

from helpers import BUNDLES, shared_data

# TotalSegmentator v2 "total" ids of the organs in ../shared/data/ct_nifti_3d/example_seg.nii.gz, by the names our
# bundles use in channel_def
TOTALSEGMENTATOR_IDS = {"spleen": 1, "right_kidney": 2, "left_kidney": 3, "gallbladder": 4, "liver": 5, "stomach": 6,
                        "pancreas": 7, "aorta": 52}
ACDC_H5_SPACING = (1.5, 1.5, 10.0)  # the h5 files carry none; the usual ACDC spacing, as tools/prepare_acdc.py writes


def _read(bundle: str, name: str) -> dict:
    with open(os.path.join(bundle, "configs", name)) as f:
        return json.load(f)


def segmentation_bundles() -> list[str]:
    return sorted(b for b in glob.glob(os.path.join(BUNDLES, "*_segmentation"))
                  if os.path.isfile(os.path.join(b, "configs", "inference.json"))
                  and os.path.isfile(os.path.join(b, "models", "model.pt")))


def serves_volumes(bundle: str) -> bool:
    """A 3D network, or a 2D network applied slice by slice to a volume (``SliceInferer``)."""
    inferer = _read(bundle, "inference.json").get("inferer", {})
    shape = _read(bundle, "metadata.json")["network_data_format"]["inputs"]["image"]["spatial_shape"]
    return "SliceInferer" in str(inferer) or len(shape) == 3


def volume_bundles() -> list[str]:
    return [b for b in segmentation_bundles() if serves_volumes(b)]


def labels(bundle: str) -> dict[str, int]:
    """``{name: id}`` of the foreground classes, as MONAI Label reads them from metadata channel_def."""
    channels = _read(bundle, "metadata.json")["network_data_format"]["outputs"]["pred"]["channel_def"]
    return {v.lower(): int(k) for k, v in channels.items() if v.lower() != "background"}


@functools.lru_cache(maxsize=None)
def exported(bundle: str) -> str:
    """The bundle exported by tools/export_bundle.py, once per test session (the MONAI Label and export tests share
    it); removed when the session ends."""
    from tools.export_bundle import export

    folder = tempfile.mkdtemp(prefix="litemed_export_")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return export(bundle, os.path.join(folder, f"{os.path.basename(bundle)}.zip"))


def _save(path: str, array: np.ndarray, affine: np.ndarray) -> str:
    import nibabel as nib

    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def _lps_crop(image: np.ndarray, label: np.ndarray, affine: np.ndarray, z: slice):
    """A sub-volume along the last axis, stored flipped in x and y (LPS voxel order): same anatomy, other grid."""
    affine = affine.copy()
    affine[:3, 3] = affine[:3, :3] @ np.array([image.shape[0] - 1, image.shape[1] - 1, z.start]) + affine[:3, 3]
    affine[:3, :2] *= -1
    return image[::-1, ::-1, z].copy(), label[::-1, ::-1, z].copy(), affine


def labelled_volumes(bundle: str, out_dir: str) -> dict[str, tuple[str, str]]:
    """Two real labelled volumes in the bundle's label ids: ``{"full": (image, label), "crop": (image, label)}``.

    "full" is a whole real volume on its own grid (for CT the file in ../shared/data itself); "crop" a few slices of it stored in another orientation (LPS), the
    small one /train trains on. Paths are NIfTI files written into ``out_dir``.
    """
    import nibabel as nib

    os.makedirs(out_dir, exist_ok=True)
    modality = str(_read(bundle, "metadata.json")["network_data_format"]["inputs"]["image"].get("modality", ""))
    ids = labels(bundle)
    if modality.upper() == "CT":
        ct = nib.load(shared_data("ct_nifti_3d", "example_ct_sm.nii.gz"))
        reference = np.asarray(nib.load(shared_data("ct_nifti_3d", "example_seg.nii.gz")).dataobj).astype(np.int64)
        lookup = np.zeros(256, dtype=np.uint8)
        for name, label_id in ids.items():
            if name in TOTALSEGMENTATOR_IDS:
                lookup[TOTALSEGMENTATOR_IDS[name]] = label_id
        image, label, affine = np.asarray(ct.dataobj), lookup[reference], ct.affine
        source = shared_data("ct_nifti_3d", "example_ct_sm.nii.gz")  # posted as it is
    elif modality.upper() == "MR" and set(ids.values()) == {1, 2, 3}:
        import h5py  # ACDC (SSL4MIS h5): 0 background, 1 RV, 2 myocardium, 3 LV, the bundles' ids

        with h5py.File(shared_data("acdc", "patient001_frame01.h5"), "r") as f:
            image = np.asarray(f["image"], dtype=np.float32).transpose(2, 1, 0)
            label = np.asarray(f["label"], dtype=np.uint8).transpose(2, 1, 0)
        affine = np.diag([*ACDC_H5_SPACING, 1.0])
        source = _save(os.path.join(out_dir, "full.nii.gz"), image, affine)
    else:
        raise AssertionError(f"{bundle}: no real labelled sample for modality {modality!r} with labels {ids}; add "
                             f"one to tests/bundle_samples.py")
    depth = image.shape[2]
    crop = _lps_crop(image, label, affine, slice(depth // 3, depth // 3 + max(2, min(10, depth // 2))))
    return {
        "full": (source, _save(os.path.join(out_dir, "full_label.nii.gz"), label, affine)),
        "crop": (_save(os.path.join(out_dir, "crop.nii.gz"), crop[0], crop[2]),
                 _save(os.path.join(out_dir, "crop_label.nii.gz"), crop[1], crop[2])),
    }
