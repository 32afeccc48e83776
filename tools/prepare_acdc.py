"""Write a MONAI datalist for the ACDC cardiac cine MRI bundle, split by patient.

Each datalist item is one cardiac phase of one patient: ``image`` and ``label`` NIfTI paths (image intensities as
acquired or as preprocessed; labels 0 background, 1 RV, 2 MYO, 3 LV) and ``case``, ``patient``, ``phase`` (ED/ES),
``group``. Layouts:

* ``nifti``: the original ACDC release, ``patientXXX/patientXXX_frameYY.nii.gz`` + ``..._gt.nii.gz`` and
  ``Info.cfg`` (``ED: n``, ``ES: n``, ``Group: ...``); the folder is searched recursively (``training/``,
  ``testing/``), and the datalist points at the original files (nothing is copied).
* ``h5``: the SSL4MIS preprocessing (``patientXXX_frame01.h5`` = ED, ``frame02`` = ES; ``image`` float in [0, 1] and
  ``label`` uint8, arrays in SimpleITK order (z, y, x)). Each file becomes ``imagesTr/<case>.nii.gz`` and
  ``labelsTr/<case>.nii.gz`` in NIfTI voxel order (``array.transpose(2, 1, 0)``); the h5 files carry no spacing, so
  the typical ACDC spacing ``networks.data.ACDC_H5_SPACING`` (1.5 x 1.5 x 10 mm) is written: an assumption that
  only HD95 in mm depends on.

* ``both``: an h5 folder and an original-layout folder into one datalist (``both H5_DIR NIFTI_DIR OUT_DIR``); a
  patient found in both is taken from the original files (raw intensities, real headers) and counted.

Patients named in ``validation`` go to the ``validation`` list, with both phases; by default one patient per ACDC
pathology group among the patients found: 2, 28, 59, 68 or 85 where present (the shipped weights' validation
patients), else one drawn with ``seed`` from that group. The group comes from ``Info.cfg``, or for h5 files from the
training set's ordering (patients 1-20 DCM, 21-40 HCM, 41-60 MINF, 61-80 NOR, 81-100 RV). Patients 101-150 of the
original release (the challenge test set) go to ``test``; the rest to ``training``.

Examples::

    python tools/prepare_acdc.py h5 ../shared/data/acdc data/acdc
    python tools/prepare_acdc.py nifti /data/ACDC/database data/acdc --validation "[2, 28, 59, 68, 85]"
    python tools/prepare_acdc.py both ../shared/data/acdc ../shared/data/acdc_nifti data/acdc48
"""

from __future__ import annotations

import glob
import os
import re

import fire
import numpy as np

from networks.data import ACDC_CLASSES, ACDC_H5_SPACING, check_labels, write_datalist, write_nifti_atomic

# one patient per ACDC group among the 23 sample patients: DCM, HCM, MINF, NOR, abnormal RV
DEFAULT_VALIDATION = (2, 28, 59, 68, 85)
TEST_PATIENTS = range(101, 151)  # the ACDC challenge test set of the original release


def _patient_id(name: str, source: str) -> int:
    found = re.findall(r"patient(\d+)", name)
    if not found:
        raise ValueError(f"{source}: the name holds no patientXXX id.")
    return int(found[0])


def read_info(path: str) -> dict[str, str]:
    """``Info.cfg`` as a dict (``ED``, ``ES``, ``Group``, ...); a clear error when ED or ES is missing."""
    info = {}
    with open(path) as f:
        for line in f:
            if ":" in line:
                key, value = line.split(":", 1)
                info[key.strip()] = value.strip()
    for key in ("ED", "ES"):
        if not re.fullmatch(r"\d+", info.get(key, "")):
            raise ValueError(f"{path}: no integer {key} frame (found {info.get(key)!r}).")
    return info


