"""Label sets and datalist helpers shared by the bundles and the data preparation tools."""

from __future__ import annotations

import json
import os
import random
import uuid
from collections import Counter, defaultdict
from typing import Callable, Sequence

import numpy as np

__all__ = ["SYNAPSE_ORGANS", "BTCV_TO_SYNAPSE", "btcv_to_synapse", "ACDC_CLASSES", "ACDC_H5_SPACING", "check_labels",
           "write_atomic", "write_atomic_with", "write_json_atomic", "write_nifti_atomic", "write_png_atomic",
           "write_datalist",
           "load_datalist", "grouped_stratified_split", "TMP_PREFIX"]

# TransUNet order: index i is the label value of organ i (0 is background)
SYNAPSE_ORGANS = ("background", "spleen", "right_kidney", "left_kidney", "gallbladder", "liver", "stomach", "aorta",
                  "pancreas")
# BTCV label id -> Synapse 8-organ label; every other BTCV id (esophagus, IVC, veins, adrenals) is background
BTCV_TO_SYNAPSE = {1: 1, 2: 2, 3: 3, 4: 4, 6: 5, 7: 6, 8: 7, 11: 8}
# ACDC label values (the original challenge convention, kept by the SSL4MIS h5 preprocessing)
ACDC_CLASSES = ("background", "right_ventricle", "myocardium", "left_ventricle")
# the SSL4MIS h5 files store no spacing: this typical ACDC spacing (mm; x, y in-plane, z between slices) is written
# into the converted NIfTI headers and used only for HD95 in mm; nothing in the pipeline resamples with it
ACDC_H5_SPACING = (1.5, 1.5, 10.0)


def btcv_to_synapse(label: np.ndarray) -> np.ndarray:
    """Map a BTCV 13-organ label array to the 8 Synapse organs (uint8, TransUNet order)."""
    lookup = np.zeros(256, dtype=np.uint8)
    for btcv_id, synapse_id in BTCV_TO_SYNAPSE.items():
        lookup[btcv_id] = synapse_id
    values = np.rint(label).astype(np.int64)
    if values.min() < 0 or values.max() > 13:
        raise ValueError(f"BTCV labels must lie in 0..13, found {values.min()}..{values.max()}.")
    return lookup[values]


def check_labels(label: np.ndarray, num_classes: int, source: str) -> np.ndarray:
    """``label`` as uint8 when every value is an integer in ``0 .. num_classes - 1``; a clear error naming ``source``
    otherwise."""
    values = np.unique(np.asarray(label))
    bad = [v for v in values.tolist() if v != int(v) or not 0 <= v < num_classes]
    if bad:
        raise ValueError(f"{source}: label values must be integers in 0..{num_classes - 1}, found {bad[:5]}.")
    return np.rint(label).astype(np.uint8)


def first_line(error: BaseException) -> str:
    """The error's first line (its type's name when it has no text), for one-line reports."""
    return str(error).splitlines()[0] if str(error) else type(error).__name__


TMP_PREFIX = ".tmp_"  # files being written; tools/infer.py removes leftovers of a killed run from OUTPUT_DIR


