"""Binary 2D segmentation helpers shared by the LiteNeXt bundles (DSB2018, GlaS, ISIC2018, PH2, Sunnybrook, lung X-ray).

* :class:`LoadMask2Dd`: a mask image (PNG/BMP/..., any bit depth) as a ``(1, H, W)`` float 0/1 ``MetaTensor``;
* :func:`train_transforms`, :func:`eval_transforms`, :func:`inference_transforms`: the LiteNeXt recipe
  (tranngocduvnvp/LiteNeXt.: ``Datasets/transform.py``): RGB in [0, 1] (grey replicated), resize to 256x256;
  training adds rotation within +-20 degrees (always), horizontal flip (p 0.5), Gaussian blur (p 0.5) and vertical
  flip (p 0.1), in that order;
* :func:`split_cases`: named-seed training/validation/test lists (stratified when the cases carry a stratum);
* :func:`binary_metrics`, :class:`BinarySegmentationReport`: per-image Dice, IoU, precision and recall (images whose
  ground truth is empty are listed but left out of the means, as in LiteNeXt's ``eval.py``).

Images are read by :class:`networks.transforms.LoadImage2Dd` (PNG, JPEG, BMP, TIFF, single-frame DICOM);
:class:`SaveMask2Dd` writes a 0/1 PNG mask.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import MapTransform, Transform

from networks.data import first_line, grouped_stratified_split, write_atomic, write_png_atomic
from networks.evaluation import ReportHandler
from networks.transforms import LoadImage2Dd

__all__ = ["read_mask", "LoadMask2Dd", "train_transforms", "eval_transforms", "inference_transforms",
           "split_cases", "binary_metrics", "summarise_metrics", "BinarySegmentationReport", "METRICS", "save_mask_png",
           "SaveMask2Dd"]

METRICS = ("dice", "iou", "precision", "recall")


def read_mask(path: str, threshold: float = 0.5) -> np.ndarray:
    """A mask file as a uint8 ``(H, W)`` array of 0/1: any pixel above ``threshold`` times the file's maximum possible
    value (255 for 8-bit, 1 for 1-bit and 0/1 files) is foreground; colour masks use their brightest channel."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            if image.mode == "1":
                array = np.asarray(image, dtype=np.uint8)
            elif image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                array = np.asarray(image, dtype=np.float64)
            else:
                array = np.asarray(image.convert("RGB") if image.mode not in ("L", "RGB") else image)
    except Exception as e:
        raise ValueError(f"{path}: not a readable mask image ({first_line(e)}).") from e
    if array.ndim == 3:
        array = array.max(-1)
    if array.size == 0:
        raise ValueError(f"{path}: empty mask.")
    top = 1.0 if array.max() <= 1 else (255.0 if array.max() <= 255 else float(array.max()))
    return (array > threshold * top).astype(np.uint8)