def training_set_group(patient: int) -> str:
    """The pathology group of an ACDC training-set patient from its id (the release orders them by group)."""
    groups = ("DCM", "HCM", "MINF", "NOR", "RV")
    return groups[(patient - 1) // 20] if 1 <= patient <= 100 else ""


def default_validation(cases: list[dict], seed: int = 0) -> tuple[int, ...]:
    """One patient per pathology group among ``cases`` (test-set patients excluded): the shipped weights' validation
    patient of that group where present, else one drawn with ``seed``."""
    import random

    by_group: dict[str, list[int]] = {}
    for case in cases:
        if case["patient"] not in TEST_PATIENTS:
            by_group.setdefault(case.get("group") or training_set_group(case["patient"]), []).append(case["patient"])
    chosen = []
    for group in sorted(by_group):
        patients = sorted(set(by_group[group]))
        preferred = [p for p in patients if p in DEFAULT_VALIDATION]
        chosen.append(preferred[0] if preferred else random.Random(f"{seed}-{group}").choice(patients))
    return tuple(sorted(chosen))


def _split(cases: list[dict], validation: tuple[int, ...] | None, source: str,
           seed: int = 0) -> tuple[list[dict], list[dict], list[dict]]:
    wanted = {int(v) for v in (default_validation(cases, seed) if validation is None else validation)}
    found = {c["patient"] for c in cases}
    missing = wanted - found
    if missing:
        raise ValueError(f"{source}: validation patients {sorted(missing)} are not among the patients found "
                         f"({sorted(found)}).")
    test = [c for c in cases if c["patient"] in TEST_PATIENTS and c["patient"] not in wanted]
    valid = [c for c in cases if c["patient"] in wanted]
    training = [c for c in cases if c not in test and c not in valid]
    return training, valid, test


def _write(out_dir: str, cases: list[dict], validation: tuple[int, ...] | None, source: str, **extra: object) -> str:
    training, valid, test = _split(cases, validation, source)
    path = os.path.join(out_dir, "datalist.json")
    write_datalist(path, training, valid, test, source=source,
                   validation_patients=sorted({c["patient"] for c in valid}), labels=list(ACDC_CLASSES), **extra)
    return path


def nifti(src: str, out_dir: str, validation: tuple[int, ...] | None = None) -> str:
    """Index the original ACDC release: ED and ES frames (from each ``Info.cfg``) with their ``_gt`` labels.

    A patient whose files are missing or unreadable is reported and skipped; the labels are checked to lie in 0..3.
    """
    cases, skipped = nifti_cases(src)
    return _write(out_dir, cases, validation, f"ACDC NIfTI ({src})", skipped=skipped)


def nifti_cases(src: str) -> tuple[list[dict], list[str]]:
    """The datalist items of an original-layout folder, and the patients skipped (with the reason)."""
    import nibabel as nib

    cases, skipped = [], []
    for info_path in sorted(glob.glob(os.path.join(src, "**", "Info.cfg"), recursive=True)):
        folder = os.path.dirname(info_path)
        try:
            patient = _patient_id(os.path.basename(folder), folder)
            info = read_info(info_path)
            for phase in ("ED", "ES"):
                stem = os.path.join(folder, f"patient{patient:03d}_frame{int(info[phase]):02d}")
                image, label = stem + ".nii.gz", stem + "_gt.nii.gz"
                for path in (image, label):
                    if not os.path.isfile(path):
                        raise FileNotFoundError(f"{path}: {phase} frame {info[phase]} of {info_path} not found.")
                image_shape = nib.load(image).shape
                label_img = nib.load(label)
                if tuple(image_shape) != tuple(label_img.shape):
                    raise ValueError(f"{label}: shape {label_img.shape} differs from the image's {image_shape}.")
                check_labels(np.asarray(label_img.dataobj), len(ACDC_CLASSES), label)
                cases.append({"image": image, "label": label, "case": f"patient{patient:03d}_{phase}",
                              "patient": patient, "phase": phase, "group": info.get("Group", "")})
        except (OSError, ValueError) as e:
            print(f"skipped {folder}: {e}")
            skipped.append(f"{folder}: {e}")
            cases = [c for c in cases if os.path.dirname(c["image"]) != folder]
    if not cases:
        raise FileNotFoundError(f"{src}: no readable patientXXX/Info.cfg with ED/ES frames found.")
    return cases, skipped


def h5(src: str, out_dir: str, validation: tuple[int, ...] | None = None,
       spacing: tuple[float, float, float] = ACDC_H5_SPACING) -> str:
    """Convert the SSL4MIS h5 volumes (``patientXXX_frame01.h5`` ED, ``frame02`` ES) to NIfTI.

    ``spacing`` (mm, x y z) is written into the headers because the h5 files have none. A corrupt file is reported
    and skipped.
    """
    cases, skipped = h5_cases(src, out_dir, spacing)
    return _write(out_dir, cases, validation, f"ACDC SSL4MIS h5 ({src})", skipped=skipped,
                  assumed_spacing_mm=list(map(float, spacing)))


def both(h5_src: str, nifti_src: str, out_dir: str, validation: tuple[int, ...] | None = None,
         spacing: tuple[float, float, float] = ACDC_H5_SPACING) -> str:
    """One datalist of an h5 folder and an original-layout folder; a patient in both comes from the original files."""
    originals, skipped = nifti_cases(nifti_src)
    converted, skipped_h5 = h5_cases(h5_src, out_dir, spacing)
    in_nifti = {c["patient"] for c in originals}
    duplicates = sorted({c["patient"] for c in converted} & in_nifti)
    if duplicates:
        print(f"patients in both folders, taken from {nifti_src}: {duplicates}")
    cases = sorted(originals + [c for c in converted if c["patient"] not in in_nifti],
                   key=lambda c: (c["patient"], c["phase"]))
    return _write(out_dir, cases, validation, f"ACDC SSL4MIS h5 ({h5_src}) + NIfTI ({nifti_src})",
                  skipped=skipped + skipped_h5, duplicates_from_nifti=duplicates,
                  assumed_spacing_mm_h5=list(map(float, spacing)))


def h5_cases(src: str, out_dir: str, spacing: tuple[float, float, float] = ACDC_H5_SPACING
             ) -> tuple[list[dict], list[str]]:
    """Convert the h5 volumes of ``src`` into ``out_dir``; their datalist items, and the files skipped."""
    import h5py

    paths = sorted(glob.glob(os.path.join(src, "patient*_frame*.h5")))
    if not paths:
        raise FileNotFoundError(f"{src}: no patientXXX_frameYY.h5 files found.")
    affine = np.diag([*map(float, spacing), 1.0])
    cases, skipped = [], []
    for path in paths:
        try:
            patient = _patient_id(os.path.basename(path), path)
            frame = int(re.findall(r"frame(\d+)", os.path.basename(path))[0])
            if frame not in (1, 2):
                raise ValueError(f"{path}: SSL4MIS names ED frame01 and ES frame02, found frame{frame:02d}.")
            with h5py.File(path, "r") as f:
                if "image" not in f or "label" not in f:
                    raise ValueError(f"{path}: needs 'image' and 'label' datasets, found {sorted(f.keys())}.")
                image, label = f["image"][()], f["label"][()]
            if image.ndim != 3 or image.shape != label.shape:
                raise ValueError(f"{path}: image {image.shape} and label {label.shape} must be equal 3D shapes.")
            phase = "ED" if frame == 1 else "ES"
            case = f"patient{patient:03d}_{phase}"
            label = check_labels(label, len(ACDC_CLASSES), path)
            # SimpleITK order (z, y, x) -> NIfTI voxel order (x, y, z)
            cases.append({
                "image": write_nifti_atomic(image.astype(np.float32).transpose(2, 1, 0), affine,
                                            os.path.join(out_dir, "imagesTr", f"{case}.nii.gz")),
                "label": write_nifti_atomic(label.transpose(2, 1, 0), affine,
                                            os.path.join(out_dir, "labelsTr", f"{case}.nii.gz")),
                "case": case, "patient": patient, "phase": phase, "group": training_set_group(patient)})
        except (OSError, ValueError) as e:
            print(f"skipped {path}: {e}")
            skipped.append(f"{path}: {e}")
    if not cases:
        raise ValueError(f"{src}: every h5 file failed: {skipped}")
    return cases, skipped


if __name__ == "__main__":
    fire.Fire({"nifti": nifti, "h5": h5, "both": both})
