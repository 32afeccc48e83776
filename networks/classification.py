"""Image classification helpers shared by the classification bundles and their tools.

* :func:`read_image_rgb`, :class:`LoadImage2D` / :class:`LoadImage2Dd`: any 2D image (PNG, JPEG, BMP, TIFF, RGB, RGBA,
  grey, 16-bit, single-frame DICOM) as a 3-channel float image in [0, 1];
* :func:`find_images`: the 2D images under a folder, in a stable order (what a classification bundle calls a case);
  :func:`image_datalist` the same as an inference datalist;
* :func:`grouped_stratified_split`: training/validation/test lists with every patient (or source) on one side and the
  classes in the same proportions on every side;
* :func:`class_weights`: inverse-frequency loss weights for class-balanced training;
* :func:`with_encoder_weights`: a classifier whose encoder starts from another LTMedNeXt checkpoint's (the
  training configs' ``pretrained_encoder``);
* :func:`classification_metrics`: accuracy, balanced accuracy, macro F1, AUC (one-vs-rest, macro) and the confusion
  matrix, with numpy only;
* :class:`ClassificationMetric`: one of those numbers as an ignite metric (validation key metric);
* :class:`ClassificationReport`: an evaluator handler that writes ``metrics.csv``, ``confusion_matrix.csv``,
  ``confusion_matrix.png`` and ``predictions.csv``.
"""

from __future__ import annotations

import csv
import io
import math
import os
import random
from collections import Counter, defaultdict
from typing import Hashable, Mapping, Sequence

import numpy as np
import torch

from networks.data import write_atomic
from networks.evaluation import ReportHandler
from networks.training import read_weights

__all__ = ["IMAGE_SUFFIXES", "DICOM_SUFFIXES", "is_dicom", "read_image_rgb", "LoadImage2D", "LoadImage2Dd",
           "find_images", "image_datalist", "grouped_stratified_split", "class_weights", "classification_metrics",
           "roc_auc", "with_encoder_weights", "ClassificationMetric", "ClassificationReport", "confusion_matrix_png"]

DICOM_SUFFIXES = (".dcm", ".dicom")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", *DICOM_SUFFIXES)
MAX_PIXELS = 20000 * 20000  # a header claiming more than this is refused before decoding (decompression bombs)


# ----------------------------------------------------------------------------------------------------------- loading
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


def _unit_range(array: np.ndarray) -> np.ndarray:
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
        return _unit_range(pixels) if pixels.dtype != np.uint8 else pixels.astype(np.float32) / 255.0
    if pixels.ndim != 2:
        raise ValueError(f"{path}: expected a 2D DICOM image, got pixel data of shape {pixels.shape}.")
    values = apply_modality_lut(pixels, ds)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        values = apply_voi_lut(values, ds)
    grey = _unit_range(values)
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
            grey = _unit_range(np.asarray(image, dtype=np.float32))
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
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path}: not a readable image ({detail}).") from e
    if array.ndim != 3 or array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"{path}: empty image (shape {array.shape}).")
    if not np.isfinite(array).all():
        raise ValueError(f"{path}: the image holds NaN or infinite values.")
    return array


class LoadImage2D:
    """Transform: a path to a ``(3, H, W)`` float32 ``MetaTensor`` in [0, 1] (see :func:`read_image_rgb`), with
    ``filename_or_obj`` and the original ``spatial_shape`` in its meta data. Rows are the image's rows (no transpose),
    the same in training and inference."""

    def __call__(self, path: str):
        from monai.data import MetaTensor

        array = read_image_rgb(str(path))
        tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
        return MetaTensor(tensor, meta={"filename_or_obj": str(path), "spatial_shape": np.asarray(array.shape[:2])})


class LoadImage2Dd:
    """Dictionary version of :class:`LoadImage2D` (MONAI ``MapTransform`` style: ``keys`` are loaded in place)."""

    def __init__(self, keys: str | Sequence[str] = "image", allow_missing_keys: bool = False) -> None:
        self.keys = [keys] if isinstance(keys, str) else list(keys)
        self.allow_missing_keys = allow_missing_keys
        self.loader = LoadImage2D()

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.keys:
            if key in d:
                d[key] = self.loader(d[key])
            elif not self.allow_missing_keys:
                raise KeyError(f"key {key!r} not in the data ({sorted(map(str, d))}).")
        return d


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


# ------------------------------------------------------------------------------------------------------------ splits
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


