"""Converters for the LiteNeXt 2D segmentation bundles: each dataset's original layout -> one common layout.

``python tools/prepare_litenext.py DATASET SOURCE OUTPUT [--seed 42] [--fractions 0.8,0.1,0.1]`` with DATASET one of
``dsb2018 glas isic2018 ph2 sunnybrook lungxray acdc_lv``. OUTPUT receives

* ``images/<case>.png``: 8-bit RGB (grey images replicated, DICOM scaled by its window or range);
* ``masks/<case>.png``: 8-bit 0/1 mask (1 = foreground) of the same height and width;
* ``datalist.json``: MONAI datalist, ``training``/``validation``/``test`` lists of ``{"image", "label", "case"}``,
  plus ``dataset``, ``split_seed`` and ``fractions``. The split is reproducible from the seed; cases of one patient
  (Sunnybrook) stay on one side, and a diagnosis (PH2) or normal/abnormal label (lung X-ray) is stratified.

Layouts read (searched recursively under SOURCE):

* ``dsb2018``: Kaggle ``stage1_train/<id>/images/<id>.png`` + ``<id>/masks/*.png`` (one mask per nucleus, merged), or
  the 96x96 preprocessing ``images/<id>.png`` + ``masks/0/<id>.png`` (or ``masks/<id>.png``; masks thresholded at 127).
* ``glas``: ``train_XX.bmp`` + ``train_XX_anno.bmp`` (instance labels; any label > 0 is gland), or PNG copies with
  binary masks of the same name in a ``labels/`` (or ``masks/``) folder; ``testA_*``/``testB_*`` form the test list
  (the challenge's test sets), ``train_*`` is split into training and validation by patient (``Grade.csv``); each
  item keeps its GlaS split name as ``split``.
* ``isic2018``: ISIC 2018 Task 1 or ISIC 2017 Part 1, ``ISIC_XXXXXXX.jpg`` + ``ISIC_XXXXXXX_segmentation.png`` paired
  by id; a mask of another size than its image is resized to the image's with nearest-neighbour.
* ``ph2``: ``IMDXXX/IMDXXX_Dermoscopic_Image/IMDXXX.bmp`` + ``IMDXXX/IMDXXX_lesion/IMDXXX_lesion.bmp``; the diagnosis
  from ``PH2_dataset.txt`` or ``PH2_diagnosis_subset.tsv`` (when present) stratifies the split.
* ``sunnybrook``: Sunnybrook Cardiac Data, DICOM images (``IM-SSSS-NNNN.dcm``) and expert contours
  ``IM-SSSS-NNNN-icontour-manual.txt`` (``x y`` per line, pixel coordinates); ``--contour i`` (default) masks the LV
  cavity inside the i-contour (endocardium), ``--contour o`` the whole LV inside the o-contour (epicardium). The
  patient is the folder that holds ``contours-manual`` (or the contour file's top folder under SOURCE); images are
  matched by name within the same patient folder. The common repackaging is read too: ``link.csv`` (``patient_id``,
  ``original_id``), ``dicoms/<patient_id>/<frame>.dcm`` and ``contourfiles/<original_id>/{i,o}-contours/
  IM-0001-NNNN-{i,o}contour-manual.txt``, contour NNNN going with frame int(NNNN); the patient is the original id.
* ``lungxray``: Montgomery (``CXR_png/MCUCXR_XXXX_N.png`` + ``ManualMask/leftMask/`` and ``rightMask/`` of the same
  name), Shenzhen (``CXR_png/CHNCXR_XXXX_N.png`` + ``mask/CHNCXR_XXXX_N_mask.png``) and JSRT converted to PNG with
  the SCR masks (``.../left lung/JPCLN001.gif`` + ``.../right lung/JPCLN001.gif``): the mask is left | right lung.
  The trailing ``_0``/``_1`` of Montgomery/Shenzhen names (normal/abnormal) stratifies the split.
* ``acdc_lv``: a folder written by ``tools/prepare_acdc.py``; each short-axis slice showing the LV cavity (label 3)
  becomes a pair (``<case>_sNN``), in DICOM display orientation, grouped by patient: Sunnybrook pretraining data.

A pair that cannot be read (corrupt file, mask of another size) is reported by name and skipped; the conversion goes on.
Each file is written under a temporary name and renamed.
"""

