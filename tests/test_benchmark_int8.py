"""tools/benchmark_int8.py on the shipped CT sample at one repeat: every precision row, a ratio to MONAI UNet and a
label agreement in [0, 1] (fp32 eager agrees with itself exactly)."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import REPO


def test_int8_benchmark_table(tmp_path):
    output = tmp_path / "int8.md"
    result = subprocess.run([sys.executable, os.path.join(REPO, "tools", "benchmark_int8.py"), "--threads", "1",
                             "--repeats", "1", "--batch", "2", "--output", str(output)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")]
                                              for line in output.read_text().splitlines() if line.startswith("| "))}
    expected = ["fp32 eager", "fp32 ONNX Runtime", "int8 ONNX Runtime, QDQ, all operators",
                "int8 ONNX Runtime, QOperator, dense convolutions", "bf16 autocast eager"]
    assert all(name in rows for name in expected)
    assert rows["fp32 eager"][2] == "1.0000" and rows["fp32 ONNX Runtime"][2] == "1.0000"
    for name in expected:
        speed, ratio, dice = (float(cell) for cell in rows[name])
        assert speed > 0 and ratio > 0 and 0.0 <= dice <= 1.0
