"""Every output file of a batch, each written under a temporary name and renamed (:mod:`networks.data`'s one atomic
writer): the label NIfTI, the overlay PNG for review, ``predictions.csv`` of the classifiers, the 0/1 PNG masks of the
2D bundles (:func:`networks.segmentation2d.save_mask_png`) and the DICOM SEG (:mod:`networks.batch.dicom_seg`)."""

from __future__ import annotations

import csv
import io
import os

import numpy as np
from PIL import Image, ImageDraw

from networks.batch.core import UsageError
from networks.data import write_atomic, write_atomic_with, write_nifti_atomic

PREDICTIONS = "predictions.csv"


def save_label(label, output_path: str) -> None:
    """Write a uint8 label NIfTI with the label's affine."""
    array = np.asarray(label.detach().cpu().numpy() if hasattr(label, "detach") else label)
    array = array[0] if array.ndim == 4 else array
    affine = np.asarray(label.affine, dtype=np.float64) if hasattr(label, "affine") else np.eye(4)
    write_nifti_atomic(array.astype(np.uint8), affine, output_path)


def prediction_columns(class_names: list[str]) -> list[str]:
    return ["case", "input", "prediction", *(f"p_{c}" for c in class_names)]


def read_predictions(path: str, class_names: list[str]) -> dict[str, dict]:
    """Rows of an earlier ``predictions.csv`` by case (empty when there is none); a file written for other classes
    is a usage error rather than something to mix with."""
    if not os.path.isfile(path):
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        expected = prediction_columns(class_names)
        if reader.fieldnames != expected:
            raise UsageError(f"{path}: written for other classes or by another tool (columns {reader.fieldnames}, "
                             f"expected {expected}); use another output folder.")
        return {row["case"]: row for row in reader}


def write_predictions(path: str, rows: list[dict], class_names: list[str]) -> None:
    """``predictions.csv``: ``case,input,prediction`` and one ``p_<class>`` column per class."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=prediction_columns(class_names))
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, buffer.getvalue())


# ------------------------------------------------------------------------------------------------------------ overlay

# distinct colours for labels 1..N (cycled beyond)
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]


def _to_ras(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    import nibabel as nib

    transform = nib.orientations.ornt_transform(nib.io_orientation(affine), nib.orientations.axcodes2ornt("RAS"))
    return nib.orientations.apply_orientation(array, transform)


def _squeeze(volume) -> tuple[np.ndarray, np.ndarray]:
    array = np.asarray(volume.detach().cpu().numpy() if hasattr(volume, "detach") else volume)
    while array.ndim > 3:
        array = array[0]
    affine = np.asarray(getattr(volume, "affine", np.eye(4)), dtype=np.float64)
    return array, affine


def representative_slices(label: np.ndarray, count: int = 3) -> list[int]:
    """Axial slices spread over the labelled range (the middle of the volume when nothing is labelled)."""
    labelled = np.flatnonzero(label.reshape(-1, label.shape[2]).any(0))
    if labelled.size == 0:
        return [label.shape[2] // 2]
    picks = np.linspace(labelled[0], labelled[-1], count + 2)[1:-1]
    return sorted({int(round(p)) for p in picks})


def render(image: np.ndarray, label: np.ndarray, names: dict[int, str], window: tuple[float, float] = (-125, 275),
           count: int = 3) -> Image.Image:
    """Side-by-side axial slices (radiological view: patient's right on the left, anterior up) with a legend."""
    tiles = []
    for z in representative_slices(label, count):
        grey = np.clip((image[:, :, z].astype(np.float32) - window[0]) / (window[1] - window[0]), 0, 1) * 255
        rgb = np.repeat(grey[..., None], 3, -1)
        for value in np.unique(label[:, :, z]):
            if value == 0:
                continue
            mask = label[:, :, z] == value
            rgb[mask] = 0.55 * rgb[mask] + 0.45 * np.array(PALETTE[(int(value) - 1) % len(PALETTE)])
        tiles.append(np.ascontiguousarray(rgb[::-1, ::-1].transpose(1, 0, 2)).astype(np.uint8))
    height = max(t.shape[0] for t in tiles)
    legend_width = 150
    canvas = Image.new("RGB", (sum(t.shape[1] for t in tiles) + legend_width, max(height, 20 * len(names) + 10)))
    x = 0
    for tile in tiles:
        canvas.paste(Image.fromarray(tile), (x, 0))
        x += tile.shape[1]
    draw = ImageDraw.Draw(canvas)
    for row, (value, name) in enumerate(sorted((k, v) for k, v in names.items() if k > 0)):
        y = 5 + 20 * row
        draw.rectangle([x + 5, y, x + 20, y + 14], fill=PALETTE[(value - 1) % len(PALETTE)])
        draw.text((x + 26, y + 1), name, fill=(255, 255, 255))
    return canvas


def save_overlay(image, label, path: str, names: dict[int, str], count: int = 3) -> None:
    """Write the overlay PNG of ``label`` on ``image`` (both on the same grid) atomically."""
    image_array, affine = _squeeze(image)
    label_array, _ = _squeeze(label)
    picture = render(_to_ras(image_array, affine), _to_ras(label_array, affine), names, count=count)
    scale = max(1, 600 // max(picture.size[1], 1))
    if scale > 1:
        picture = picture.resize((picture.size[0] * scale, picture.size[1] * scale), Image.NEAREST)
    write_atomic_with(path, lambda tmp: picture.save(tmp, format="PNG"), ".png")
