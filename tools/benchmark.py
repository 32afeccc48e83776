"""CPU benchmark of LiteNeXt and LTMedNeXt against MONAI's 2D segmentation networks, written as a markdown table.

For every network, in one run: parameters, GMACs (ptflops, aten backend, batch 1 at the largest size), eager
inference slices/s at each size, training-step slices/s, peak RSS increase of inference in a fresh process, and
ONNX Runtime slices/s with the largest |ONNX Runtime - PyTorch| difference. Every throughput is also given as a
ratio to MONAI UNet measured in the same run (UNet is added to the run when it is not selected). All networks take
3 input channels and give 1 output channel (binary logits), but ``litenext_encoder``, which gives its bottleneck
features. Nothing is downloaded.

Throughputs are the median of ``--repeats`` timed iterations after two untimed warm-up iterations, with
``torch.set_num_threads(threads)`` (and ``intra_op_num_threads=threads`` for ONNX Runtime). GMACs, training, peak
memory and ONNX Runtime use the largest of ``--sizes``; ``--batch`` applies to all but GMACs (always batch 1).

Examples::

    python tools/benchmark.py                                   # all networks, writes docs/benchmark.md
    python tools/benchmark.py --networks litenext,litenext_published,unet --repeats 3
    python tools/benchmark.py --threads 4 --skip_onnx --output /tmp/benchmark.md
    python tools/benchmark.py --networks litenext,unet --repeats 1 --batch 1 --sizes 64 --skip_training

Network names: litenext, litenext_published, litenext_encoder, ltmednext_t, ltmednext_s, unet, basicunet,
attentionunet, segresnet, swinunetr, mednext_s.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import fire
import monai
import numpy as np
import onnxruntime as ort
import torch
import torch.nn as nn
from monai.networks.nets import AttentionUnet, BasicUNet, SegResNet, SwinUNETR, UNet
from monai.networks.nets.mednext import create_mednext
from ptflops import get_model_complexity_info

from networks import LiteNeXt, LTMedNeXt
from networks.data import write_atomic

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO_ROOT / "docs" / "benchmark.md"
IN_CHANNELS, OUT_CHANNELS = 3, 1
REFERENCE = "unet"  # the "x UNet" columns divide by this network's throughput
WARMUP = 2  # untimed iterations before the timed repeats
ONNX_OPSET = 17
UNET_CHANNELS, UNET_STRIDES = (16, 32, 64, 128, 256), (2, 2, 2, 2)


class LiteNeXtEncoder(nn.Sequential):
    """LiteNeXt without its decoder (stem, four stages and bottleneck; the bottleneck features are the output): any
    runtime's time for it is a floor under the whole network's in that runtime, whatever the decoder costs."""

    def __init__(self) -> None:
        network = LiteNeXt(IN_CHANNELS, OUT_CHANNELS)
        super().__init__(network.stem, network.stage1, network.stage2, network.stage3, network.stage4,
                         network.bottleneck)


# name -> (label in the table, builder)
NETWORKS: dict[str, tuple[str, Callable[[], nn.Module]]] = {
    "litenext": ("LiteNeXt (fused decoder)", lambda: LiteNeXt(IN_CHANNELS, OUT_CHANNELS)),
    "litenext_published": ("LiteNeXt (published order)",
                           lambda: LiteNeXt(IN_CHANNELS, OUT_CHANNELS, fused_decoder=False)),
    "litenext_encoder": ("LiteNeXt encoder alone (no decoder)", LiteNeXtEncoder),
    "ltmednext_t": ("LTMedNeXt-T", lambda: LTMedNeXt(2, IN_CHANNELS, OUT_CHANNELS, size="T")),
    "ltmednext_s": ("LTMedNeXt-S", lambda: LTMedNeXt(2, IN_CHANNELS, OUT_CHANNELS, size="S")),
    "unet": ("MONAI UNet", lambda: UNet(2, IN_CHANNELS, OUT_CHANNELS, UNET_CHANNELS, UNET_STRIDES, num_res_units=2)),
    "basicunet": ("MONAI BasicUNet", lambda: BasicUNet(2, IN_CHANNELS, OUT_CHANNELS)),
    "attentionunet": ("MONAI AttentionUnet",
                      lambda: AttentionUnet(2, IN_CHANNELS, OUT_CHANNELS, UNET_CHANNELS, UNET_STRIDES)),
    "segresnet": ("MONAI SegResNet", lambda: SegResNet(2, in_channels=IN_CHANNELS, out_channels=OUT_CHANNELS)),
    "swinunetr": ("MONAI SwinUNETR (feature_size 24)",
                  lambda: SwinUNETR(IN_CHANNELS, OUT_CHANNELS, feature_size=24, spatial_dims=2)),
    "mednext_s": ("MONAI MedNeXt-S k3 (Roy et al.)",
                  lambda: create_mednext("S", spatial_dims=2, in_channels=IN_CHANNELS, out_channels=OUT_CHANNELS)),
}


@dataclass
class Result:
    """Everything measured for one network; ``None`` where a measurement was skipped or failed."""

    name: str
    parameters: int
    gmacs: float | None = None
    inference: dict[int, float] = field(default_factory=dict)  # size -> slices/s
    peak_rss_mib: float | None = None
    training: float | None = None
    onnx: float | None = None
    onnx_error: float | None = None
    failures: dict[str, str] = field(default_factory=dict)  # "network", "gmacs" or "onnx" -> reason


@dataclass
class Settings:
    """What one run measures; ``notes`` are extra lines for the markdown file."""

    names: list[str]
    repeats: int
    threads: int
    sizes: list[int]
    batch: int
    training: bool
    onnx: bool
    notes: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        """The size of the GMACs, training, memory and ONNX Runtime measurements."""
        return max(self.sizes)


def _as_list(value: str | int | Sequence[str | int]) -> list[str]:
    """Fire turns ``a,b`` into a tuple and ``256`` into an int; accept those and plain comma-separated strings."""
    if isinstance(value, (str, int)):
        return [part.strip() for part in str(value).split(",") if part.strip()]
    return [str(part).strip() for part in value]


def _images(batch: int, size: int) -> torch.Tensor:
    return torch.randn(batch, IN_CHANNELS, size, size, generator=torch.Generator().manual_seed(0))


def build(name: str) -> nn.Module:
    """A freshly initialised network in eval mode."""
    torch.manual_seed(0)
    return NETWORKS[name][1]().eval()


def median_rate(step: Callable[[], object], batch: int, repeats: int) -> float:
    """Slices per second: ``batch`` over the median time of ``repeats`` calls of ``step`` after the warm-up."""
    for _ in range(WARMUP):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def count_gmacs(model: nn.Module, size: int) -> float:
    with contextlib.redirect_stdout(sys.stderr):  # ptflops prints its own failures; keep stdout for the table
        macs, _ = get_model_complexity_info(model, (IN_CHANNELS, size, size), print_per_layer_stat=False,
                                            as_strings=False, backend="aten", ost=sys.stderr)
    if macs is None:
        raise RuntimeError("ptflops (aten backend) could not count this network; its traceback is on stderr")
    return float(macs) / 1e9


def inference_step(model: nn.Module, batch: int, size: int) -> Callable[[], object]:
    """One eager inference call on a batch of random images (timed later, interleaved with the other networks)."""
    images = _images(batch, size)

    def step() -> object:
        with torch.inference_mode():
            return model(images)

    return step


def interleaved_rates(steps: dict[tuple[str, str], Callable[[], object]], batch: int,
                      repeats: int) -> dict[tuple[str, str], float]:
    """Slices per second of every step: ``WARMUP`` untimed calls each, then ``repeats`` rounds that call every step
    once in turn; the median time per step. Interleaving puts each network's timings in the same stretches of time
    as the reference's: on a shared (virtual) machine whose speed drifts over minutes, timing one network after
    another moved the LiteNeXt/UNet ratio between 0.8 and 1.2 from run to run."""
    for step in steps.values():
        for _ in range(WARMUP):
            step()
    times: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
    for _ in range(repeats):
        for key, step in steps.items():
            start = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - start)
    return {key: batch / statistics.median(values) for key, values in times.items()}


def training_rate(model: nn.Module, batch: int, size: int, repeats: int) -> float:
    """Forward, BCE-with-logits loss, backward and an SGD step on random images and random masks shaped like the
    output."""
    images = _images(batch, size)
    with torch.no_grad():
        output_shape = model.eval()(images[:1]).shape[1:]
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_function = nn.BCEWithLogitsLoss()
    masks = (torch.rand(batch, *output_shape, generator=torch.Generator().manual_seed(1)) > 0.5).float()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_function(model(images), masks).backward()
        optimizer.step()

    return median_rate(step, batch, repeats)


def _resident_kib() -> tuple[int, int]:
    """(current, peak) resident set size of this process in KiB: VmRSS and VmHWM from /proc/self/status.

    Not ``resource.getrusage().ru_maxrss``: Linux carries the parent's peak across fork and exec into it, so in a
    child spawned by this (large) process it starts near the parent's peak and hides the child's own.
    """
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def _peak_rss_increase_mib(name: str, batch: int, size: int, threads: int) -> float:
    """Run in a fresh process: peak RSS during two inference calls minus the RSS once the network is built."""
    torch.set_num_threads(threads)
    model = build(name)
    images = _images(batch, size)
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset the peak (VmHWM) to the current RSS
    before, _ = _resident_kib()
    with torch.inference_mode():
        for _ in range(2):
            model(images)
    return (_resident_kib()[1] - before) / 1024


def peak_rss_mib(name: str, batch: int, size: int, threads: int) -> float:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_peak_rss_increase_mib, (name, batch, size, threads))


def onnx_step(model: nn.Module, batch: int, size: int, threads: int, path: str) -> tuple[Callable[[], object], float]:
    """Export with a dynamic batch axis (traced at batch 1), run at ``batch``: the ONNX Runtime call (timed later)
    and max |ORT - torch|."""
    images = _images(batch, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (images[:1],), path, dynamo=False, opset_version=ONNX_OPSET, input_names=["image"],
                          output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {"image": images.numpy()}
    with torch.inference_mode():
        expected = model(images).numpy()
    error = float(np.abs(session.run(None, feed)[0] - expected).max())
    return lambda: session.run(None, feed), error


def _failure_reason(error: Exception) -> str:
    lines = str(error).strip().splitlines() or [""]
    return f"{type(error).__name__}: {lines[0][:300]}".replace("|", "\\|")


def _attempt(result: Result, key: str, call: Callable[[], T]) -> T | None:
    """``call()``, or ``None`` with the reason kept in ``result.failures[key]`` if it raises."""
    try:
        return call()
    except Exception as error:
        result.failures[key] = _failure_reason(error)
        _log(f"{result.name}: {key} failed: {result.failures[key]}")
        return None


def _runs(model: nn.Module, sizes: list[int]) -> bool:
    """One batch-1 forward pass at each size; raises where the network cannot run."""
    with torch.inference_mode():
        for size in sizes:
            model(_images(1, size))
    return True


def measure(name: str, settings: Settings, folder: str) -> tuple[Result, dict[str, Callable[[], object]]]:
    """All measurements of one network but the inference throughputs, and the inference calls to time (keys
    ``"224"``, ... and ``"onnx"``; see ``interleaved_rates``). A network that cannot run (e.g. a missing optional
    dependency), or a measurement that fails (ptflops, ONNX export), is recorded in ``failures`` instead of stopping
    the run."""
    size, batch, repeats = settings.size, settings.batch, settings.repeats
    model = build(name)
    result = Result(name=name, parameters=sum(p.numel() for p in model.parameters()))
    steps: dict[str, Callable[[], object]] = {}
    _log(f"{name}: complexity")
    if _attempt(result, "network", lambda: _runs(model, settings.sizes)) is None:
        return result, steps
    result.gmacs = _attempt(result, "gmacs", lambda: count_gmacs(model, size))
    for s in settings.sizes:
        steps[str(s)] = inference_step(model, batch, s)
    _log(f"{name}: peak memory")
    result.peak_rss_mib = peak_rss_mib(name, batch, size, settings.threads)
    if settings.onnx:
        _log(f"{name}: ONNX Runtime export")
        step_and_error = _attempt(result, "onnx", lambda: onnx_step(model, batch, size, settings.threads,
                                                                    os.path.join(folder, f"{name}.onnx")))
        if step_and_error is not None:
            steps["onnx"], result.onnx_error = step_and_error
    if settings.training:
        _log(f"{name}: training")
        result.training = training_rate(build(name), batch, size, repeats)
    return result, steps


def measure_all(settings: Settings, folder: str) -> list[Result]:
    """``measure`` every network, then time all their inference calls together (``interleaved_rates``)."""
    results, steps = [], {}
    for name in settings.names:
        result, own_steps = measure(name, settings, folder)
        results.append(result)
        steps.update({(name, key): step for key, step in own_steps.items()})
    _log(f"inference of every network, {settings.repeats} interleaved rounds")
    rates = interleaved_rates(steps, settings.batch, settings.repeats)
    for result in results:
        for s in settings.sizes:
            if (result.name, str(s)) in rates:
                result.inference[s] = rates[(result.name, str(s))]
        result.onnx = rates.get((result.name, "onnx"))
    return results


def _log(message: str) -> None:
    print(f"[benchmark] {message}", file=sys.stderr, flush=True)


def _rate(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _ratio(value: float | None, reference: float | None) -> str:
    return "-" if value is None or not reference else f"{value / reference:.2f}"


def _header(settings: Settings) -> list[str]:
    size = settings.size
    header = ["Network", "Parameters", f"GMACs ({size}x{size})"]
    for s in settings.sizes:
        header += [f"Inference {s}x{s} (slices/s)", "x UNet"]
    if settings.training:
        header += [f"Training {size}x{size} (slices/s)", "x UNet"]
    header += [f"Peak RSS {size}x{size} (MiB)"]
    if settings.onnx:
        header += [f"ONNX Runtime {size}x{size} (slices/s)", "x own eager", "x UNet (eager)", "max abs ORT - torch"]
    return header


def table(results: list[Result], settings: Settings) -> tuple[str, list[str]]:
    """The markdown table and its footnotes (the reasons behind every "n/a")."""
    reference = next(r for r in results if r.name == REFERENCE)
    header = _header(settings)
    footnotes: list[str] = []

    def not_available(result: Result, key: str) -> str:
        what = {"network": "the network did not run", "gmacs": "MAC counting failed",
                "onnx": "ONNX export or ONNX Runtime failed"}[key]
        footnotes.append(f"{NETWORKS[result.name][0]}: {what}: {result.failures[key]}")
        return f"n/a [^{len(footnotes)}]"

    rows = []
    for r in results:
        row = [NETWORKS[r.name][0], f"{r.parameters:,}"]
        if "network" in r.failures:
            rows.append(row + [not_available(r, "network")] * (len(header) - len(row)))
            continue
        row += [not_available(r, "gmacs") if "gmacs" in r.failures else f"{r.gmacs:.3f}"]
        for s in settings.sizes:
            row += [_rate(r.inference[s]), _ratio(r.inference[s], reference.inference.get(s))]
        if settings.training:
            row += [_rate(r.training), _ratio(r.training, reference.training)]
        row += [f"{r.peak_rss_mib:.1f}"]
        if settings.onnx:
            if "onnx" in r.failures:
                row += [not_available(r, "onnx")] * 4
            else:
                row += [_rate(r.onnx), _ratio(r.onnx, r.inference.get(settings.size)),
                        _ratio(r.onnx, reference.inference.get(settings.size)), f"{r.onnx_error:.1e}"]
        rows.append(row)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines), footnotes


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def render(results: list[Result], settings: Settings) -> tuple[str, str]:
    """The whole markdown document, and the table alone."""
    body, footnotes = table(results, settings)
    size, batch = settings.size, settings.batch
    versions = (f"torch {torch.__version__}, monai {monai.__version__}, onnxruntime {ort.__version__}, "
                f"ptflops {importlib.metadata.version('ptflops')}")
    caption = (f"Table: {IN_CHANNELS} input channels and {OUT_CHANNELS} output channel (binary logits) for every "
               f"network. GMACs counted by ptflops `get_model_complexity_info(..., backend=\"aten\")` at batch 1, "
               f"{IN_CHANNELS}x{size}x{size}. Throughputs at batch {batch}, median of {settings.repeats} timed "
               f"repeats after {WARMUP} warm-up iterations; \"x UNet\" is the ratio to MONAI UNet in this run. "
               f"Inference (eager and ONNX Runtime) is timed in {settings.repeats} rounds that run every network "
               f"once in turn, so that all of them meet the same machine conditions; training one network after "
               f"another.")
    notes = [
        f"Inference: `model.eval()` under `torch.inference_mode()`, random input of shape "
        f"({batch}, {IN_CHANNELS}, size, size).",
        f"Peak RSS: peak resident set (VmHWM, reset through /proc/self/clear_refs) during two inference calls at "
        f"batch {batch}, {size}x{size}, minus the resident set just before them, in a fresh `spawn` process per "
        f"network that has built the network and its input. Not `getrusage` `ru_maxrss`: in a spawned child it "
        f"starts at the parent's peak.",
    ]
    if settings.training:
        notes.append(f"Training: one forward, BCE-with-logits loss, backward and SGD (momentum 0.9) step at batch "
                     f"{batch}, {size}x{size}, on a freshly initialised network in train mode.")
    if settings.onnx:
        notes.append(f"ONNX Runtime: `torch.onnx.export(dynamo=False, opset_version={ONNX_OPSET})` with a dynamic "
                     f"batch axis (traced at batch 1), CPUExecutionProvider, "
                     f"`intra_op_num_threads={settings.threads}`, run at batch {batch}; \"x own eager\" divides by "
                     f"the same network's eager PyTorch inference at {size}x{size}, \"x UNet (eager)\" by eager "
                     f"MONAI UNet's; the last column is max |ONNX Runtime - PyTorch| on the same input.")
    if "litenext_encoder" in settings.names:
        notes.append(f"{NETWORKS['litenext_encoder'][0]}: LiteNeXt's stem, stages and bottleneck, whose output (the "
                     f"bottleneck features, 128 channels at 1/16 resolution) replaces the logits; its time in each "
                     f"runtime is a floor under the whole LiteNeXt's.")
    notes += settings.notes
    lines = [
        "# LiteMed Bundles CPU benchmark",
        "",
        f"Date: {datetime.datetime.now().isoformat(timespec='seconds')}  ",
        f"Versions: {versions}, Python {platform.python_version()}  ",
        f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs visible)  ",
        f"Threads: {settings.threads}",
        "",
        caption,
        "",
        body,
        "",
        *[f"- {note}" for note in notes],
    ]
    if footnotes:
        lines += ["", *[f"[^{i}]: {note}" for i, note in enumerate(footnotes, 1)]]
    return "\n".join(lines) + "\n", body


def main(networks: str | Sequence[str] = "all", repeats: int = 5, threads: int = 2,
         sizes: str | int | Sequence[int] = "224,256", batch: int = 8, output: str | None = None,
         skip_training: bool = False, skip_onnx: bool = False) -> None:
    """Benchmark the networks and write the markdown table to ``output`` (default docs/benchmark.md)."""
    names = list(NETWORKS) if _as_list(networks) == ["all"] else [n.lower() for n in _as_list(networks)]
    unknown = sorted(set(names) - set(NETWORKS))
    if unknown:
        raise ValueError(f"unknown networks {unknown}; choose from {', '.join(NETWORKS)}.")
    if min(repeats, threads, batch) < 1:
        raise ValueError("repeats, threads and batch must be positive.")
    settings = Settings(names=[n for n in NETWORKS if n in names], repeats=repeats, threads=threads,
                        sizes=[int(s) for s in _as_list(sizes)], batch=batch, training=not skip_training,
                        onnx=not skip_onnx)
    if REFERENCE not in settings.names:
        settings.names.append(REFERENCE)
        settings.notes.append(f"{NETWORKS[REFERENCE][0]} was not selected and was added as the ratio reference.")
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="litemed_benchmark_") as folder:
        results = measure_all(settings, folder)
    document, body = render(results, settings)
    path = Path(output) if output is not None else DEFAULT_OUTPUT
    write_atomic(str(path), document)
    print(body)
    _log(f"wrote {path}")


if __name__ == "__main__":
    fire.Fire(main)