def write_atomic_with(path: str, write: Callable[[str], None], suffix: str = "") -> None:
    """``write(tmp)`` to a fresh temporary file in the target folder, then rename it to ``path``: never a
    half-written file under ``path``, and the temporary file is removed if ``write`` fails."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # a unique name the writer creates itself (not mkstemp's 0600 file): outputs keep the umask's permissions
    tmp = os.path.join(folder, f"{TMP_PREFIX}{uuid.uuid4().hex}{suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_atomic(path: str, data: str | bytes) -> None:
    """Write text (UTF-8) or bytes atomically (see ``write_atomic_with``)."""

    def write(tmp: str) -> None:
        if isinstance(data, bytes):
            with open(tmp, "wb") as f:
                f.write(data)
        else:
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                f.write(data)

    write_atomic_with(path, write)


def write_nifti_atomic(array: np.ndarray, affine: np.ndarray, path: str) -> str:
    """Save a NIfTI atomically (the temporary name keeps ``.nii.gz`` / ``.nii`` so nibabel compresses alike)."""
    import nibabel as nib

    suffix = ".nii.gz" if path.endswith(".nii.gz") else os.path.splitext(path)[1]
    write_atomic_with(path, lambda tmp: nib.save(nib.Nifti1Image(array, affine), tmp), suffix)
    return path


def write_png_atomic(array: np.ndarray, path: str) -> None:
    """Save a 2D (grey) or 3D (RGB) uint8 array as a PNG atomically."""
    from PIL import Image

    write_atomic_with(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"), ".png")


def write_json_atomic(path: str, content: object) -> None:
    """Write JSON atomically (see ``write_atomic``)."""
    write_atomic(path, json.dumps(content, indent=2))


def write_datalist(path: str, training: Sequence[dict], validation: Sequence[dict] = (),
                   test: Sequence[dict] = (), **extra: object) -> dict:
    """Write a MONAI datalist (``training``/``validation``/``test`` lists of dicts) with the ``image`` and ``label``
    paths (absolute, or relative to the working directory) stored relative to the datalist's folder. A ``label``
    that is not a path (a class index) is stored as it is."""
    root = os.path.dirname(os.path.abspath(path))

    def relative(items: Sequence[dict]) -> list[dict]:
        return [{k: os.path.relpath(os.path.abspath(v), root) if k in ("image", "label") and isinstance(v, str) else v
                 for k, v in item.items()} for item in items]

    datalist = {**extra, "training": relative(training), "validation": relative(validation), "test": relative(test)}
    write_json_atomic(path, datalist)
    return datalist


def load_datalist(path: str, key: str) -> list[dict]:
    """The ``key`` list of a datalist file, with relative paths resolved against the file's folder (a ``label`` that
    is a class index is left as it is)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: datalist not found (prepare the data with tools/prepare_*.py).")
    with open(path) as f:
        datalist = json.load(f)
    if key not in datalist:
        raise KeyError(f"{path}: no {key!r} list (found {sorted(datalist)}).")
    root = os.path.dirname(os.path.abspath(path))
    return [{k: os.path.normpath(os.path.join(root, v)) if k in ("image", "label") and isinstance(v, str)
             and not os.path.isabs(v) else v
             for k, v in item.items()} for item in datalist[key]]


def grouped_stratified_split(items: Sequence[dict], fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0,
                             group_key: str = "group", label_key: str = "label") -> list[list[dict]]:
    """Split ``items`` into ``len(fractions)`` lists so that every group (patient, source paper) lies in one list and
    each class is spread over the lists in about the given fractions of its images.

    Per class (a group's class is its most frequent label), the groups are shuffled with ``seed``, ordered largest
    first (ties in shuffled order) and each is given to the list furthest below its target share of that class's
    images. Lists keep the items' input order. With at least as many groups of a class as lists of non-zero fraction,
    every such list receives that class.
    """
    if not fractions or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"fractions must be non-negative with a positive sum, got {list(fractions)}.")
    weights = np.asarray(fractions, dtype=np.float64) / float(sum(fractions))
    members: dict[str, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        members[str(item[group_key])].append(i)
    by_class: dict[int, list[str]] = defaultdict(list)
    for group, indices in members.items():
        counts = Counter(int(items[i][label_key]) for i in indices)
        by_class[min(counts, key=lambda c: (-counts[c], c))].append(group)
    rng = random.Random(seed)
    assignment: dict[str, int] = {}
    for label in sorted(by_class):
        groups = sorted(by_class[label])
        rng.shuffle(groups)
        groups.sort(key=lambda g: -len(members[g]))  # stable: equal sizes stay in shuffled order
        total = sum(len(members[g]) for g in groups)
        counts = np.zeros(len(weights))
        for group in groups:
            empty = [i for i in range(len(weights)) if weights[i] > 0 and counts[i] == 0]
            if len(empty) > 0 and len(groups) - groups.index(group) <= len(empty):
                target = empty[0]  # just enough groups left to give every list this class
            else:
                target = int(np.argmax(weights * total - counts))
            assignment[group] = target
            counts[target] += len(members[group])
    splits: list[list[dict]] = [[] for _ in weights]
    for item in items:
        splits[assignment[str(item[group_key])]].append(item)
    return splits
