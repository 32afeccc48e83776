"""Training throughput of a volume bundle (a 2D network trained on the slices of 3D volumes), LTMedNeXt against MONAI
UNet in one run, and what bounds it.

``python tools/benchmark_training.py BUNDLE [--dataset_dir DIR] [--device cpu|cuda] [--num_workers N] [--batches 20]``

For the bundle's own network and for MONAI's UNet (the bundle's ``configs/unet_baseline.json``), built from the
bundle's ``configs/train.json`` with every recipe setting as it is (preprocessing, slice augmentation, batch size,
loss, optimiser, mixed precision on CUDA), in slices per second:

* **pipeline**: the training ``DataLoader`` alone (``--num_workers`` processes): loading, cutting and augmenting;
* **step**: the training step alone (forward, loss, backward, optimiser) on random tensors of the batch's shape, on
  ``--device``;
* **end to end**: both together, as training runs them (each batch moved to the device, then the step).

The slower of pipeline and step bounds end to end; the table says which. Without ``--dataset_dir`` it writes
``--cases`` synthetic CT-like volumes (512x512x``--depth``, a few labelled blobs) into a temporary folder: pipeline
rates then hold for volumes of that size, not for real data. Rates are over ``--batches`` batches after 3 untimed
ones (which start the workers). The markdown table is printed and, with ``--output``, written atomically.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time

import fire
import numpy as np
import torch

from networks.data import write_atomic, write_datalist
from tools.benchmark import cpu_model

PEERS = ([], ["configs/unet_baseline.json"])  # the bundle's network, then MONAI UNet with the same recipe


def synthetic_volumes(folder: str, cases: int, depth: int, num_classes: int, seed: int = 0) -> str:
    """``cases`` CT-like NIfTI volumes (HU, 512x512x``depth``, 0.8 x 0.8 x 2.5 mm) with blobs of labels 1 to
    ``num_classes - 1``, and their ``datalist.json`` (all under training); returns the folder."""
    import nibabel as nib

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.arange(512), np.arange(512), indexing="ij")
    items = []
    for case in range(cases):
        image = rng.normal(40.0, 30.0, (512, 512, depth)).astype(np.float32)
        label = np.zeros((512, 512, depth), dtype=np.uint8)
        for value in range(1, num_classes):
            cx, cy, r = rng.integers(120, 390), rng.integers(120, 390), rng.integers(15, 50)
            blob = (x - cx) ** 2 + (y - cy) ** 2 < r ** 2
            label[blob, depth // 4: 3 * depth // 4] = value
            image[blob, depth // 4: 3 * depth // 4] += 60.0 * value
        affine = np.diag([0.8, 0.8, 2.5, 1.0])
        paths = {}
        for key, array in (("image", image), ("label", label)):
            paths[key] = os.path.join(folder, f"case{case}_{key}.nii.gz")
            nib.save(nib.Nifti1Image(array, affine), paths[key])
        items.append(paths)
    write_datalist(os.path.join(folder, "datalist.json"), items, [])
    return folder


def parse(bundle: str, extra_configs: list[str], dataset_dir: str, device: str, num_workers: int, output: str):
    """The bundle's training config with the benchmark's settings, parsed as MONAI's runner parses it."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([os.path.join(bundle, "configs", "train.json")] +
                       [os.path.join(bundle, config) for config in extra_configs])
    parser.update({"bundle_root": output, "dataset_dir": dataset_dir, "device": f"$torch.device('{device}')",
                   "num_workers": num_workers, "validate#dataset#data": [], "pretrained_weights": ""})
    if device == "cpu":
        parser["amp"] = False
    parser.parse()
    return parser


