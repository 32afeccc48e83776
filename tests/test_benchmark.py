"""tools/benchmark.py at tiny settings: the markdown table is written, with the expected columns and rows."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "tools" / "benchmark.py"

EXPECTED_HEADER = [
    "Network", "Parameters", "GMACs (64x64)",
    "Inference 32x32 (slices/s)", "x UNet",
    "Inference 64x64 (slices/s)", "x UNet",
    "Training 64x64 (slices/s)", "x UNet",
    "Peak RSS 64x64 (MiB)",
    "ONNX Runtime 64x64 (slices/s)", "x own eager", "x UNet (eager)", "max abs ORT - torch",
]


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_benchmark_writes_markdown_table(tmp_path: Path) -> None:
    output = tmp_path / "benchmark.md"
    command = [sys.executable, str(SCRIPT), "--networks", "litenext,litenext_encoder,unet", "--repeats", "1",
               "--batch", "1", "--sizes", "32,64", "--threads", "1", "--output", str(output)]
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    assert completed.returncode == 0, completed.stderr[-4000:]

    assert sorted(tmp_path.iterdir()) == [output]  # written atomically, no temporary file left behind
    text = output.read_text()
    assert text.startswith("# ")
    for expected in ("Date:", "torch ", "monai ", "onnxruntime ", "CPU:", "Threads: 1", "ptflops"):
        assert expected in text
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert _cells(table[0]) == EXPECTED_HEADER
    rows = [_cells(line) for line in table[2:]]
    assert [row[0] for row in rows] == ["LiteNeXt (fused decoder)", "LiteNeXt encoder alone (no decoder)", "MONAI UNet"]
    assert all(len(row) == len(EXPECTED_HEADER) for row in rows)
    assert rows[0][1] == "711,201"
    ratio_columns = [i for i, name in enumerate(EXPECTED_HEADER) if name == "x UNet"]
    assert [rows[2][i] for i in ratio_columns] == ["1.00"] * 3
    assert "n/a" not in text
    assert all(float(row[-1]) < 1e-3 for row in rows)  # ONNX Runtime agrees with PyTorch
    assert table[0] in completed.stdout  # the table is printed too


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("benchmark_under_test", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_unknown_network_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown networks"):
        _benchmark_module().main(networks="litenext,no_such_net")


def test_encoder_row_is_the_litenext_encoder() -> None:
    import torch

    module = _benchmark_module()
    images = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        expected = module.build("litenext").encode(images)[-1]
        assert torch.equal(module.build("litenext_encoder")(images), expected)


def test_inference_is_timed_in_interleaved_rounds() -> None:
    module = _benchmark_module()
    calls: list[str] = []
    steps = {(name, "224"): (lambda name=name: calls.append(name)) for name in ("litenext", "unet", "segresnet")}
    rates = module.interleaved_rates(steps, batch=8, repeats=3)
    warmup = 3 * module.WARMUP
    assert calls[:warmup] == sorted(calls[:warmup], key=["litenext", "unet", "segresnet"].index)
    assert calls[warmup:] == ["litenext", "unet", "segresnet"] * 3
    assert set(rates) == set(steps) and all(rate > 0 for rate in rates.values())


def test_pipeline_benchmark_writes_table(tmp_path: Path) -> None:
    output = tmp_path / "pipeline.md"
    command = [sys.executable, str(REPO_ROOT / "tools" / "benchmark_pipeline.py"), "--shape", "64,48,4",
               "--threads", "1", "--repeats", "1", "--output", str(output)]
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert sorted(tmp_path.iterdir()) == [output]
    rows = [_cells(line) for line in output.read_text().splitlines() if line.startswith("| ")][2:]
    assert [row[0] for row in rows] == ["LTMedNeXt-T (bundle)", "LTMedNeXt-T (bundle, --engine onnx)",
                                        "MONAI UNet (same pipeline)", "MONAI UNet (same pipeline, --engine onnx)"]
    assert rows[2][2] == "1.00"
    assert all(float(row[1]) > 0 and 100 < float(row[3]) < 8000 for row in rows)
    printed = [line for line in completed.stdout.splitlines() if line.startswith("| ")][2:]
    assert [_cells(line)[0] for line in printed] == [row[0] for row in rows]  # the table on stdout once
