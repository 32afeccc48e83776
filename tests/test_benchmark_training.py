"""tools/benchmark_training.py at tiny settings on synthetic volumes: one row per network with the three rates and
what bounds the end-to-end rate; a bundle without a UNet baseline is refused."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import BUNDLES, REPO

SCRIPT = os.path.join(REPO, "tools", "benchmark_training.py")


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_training_benchmark_table(tmp_path):
    output = tmp_path / "training.md"
    command = [sys.executable, SCRIPT, os.path.join(BUNDLES, "acdc_ltmednext_segmentation"), "--batches", "2",
               "--num_workers", "1", "--threads", "1", "--cases", "1", "--depth", "8", "--output", str(output)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    assert sorted(os.listdir(tmp_path)) == ["training.md"]
    rows = [_cells(line) for line in output.read_text().splitlines() if line.startswith("| ")]
    assert rows[0][:4] == ["network", "pipeline (slices/s)", "step (slices/s)", "end to end (slices/s)"]
    body = {row[0]: row for row in rows[2:]}
    assert sorted(body) == ["LTMedNeXt-T", "UNet"]
    for row in body.values():
        assert all(float(cell) > 0 for cell in row[1:4]) and row[5] in ("data pipeline", "training step")
    assert body["UNet"][4] == "1.00"


def test_training_benchmark_refuses_a_bundle_without_unet_baseline():
    result = subprocess.run([sys.executable, SCRIPT, os.path.join(BUNDLES, "dsb2018_litenext_segmentation")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "unet_baseline.json" in result.stderr