def _rate(slices: int, seconds: float) -> float:
    return slices / seconds if seconds > 0 else float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(parser, batches: int) -> dict[str, float | str]:
    """Pipeline, step and end-to-end slices/s of one parsed config, and which of the first two bounds the third."""
    loader = parser.get_parsed_content("train#dataloader")
    network = parser.get_parsed_content("network")
    loss_function = parser.get_parsed_content("loss")
    optimizer = parser.get_parsed_content("optimizer")
    device = parser.get_parsed_content("device")
    amp = bool(parser.get_parsed_content("amp"))
    dtype = parser.get_parsed_content("amp_kwargs").get("dtype", torch.float16) if amp else None
    scaler = torch.amp.GradScaler("cuda") if amp and dtype == torch.float16 else None
    network.train()

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype) if amp else contextlib.nullcontext():
            loss = loss_function(network(images), labels)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()

    def batches_of(count: int):
        while True:
            for batch in loader:
                yield batch
                count -= 1
                if count == 0:
                    return

    warmup, timed = 3, max(1, int(batches))
    stream = batches_of(warmup + timed)
    sample = next(stream)  # a full batch: the step's tensors have its shape
    for _ in range(warmup - 1):
        next(stream)
    start, slices = time.perf_counter(), 0
    for batch in stream:
        slices += len(batch["image"])
    pipeline = _rate(slices, time.perf_counter() - start)

    images = torch.rand_like(sample["image"]).to(device)
    labels = sample["label"].to(device)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    for _ in range(warmup):
        step(images, labels)
    _sync(device)
    start = time.perf_counter()
    for _ in range(timed):
        step(images, labels)
    _sync(device)
    step_rate = _rate(timed * len(images), time.perf_counter() - start)

    stream = batches_of(warmup + timed)
    for _ in range(warmup):
        batch = next(stream)
        step(batch["image"].to(device), batch["label"].to(device))
    _sync(device)
    start, slices = time.perf_counter(), 0
    for batch in stream:
        step(batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True))
        slices += len(batch["image"])
    _sync(device)
    end_to_end = _rate(slices, time.perf_counter() - start)
    return {"pipeline": pipeline, "step": step_rate, "end_to_end": end_to_end,
            "bound": "data pipeline" if pipeline < step_rate else "training step",
            "batch": len(images), "shape": "x".join(str(s) for s in images.shape[1:])}


def table(bundle: str, rows: dict[str, dict], settings: dict) -> str:
    reference = rows["UNet"]["end_to_end"]
    lines = [f"# Training throughput: {os.path.basename(os.path.normpath(bundle))}", "",
             ", ".join(f"{k}: {v}" for k, v in settings.items()), "",
             "| network | pipeline (slices/s) | step (slices/s) | end to end (slices/s) | end to end x MONAI UNet "
             "| bound by |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['pipeline']:.1f} | {r['step']:.1f} | {r['end_to_end']:.1f} | "
                     f"{r['end_to_end'] / reference:.2f} | {r['bound']} |")
    return "\n".join(lines) + "\n"


def main(bundle: str, dataset_dir: str = "", device: str = "cpu", num_workers: int | None = None, batches: int = 20,
         threads: int = 0, cases: int = 4, depth: int = 40, output: str = "") -> None:
    bundle = os.path.abspath(bundle)
    if not os.path.isfile(os.path.join(bundle, "configs", "unet_baseline.json")):
        sys.exit(f"{bundle}: not a volume bundle with configs/unet_baseline.json (Synapse, ACDC).")
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"--device {device}: torch sees no CUDA GPU here.")
    if threads:
        torch.set_num_threads(int(threads))
    if num_workers is None:
        num_workers = min(8, (os.cpu_count() or 2) // 2)
    with tempfile.TemporaryDirectory() as tmp:
        if not dataset_dir:
            from monai.bundle import ConfigParser

            num_classes = int(ConfigParser.load_config_file(os.path.join(bundle, "configs", "train.json"))
                              .get("num_classes", 9))
            dataset_dir = synthetic_volumes(os.path.join(tmp, "data"), cases, depth, num_classes)
            data = f"{cases} synthetic volumes 512x512x{depth}"
        else:
            data = os.path.abspath(dataset_dir)
        rows = {}
        for extra in PEERS:
            parser = parse(bundle, extra, dataset_dir, device, num_workers, os.path.join(tmp, "run"))
            network = parser.get_parsed_content("network_def")
            size = parser.get("network_size") if type(network).__name__.startswith("LTMedNeXt") else None
            rows[type(network).__name__ + (f"-{size}" if size else "")] = measure(parser, batches)
    first = next(iter(rows.values()))
    settings = {"device": torch.cuda.get_device_name(0) if device.startswith("cuda") else cpu_model(),
                "threads": torch.get_num_threads(), "loader workers": num_workers, "data": data,
                "batch": f"{first['batch']} x {first['shape']}", "timed batches": batches,
                "torch": torch.__version__}
    text = table(bundle, rows, settings)
    print(text)
    if output:
        write_atomic(output, text)


if __name__ == "__main__":
    fire.Fire(main)
