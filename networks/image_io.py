"""Reading 2D images as the 2D bundles see them: any PNG, JPEG, BMP, TIFF (RGB, RGBA, palette, grey, 16-bit) or
single-frame DICOM as a 3-channel float image in [0, 1] (:func:`read_image_rgb`), and the images of a folder in a
stable order (:func:`find_images`, :func:`image_datalist`: what a 2D bundle calls a case)."""

from __future__ import annotations

import os

import numpy as np

from networks.data import first_line

__all__ = ["IMAGE_SUFFIXES", "DICOM_SUFFIXES", "MAX_PIXELS", "is_dicom", "unit_range", "read_image_rgb",
           "find_images", "image_datalist"]

DICOM_SUFFIXES = (".dcm", ".dicom")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", *DICOM_SUFFIXES)
MAX_PIXELS = 20000 * 20000  # a header claiming more than this is refused before decoding (decompression bombs)



def is_dicom(path: str) -> bool:
    """A ``.dcm``/``.dicom`` name, or a file with the DICOM preamble (``DICM`` at byte 128)."""
    if path.lower().endswith(DICOM_SUFFIXES):
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def unit_range(array: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] (a constant image becomes zeros)."""
    array = array.astype(np.float32)
    low, high = float(array.min()), float(array.max())
    return (array - low) / (high - low) if high > low else np.zeros_like(array)


def _read_dicom(path: str) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(path)
    if "PixelData" not in ds:
        raise ValueError(f"{path}: DICOM file without pixel data.")
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        raise ValueError(f"{path}: multi-frame DICOM ({ds.NumberOfFrames} frames); only single-frame images are "
                         f"classified.")
    pixels = ds.pixel_array
    if pixels.ndim == 3 and pixels.shape[-1] == 3:  # colour (RGB / YBR converted by pydicom)
        return unit_range(pixels) if pixels.dtype != np.uint8 else pixels.astype(np.float32) / 255.0
    if pixels.ndim != 2:
        raise ValueError(f"{path}: expected a 2D DICOM image, got pixel data of shape {pixels.shape}.")
    values = apply_modality_lut(pixels, ds)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        values = apply_voi_lut(values, ds)
    grey = unit_range(values)
    if str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1":
        grey = 1.0 - grey
    return np.repeat(grey[..., None], 3, axis=-1)


def _read_pil(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        if image.width * image.height > MAX_PIXELS:
            raise ValueError(f"{path}: the header claims {image.width}x{image.height} pixels, over the limit.")
        if getattr(image, "n_frames", 1) > 1:
            raise ValueError(f"{path}: {image.n_frames} frames; only single-frame images are classified.")
        image.load()  # decode now: a truncated or corrupt file fails here, with its name
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit or float grey: scaled by its own range
            grey = unit_range(np.asarray(image, dtype=np.float32))
            return np.repeat(grey[..., None], 3, axis=-1)
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            background = Image.new("RGBA", image.size, (0, 0, 0, 255))
            image = Image.alpha_composite(background, image.convert("RGBA"))  # transparent -> black, as CT air
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def read_image_rgb(path: str) -> np.ndarray:
    """The image in ``path`` as a float32 ``(H, W, 3)`` array in [0, 1].

    RGB/RGBA/palette/grey 8-bit images are divided by 255 (transparent pixels become black; grey is repeated over the
    three channels); 16-bit and float grey images and DICOM are scaled by their own range after DICOM's rescale and,
    when the file has one, its display window (MONOCHROME1 is inverted). Raises ``ValueError`` naming the file for
    anything unreadable, multi-frame, empty or not finite.
    """
    try:
        array = _read_dicom(path) if is_dicom(path) else _read_pil(path)
    except ValueError:
        raise
    except Exception as e:  # PIL.UnidentifiedImageError, OSError (truncated), pydicom errors
        raise ValueError(f"{path}: not a readable image ({first_line(e)}).") from e
    if array.ndim != 3 or array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"{path}: empty image (shape {array.shape}).")
    if not np.isfinite(array).all():
        raise ValueError(f"{path}: the image holds NaN or infinite values.")
    return array


def find_images(folder: str) -> list[str]:
    """Every 2D image under ``folder`` (searched recursively; hidden files skipped), sorted by relative path: files
    named with :data:`IMAGE_SUFFIXES` (any case) and files without a suffix that carry the DICOM preamble."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = os.path.join(root, name)
            if name.startswith("."):
                continue
            if name.lower().endswith(IMAGE_SUFFIXES) or ("." not in name and is_dicom(path)):
                found.append(path)
    return found


def image_datalist(folder: str, key: str = "image") -> list[dict]:
    """``[{key: path}, ...]`` for every image :func:`find_images` finds under ``folder``: the inference datalist of
    the 2D bundles (a ``_target_`` component, so an exported bundle reaches it from its own ``networks/`` copy)."""
    return [{key: path} for path in find_images(folder)]