from __future__ import annotations

import csv
import functools
import glob
import json
import logging
import os
import re
import sys
from typing import Callable, Iterable, Sequence

import fire
import numpy as np

from networks.image_io import IMAGE_SUFFIXES, read_image_rgb, unit_range
from networks.data import first_line, write_datalist, write_png_atomic
from networks.segmentation2d import read_mask, split_cases

log = logging.getLogger("prepare_litenext")


def _walk(root: str) -> list[str]:
    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        found += [os.path.join(folder, f) for f in sorted(files) if not f.startswith(".")]
    return found


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


class Pair(dict):
    """One case to convert: ``case`` name, ``image`` path (or a callable giving the 8-bit RGB array), ``masks`` (paths
    whose union is the mask, or a callable giving the mask for the image's shape), optional ``stratum``, ``group``,
    ``subset`` (``test`` to force), ``resize_mask`` (a mask of another size is brought to the image's with
    nearest-neighbour instead of refused) and ``error`` (the case could not be read: reported as failed)."""


def resize_nearest(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A 0/1 ``(H, W)`` mask resampled to ``shape`` (height, width) with nearest-neighbour (stays 0/1)."""
    from PIL import Image

    return np.asarray(Image.fromarray(mask).resize((shape[1], shape[0]), Image.NEAREST), dtype=np.uint8)


def convert(pairs: Sequence[Pair], output: str, dataset: str, seed: int = 42,
            fractions: Sequence[float] = (0.8, 0.1, 0.1), threshold: float = 0.5) -> dict:
    """Write every pair in the common layout and the datalist; returns the datalist."""
    if not pairs:
        raise ValueError(f"no {dataset} image/mask pairs found; see tools/prepare_litenext.py for the layouts read.")
    converted, failed = [], []
    for pair in pairs:
        image_path = os.path.join(output, "images", f"{pair['case']}.png")
        mask_path = os.path.join(output, "masks", f"{pair['case']}.png")
        try:
            if pair.get("error"):
                raise ValueError(pair["error"])
            image = pair["image"]() if callable(pair["image"]) else \
                np.round(read_image_rgb(pair["image"]) * 255).astype(np.uint8)
            masks = pair["masks"]
            if callable(masks):
                mask = masks(image.shape[:2])
            else:
                if not masks:
                    raise ValueError(f"{pair['image']}: no mask file found for this image.")
                mask = np.zeros(image.shape[:2], dtype=np.uint8)
                for path in masks:
                    part = read_mask(path, threshold)
                    if part.shape != mask.shape and pair.get("resize_mask"):
                        part = resize_nearest(part, mask.shape)
                    if part.shape != mask.shape:
                        raise ValueError(f"{path}: mask size {part.shape[::-1]} differs from image {pair['image']} "
                                         f"{mask.shape[::-1]} (width x height).")
                    mask |= part
            write_png_atomic(image, image_path)
            write_png_atomic(mask.astype(np.uint8), mask_path)
        except Exception as e:  # one bad case is reported and skipped
            message = first_line(e)
            log.error("skipped %s: %s", pair["case"], message)
            failed.append({"case": pair["case"], "message": message})
            continue
        item = {"image": image_path, "label": mask_path, "case": pair["case"]}
        item.update({k: pair[k] for k in ("stratum", "group", "split") if k in pair})
        converted.append((item, pair.get("subset")))
    training, validation, test = assign_splits(converted, fractions, seed)
    datalist = write_datalist(os.path.join(output, "datalist.json"), training, validation, test, dataset=dataset,
                              split_seed=seed, fractions=list(fractions), failed=failed)
    log.info("%s: %d training, %d validation, %d test, %d skipped -> %s", dataset, len(training), len(validation),
             len(test), len(failed), output)
    return datalist


def assign_splits(items: Sequence[tuple[dict, str | None]], fractions: Sequence[float], seed: int) -> list[list[dict]]:
    """Training/validation/test lists of ``(item, subset)`` pairs: a ``test`` subset (the dataset's own test set)
    is the test list and the rest is split into training/validation; otherwise all are split by ``fractions``."""
    fixed_test = [item for item, subset in items if subset == "test"]
    rest = [item for item, subset in items if subset != "test"]
    if fixed_test:
        train_share = fractions[0] / (fractions[0] + fractions[1])
        return [*split_cases(rest, (train_share, 1 - train_share), seed, group_key="group"), fixed_test]
    return split_cases(rest, fractions, seed, group_key="group")


def split_of(pairs: Sequence[Pair], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 42) -> list[list[str]]:
    """The case names ``convert`` puts in training/validation/test when every pair converts (nothing is written)."""
    items = [({"case": p["case"], **{k: p[k] for k in ("stratum", "group") if k in p}}, p.get("subset")) for p in pairs]
    return [[item["case"] for item in part] for part in assign_splits(items, fractions, seed)]


# ------------------------------------------------------------------------------------------------------ the layouts
def dsb2018_pairs(source: str) -> list[Pair]:
    """Kaggle stage1_train (per-nucleus masks, merged) or the 96x96 ``images/`` + ``masks/0/`` preprocessing."""
    pairs = []
    for image in _walk(source):
        parts = image.split(os.sep)
        if len(parts) < 2 or parts[-2] != "images" or not image.lower().endswith(".png"):
            continue
        case, parent = _stem(image), os.path.dirname(os.path.dirname(image))
        if os.path.basename(parent) == case:  # stage1_train/<id>/images/<id>.png
            masks = sorted(glob.glob(os.path.join(parent, "masks", "*.png")))
        else:
            masks = [p for p in (os.path.join(parent, "masks", "0", f"{case}.png"),
                                 os.path.join(parent, "masks", f"{case}.png")) if os.path.isfile(p)][:1]
        pairs.append(Pair(case=case, image=image, masks=masks))
    return pairs


def _glas_patients(source: str) -> dict[str, str]:
    """Image name -> patient id from the release's ``Grade.csv`` (``name,patient ID,...``), when present."""
    patients = {}
    for path in _walk(source):
        if os.path.basename(path).lower() == "grade.csv":
            with open(path, newline="", errors="replace") as f:
                for row in csv.reader(f):
                    if len(row) >= 2 and re.fullmatch(r"(train|testA|testB)_\d+", row[0].strip(), re.IGNORECASE):
                        patients[row[0].strip()] = f"patient_{row[1].strip()}"
    return patients


def glas_pairs(source: str) -> list[Pair]:
    """GlaS: the original release, ``<split>_<n>.bmp`` + ``<split>_<n>_anno.bmp`` (integer gland ids, any id > 0 is
    gland), or a copy of PNG images with binary masks of the same name in another folder (``images/train_1.png`` +
    ``labels/train_1.png``, or ``<name>_anno.png``). testA/testB form the test list; the split name is kept as
    ``split`` and the patient from ``Grade.csv`` as ``group``, so training and validation never share a patient."""
    files = _walk(source)
    patients = _glas_patients(source)
    images, masks = {}, {}
    for path in files:
        stem, ext = _stem(path), os.path.splitext(path)[1].lower()
        if ext not in (".bmp", ".png"):
            continue
        if stem.lower().endswith("_anno"):
            masks[stem[: -len("_anno")]] = path
        elif re.search(r"(^|[\\/])(labels?|masks?|annotations?|gt|ground_?truth)[\\/]", os.path.relpath(path, source),
                       re.IGNORECASE):
            masks.setdefault(stem, path)
        else:
            images.setdefault(stem, path)
    pairs = []
    for case, image in sorted(images.items()):
        match = re.fullmatch(r"(train|testA|testB)_(\d+)", case, re.IGNORECASE)
        if not match:
            continue
        pair = Pair(case=case, image=image, masks=[masks[case]] if case in masks else [], split=match.group(1),
                    subset="test" if match.group(1).lower().startswith("test") else None)
        if case in patients:
            pair["group"] = patients[case]
        pairs.append(pair)
    return pairs


def isic2018_pairs(source: str) -> list[Pair]:
    """ISIC 2018 Task 1 or ISIC 2017 Part 1: ``ISIC_<n>.jpg`` + ``ISIC_<n>_segmentation.png`` anywhere under SOURCE
    (``ISIC2018_Task1-2_Training_Input`` + ``ISIC2018_Task1_Training_GroundTruth``, or ``ISIC-2017_Training_Data`` +
    ``ISIC-2017_Training_Part1_GroundTruth``), paired by id; ``ISIC_<n>_superpixels.png`` files are not images. A mask
    at another size than its image (downsized copies of the images) is resized to it with nearest-neighbour."""
    files = _walk(source)
    masks = {os.path.basename(p)[: -len("_segmentation.png")]: p for p in files if p.endswith("_segmentation.png")}
    return [Pair(case=_stem(p), image=p, masks=[masks[_stem(p)]] if _stem(p) in masks else [], resize_mask=True)
            for p in files if re.fullmatch(r"ISIC_\d+\.jpe?g", os.path.basename(p), re.IGNORECASE)]


def _ph2_diagnoses(source: str) -> dict[str, int]:
    diagnoses = {}
    for path in _walk(source):
        if os.path.basename(path) in ("PH2_dataset.txt", "PH2_diagnosis_subset.tsv"):
            with open(path, errors="replace") as f:
                for line in f:
                    cells = [c.strip() for c in re.split(r"\||\t", line) if c.strip()]
                    if len(cells) >= 2 and re.fullmatch(r"IMD\d+", cells[0]) and cells[1].isdigit():
                        diagnoses[cells[0]] = int(cells[1])
    return diagnoses


def ph2_pairs(source: str) -> list[Pair]:
    """PH2: ``IMDXXX/IMDXXX_Dermoscopic_Image/IMDXXX.bmp`` + ``IMDXXX/IMDXXX_lesion/IMDXXX_lesion.bmp``."""
    diagnoses = _ph2_diagnoses(source)
    pairs = []
    for image in _walk(source):
        case = _stem(image)
        if os.path.basename(os.path.dirname(image)) != f"{case}_Dermoscopic_Image":
            continue
        lesion = os.path.join(os.path.dirname(os.path.dirname(image)), f"{case}_lesion", f"{case}_lesion.bmp")
        pair = Pair(case=case, image=image, masks=[lesion] if os.path.isfile(lesion) else [])
        if case in diagnoses:
            pair["stratum"] = diagnoses[case]
        pairs.append(pair)
    return pairs


def contour_mask(contour_file: str, shape: tuple[int, int]) -> np.ndarray:
    """The filled polygon of a Sunnybrook contour file (``x y`` pixel coordinates per line) as a 0/1 mask."""
    from PIL import Image, ImageDraw

    try:
        points = np.loadtxt(contour_file, dtype=np.float64, ndmin=2)
    except ValueError as e:
        raise ValueError(f"{contour_file}: not a contour file of 'x y' lines ({e}).") from e
    if points.shape[1] != 2 or len(points) < 3:
        raise ValueError(f"{contour_file}: a contour needs at least 3 'x y' points, got shape {points.shape}.")
    canvas = Image.new("L", (shape[1], shape[0]), 0)
    ImageDraw.Draw(canvas).polygon([(float(x), float(y)) for x, y in points], fill=1, outline=1)
    return np.asarray(canvas, dtype=np.uint8)


def _sunnybrook_links(files: Sequence[str]) -> dict[str, str]:
    """Original id (SC-HF-I-1) -> the repackaging's patient folder (SCD0000101) from its ``link.csv``."""
    links = {}
    for path in files:
        if os.path.basename(path).lower() == "link.csv":
            with open(path, newline="", errors="replace") as f:
                for row in csv.DictReader(f):
                    if row.get("patient_id") and row.get("original_id"):
                        links[row["original_id"].strip()] = row["patient_id"].strip()
    return links


def _sunnybrook_repackaged_pairs(source: str, files: Sequence[str], links: dict[str, str], contour: str) -> list[Pair]:
    """The common repackaging: ``link.csv``, ``dicoms/<patient_id>/<frame>.dcm`` and
    ``contourfiles/<original_id>/<contour>-contours/IM-0001-NNNN-<contour>contour-manual.txt`` (NNNN is the frame)."""
    frames = {}
    for path in files:
        parts = os.path.relpath(path, source).split(os.sep)
        if len(parts) >= 2 and re.fullmatch(r"\d+\.dcm", parts[-1], re.IGNORECASE):
            frames[(parts[-2], int(_stem(path)))] = path
    pairs = []
    for path in files:
        match = re.fullmatch(rf"IM-\d+-(\d+)-{contour}contour-manual\.txt", os.path.basename(path))
        original = os.path.relpath(path, source).split(os.sep)
        original = next((p for p in original if p in links), None)
        if not match or original is None:
            continue
        image = frames.get((links[original], int(match.group(1))))
        if image is None:
            log.error("skipped %s: no frame %s.dcm for patient %s (%s)", path, int(match.group(1)), original,
                      links[original])
            continue
        pairs.append(Pair(case=f"{original}_{_stem(path)[: -len(f'-{contour}contour-manual')]}", image=image,
                          group=original, masks=lambda shape, c=path: contour_mask(c, shape)))
    return pairs


def sunnybrook_pairs(source: str, contour: str = "i") -> list[Pair]:
    """Sunnybrook: each ``IM-SSSS-NNNN-<contour>contour-manual.txt`` with the DICOM ``IM-SSSS-NNNN(.dcm)`` of its
    patient (the original release), or the common repackaging with ``link.csv``."""
    if contour not in ("i", "o"):
        raise ValueError(f"contour must be 'i' (endocardium) or 'o' (epicardium), got {contour!r}.")
    files = _walk(source)
    links = _sunnybrook_links(files)
    if links:
        return _sunnybrook_repackaged_pairs(source, files, links, contour)
    pairs = []
    for path in files:
        match = re.fullmatch(rf"(IM-\d+-\d+)-{contour}contour-manual\.txt", os.path.basename(path))
        if not match:
            continue
        relative = os.path.relpath(path, source).split(os.sep)
        patient = relative[relative.index("contours-manual") - 1] if "contours-manual" in relative[1:] else relative[0]
        image_name = match.group(1)
        candidates = [p for p in files if _stem(p) == image_name and not p.endswith(".txt")
                      and patient in os.path.relpath(p, source).split(os.sep)]
        if not candidates:
            log.error("skipped %s: no DICOM image %s for patient %s", path, image_name, patient)
            continue
        pairs.append(Pair(case=f"{patient}_{image_name}", image=candidates[0], group=patient,
                          masks=lambda shape, c=path: contour_mask(c, shape)))
    return pairs


@functools.lru_cache(maxsize=2)
def _volume(path: str) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.load(path).dataobj)


def _acdc_slice_rgb(path: str, index: int) -> np.ndarray:
    grey = unit_range(_volume(path)[:, :, index].T)  # as read_image_rgb scales a DICOM without a display window
    return np.repeat(np.round(grey * 255).astype(np.uint8)[..., None], 3, axis=-1)


def acdc_lv_pairs(source: str) -> list[Pair]:
    """ACDC's LV cavity (label 3) as 2D pairs, from a folder written by ``tools/prepare_acdc.py`` (``datalist.json``
    and its NIfTI volumes): every short-axis slice that shows the cavity, transposed to the DICOM display orientation
    (RV on the viewer's left, as in Sunnybrook), scaled by its own range as a DICOM without a display window is;
    grouped by patient. Pretraining data for the Sunnybrook bundle (same modality and structure)."""
    import nibabel as nib

    datalist_path = os.path.join(source, "datalist.json")
    if not os.path.isfile(datalist_path):
        raise FileNotFoundError(f"{datalist_path}: not found; write it with tools/prepare_acdc.py first.")
    with open(datalist_path) as f:
        datalist = json.load(f)
    pairs = []
    for item in datalist.get("training", []) + datalist.get("validation", []):
        image, label = (os.path.join(source, item[k]) for k in ("image", "label"))
        try:
            cavity = np.asarray(nib.load(label).dataobj) == 3
        except Exception as e:  # convert lists it under the datalist's failed
            pairs.append(Pair(case=item["case"], image=image, masks=[], error=f"{label}: {first_line(e)}"))
            continue
        for index in np.flatnonzero(cavity.any(axis=(0, 1))):
            pairs.append(Pair(case=f"{item['case']}_s{index:02d}", group=f"patient{int(item['patient']):03d}",
                              image=functools.partial(_acdc_slice_rgb, image, int(index)),
                              masks=lambda shape, c=cavity[:, :, index].T: c.astype(np.uint8)))
    return pairs


def lungxray_pairs(source: str) -> list[Pair]:
    """Montgomery (left/right masks), Shenzhen (``_mask`` files) and JSRT/SCR (left/right lung GIFs)."""
    files = _walk(source)
    by_stem: dict[str, list[str]] = {}
    for path in files:
        by_stem.setdefault(_stem(path), []).append(path)
    pairs = []
    for image in files:
        folders = [f.lower() for f in os.path.relpath(image, source).split(os.sep)[:-1]]
        if not image.lower().endswith(IMAGE_SUFFIXES) or any("mask" in f or "lung" in f for f in folders):
            continue
        stem = _stem(image)
        if stem.endswith("_mask"):
            continue
        masks = [p for p in by_stem.get(f"{stem}_mask", [])]
        if not masks:  # left and right lung masks of the same name
            sides = [p for p in by_stem.get(stem, []) if p != image]
            folder = {p: os.path.relpath(os.path.dirname(p), source) for p in sides}
            masks = [p for p in sides if re.search(r"left", folder[p], re.IGNORECASE)][:1] + \
                    [p for p in sides if re.search(r"right", folder[p], re.IGNORECASE)][:1]
        pair = Pair(case=stem, image=image, masks=masks)
        abnormal = re.search(r"_([01])$", stem)
        if abnormal:
            pair["stratum"] = int(abnormal.group(1))
        pairs.append(pair)
    return pairs


LAYOUTS: dict[str, Callable[..., list[Pair]]] = {"dsb2018": dsb2018_pairs, "glas": glas_pairs,
                                                 "isic2018": isic2018_pairs, "ph2": ph2_pairs,
                                                 "sunnybrook": sunnybrook_pairs, "lungxray": lungxray_pairs,
                                                 "acdc_lv": acdc_lv_pairs}
THRESHOLDS = {"dsb2018": 0.5, "glas": 0.0, "isic2018": 0.5, "ph2": 0.5, "sunnybrook": 0.5, "lungxray": 0.5,
              "acdc_lv": 0.5}


def prepare(dataset: str, source: str, output: str, seed: int = 42, fractions: Iterable[float] = (0.8, 0.1, 0.1),
            contour: str = "i") -> dict:
    """Convert SOURCE (the dataset's original layout) into OUTPUT; returns the datalist."""
    if dataset not in LAYOUTS:
        raise ValueError(f"dataset must be one of {', '.join(LAYOUTS)}, got {dataset!r}.")
    if not os.path.isdir(source):
        raise FileNotFoundError(f"{source}: source folder not found.")
    fractions = [float(f) for f in (fractions.split(",") if isinstance(fractions, str) else fractions)]
    pairs = sunnybrook_pairs(source, contour) if dataset == "sunnybrook" else LAYOUTS[dataset](source)
    return convert(pairs, output, dataset, seed, fractions, THRESHOLDS[dataset])


def main(dataset: str, source: str, output: str, seed: int = 42, fractions: str = "0.8,0.1,0.1",
         contour: str = "i") -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    datalist = prepare(dataset, source, output, seed, fractions, contour)
    if datalist.get("failed"):
        sys.exit(1)


if __name__ == "__main__":
    fire.Fire(main)
