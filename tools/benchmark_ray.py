"""Batch throughput of ``tools/infer.py``: the in-process engine against the Ray engine with 1 and 2 workers.

``python tools/benchmark_ray.py --cases 16 --shape 128,128,32 --workers 1,2 --output docs/benchmark_ray.md``

It writes a fixed batch of ``cases`` synthetic CT volumes (``benchmark_pipeline.write_synthetic_ct``) and a copy of
the Synapse bundle with random LTMedNeXt-T weights (speed does not depend on the values), then runs the whole batch
with ``networks.batch.runners.run``:
in-process with 1 torch thread and with ``threads`` (the default engine), and on a Ray
cluster of one node with ``k`` CPUs for each ``k`` in ``workers`` (one task of 1 CPU and 1 thread per case, so ``k``
workers). Each row gives the batch's wall time (start-up included: Ray's connection, worker processes, each worker's
model load) and cases/min, when the first case finished, and the steady pace after it (seconds between finished cases,
from the per-case log lines). Ray's per-case overhead is its steady pace with 1 worker minus the in-process pace with
1 thread: the same work on one CPU, so the difference is Ray's dispatch, result transfer and scheduling. Every Ray
batch's labels are checked equal, voxel for voxel, to the in-process ones. Ray's workers run at the benchmark's own
priority (``RAY_worker_niceness=0``; Ray lowers it by default), so that both engines compete alike for a busy CPU.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import tempfile
import time

import fire
import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE = os.path.join(REPO_ROOT, "bundles", "synapse_ltmednext_segmentation")


class _Finishes(logging.Handler):
    """perf_counter() of every per-case log line the batch summary writes as a case finishes."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("case "):
            self.times.append(time.perf_counter())


def _random_weight_bundle(folder: str) -> str:
    import torch

    from networks import LTMedNeXt

    bundle = os.path.join(folder, "bundle")
    shutil.copytree(os.path.join(BUNDLE, "configs"), os.path.join(bundle, "configs"))
    os.makedirs(os.path.join(bundle, "models"))
    torch.manual_seed(0)
    torch.save(LTMedNeXt(2, 1, 9, "T").state_dict(), os.path.join(bundle, "models", "model.pt"))
    return bundle


def _labels(folder: str) -> dict[str, np.ndarray]:
    import nibabel as nib

    return {name: np.asarray(nib.load(os.path.join(folder, name)).dataobj) for name in sorted(os.listdir(folder))
            if name.endswith("_seg.nii.gz")}


def _timed_batch(bundle: str, source: str, output: str, cases: int, **options) -> dict:
    from networks.batch.runners import run

    finishes = _Finishes()
    logging.getLogger("infer").addHandler(finishes)
    try:
        start = time.perf_counter()
        code = run(bundle, source, output, **options)
        wall = time.perf_counter() - start
    finally:
        logging.getLogger("infer").removeHandler(finishes)
    if code != 0 or len(finishes.times) != cases:
        raise RuntimeError(f"batch {options} ended with exit code {code} after {len(finishes.times)} cases")
    times = finishes.times
    steady = (times[-1] - times[0]) / (cases - 1) if cases > 1 else float("nan")
    return {"wall": wall, "first": times[0] - start, "steady": steady}


def main(cases: int = 16, shape: str | tuple = "128,128,32", workers: str | tuple | int = "1,2", threads: int = 2,
         output: str = "") -> None:
    """Run the batch with every engine and print (and write to ``output`` when given) a markdown table."""
    import monai
    import ray
    import torch
    from ray.cluster_utils import Cluster

    from tools.benchmark_pipeline import write_synthetic_ct

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_worker_niceness", "0")  # Ray lowers its workers' priority by default: not here
    shape = tuple(int(s) for s in (shape.split(",") if isinstance(shape, str) else shape))
    workers = [int(w) for w in (str(workers).split(",") if isinstance(workers, (str, int)) else workers)]
    if cases < 2:
        raise ValueError("cases must be at least 2 (the steady pace is measured after the first case).")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("infer").setLevel(logging.INFO)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        bundle, source = _random_weight_bundle(tmp), os.path.join(tmp, "in")
        os.makedirs(source)
        write_synthetic_ct(os.path.join(source, "case000.nii.gz"), shape)
        for i in range(1, cases):
            shutil.copy(os.path.join(source, "case000.nii.gz"), os.path.join(source, f"case{i:03d}.nii.gz"))
        reference = os.path.join(tmp, "in_process_1")
        for n in sorted({1, threads}):
            row = _timed_batch(bundle, source, os.path.join(tmp, f"in_process_{n}"), cases, num_threads=n)
            rows.append((f"in-process, {n} torch thread{'s' * (n > 1)}", "-", row))
            print(rows[-1], flush=True)
        for k in workers:
            cluster = Cluster()
            try:
                cluster.add_node(num_cpus=k, include_dashboard=False)  # the head: one node of k CPUs
                out = os.path.join(tmp, f"ray_{k}")
                row = _timed_batch(bundle, source, out, cases, num_threads=1, ray_address=cluster.address)
            finally:
                cluster.shutdown()
            ours, theirs = _labels(out), _labels(reference)
            if sorted(ours) != sorted(theirs) or any((ours[n] != theirs[n]).any() for n in ours):
                raise RuntimeError(f"Ray with {k} workers: labels differ from the in-process engine's")
            rows.append((f"Ray, {k} worker{'s' * (k > 1)} (1 node, {k} CPU{'s' * (k > 1)})", str(k), row))
            print(rows[-1], flush=True)
    base = rows[0][2]
    lines = [
        f"# Batch inference throughput: in-process vs Ray ({cases} cases of {'x'.join(map(str, shape))})",
        "",
        f"Date: {time.strftime('%Y-%m-%d')}. CPU: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores. torch {torch.__version__}, monai {monai.__version__}, ray {ray.__version__}.",
        f"Command: `python tools/benchmark_ray.py --cases {cases} --shape {','.join(map(str, shape))} "
        f"--workers {','.join(map(str, workers))} --threads {threads}`. Wall time includes start-up (model load; "
        "for Ray also the connection, worker processes and each worker's model load). Ray labels equal the "
        "in-process ones voxel for voxel.",
        "",
        "| Engine | Ray workers | Wall (s) | Cases/min | First case done (s) | Steady s/case | Steady cases/min |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, k, row in rows:
        lines.append(f"| {name} | {k} | {row['wall']:.1f} | {60 * cases / row['wall']:.1f} | {row['first']:.1f} | "
                     f"{row['steady']:.2f} | {60 / row['steady']:.1f} |")
    one = next((row for _, k, row in rows if k == "1"), None)
    if one:
        lines += ["", f"Ray's overhead, 1 worker against in-process with 1 thread (the same work on one CPU): "
                      f"{one['steady'] - base['steady']:+.2f} s per case in steady state, "
                      f"{one['first'] - base['first']:+.1f} s of start-up before the first case finishes."]
    text = "\n".join(lines) + "\n"
    if output:
        from networks.data import write_atomic

        write_atomic(output, text)
    print(text)


if __name__ == "__main__":
    fire.Fire(main)