def class_weights(datalist: Sequence[dict], num_classes: int, label_key: str = "label",
                  device: str | torch.device | None = None) -> torch.Tensor:
    """Inverse-frequency class weights (mean 1 over the classes present) for ``torch.nn.CrossEntropyLoss``; a class
    absent from ``datalist`` gets weight 0. On ``device`` when given (a config's ``_target_`` component)."""
    counts = np.bincount([int(item[label_key]) for item in datalist], minlength=num_classes).astype(np.float64)
    if len(counts) > num_classes:
        raise ValueError(f"labels up to {len(counts) - 1} found, but num_classes is {num_classes}.")
    weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / max(int((counts > 0).sum()), 1), 0.0)
    present = weights[counts > 0]
    weights = weights / present.mean() if len(present) else weights
    return torch.as_tensor(weights, dtype=torch.float32, device=device)


def with_encoder_weights(network: torch.nn.Module, path: str | None) -> torch.nn.Module:
    """``network`` (an LTMedNeXtClassifier, or one wrapped in DistributedDataParallel) with its encoder initialised
    from the ``encoder.*`` weights of another LTMedNeXt checkpoint at ``path`` (a segmentation bundle's
    ``models/model.pt``, for example); unchanged when ``path`` is empty or None.

    A stem trained on fewer input channels (1 for CT/MR) is spread evenly over this network's channels, so a grey
    image replicated to RGB gives the stem exactly the response it was trained on. Everything outside the encoder
    (the classification head) keeps its initialisation.
    """
    if not path:
        return network
    target = getattr(network, "module", network)
    state = read_weights(path)
    encoder = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    if not encoder:
        raise ValueError(f"{path}: no encoder.* weights (not an LTMedNeXt checkpoint?)")
    own = target.encoder.state_dict()
    stem = "stem.0.weight"
    if stem in encoder and stem in own and encoder[stem].shape[1] != own[stem].shape[1]:
        mean = encoder[stem].mean(1, keepdim=True)
        encoder[stem] = mean.expand(-1, own[stem].shape[1], -1, -1) * (encoder[stem].shape[1] / own[stem].shape[1])
    mismatched = [k for k in own if k not in encoder or encoder[k].shape != own[k].shape]
    if mismatched:
        raise ValueError(f"{path}: encoder weights do not fit this network (size or width differs): "
                         f"{', '.join(mismatched[:5])}")
    target.encoder.load_state_dict(encoder)
    return network


# ----------------------------------------------------------------------------------------------------------- metrics
def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the binary truth ``positive`` (Mann-Whitney U with average ranks
    for ties); NaN when one of the two classes is absent."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    start = 0
    while start < len(scores):  # average rank over runs of equal scores
        end = start
        while end + 1 < len(scores) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def classification_metrics(labels: Sequence[int], probabilities: np.ndarray | Sequence[Sequence[float]],
                           num_classes: int | None = None) -> dict:
    """Accuracy, balanced accuracy, macro F1, AUC and the confusion matrix of class ``probabilities`` ``(N, C)``
    against integer ``labels``.

    Returns a dict: ``accuracy``; ``balanced_accuracy`` (mean recall over the classes present in ``labels``);
    ``f1_macro`` (mean F1 over the classes present in ``labels`` or predicted; a class with no true and no predicted
    image is left out); ``auc`` (two classes: ROC AUC of the class-1 probability; more: mean one-vs-rest AUC over the
    classes where it is defined); ``n``; ``confusion_matrix`` (rows: true class, columns: predicted class, a list of
    lists); ``per_class`` (precision, recall, f1, support, auc per class index). The prediction is the argmax.
    """
    probs = np.asarray(probabilities, dtype=np.float64)
    truth = np.asarray(labels, dtype=np.int64).reshape(-1)
    if probs.ndim != 2 or len(probs) != len(truth):
        raise ValueError(f"probabilities must be (N, C) with N = {len(truth)} labels, got shape {probs.shape}.")
    num_classes = int(num_classes or probs.shape[1])
    if len(truth) and (truth.min() < 0 or truth.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, found {truth.min()}..{truth.max()}.")
    pred = probs.argmax(1) if len(probs) else np.zeros(0, dtype=np.int64)
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (truth, pred), 1)
    support, predicted, hits = matrix.sum(1), matrix.sum(0), np.diag(matrix)
    per_class = []
    for c in range(num_classes):
        precision = hits[c] / predicted[c] if predicted[c] else float("nan")
        recall = hits[c] / support[c] if support[c] else float("nan")
        f1 = 2 * hits[c] / (support[c] + predicted[c]) if support[c] + predicted[c] else float("nan")
        auc = roc_auc(probs[:, c], truth == c) if len(truth) else float("nan")
        per_class.append({"precision": float(precision), "recall": float(recall), "f1": float(f1),
                          "support": int(support[c]), "auc": auc})
    present = [c for c in range(num_classes) if support[c]]

    def mean(values):
        values = [v for v in values if not math.isnan(v)]
        return float(np.mean(values)) if values else float("nan")

    return {
        "accuracy": float(hits.sum() / len(truth)) if len(truth) else float("nan"),
        "balanced_accuracy": mean([per_class[c]["recall"] for c in present]),
        "f1_macro": mean([p["f1"] for p in per_class]),
        "auc": per_class[1]["auc"] if num_classes == 2 else mean([p["auc"] for p in per_class]),
        "n": int(len(truth)),
        "confusion_matrix": matrix.tolist(),
        "per_class": per_class,
    }


