"""Batch segmentation of 2D images with a 2D segmentation bundle (the LiteNeXt bundles): what
``python tools/infer.py BUNDLE_DIR INPUT OUTPUT_DIR`` runs when the bundle's metadata declares a segmentation output
for 2D image input (``network_data_format.outputs.pred.format`` ``segmentation`` and ``data_type`` naming ``png``).

INPUT is one 2D image or a folder searched recursively for them (PNG, JPEG, BMP, TIFF, single-frame DICOM), found and
named as for the classification bundles (``tools/classify.py``: ``a/b.png`` -> case ``a__b``). Each case gives
``<case>_seg.png`` in OUTPUT_DIR: an 8-bit mask with the image's height and width, 0 background and 1 foreground,
written under a temporary name and renamed. ``summary.csv`` / ``summary.json`` have the columns of the other paths
(``case,input,status,output,seconds,message``); a case whose mask exists is ``skipped`` (an interrupted batch resumes)
unless ``--overwrite``, a corrupt image is ``failed`` with a message naming the file and the batch carries on.
Exit codes: 0 every case ok or skipped, 1 some case failed, 2 usage error.

The bundle's ``configs/inference.json`` gives the network, ``preprocessing`` (load + resize), ``inferer`` and
``postprocessing`` (sigmoid, ``Invertd`` back to the image's size, threshold); its saving transform is dropped, since
this tool writes the masks itself.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from tools.classify import ClassifierRunner, bundle_metadata, start_batch
from tools.infer import Result, UsageError, failed_result, finish_batch, write_summary

log = logging.getLogger("segment2d")


def is_image2d_segmentation_bundle(bundle_dir: str) -> bool:
    """Whether the bundle segments 2D images: a ``segmentation`` output and ``png`` among its data types."""
    meta = bundle_metadata(bundle_dir)
    pred = meta.get("network_data_format", {}).get("outputs", {}).get("pred", {})
    return str(pred.get("format", "")).lower() == "segmentation" and "png" in str(meta.get("data_type", "")).lower()


class Segmenter2D(ClassifierRunner):
    """Loading and preprocessing as :class:`tools.classify.ClassifierRunner`; :meth:`segment` gives the mask."""

    def __init__(self, bundle_dir: str, device: str = "cpu", engine: str | None = None,
                 weights: str | None = None, overrides: dict | None = None) -> None:
        from monai.transforms import Compose, SaveImaged

        from networks.segmentation2d import SaveMask2Dd

        super().__init__(bundle_dir, device, engine, weights, overrides)
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


def run(bundle_dir: str, input: str, output_dir: str, device: str = "cpu", overlay: bool = False,
        num_threads: int = 0, num_workers: int = 0, dicom_seg: bool = False, engine: str | None = None,
        ray_address: str | None = None, overrides: dict | None = None, overwrite: bool = False) -> int:
    """Segment every 2D image under INPUT with the bundle in BUNDLE_DIR; returns the exit code. The arguments are
    ``tools/infer.py``'s; ``overlay``, ``dicom_seg`` and ``ray_address`` (volume bundles) are usage errors here and
    ``num_workers`` is not used (2D images load in milliseconds)."""
    from networks.segmentation2d import save_mask_png

    if overlay or dicom_seg or ray_address:
        raise UsageError(f"{bundle_dir} segments 2D images in this process: --overlay, --dicom_seg and --ray_address "
                         f"are for volume bundles.")
    cases = start_batch(input, output_dir, num_threads)
    outputs = {c.name: os.path.join(output_dir, f"{c.name}_seg.png") for c in cases}
    results = {c.name: Result(c.name, c.input, "skipped", outputs[c.name], 0.0, "output exists")
               for c in cases if os.path.isfile(outputs[c.name]) and not overwrite}
    todo = [c for c in cases if c.name not in results]
    runner = Segmenter2D(bundle_dir, device, engine=engine, overrides=overrides)  # checks the overrides every time
    for case in todo:
        start = time.perf_counter()
        try:
            mask = runner.segment(case.input)
            save_mask_png(mask, outputs[case.name])
            fraction = float(mask.mean())
            message = "warning: empty mask (no foreground found)" if fraction == 0 else f"foreground {fraction:.2%}"
            result = Result(case.name, case.input, "ok", outputs[case.name], time.perf_counter() - start, message)
        except Exception as e:  # one bad image must not stop the batch
            result = failed_result(case, e, time.perf_counter() - start)
        results[case.name] = result
        (log.error if result.status == "failed" else log.info)(
            "case %s: %s in %.2f s %s", case.name, result.status, result.seconds, result.message)
        write_summary(output_dir, [results[c.name] for c in cases if c.name in results])
    return finish_batch(output_dir, [results[c.name] for c in cases], "images")
