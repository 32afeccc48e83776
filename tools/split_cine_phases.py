"""Split a multi-phase cine MRI DICOM series into one folder per cardiac phase.

A cine short-axis series holds every slice position once per phase (e.g. 10 positions x 25 phases = 250 files), so
read as one volume its slices would collide. ``tools/infer.py`` refuses such a series and names this tool. Here the
files of each slice position are ordered by TriggerTime (InstanceNumber where TriggerTime is missing); phase k is
the k-th file of every position. Each phase is copied to ``OUT/<series>_phaseKK/`` (written under a temporary name,
then renamed), a plain 3D series that ``tools/infer.py`` segments as its own case.

Examples::

    python tools/split_cine_phases.py /data/cine_sax out/phases                       # every phase
    python tools/split_cine_phases.py /data/cine_sax out/phases --phases "[0, 11]"    # e.g. ED and ES
"""

from __future__ import annotations

import os
import shutil
import tempfile

import fire
import numpy as np


def _slice_position(ds) -> float:
    orientation = np.asarray(ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), dtype=np.float64)
    return float(np.dot(np.cross(orientation[:3], orientation[3:]), np.asarray(ds.ImagePositionPatient, float)))


def cine_phases(folder: str, series_uid: str | None = None) -> list[list[str]]:
    """The files of the series in ``folder`` as phases (each a list of files, one per slice position).

    One phase when every position occurs once. Raises ValueError naming the folder when positions repeat unevenly
    (duplicates or a broken export rather than a cine series) or no file has a position.
    """
    import pydicom

    by_position: dict[float, list[tuple[float, int, str]]] = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        if "ImagePositionPatient" not in ds:
            continue
        if series_uid is not None and str(getattr(ds, "SeriesInstanceUID", "") or "") != series_uid:
            continue
        trigger = float(ds.get("TriggerTime", np.nan) or np.nan)
        order = (trigger if np.isfinite(trigger) else float(ds.get("InstanceNumber", 0) or 0))
        by_position.setdefault(round(_slice_position(ds), 2), []).append((order, int(ds.get("InstanceNumber", 0) or 0),
                                                                          path))
    if not by_position:
        raise ValueError(f"{folder}: no DICOM image slices with a position were found.")
    counts = {len(files) for files in by_position.values()}
    if len(counts) != 1:
        raise ValueError(f"{folder}: slice positions repeat unevenly ({min(counts)} to {max(counts)} files per "
                         f"position): duplicates or an incomplete export, not a regular cine series.")
    positions = sorted(by_position)
    ordered = [sorted(by_position[p]) for p in positions]
    return [[files[k][2] for files in ordered] for k in range(counts.pop())]


def split(input: str, output_dir: str, phases: list[int] | None = None) -> list[str]:
    """Copy each phase (or only ``phases``, 0-based) of the cine series in ``input`` to its own folder."""
    groups = cine_phases(input)
    wanted = list(range(len(groups))) if phases is None else [int(p) for p in phases]
    bad = [p for p in wanted if not 0 <= p < len(groups)]
    if bad:
        raise ValueError(f"{input}: phases {bad} out of range; the series holds {len(groups)} phases (0-based).")
    base = os.path.basename(os.path.abspath(input))
    os.makedirs(output_dir, exist_ok=True)
    written = []
    for k in wanted:
        target = os.path.join(output_dir, f"{base}_phase{k:02d}")
        if os.path.isdir(target):
            written.append(target)  # done by an earlier run
            continue
        tmp = tempfile.mkdtemp(dir=output_dir, prefix=".tmp_")
        for path in groups[k]:
            shutil.copy2(path, os.path.join(tmp, os.path.basename(path)))
        os.replace(tmp, target)
        written.append(target)
    print(f"{input}: {len(groups)} phases x {len(groups[0])} slices; wrote {len(written)} folder(s) to {output_dir}")
    return written


if __name__ == "__main__":
    fire.Fire(split)
