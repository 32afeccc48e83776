"""Classification metrics and reports shared by the classification bundles.

* :func:`classification_metrics`: accuracy, balanced accuracy, macro F1, AUC (one-vs-rest, macro) and the confusion
  matrix, with numpy only;
* :class:`ClassificationMetric`: one of those numbers as an ignite metric (validation key metric);
* :class:`ClassificationReport`: an evaluator handler that writes ``metrics.csv``, ``confusion_matrix.csv``,
  ``confusion_matrix.png`` and ``predictions.csv``.

Reading images lives in :mod:`networks.image_io` and :mod:`networks.transforms`, splits in :mod:`networks.data`,
weight helpers in :mod:`networks.training`.
"""

from __future__ import annotations

import csv
import io
import math
import os
from typing import Mapping, Sequence

import numpy as np
import torch

from networks.data import write_atomic
from networks.evaluation import ReportHandler

__all__ = ["classification_metrics", "roc_auc", "ClassificationMetric", "ClassificationReport", "confusion_matrix_png"]


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


_MOVED = {  # names this module held before it was split by concern; bundle configs written then still resolve them
    "IMAGE_SUFFIXES": "networks.image_io", "DICOM_SUFFIXES": "networks.image_io", "is_dicom": "networks.image_io",
    "read_image_rgb": "networks.image_io", "find_images": "networks.image_io", "image_datalist": "networks.image_io",
    "LoadImage2D": "networks.transforms", "LoadImage2Dd": "networks.transforms",
    "grouped_stratified_split": "networks.data",
    "class_weights": "networks.training", "with_encoder_weights": "networks.training",
}


def __getattr__(name: str):
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    import warnings

    warnings.warn(f"networks.classification.{name} moved to {_MOVED[name]}.{name}", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(_MOVED[name]), name)
