"""Reduced-precision CPU inference judged by the labels it gives: ONNX Runtime int8 and torch bf16 against fp32, with
MONAI UNet fp32 eager measured in the same run.

``python tools/benchmark_int8.py [--images DIR] [--threads 2] [--repeats 5] [--output FILE]``

* LTMedNeXt-T with the Synapse bundle's shipped weights, on axial slices of the shipped CT sample
  (``samples/ct_nifti``; the bundle's HU window, 224x224): the even slices calibrate, the odd slices are timed and
  compared.
* With ``--images DIR``: LiteNeXt with the ISIC 2018 bundle's weights on the images there (RGB, 256x256; the first half
  calibrates, the second half is timed and compared).

Rows: fp32 eager; fp32 ONNX Runtime; int8 ONNX Runtime, QDQ (static quantization, per-channel int8 weights, uint8
activations, every operator ONNX Runtime quantizes); int8 ONNX Runtime, QOperator on the dense convolutions only
(depthwise convolutions and everything else in fp32); bf16 autocast eager. Columns: slices/s (median of
``--repeats``), the ratio to MONAI UNet fp32 eager on the same input, and the lowest Dice, over the classes present,
between the row's labels and fp32 eager's. Nothing is downloaded; the quantized models live in a temporary folder.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings

import fire
import numpy as np
import torch

from networks.data import write_atomic
from networks.evaluation import dice
from tools.benchmark import median_rate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNAPSE = os.path.join(REPO, "bundles", "synapse_ltmednext_segmentation")


def ct_slices() -> np.ndarray:
    """The shipped CT sample's axial slices, in the Synapse bundle's HU window scaled to [0, 1] and resized to its
    ``roi_size``: ``(N, 1, H, W)`` float32."""
    import nibabel as nib

    with open(os.path.join(SYNAPSE, "configs", "inference.json")) as f:
        config = json.load(f)
    low, high = config["hu_window"]
    volume = nib.load(os.path.join(REPO, "samples", "ct_nifti", "example_ct_sm.nii.gz")).get_fdata(dtype=np.float32)
    volume = np.clip((volume - low) / (high - low), 0.0, 1.0)
    slices = torch.from_numpy(volume).permute(2, 0, 1)[:, None]
    return torch.nn.functional.interpolate(slices, size=tuple(config["roi_size"]), mode="bilinear").numpy()


def rgb_images(folder: str, size: int = 256) -> np.ndarray:
    """The images under ``folder`` as ``(N, 3, size, size)`` float32 in [0, 1] (bilinear resize)."""
    from networks.image_io import find_images, read_image_rgb

    images = [torch.from_numpy(read_image_rgb(p).transpose(2, 0, 1).copy())[None] for p in find_images(folder)]
    if len(images) < 4:
        raise SystemExit(f"{folder}: needs at least 4 images, found {len(images)}.")
    return torch.cat([torch.nn.functional.interpolate(i, size=(size, size), mode="bilinear") for i in images]).numpy()


def labels_of(logits: np.ndarray) -> np.ndarray:
    return logits.argmax(1) if logits.shape[1] > 1 else (logits[:, 0] > 0).astype(np.int64)


def lowest_dice(labels: np.ndarray, reference: np.ndarray) -> float:
    """The lowest Dice, over the foreground classes present in ``reference``, between two label arrays."""
    scores = [dice(labels == c, reference == c) for c in np.unique(reference) if c != 0]
    return float(min(scores)) if scores else float("nan")


def onnx_models(network: torch.nn.Module, shape: tuple[int, ...], calibration: np.ndarray, folder: str) -> dict:
    """fp32, int8 QDQ (all operators) and int8 QOperator (dense convolutions) ONNX files of ``network``."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"image": x[None]} for x in calibration])

        def get_next(self):
            return next(self.items, None)

    fp32, prepared = os.path.join(folder, "fp32.onnx"), os.path.join(folder, "prepared.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(network, (torch.zeros(1, *shape),), fp32, input_names=["image"], output_names=["pred"],
                          dynamic_axes={"image": {0: "batch"}, "pred": {0: "batch"}}, dynamo=False)
    quant_pre_process(fp32, prepared, skip_symbolic_shape=True)
    dense = [node.name for node in onnx.load(prepared).graph.node if node.op_type == "Conv"
             and all(a.i == 1 for a in node.attribute if a.name == "group")]
    paths = {"fp32 ONNX Runtime": fp32}
    for label, fmt, nodes in (("int8 ONNX Runtime, QDQ, all operators", QuantFormat.QDQ, None),
                              ("int8 ONNX Runtime, QOperator, dense convolutions", QuantFormat.QOperator, dense)):
        paths[label] = os.path.join(folder, f"{len(paths)}.onnx")
        quantize_static(prepared, paths[label], Reader(), quant_format=fmt, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_quantize=nodes)
    return paths


