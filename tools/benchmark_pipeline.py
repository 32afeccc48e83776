"""End-to-end CT pipeline benchmark: read, preprocess, infer, restore and write one volume, per network.

``python tools/benchmark_pipeline.py --shape 512,512,150 --threads 2 --output docs/benchmark_pipeline.md``

It writes a synthetic CT NIfTI of the given shape (HU values: air, a body ellipse with soft tissue, bone) and runs
the Synapse bundle's own inference pipeline (``networks.batch.volumes.VolumeSegmenter``: ``configs/inference.json``) on
it once per network and engine (eager PyTorch, and ``--engine onnx``: ONNX Runtime), each in a fresh subprocess so
that peak RSS (``ru_maxrss`` of that process, interpreter and libraries included) belongs to one pipeline alone.
The MONAI UNet rows swap ``network_def`` through ``configs/unet_baseline.json``, everything else unchanged. Both networks get random weights of their own
architecture: speed and memory do not depend on the values. Seconds are the best of ``repeats`` runs of one case
(read, preprocess, infer, invert to the input grid, write the label NIfTI); model construction (and the ONNX export)
is reported apart.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import fire
import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE = os.path.join(REPO_ROOT, "bundles", "synapse_ltmednext_segmentation")
UNET_CONFIG = os.path.join(BUNDLE, "configs", "unet_baseline.json")
PIPELINES = {  # name: (extra configs, engine)
    "LTMedNeXt-T (bundle)": ((), "torch"),
    "LTMedNeXt-T (bundle, --engine onnx)": ((), "onnx"),
    "MONAI UNet (same pipeline)": ((UNET_CONFIG,), "torch"),
    "MONAI UNet (same pipeline, --engine onnx)": ((UNET_CONFIG,), "onnx"),
}


def write_synthetic_ct(path: str, shape: tuple[int, int, int], spacing=(0.8, 0.8, 2.5)) -> None:
    """A body-like CT volume in HU: -1000 air, a soft-tissue ellipse with noise, a bright spine."""
    import nibabel as nib

    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    body = (x / 0.85) ** 2 + (y / 0.65) ** 2 < 1
    spine = (x / 0.08) ** 2 + ((y - 0.4) / 0.08) ** 2 < 1
    rng = np.random.default_rng(0)
    volume = np.full(shape, -1000, dtype=np.int16)
    for z in range(shape[2]):
        plane = np.where(body, 40 + rng.normal(0, 20, shape[:2]), -1000)
        volume[..., z] = np.where(spine, 700, plane).astype(np.int16)
    nib.save(nib.Nifti1Image(volume, np.diag([*spacing, 1.0])), path)


def measure(volume: str, extra_configs: tuple[str, ...] = (), threads: int = 2, repeats: int = 2,
            engine: str = "torch") -> None:
    """Run in a subprocess: one pipeline on one volume; prints a JSON line with seconds and peak RSS."""
    import torch

    from networks.batch.volumes import Case, VolumeSegmenter
    from networks.batch.writers import save_label

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        weights = os.path.join(tmp, "random.pt")
        torch.save(_network(tuple(extra_configs)).state_dict(), weights)
        runner = VolumeSegmenter(BUNDLE, "cpu", tuple(extra_configs), weights, engine)
        setup = time.perf_counter() - start
        case = Case("bench", volume, "nifti")
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            label = runner(case)
            save_label(label, os.path.join(tmp, "bench_seg.nii.gz"))
            seconds.append(time.perf_counter() - start)
        assert tuple(label.shape[-3:]) == tuple(runner.load(case).shape[-3:])
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": min(seconds), "setup": setup, "peak_mib": peak_mib}))


def _network(extra_configs: tuple[str, ...]):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([os.path.join(BUNDLE, "configs", "inference.json"), *extra_configs])
    parser["device"] = "$torch.device('cpu')"
    return parser.get_parsed_content("network_def")


def main(shape: str | tuple = "512,512,150", threads: int = 2, repeats: int = 2,
         output: str = "docs/benchmark_pipeline.md") -> None:
    """Benchmark both pipelines on a synthetic CT of ``shape`` and write a markdown table to ``output``."""
    import monai
    import torch

    shape = tuple(int(s) for s in (shape.split(",") if isinstance(shape, str) else shape))
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        volume = os.path.join(tmp, "ct.nii.gz")
        write_synthetic_ct(volume, shape)
        for number, (name, (extra, engine)) in enumerate(PIPELINES.items(), 1):
            command = [sys.executable, os.path.abspath(__file__), "measure", volume, "--threads", str(threads),
                       "--repeats", str(repeats), "--extra_configs", json.dumps(list(extra)), "--engine", engine]
            done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
            if done.returncode != 0:
                raise RuntimeError(f"{name} pipeline failed:\n{done.stderr[-3000:]}")
            rows[name] = json.loads(done.stdout.strip().splitlines()[-1])
            # progress on stderr: stdout carries the table once
            print(f"[{number}/{len(PIPELINES)}] {name}: {rows[name]['seconds']:.1f} s", file=sys.stderr, flush=True)
    unet = rows["MONAI UNet (same pipeline)"]
    lines = [
        f"# Synapse CT pipeline benchmark ({'x'.join(map(str, shape))} volume)",
        "",
        f"Date: {time.strftime('%Y-%m-%d')}. CPU: {platform.processor() or platform.machine()}, threads: {threads}. "
        f"torch {torch.__version__}, monai {monai.__version__}.",
        f"Command: `python tools/benchmark_pipeline.py --shape {','.join(map(str, shape))} --threads {threads} "
        f"--repeats {repeats}`. Seconds: best of {repeats} runs of read + preprocess + infer + invert + write; "
        "peak RSS: the whole process (interpreter, torch, model, volume).",
        "",
        "| Pipeline | Seconds per volume | x faster than UNet pipeline | Peak RSS (MiB) | Model setup (s) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['seconds']:.1f} | {unet['seconds'] / row['seconds']:.2f} | "
                     f"{row['peak_mib']:.0f} | {row['setup']:.1f} |")
    text = "\n".join(lines) + "\n"
    from networks.data import write_atomic

    write_atomic(output, text)
    print(text)


if __name__ == "__main__":
    if sys.argv[1:2] == ["measure"]:
        fire.Fire(measure, command=sys.argv[2:])
    else:
        fire.Fire(main)