def _as_rows(y_pred, y) -> tuple[list[np.ndarray], list[int]]:
    """(probability vectors, labels) from a batch tensor or a decollated list, as an evaluator's output gives."""
    preds = [p for p in y_pred] if not isinstance(y_pred, (list, tuple)) else list(y_pred)
    labels = [t for t in y] if not isinstance(y, (list, tuple)) else list(y)
    probs = [np.asarray(torch.as_tensor(p).detach().cpu().float().reshape(-1)) for p in preds]
    return probs, [int(torch.as_tensor(t).reshape(-1)[0]) for t in labels]


try:  # ignite is a dependency of the bundles' training configs, not of this module's functions
    from ignite.metrics import Metric as _IgniteMetric
except ImportError:  # pragma: no cover
    _IgniteMetric = object


class ClassificationMetric(_IgniteMetric):
    """One number of :func:`classification_metrics` (``accuracy``, ``balanced_accuracy``, ``f1_macro``, ``auc``) as
    an ignite metric over an evaluation run, for a MONAI evaluator's ``key_val_metric`` / ``additional_metrics``.

    Expects ``output_transform`` to give ``(y_pred, y)``: class probabilities ``(C,)`` per image and integer labels
    (``monai.handlers.from_engine(['pred', 'label'])``). Under torch.distributed the values of all ranks are gathered.
    """

    def __init__(self, metric: str = "balanced_accuracy", num_classes: int | None = None,
                 output_transform=lambda x: x, device: str | torch.device = "cpu") -> None:
        if metric not in ("accuracy", "balanced_accuracy", "f1_macro", "auc"):
            raise ValueError(f"metric must be accuracy, balanced_accuracy, f1_macro or auc, got {metric!r}.")
        self.metric = metric
        self.num_classes = num_classes
        self._probs: list[np.ndarray] = []
        self._labels: list[int] = []
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        self._probs, self._labels = [], []

    def update(self, output) -> None:
        probs, labels = _as_rows(*output)
        self._probs += probs
        self._labels += labels

    def compute(self) -> float:
        import ignite.distributed as idist

        probs = torch.as_tensor(np.stack(self._probs)) if self._probs else torch.zeros(0, self.num_classes or 2)
        labels = torch.as_tensor(self._labels, dtype=torch.int64)
        if idist.get_world_size() > 1:
            probs, labels = idist.all_gather(probs), idist.all_gather(labels)
        if len(labels) == 0:
            raise RuntimeError("ClassificationMetric: no images were evaluated.")
        return classification_metrics(labels.numpy(), probs.numpy(), self.num_classes)[self.metric]


