"""Per-case, per-class segmentation metrics in the TransUNet protocol, and a MONAI handler that reports them."""

from __future__ import annotations

import csv
import io
import os
import re
from typing import Sequence

import numpy as np
from scipy import ndimage

from networks.data import write_atomic

__all__ = ["dice", "hd95", "case_metrics", "summarise", "ReportHandler", "SegmentationReport", "PROTOCOL"]

PROTOCOL = ("TransUNet protocol: 3D per case and per organ; Dice and HD95 (95th percentile of the symmetric surface "
            "distances) in voxels (no spacing, as TransUNet reports) and in mm (from the label's spacing); a prediction "
            "with no voxels of an organ present in the ground truth scores Dice 0 and HD95 0 (medpy rules); organs "
            "absent from a case's ground truth are left out of that organ's mean.")


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    total = pred.sum() + gt.sum()
    return float(2.0 * np.logical_and(pred, gt).sum() / total) if total else 1.0


def _surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distances from the surface voxels of ``a`` to the surface of ``b`` (medpy's definition)."""
    footprint = ndimage.generate_binary_structure(a.ndim, 1)
    surface_a = a ^ ndimage.binary_erosion(a, structure=footprint, iterations=1)
    surface_b = b ^ ndimage.binary_erosion(b, structure=footprint, iterations=1)
    distance_to_b = ndimage.distance_transform_edt(~surface_b, sampling=spacing)
    return distance_to_b[surface_a]


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """95th percentile Hausdorff distance between two non-empty binary masks (voxel units without ``spacing``)."""
    spacing = [1.0] * pred.ndim if spacing is None else list(spacing)
    distances = np.concatenate([_surface_distances(pred, gt, spacing), _surface_distances(gt, pred, spacing)])
    return float(np.percentile(distances, 95))


def case_metrics(pred: np.ndarray, gt: np.ndarray, labels: dict[int, str], spacing: Sequence[float]) -> list[dict]:
    """One row per foreground label: dice, hd95 in voxels and mm, and whether the organ is in the ground truth."""
    rows = []
    for value, name in sorted(labels.items()):
        if value == 0:
            continue
        p, g = pred == value, gt == value
        row = {"organ": name, "gt_present": bool(g.any()), "dice": 0.0, "hd95_voxels": 0.0, "hd95_mm": 0.0}
        if p.any() and g.any():
            row.update(dice=dice(p, g), hd95_voxels=hd95(p, g), hd95_mm=hd95(p, g, spacing))
        elif p.any():  # medpy rule for an organ absent from the ground truth
            row.update(dice=1.0)
        rows.append(row)
    return rows


def summarise(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Mean per organ over the cases where the organ is in the ground truth, and the mean over organs."""
    organs: dict[str, list[dict]] = {}
    for row in rows:
        if row["gt_present"]:
            organs.setdefault(row["organ"], []).append(row)
    summary = {organ: {key: float(np.mean([r[key] for r in items])) for key in ("dice", "hd95_voxels", "hd95_mm")}
               for organ, items in organs.items()}
    if summary:
        summary["mean"] = {key: float(np.mean([v[key] for v in summary.values()]))
                           for key in ("dice", "hd95_voxels", "hd95_mm")}
    return summary


def summary_markdown(summary: dict[str, dict[str, float]], title: str, level: int = 1, protocol: bool = True) -> str:
    lines = ["#" * level + f" {title}", "", *([PROTOCOL, ""] if protocol else []),
             "| organ | Dice | HD95 (voxels) | HD95 (mm) |", "| --- | --- | --- | --- |"]
    for organ, values in summary.items():
        lines.append(f"| {organ} | {values['dice']:.4f} | {values['hd95_voxels']:.2f} | {values['hd95_mm']:.2f} |")
    return "\n".join(lines) + "\n"


class ReportHandler:
    """Base of the evaluators' report handlers: ``rows`` cleared when a run starts, ``collect`` after every
    iteration, ``write`` when the run completes (subclasses define both)."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, lambda _: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def collect(self, engine) -> None:
        raise NotImplementedError

    def write(self, engine=None) -> dict:
        raise NotImplementedError


class SegmentationReport(ReportHandler):
    """MONAI/ignite handler: per-case, per-organ metrics into ``metrics.csv`` and ``summary.md`` in ``output_dir``.

    Expects the evaluator's output items to hold ``pred`` and ``label`` label maps on the same (original) grid, as
    produced by inverting the preprocessing. With ``group_pattern`` (a regular expression whose first group picks a
    part of the case's file name, e.g. ``_(ED|ES)\b`` for the cardiac phase), ``summary.md`` also holds one table per
    group.
    """

    def __init__(self, output_dir: str, labels: dict, title: str = "Segmentation evaluation",
                 group_pattern: str | None = None) -> None:
        self.output_dir = output_dir
        self.labels = {int(k): v for k, v in labels.items()}
        self.title = title
        self.group_pattern = re.compile(group_pattern) if group_pattern else None
        super().__init__()

    def collect(self, engine) -> None:
        for item in engine.state.output:
            pred, label = item["pred"], item["label"]
            case = os.path.basename(str(label.meta.get("filename_or_obj", f"case{len(self.rows)}")))
            spacing = [float(s) for s in label.pixdim[:3]]
            for row in case_metrics(_labels(pred), _labels(label), self.labels, spacing):
                self.rows.append({"case": case, **row})

    def groups(self) -> dict[str, list[dict]]:
        """The rows by the group that ``group_pattern`` finds in their case name (cases without a match are left
        out)."""
        groups: dict[str, list[dict]] = {}
        if self.group_pattern is not None:
            for row in self.rows:
                found = self.group_pattern.search(row["case"])
                if found:
                    groups.setdefault(found.group(1), []).append(row)
        return dict(sorted(groups.items()))

    def write(self, engine=None) -> dict:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["case", "organ", "gt_present", "dice", "hd95_voxels", "hd95_mm"])
        writer.writeheader()
        writer.writerows(self.rows)
        write_atomic(os.path.join(self.output_dir, "metrics.csv"), buffer.getvalue())
        summary = summarise(self.rows)
        text = summary_markdown(summary, self.title)
        for group, rows in self.groups().items():
            cases = len({row["case"] for row in rows})
            text += "\n" + summary_markdown(summarise(rows), f"{group} ({cases} cases)", level=2, protocol=False)
        write_atomic(os.path.join(self.output_dir, "summary.md"), text)
        if engine is not None:
            engine.state.metrics["mean_dice"] = summary.get("mean", {}).get("dice", 0.0)
        return summary


def _labels(tensor) -> np.ndarray:
    array = np.asarray(tensor.detach().cpu().numpy() if hasattr(tensor, "detach") else tensor)
    return np.rint(array[0] if array.ndim == 4 else array).astype(np.int64)
