"""2D images (PNG, JPEG, BMP, TIFF, single-frame DICOM): discovery, one predictor base built from the bundle's inference
config, the classifier and the 2D segmenter on it.

Each image is one case, named by its path under INPUT without the suffix (``a/b.png`` -> ``a__b``; the suffix is kept
when two images would share a name). The bundle's ``preprocessing`` loads the image (the same transform chain as
training and MONAI's own runner), ``inferer`` runs the network and ``postprocessing`` gives probabilities or the mask.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np

from networks.batch.core import BundleSpec, UsageError, load_network
from networks.data import first_line


@dataclass
class Image2D:
    name: str
    input: str


def _name(relative: str, keep_suffix: bool) -> str:
    stem, suffix = os.path.splitext(relative)
    relative = f"{stem}_{suffix.lstrip('.')}" if keep_suffix and suffix else stem
    return re.sub(r"[\\/]+", "__", relative).strip("_.") or "image"


def discover(input_path: str) -> list[Image2D]:
    """Every 2D image under ``input_path`` (or the one image it names), in a stable order, with unique case names;
    UsageError when there is none."""
    from networks.image_io import IMAGE_SUFFIXES, find_images, is_dicom

    if not os.path.exists(input_path):
        raise UsageError(f"{input_path}: input not found.")
    if os.path.isfile(input_path):
        if not (input_path.lower().endswith(IMAGE_SUFFIXES) or is_dicom(input_path)):
            raise UsageError(f"{input_path}: not a 2D image ({', '.join(IMAGE_SUFFIXES)}, or DICOM) or a folder.")
        return [Image2D(_name(os.path.basename(input_path), False), input_path)]
    paths = find_images(input_path)
    if not paths:
        raise UsageError(f"{input_path}: no 2D images (PNG, JPEG, BMP, TIFF, DICOM) found.")
    relative = [os.path.relpath(p, input_path) for p in paths]
    plain = [_name(r, False) for r in relative]
    clashes = {n for n in plain if plain.count(n) > 1}
    return [Image2D(_name(r, n in clashes), p) for r, n, p in zip(relative, plain, paths)]


class ImagePredictor:
    """The network, preprocessing, inferer and postprocessing of a 2D bundle's inference config, loaded once."""

    def __init__(self, bundle_dir: str, device: str = "cpu", engine: str | None = None,
                 weights: str | None = None, overrides: dict | None = None) -> None:
        import torch

        spec = BundleSpec(bundle_dir)
        weights = spec.check(weights)
        parser = spec.parser(overrides)
        self.spec = spec
        self.device = torch.device(device)
        self.network, self.engine = load_network(parser, bundle_dir, weights, device, engine, "image_size", 3)
        self.preprocessing = parser.get_parsed_content("preprocessing")
        self.inferer = parser.get_parsed_content("inferer")
        self.postprocessing = parser.get_parsed_content("postprocessing")

    def load(self, path: str):
        """The preprocessed image (what the network takes, without the batch dimension); ValueError naming the file
        when it cannot be read or preprocessed."""
        import torch

        try:
            image = self.preprocessing({"image": path})["image"]
        except Exception as e:
            cause = e
            while getattr(cause, "__cause__", None) is not None and path not in str(cause):
                cause = cause.__cause__  # MONAI wraps transform errors; the loader's own message names the file
            message = first_line(cause)
            raise ValueError(message if path in message else f"{path}: {message}") from e
        image = torch.as_tensor(image)
        if not torch.isfinite(image).all():
            raise ValueError(f"{path}: the image holds NaN or infinite values.")
        return image


class ImageClassifier(ImagePredictor):
    """:meth:`predict` gives class probabilities; the class names come from the metadata's ``channel_def``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        pred = self.spec.pred
        self.class_names = [self.spec.labels[k] for k in sorted(self.spec.labels)]
        if not self.class_names or len(self.class_names) != int(pred.get("num_channels", -1)):
            raise UsageError(f"{self.spec.meta_file}: outputs#pred#channel_def must name each of the "
                             f"{pred.get('num_channels')} classes, found {pred.get('channel_def', {})}.")

    def predict(self, images: list) -> np.ndarray:
        """Class probabilities ``(N, classes)`` of preprocessed images."""
        import torch

        batch = torch.stack([torch.as_tensor(i).as_subclass(torch.Tensor) for i in images]).to(self.device)
        with torch.inference_mode():
            probabilities = self.inferer(batch, self.network).cpu()
        if probabilities.ndim != 2 or probabilities.shape[1] != len(self.class_names):
            raise ValueError(f"the network gives shape {list(probabilities.shape)} for {len(images)} images; expected "
                             f"({len(images)}, {len(self.class_names)}).")
        return np.stack([np.asarray(self.postprocessing({"pred": row})["pred"], dtype=np.float64)
                         for row in probabilities])


class ImageSegmenter(ImagePredictor):
    """:meth:`segment` gives the 0/1 mask on the image's own grid; the bundle's saving transforms are dropped, since
    the batch writes the masks itself."""

    def __init__(self, *args, **kwargs) -> None:
        from monai.transforms import Compose, SaveImaged

        from networks.segmentation2d import SaveMask2Dd

        super().__init__(*args, **kwargs)
        self.postprocessing = Compose([t for t in self.postprocessing.transforms
                                       if not isinstance(t, (SaveImaged, SaveMask2Dd))])

    def segment(self, path: str) -> np.ndarray:
        """The uint8 ``(H, W)`` 0/1 mask of the image in ``path``, on the image's own grid."""
        import torch

        image = self.load(path)
        with torch.inference_mode():
            logits = self.inferer(image[None].to(self.device), self.network)[0].cpu()
        mask = self.postprocessing({"image": image, "pred": logits})["pred"]
        mask = np.asarray(mask.detach().cpu().numpy() if hasattr(mask, "detach") else mask)
        mask = mask[0] if mask.ndim == 3 else mask
        original = tuple(int(s) for s in image.meta["spatial_shape"])
        if mask.shape != original:
            raise ValueError(f"{path}: the restored mask has shape {mask.shape}, the image {original}.")
        return (mask > 0).astype(np.uint8)
