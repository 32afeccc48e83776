"""Batch classification with a classification bundle: what ``python tools/infer.py BUNDLE_DIR INPUT OUTPUT_DIR`` runs
when the bundle's metadata says its output is class probabilities (``network_data_format.outputs.pred.format`` is
``classes``).

INPUT is one 2D image or a folder searched recursively for them: PNG, JPEG, BMP, TIFF (``.png .jpg .jpeg .bmp .tif
.tiff``, any case) and single-frame DICOM (``.dcm``, ``.dicom`` or no suffix with the DICOM preamble). Each image is
one case, named by its path under INPUT without the suffix (``a/b.png`` -> ``a__b``; the suffix is kept when two
images would share a name). OUTPUT_DIR gets:

* ``predictions.csv``: ``case,input,prediction`` and one ``p_<class>`` probability column per class, the class names
  from the bundle metadata's ``channel_def``; one row per image predicted, rewritten atomically after every batch;
* ``summary.csv`` / ``summary.json``: ``case,input,status,output,seconds,message`` as for the segmentation bundles
  (``tools/infer.py``'s ``write_summary``): ``ok``, ``skipped`` (already in ``predictions.csv`` from an earlier run;
  ``--overwrite`` predicts it again) or ``failed`` with a message naming the file; a corrupt image fails alone and the
  batch carries on.

Exit codes as ``tools/infer.py``: 0 every case ok or skipped, 1 some case failed, 2 usage error.
The bundle's ``configs/inference.json`` gives the network, ``preprocessing`` (which loads the image: the same
transform chain as training and MONAI's own runner), ``inferer`` and ``postprocessing`` (softmax).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import time
from dataclasses import dataclass

import numpy as np

from tools.infer import (Result, UsageError, apply_overrides, check_output_dir, finish_batch, load_network,
                         write_summary)

CLASSIFICATION_FORMATS = ("classes", "classification")
PREDICTIONS = "predictions.csv"
log = logging.getLogger("classify")


def bundle_metadata(bundle_dir: str) -> dict:
    """The bundle's ``configs/metadata.json`` ({} when missing or unreadable)."""
    try:
        with open(os.path.join(bundle_dir, "configs", "metadata.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def is_classification_bundle(bundle_dir: str) -> bool:
    """Whether the bundle's metadata declares class probabilities as its output (format ``classes``)."""
    pred = bundle_metadata(bundle_dir).get("network_data_format", {}).get("outputs", {}).get("pred", {})
    return str(pred.get("format", "")).lower() in CLASSIFICATION_FORMATS


@dataclass
class Image2D:
    name: str
    input: str


def _name(relative: str, keep_suffix: bool) -> str:
    stem, suffix = os.path.splitext(relative)
    relative = f"{stem}_{suffix.lstrip('.')}" if keep_suffix and suffix else stem
    return re.sub(r"[\\/]+", "__", relative).strip("_.") or "image"


def start_batch(input: str, output_dir: str, num_threads: int) -> list[Image2D]:
    """The images under INPUT, once torch's threads are set and OUTPUT_DIR is writable; none is a usage error."""
    import torch

    if num_threads > 0:
        torch.set_num_threads(num_threads)
    check_output_dir(output_dir)
    cases = discover(input)
    if not cases:
        raise UsageError(f"{input}: no 2D images (PNG, JPEG, BMP, TIFF, DICOM) found.")
    return cases


def discover(input_path: str) -> list[Image2D]:
    """Every 2D image under ``input_path`` (or the one image it names), in a stable order, with unique case names."""
    from networks.classification import IMAGE_SUFFIXES, find_images, is_dicom

    if not os.path.exists(input_path):
        raise UsageError(f"{input_path}: input not found.")
    if os.path.isfile(input_path):
        if not (input_path.lower().endswith(IMAGE_SUFFIXES) or is_dicom(input_path)):
            raise UsageError(f"{input_path}: not a 2D image ({', '.join(IMAGE_SUFFIXES)}, or DICOM) or a folder.")
        return [Image2D(_name(os.path.basename(input_path), False), input_path)]
    paths = find_images(input_path)
    relative = [os.path.relpath(p, input_path) for p in paths]
    plain = [_name(r, False) for r in relative]
    clashes = {n for n in plain if plain.count(n) > 1}
    return [Image2D(_name(r, n in clashes), p) for r, n, p in zip(relative, plain, paths)]


class ClassifierRunner:
    """The network, preprocessing, inferer and postprocessing of a classification bundle's inference config."""

    def __init__(self, bundle_dir: str, device: str = "cpu", engine: str | None = None,
                 weights: str | None = None, overrides: dict | None = None) -> None:
        import torch
        from monai.bundle import ConfigParser

        config_file = os.path.join(bundle_dir, "configs", "inference.json")
        meta_file = os.path.join(bundle_dir, "configs", "metadata.json")
        weights = weights or os.path.join(bundle_dir, "models", "model.pt")
        for path in (config_file, meta_file):
            if not os.path.isfile(path):
                raise UsageError(f"{path}: not found; is {bundle_dir} a bundle?")
        if not os.path.isfile(weights):
            raise UsageError(f"{weights}: not found; this bundle ships no trained weights: train it first (see its "
                             f"docs/README.md).")
        parser = ConfigParser()
        parser.read_config(config_file)
        apply_overrides(parser, overrides, config_file)
        parser.read_meta(meta_file)
        pred = parser.get("_meta_#network_data_format#outputs#pred", {})
        channel_def = pred.get("channel_def", {})
        self.class_names = [str(channel_def[k]) for k in sorted(channel_def, key=int)]
        if not self.class_names or len(self.class_names) != int(pred.get("num_channels", -1)):
            raise UsageError(f"{meta_file}: outputs#pred#channel_def must name each of the "
                             f"{pred.get('num_channels')} classes, found {channel_def}.")
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
            message = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
            raise ValueError(message if path in message else f"{path}: {message}") from e
        image = torch.as_tensor(image)
        if not torch.isfinite(image).all():
            raise ValueError(f"{path}: the image holds NaN or infinite values.")
        return image

    def predict(self, images: list) -> np.ndarray:
        """Class probabilities ``(N, classes)`` of preprocessed images."""
        import torch

        batch = torch.stack([torch.as_tensor(i).as_subclass(torch.Tensor) for i in images]).to(self.device)
        with torch.inference_mode():
            logits = self.inferer(batch, self.network).cpu()
        if logits.ndim != 2 or logits.shape[1] != len(self.class_names):
            raise ValueError(f"the network gives shape {list(logits.shape)} for {len(images)} images; expected "
                             f"({len(images)}, {len(self.class_names)}).")
        return np.stack([np.asarray(self.postprocessing({"pred": row})["pred"], dtype=np.float64) for row in logits])


def read_predictions(path: str, class_names: list[str]) -> dict[str, dict]:
    """Rows of an earlier ``predictions.csv`` by case (empty when there is none); a file written for other classes
    is a usage error rather than something to mix with."""
    if not os.path.isfile(path):
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        expected = ["case", "input", "prediction", *(f"p_{c}" for c in class_names)]
        if reader.fieldnames != expected:
            raise UsageError(f"{path}: written for other classes or by another tool (columns {reader.fieldnames}, "
                             f"expected {expected}); use another output folder.")
        return {row["case"]: row for row in reader}


def write_predictions(path: str, rows: list[dict], class_names: list[str]) -> None:
    """``predictions.csv``, under a temporary name first and then renamed."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["case", "input", "prediction", *(f"p_{c}" for c in class_names)])
    writer.writeheader()
    writer.writerows(rows)
    from networks.data import write_atomic

    write_atomic(path, buffer.getvalue())


def _message(error: Exception, path: str) -> str:
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    return message if path in message else f"{path}: {message}"


def run(bundle_dir: str, input: str, output_dir: str, device: str = "cpu", overlay: bool = False,
        num_threads: int = 0, num_workers: int = 0, dicom_seg: bool = False, engine: str | None = None,
        ray_address: str | None = None, overrides: dict | None = None, overwrite: bool = False,
        batch_size: int = 8) -> int:
    """Classify every image under INPUT with the classification bundle in BUNDLE_DIR; returns the exit code.

    The arguments are ``tools/infer.py``'s; ``overlay``, ``dicom_seg`` and ``ray_address`` are for segmentation (a
    usage error here), ``num_workers`` is not used (2D images load in milliseconds); ``batch_size`` images go through
    the network at once."""
    if overlay or dicom_seg:
        raise UsageError(f"{bundle_dir} is a classification bundle: --overlay and --dicom_seg are for segmentation "
                         f"bundles.")
    if ray_address:
        raise UsageError(f"{bundle_dir} is a classification bundle: --ray_address is for segmentation bundles (a batch "
                         f"of 2D images is classified in one process).")
    if batch_size < 1:
        raise UsageError(f"batch_size must be at least 1, got {batch_size}.")
    cases = start_batch(input, output_dir, num_threads)
    runner = ClassifierRunner(bundle_dir, device, engine=engine, overrides=overrides)
    predictions_path = os.path.join(output_dir, PREDICTIONS)
    rows = read_predictions(predictions_path, runner.class_names)
    results = {c.name: Result(c.name, c.input, "skipped", predictions_path, 0.0, "already in predictions.csv")
               for c in cases if c.name in rows and rows[c.name]["input"] == c.input and not overwrite}
    todo = [c for c in cases if c.name not in results]
    order = [c.name for c in cases] + [name for name in rows if name not in {c.name for c in cases}]

    def save() -> None:
        write_predictions(predictions_path, [rows[n] for n in order if n in rows], runner.class_names)
        write_summary(output_dir, [results[c.name] for c in cases if c.name in results])

    for start in range(0, len(todo), batch_size):
        loaded = []
        for case in todo[start:start + batch_size]:
            began = time.perf_counter()
            try:
                image = runner.load(case.input)
                warning = ("warning: every pixel has one value; the image holds nothing to classify"
                           if float(image.min()) == float(image.max()) else "")
                loaded.append((case, image, warning, time.perf_counter() - began))
            except Exception as e:  # one bad image must not stop the batch
                results[case.name] = Result(case.name, case.input, "failed", "", time.perf_counter() - began,
                                            _message(e, case.input))
        if loaded:
            began = time.perf_counter()
            try:
                probabilities = runner.predict([image for _, image, _, _ in loaded])
            except Exception as e:
                for case, _, _, seconds in loaded:
                    results[case.name] = Result(case.name, case.input, "failed", "", seconds, _message(e, case.input))
            else:
                share = (time.perf_counter() - began) / len(loaded)
                for (case, _, warning, seconds), p in zip(loaded, probabilities):
                    prediction = runner.class_names[int(np.argmax(p))]
                    rows[case.name] = {"case": case.name, "input": case.input, "prediction": prediction,
                                       **{f"p_{c}": f"{v:.6f}" for c, v in zip(runner.class_names, p)}}
                    results[case.name] = Result(case.name, case.input, "ok", predictions_path, seconds + share,
                                                warning or f"{prediction} ({float(np.max(p)):.3f})")
        for case in todo[start:start + batch_size]:
            result = results[case.name]
            (log.error if result.status == "failed" else log.info)(
                "case %s: %s in %.2f s %s", case.name, result.status, result.seconds, result.message)
        save()
    return finish_batch(output_dir, [results[c.name] for c in cases], "images")