# ----------------------------------------------------------------------------------------------------------- reports
def confusion_matrix_png(matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: str,
                         title: str = "Confusion matrix") -> None:
    """Draw ``matrix`` (rows: true, columns: predicted) as a PNG: counts and row percentages in cells shaded by the
    row fraction, class names on both axes. Written under a temporary name and renamed."""
    from PIL import Image, ImageDraw, ImageFont

    matrix = np.asarray(matrix, dtype=np.int64)
    n = len(class_names)
    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # pragma: no cover - Pillow without FreeType sizes
        font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = lambda s: probe.textbbox((0, 0), s, font=font)[2]  # noqa: E731
    label_w = max(text_width(name) for name in class_names) + 16
    cell, top, left = 96, 70, label_w + 28
    width = max(left + n * cell + 20, text_width(title) + 40)
    height = top + n * cell + 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), title, fill="black", font=font)
    draw.text((left + n * cell // 2 - text_width("predicted") // 2, top - 24), "predicted", fill="black", font=font)
    draw.text((6, top + n * cell // 2 - 40), "true", fill="black", font=font)
    rows = matrix.sum(1)
    for i in range(n):
        draw.text((left - 8 - text_width(class_names[i]), top + i * cell + cell // 2 - 8), class_names[i],
                  fill="black", font=font)
        draw.text((left + i * cell + cell // 2 - text_width(class_names[i]) // 2, top + n * cell + 8),
                  class_names[i], fill="black", font=font)
        for j in range(n):
            fraction = matrix[i, j] / rows[i] if rows[i] else 0.0
            shade = int(255 - 200 * fraction)
            box = (left + j * cell, top + i * cell, left + (j + 1) * cell, top + (i + 1) * cell)
            draw.rectangle(box, fill=(shade, shade, 255), outline="black")
            colour = "white" if fraction > 0.6 else "black"
            for k, text in enumerate((str(int(matrix[i, j])), f"{100 * fraction:.0f}%")):
                draw.text((box[0] + cell // 2 - text_width(text) // 2, box[1] + cell // 2 - 18 + 20 * k), text,
                          fill=colour, font=font)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_atomic(path, buffer.getvalue())


def _fmt(value: float) -> str:
    return "nan" if isinstance(value, float) and math.isnan(value) else f"{value:.4f}"


class ClassificationReport(ReportHandler):
    """MONAI/ignite evaluator handler: per-image predictions and the classification metrics of a run.

    On completion writes into ``output_dir`` (each file atomically): ``metrics.csv`` (``metric,value``: accuracy,
    balanced_accuracy, f1_macro, auc, n, then precision/recall/f1/auc/support per class), ``confusion_matrix.csv``
    (rows: true class, columns: predicted class), ``confusion_matrix.png`` and ``predictions.csv`` (image, label,
    prediction, one ``p_<class>`` column per class). The numbers are also put into ``engine.state.metrics``.

    Expects the evaluator's output items (decollated) to hold ``pred`` (class probabilities, ``(C,)``), ``label``
    and ``image`` (with ``filename_or_obj`` in its meta data).
    """

    def __init__(self, output_dir: str, class_names: Sequence[str] | Mapping, title: str = "Classification") -> None:
        self.output_dir = output_dir
        if isinstance(class_names, Mapping):
            class_names = [class_names[k] for k in sorted(class_names, key=int)]
        self.class_names = [str(c) for c in class_names]
        self.title = title
        super().__init__()

    def collect(self, engine) -> None:
        for item in engine.state.output:
            image = item.get("image")
            meta = getattr(image, "meta", {}) or {}
            probs, labels = _as_rows([item["pred"]], [item["label"]])
            self.rows.append({"image": str(meta.get("filename_or_obj", f"image{len(self.rows)}")),
                              "label": labels[0], "probabilities": probs[0]})

    def write(self, engine=None) -> dict:
        if not self.rows:
            raise RuntimeError("ClassificationReport: no images were evaluated.")
        probs = np.stack([r["probabilities"] for r in self.rows])
        if probs.shape[1] != len(self.class_names):
            raise ValueError(f"{probs.shape[1]} class probabilities per image, but {len(self.class_names)} class "
                             f"names ({self.class_names}).")
        result = classification_metrics([r["label"] for r in self.rows], probs, len(self.class_names))
        lines = [("accuracy", result["accuracy"]), ("balanced_accuracy", result["balanced_accuracy"]),
                 ("f1_macro", result["f1_macro"]), ("auc", result["auc"])]
        for name, values in zip(self.class_names, result["per_class"]):
            lines += [(f"{key}_{name}", values[key]) for key in ("precision", "recall", "f1", "auc")]
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["metric", "value"])
        writer.writerows([(k, _fmt(v)) for k, v in lines])
        writer.writerow(["n", result["n"]])
        writer.writerows([(f"support_{n}", v["support"]) for n, v in zip(self.class_names, result["per_class"])])
        write_atomic(os.path.join(self.output_dir, "metrics.csv"), buffer.getvalue())

        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["true \\ predicted", *self.class_names])
        writer.writerows([[name, *row] for name, row in zip(self.class_names, result["confusion_matrix"])])
        write_atomic(os.path.join(self.output_dir, "confusion_matrix.csv"), buffer.getvalue())
        confusion_matrix_png(result["confusion_matrix"], self.class_names,
                             os.path.join(self.output_dir, "confusion_matrix.png"),
                             f"{self.title} (n={result['n']}, accuracy {result['accuracy']:.3f})")

        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["image", "label", "prediction", *(f"p_{n}" for n in self.class_names)])
        for row in self.rows:
            p = row["probabilities"]
            writer.writerow([row["image"], self.class_names[row["label"]], self.class_names[int(p.argmax())],
                             *(f"{v:.6f}" for v in p)])
        write_atomic(os.path.join(self.output_dir, "predictions.csv"), buffer.getvalue())
        if engine is not None:
            engine.state.metrics.update({k: v for k, v in lines[:4]})
        return result
