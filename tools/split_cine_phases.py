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

from networks.batch.volumes import cine_phases


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