class LoadMask2Dd(MapTransform):
    """Load the mask paths under ``keys`` as ``(1, H, W)`` float32 0/1 ``MetaTensor`` (see :func:`read_mask`)."""

    def __init__(self, keys: str | Sequence[str] = "label", threshold: float = 0.5,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.threshold = threshold

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        from monai.data import MetaTensor

        d = dict(data)
        for key in self.keys:
            if key not in d:
                if self.allow_missing_keys:
                    continue
                raise KeyError(f"key {key!r} not in the data ({sorted(map(str, d))}).")
            path = str(d[key])
            mask = read_mask(path, self.threshold)
            d[key] = MetaTensor(torch.from_numpy(mask[None].astype(np.float32)),
                                meta={"filename_or_obj": path, "spatial_shape": np.asarray(mask.shape)})
        return d


class _CheckSameSize(Transform):
    """Fail with both file names when an image and its mask differ in size."""

    def __call__(self, d: dict) -> dict:
        if "label" in d and tuple(d["image"].shape[-2:]) != tuple(d["label"].shape[-2:]):
            raise ValueError(f"{d['label'].meta.get('filename_or_obj')}: mask size {tuple(d['label'].shape[-2:])} "
                             f"differs from image {d['image'].meta.get('filename_or_obj')} "
                             f"{tuple(d['image'].shape[-2:])}.")
        return d


def _load(keys: Sequence[str]) -> list:
    loaders = [LoadImage2Dd("image")]
    if "label" in keys:
        loaders += [LoadMask2Dd("label"), _CheckSameSize()]
    return loaders


def train_transforms(image_size: Sequence[int] = (256, 256), rotate_degrees: float = 20.0, hflip_prob: float = 0.5,
                     blur_prob: float = 0.5, vflip_prob: float = 0.1, intensity_prob: float = 0.0):
    """LiteNeXt training chain for ``{"image", "label"}`` file paths: load, resize (image bilinear, mask nearest),
    random rotation within +-``rotate_degrees`` (every sample), horizontal flip, Gaussian blur (sigma 0.8-1.4, the
    range of albumentations' default 3-7 px kernels) and vertical flip. ``intensity_prob`` > 0 adds, each with that
    probability, a gamma change (0.5-2) and a brightness scale (x0.6-1.6, clipped to [0, 1]): images whose grey levels
    depend on a display window or scanner (MRI) more than on the tissue."""
    from monai.transforms import (Compose, EnsureTyped, RandAdjustContrastd, RandFlipd, RandGaussianSmoothd,
                                  RandRotated, RandScaleIntensityd, Resized, ScaleIntensityRanged)

    keys = ["image", "label"]
    intensity = [RandAdjustContrastd("image", gamma=(0.5, 2.0), prob=intensity_prob),
                 RandScaleIntensityd("image", factors=(-0.4, 0.6), prob=intensity_prob),
                 ScaleIntensityRanged("image", a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True)
                 ] if intensity_prob > 0 else []
    return Compose([
        *_load(keys),
        Resized(keys, spatial_size=tuple(image_size), mode=("bilinear", "nearest")),
        EnsureTyped(keys, track_meta=False),
        RandRotated(keys, range_x=math.radians(rotate_degrees), prob=1.0, mode=("bilinear", "nearest"),
                    padding_mode="zeros"),
        RandFlipd(keys, prob=hflip_prob, spatial_axis=1),
        RandGaussianSmoothd("image", sigma_x=(0.8, 1.4), sigma_y=(0.8, 1.4), prob=blur_prob),
        RandFlipd(keys, prob=vflip_prob, spatial_axis=0),
        *intensity,
    ])


def eval_transforms(image_size: Sequence[int] = (256, 256), resize_label: bool = True):
    """Validation chain: load and resize; ``resize_label=False`` keeps the mask at its original size (test metrics on
    the original geometry, after the prediction is restored with ``Invertd``)."""
    from monai.transforms import Compose, EnsureTyped, Resized

    keys = ["image", "label"] if resize_label else ["image"]
    return Compose([*_load(["image", "label"]),
                    Resized(keys, spatial_size=tuple(image_size), mode=("bilinear", "nearest")[:len(keys)]),
                    EnsureTyped(["image", "label"], track_meta=True)])


def inference_transforms(image_size: Sequence[int] = (256, 256)):
    """Inference chain for ``{"image": path}``: load and resize (invertible: ``Invertd`` restores the size)."""
    from monai.transforms import Compose, EnsureTyped, Resized

    return Compose([*_load(["image"]), Resized("image", spatial_size=tuple(image_size), mode="bilinear"),
                    EnsureTyped("image", track_meta=True)])


def split_cases(items: Sequence[dict], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 42,
                stratum_key: str = "stratum", group_key: str = "case") -> list[list[dict]]:
    """Training/validation/test lists of ``items`` in about ``fractions``, reproducible from ``seed``; items sharing a
    ``group_key`` value (a patient) stay on one side and each ``stratum_key`` value (a diagnosis; optional) is spread
    over the sides in the same proportions (:func:`networks.data.grouped_stratified_split`)."""
    rows = [{**item, "_group": item.get(group_key, i), "_stratum": int(item.get(stratum_key, 0))}
            for i, item in enumerate(items)]
    splits = grouped_stratified_split(rows, fractions, seed, group_key="_group", label_key="_stratum")
    return [[{k: v for k, v in row.items() if not k.startswith("_")} for row in part] for part in splits]


# ----------------------------------------------------------------------------------------------------------- metrics
def binary_metrics(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """Dice, IoU, precision and recall of binary arrays of one image (NaN where undefined: an empty ground truth gives
    NaN Dice/IoU/recall; an empty prediction NaN precision)."""
    pred, gt = np.asarray(pred) > 0, np.asarray(gt) > 0
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth {gt.shape}.")
    tp = float(np.logical_and(pred, gt).sum())
    n_pred, n_gt = float(pred.sum()), float(gt.sum())
    union = n_pred + n_gt - tp
    nan = float("nan")
    return {"dice": 2 * tp / (n_pred + n_gt) if n_gt else nan, "iou": tp / union if n_gt else nan,
            "precision": tp / n_pred if n_pred else (0.0 if n_gt else nan), "recall": tp / n_gt if n_gt else nan}


def summarise_metrics(rows: Sequence[dict]) -> dict[str, float]:
    """Mean of each metric over the images with a non-empty ground truth, and their count."""
    kept = [r for r in rows if r["gt_pixels"] > 0]
    summary = {m: float(np.nanmean([r[m] for r in kept])) if kept else float("nan") for m in METRICS}
    return {**summary, "images": len(kept), "empty_gt_images": len(rows) - len(kept)}


def _array(tensor) -> np.ndarray:
    array = np.asarray(tensor.detach().cpu().numpy() if hasattr(tensor, "detach") else tensor)
    return array[0] if array.ndim == 3 else array


class BinarySegmentationReport(ReportHandler):
    """MONAI/ignite evaluator handler: per-image metrics (:func:`binary_metrics`) into ``metrics.csv`` and their means
    into ``summary.json`` in ``output_dir``; the means are also put in ``engine.state.metrics`` as ``test_<metric>``.

    Expects the evaluator's (decollated) output items to hold binary ``pred`` and ``label`` ``(1, H, W)`` on the same
    grid (the original one when the prediction was restored with ``Invertd``).
    """

    def __init__(self, output_dir: str) -> None:
        self.output_dir = output_dir
        super().__init__()

    def collect(self, engine) -> None:
        for item in engine.state.output:
            label = item["label"]
            case = str(getattr(label, "meta", {}).get("filename_or_obj", f"image{len(self.rows)}"))
            gt, pred = _array(label), _array(item["pred"])
            self.rows.append({"case": os.path.basename(case), "gt_pixels": int((gt > 0).sum()),
                              "pred_pixels": int((pred > 0).sum()), **binary_metrics(pred, gt)})

    def write(self, engine=None) -> dict:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["case", "gt_pixels", "pred_pixels", *METRICS])
        writer.writeheader()
        writer.writerows({**r, **{m: f"{r[m]:.6f}" for m in METRICS}} for r in self.rows)
        write_atomic(os.path.join(self.output_dir, "metrics.csv"), buffer.getvalue())
        summary = summarise_metrics(self.rows)
        write_atomic(os.path.join(self.output_dir, "summary.json"), json.dumps(summary, indent=2))
        if engine is not None:
            engine.state.metrics.update({f"test_{m}": summary[m] for m in METRICS})
        return summary



def save_mask_png(mask, path: str) -> None:
    """Write a binary mask ``(H, W)`` or ``(1, H, W)`` as an 8-bit PNG of 0/1 (temporary name, then renamed)."""
    array = np.asarray(mask.detach().cpu().numpy() if hasattr(mask, "detach") else mask)
    array = array[0] if array.ndim == 3 else array
    if array.ndim != 2:
        raise ValueError(f"{path}: a 2D mask is expected, got shape {array.shape}.")
    write_png_atomic((array > 0).astype(np.uint8), path)


class SaveMask2Dd(MapTransform):
    """Save the binary masks under ``keys`` as ``<output_dir>/<image stem>_<postfix>.png`` (0/1, the image's size);
    the image name comes from the mask's ``filename_or_obj`` meta data (copied from the image by ``Invertd``)."""

    def __init__(self, keys: str | Sequence[str] = "pred", output_dir: str = "./eval", output_postfix: str = "seg",
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir, self.output_postfix = output_dir, output_postfix

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            source = str(getattr(d[key], "meta", {}).get("filename_or_obj", key))
            stem = os.path.splitext(os.path.basename(source))[0]
            save_mask_png(d[key], os.path.join(self.output_dir, f"{stem}_{self.output_postfix}.png"))
        return d