def compare(title: str, network: torch.nn.Module, calibration: np.ndarray, test: np.ndarray, threads: int,
            repeats: int) -> str:
    """One markdown table: every precision of ``network`` and MONAI UNet fp32 eager, timed and compared on ``test``."""
    import onnxruntime as ort
    from monai.networks.nets import UNet

    channels = test.shape[1]
    inputs = torch.from_numpy(test)
    rows = []
    with torch.no_grad():
        reference = network(inputs).numpy()
        out_channels = reference.shape[1]
        unet = UNet(2, channels, out_channels, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2).eval()
        unet_rate = median_rate(lambda: unet(inputs), len(test), repeats)
        reference_labels = labels_of(reference)
        rows.append(("fp32 eager", median_rate(lambda: network(inputs), len(test), repeats), 1.0))
        with tempfile.TemporaryDirectory() as folder:
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            for label, path in onnx_models(network, test.shape[1:], calibration, folder).items():
                session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
                outputs = session.run(None, {"image": test})[0]
                rows.append((label, median_rate(lambda: session.run(None, {"image": test}), len(test), repeats),
                             lowest_dice(labels_of(outputs), reference_labels)))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = network(inputs).float().numpy()
            rows.append(("bf16 autocast eager", median_rate(lambda: network(inputs), len(test), repeats),
                         lowest_dice(labels_of(outputs), reference_labels)))
    lines = [f"## {title}", "", f"{len(test)} slices of {'x'.join(map(str, test.shape[1:]))}, calibration on "
             f"{len(calibration)} others; MONAI UNet fp32 eager: {unet_rate:.1f} slices/s", "",
             "| precision | slices/s | x MONAI UNet fp32 eager | lowest Dice vs fp32 labels |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {label} | {r:.1f} | {r / unet_rate:.2f} | {dice:.4f} |" for label, r, dice in rows]
    return "\n".join(lines) + "\n"


def main(images: str = "", threads: int = 2, repeats: int = 5, batch: int = 8, output: str = "") -> None:
    from networks import LiteNeXt, LTMedNeXt

    logging.getLogger().setLevel(logging.ERROR)  # the quantizer logs a line per tensor
    torch.set_num_threads(int(threads))
    torch.manual_seed(0)
    weights = os.path.join(REPO, "bundles", "{}", "models", "model.pt")
    ltmednext = LTMedNeXt(2, 1, 9, "T").eval()
    ltmednext.load_state_dict(torch.load(weights.format("synapse_ltmednext_segmentation"), weights_only=True))
    ct = ct_slices()
    sections = [compare("LTMedNeXt-T, Synapse weights, shipped CT sample", ltmednext, ct[0::2], ct[1::2][:batch],
                        threads, repeats)]
    if images:
        litenext = LiteNeXt(3, 1).eval()
        litenext.load_state_dict(torch.load(weights.format("isic2018_litenext_segmentation"), weights_only=True))
        rgb = rgb_images(images)
        half = len(rgb) // 2
        sections.append(compare(f"LiteNeXt, ISIC 2018 weights, {images}", litenext, rgb[:half][:16],
                                rgb[half:][:batch], threads, repeats))
    import onnxruntime

    text = (f"# Reduced precision on this CPU\n\ntorch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
            f"{threads} threads\n\n" + "\n".join(sections))
    print(text)
    if output:
        write_atomic(output, text)


if __name__ == "__main__":
    fire.Fire(main)
