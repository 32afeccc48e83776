"""Batch inference with a bundle: ``python tools/infer.py BUNDLE_DIR INPUT OUTPUT_DIR [options]``.

INPUT is a NIfTI file, a DICOM series folder, or a folder searched recursively for NIfTI files and DICOM series
(grouped by SeriesInstanceUID; several series in one folder become several cases). Each case gives one label NIfTI
on the input's grid (``<case>_seg.nii.gz``) in OUTPUT_DIR, written under a temporary name and renamed, plus
``summary.csv`` (case,input,status,output,seconds,message, then one ``<structure>_ml`` volume column per label) and
``summary.json``. A case whose output already exists is skipped, so an interrupted batch resumes where it stopped
(temporary files a killed run left are removed), unless ``--overwrite`` asks for every case to be redone (to apply
other options or new weights to a finished batch); a failing case is reported and the batch carries on. Headers are
checked before any voxel is read: a volume over 4 GiB as float32 is refused, and so is a DICOM series whose slices
do not form one regular grid (:func:`check_dicom_series`: the same Rows, Columns, PixelSpacing, ImageOrientationPatient,
BitsAllocated, PixelRepresentation and SamplesPerPixel; positions on one line along the slice normal; even steps, no
gap or duplicate; every file of the series with a position, so a truncated slice is caught) or that is an enhanced
multi-frame file. A file that claims to be DICOM (``.dcm``/``.dicom``/``.ima`` or the DICM preamble) but cannot be
parsed is a failed row of its own, and fails the series of its folder; other files are ignored and counted in the
last log line. A NIfTI of shape (x, y, z, 1) or (x, y, z, 1, 1) is read as
(x, y, z) (the row's message says so). ``--device cuda`` where torch sees no GPU is a usage error.

The bundle's own ``configs/inference.json`` decides the network, preprocessing, inferer and postprocessing (the
ids MONAI Label uses too); this tool adds discovery, loading of DICOM series, writing and reporting. Any other
``--ID VALUE`` sets that id of the inference config for this run, as ``python -m monai.bundle run`` does
(``--test_time_augmentation false``, ``--inferer#sw_batch_size 16``); an id the config does not have is a usage error.

Cases run here, one after another, unless ``--ray_address`` sends them to a Ray cluster (``tools/ray_engine.py``,
imported only then; ``pip install -e ".[distributed]"``): the same plan, per-case processing and summary, only where
each case runs differs. BUNDLE_DIR, INPUT and OUTPUT_DIR must then be on a filesystem every node sees.

Exit codes: 0 every case ok or skipped, 1 some case failed, 2 usage error (bundle missing, output not writable, Ray
not installed, Ray address malformed or unreachable).

Examples::

    python tools/infer.py bundles/synapse_ltmednext_segmentation samples/ct_dicom out/
    python tools/infer.py bundles/synapse_ltmednext_segmentation /data/dicom out/ --overlay --device cpu
    python tools/infer.py bundles/acdc_ltmednext_segmentation /data/cmr out/ --test_time_augmentation false
    python tools/infer.py bundles/synapse_ltmednext_segmentation /nfs/studies /nfs/out --ray_address 10.0.0.1:6379
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import logging
import os
import re
import sys
import tempfile
import time
from collections import deque
from dataclasses import asdict, dataclass, field

import fire
import numpy as np

NIFTI_SUFFIXES = (".nii", ".nii.gz")
TMP_PREFIX = ".tmp_"  # networks.data.TMP_PREFIX (not imported here: networks loads torch); a run removes leftovers
ENGINES = ("torch", "onnx")
MAX_VOLUME_BYTES = 4 * 2**30  # a volume larger than this as float32 is refused before it is read
SUMMARY_FIELDS = ("case", "input", "status", "output", "seconds", "message")
log = logging.getLogger("infer")


class UsageError(Exception):
    """A problem with the command line itself (exit code 2)."""


@dataclass
class Case:
    """One unit of work: a NIfTI file or one DICOM series (its files, ordered later by the reader)."""

    name: str
    input: str
    kind: str  # "nifti", "dicom", or "unreadable" (a file that claims to be DICOM but cannot be parsed)
    series_uid: str = ""
    problem: str = ""  # set by discovery when the case cannot be read as it stands (an "unreadable" file)
    outputs: dict = field(default_factory=dict)  # "label", "dicom_seg", "overlay" -> path; set by plan()


@dataclass
class Result:
    case: str
    input: str
    status: str
    output: str = ""
    seconds: float = 0.0
    message: str = ""
    volumes_ml: dict = field(default_factory=dict)


def _case_name(path: str, root: str) -> str:
    relative = os.path.relpath(path, root) if os.path.isdir(root) and path != root else os.path.basename(path)
    for suffix in NIFTI_SUFFIXES:
        if relative.endswith(suffix):
            relative = relative[: -len(suffix)]
    return re.sub(r"[\\/]+", "__", relative).strip("_.") or "case"


DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")


def claims_dicom(path: str) -> bool:
    """A DICOM file name, or the DICM preamble at byte 128."""
    if path.lower().endswith(DICOM_SUFFIXES):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _dicom_series(folder: str, unreadable: list[Case], ignored: list[str]) -> dict[str, str]:
    """SeriesInstanceUID -> folder for the DICOM files directly in ``folder``. A file that claims to be DICOM
    (:func:`claims_dicom`) but cannot be parsed is added to ``unreadable``; other files that are not DICOM (README.txt,
    thumbnails) to ``ignored``."""
    import pydicom

    series: dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or name.lower().endswith(NIFTI_SUFFIXES):
            continue
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "SOPClassUID"])
            is_dicom = "SOPClassUID" in header or "SeriesInstanceUID" in header or bool(header.file_meta)
            problem = "" if is_dicom else "no DICOM header"
        except Exception as e:
            problem = str(e).splitlines()[0] if str(e) else type(e).__name__
        if problem:
            if claims_dicom(path):
                unreadable.append(Case("", path, "unreadable",
                                       problem=f"claims to be DICOM but cannot be parsed ({problem})"))
            else:
                ignored.append(path)
            continue
        # files without a SeriesInstanceUID (anonymised exports) form one series per folder, keyed ""
        series.setdefault(str(getattr(header, "SeriesInstanceUID", "") or ""), folder)
    return series


def discover(input_path: str, ignored: list[str] | None = None) -> list[Case]:
    """All cases under ``input_path``, in a stable order; files that are neither NIfTI nor DICOM are appended to
    ``ignored``."""
    ignored = [] if ignored is None else ignored
    if not os.path.exists(input_path):
        raise UsageError(f"{input_path}: input not found.")
    if os.path.isfile(input_path):
        if input_path.endswith(NIFTI_SUFFIXES):
            return [Case(_case_name(input_path, input_path), input_path, "nifti")]
        raise UsageError(f"{input_path}: not a NIfTI file (.nii, .nii.gz) or a folder.")
    cases: list[Case] = []
    for folder, dirs, files in os.walk(input_path):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(NIFTI_SUFFIXES):
                path = os.path.join(folder, name)
                cases.append(Case(_case_name(path, input_path), path, "nifti"))
        unreadable: list[Case] = []
        series = _dicom_series(folder, unreadable, ignored)
        # a slice that cannot be parsed may belong to any series of the folder: none is segmented incomplete
        problem = (f"the folder holds {len(unreadable)} DICOM file(s) that cannot be parsed "
                   f"({os.path.basename(unreadable[0].input)}); the series may be incomplete") if unreadable else ""
        for uid in sorted(series):
            base = _case_name(folder, input_path) if folder != input_path else os.path.basename(os.path.abspath(folder))
            name = base if len(series) == 1 else f"{base}__{uid[-12:] or 'no_uid'}"
            cases.append(Case(name, folder, "dicom", uid, problem=problem))
        for case in unreadable:
            case.name = _case_name(case.input, input_path)
            cases.append(case)
    return cases


def apply_overrides(parser, overrides: dict | None, config_file: str) -> None:
    """Set each ``id: value`` of ``overrides`` in ``parser`` (ids as MONAI writes them, ``inferer#sw_batch_size``);
    UsageError for an id the config does not have: a misspelt option must not pass unnoticed."""
    for key, value in (overrides or {}).items():
        if key not in parser:
            raise UsageError(f"--{key}: {config_file} has no id {key!r} (options of this tool: --device, --overlay, "
                             f"--num_threads, --num_workers, --dicom_seg, --engine, --ray_address, --overwrite).")
        parser[key] = value


def check_bundle(bundle_dir: str, extra_configs: tuple[str, ...] = (), weights: str | None = None) -> tuple[str, str]:
    """The bundle's inference config and weights; UsageError when either (or an extra config) is missing."""
    config_file = os.path.join(bundle_dir, "configs", "inference.json")
    weights = weights or os.path.join(bundle_dir, "models", "model.pt")
    for path in (config_file, weights, *extra_configs):
        if not os.path.isfile(path):
            raise UsageError(f"{path}: not found; is {bundle_dir} a bundle with trained weights?")
    return config_file, weights


class BundleRunner:
    """The network, preprocessing, inferer and postprocessing of a bundle's inference config, loaded once."""

    def __init__(self, bundle_dir: str, device: str = "cpu", extra_configs: tuple[str, ...] = (),
                 weights: str | None = None, engine: str | None = None, overrides: dict | None = None) -> None:
        import torch
        from monai.bundle import ConfigParser
        from monai.transforms import Compose, LoadImaged, SaveImaged

        config_file, weights = check_bundle(bundle_dir, extra_configs, weights)
        parser = ConfigParser()
        parser.read_config([config_file, *extra_configs])
        apply_overrides(parser, overrides, config_file)
        meta_file = os.path.join(bundle_dir, "configs", "metadata.json")
        if os.path.isfile(meta_file):
            parser.read_meta(meta_file)
            self.labels = {int(k): v for k, v in
                           parser.get("_meta_#network_data_format#outputs#pred#channel_def", {}).items()}
        else:
            self.labels = {}
        self.name = os.path.basename(os.path.abspath(bundle_dir))
        self.version = str(parser.get("_meta_#version", "0"))
        self.device = torch.device(device)
        self.network, self.engine = load_network(parser, bundle_dir, weights, device, engine, "roi_size", 1)
        self.preprocessing = parser.get_parsed_content("preprocessing")
        self.inferer = parser.get_parsed_content("inferer")
        post = parser.get_parsed_content("postprocessing")
        # like MONAI Label: this tool writes outputs itself (atomically), so the bundle's SaveImaged is dropped
        self.postprocessing = Compose([t for t in post.transforms if not isinstance(t, SaveImaged)])
        first = self.preprocessing.transforms[0]
        if not isinstance(first, LoadImaged):
            raise UsageError(f"{config_file}: preprocessing must start with LoadImaged.")
        self.after_loading = Compose(self.preprocessing.transforms[1:])

    def load(self, case: Case):
        from monai.data import ITKReader
        from monai.transforms import LoadImage

        check_header(case)
        if case.kind == "dicom":
            reader = ITKReader(series_name=case.series_uid) if case.series_uid else ITKReader()
            return LoadImage(reader=reader, image_only=True)(case.input)
        return squeeze_trailing_dims(LoadImage(image_only=True)(case.input))

    def __call__(self, case: Case):
        return self.segment({"image": self.load(case)}, case.input)

    def segment(self, item: dict, source: str):
        """The label volume, on its own grid, of the volume in ``item``; the volume is taken out of ``item`` so that
        it is freed as soon as preprocessing no longer needs it."""
        import torch

        image = take_volume(item)
        check_volume(image, source)
        data = self.after_loading({"image": image})
        del image
        with torch.inference_mode():
            data["pred"] = self.inferer(data["image"][None].to(self.device), self.network)[0].cpu()
        return self.postprocessing(data)["pred"]


class OnnxNetwork:
    """The network exported to ONNX once and run by ONNX Runtime on the CPU: a drop-in for the inferer's network
    (tensor in, tensor out, dynamic batch). Outputs equal eager PyTorch's within 1e-4 (tests/test_infer.py)."""

    def __init__(self, network, input_shape: tuple[int, ...]) -> None:
        import warnings

        import onnxruntime
        import torch

        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = os.path.join(tmp, "model.onnx")
            torch.onnx.export(network.cpu(), (torch.zeros(1, *input_shape),), path, input_names=["image"],
                              output_names=["pred"], dynamic_axes={"image": {0: "batch"}, "pred": {0: "batch"}},
                              dynamo=False)
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            self.session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def __call__(self, batch):
        import torch

        return torch.from_numpy(self.session.run(None, {"image": batch.detach().cpu().float().numpy()})[0])


def load_network(parser, bundle_dir: str, weights: str, device: str, engine: str | None, input_size_id: str,
                 default_channels: int):
    """The bundle's ``network`` with ``weights`` loaded, in eval mode, wrapped for ONNX Runtime when the engine (the
    argument, else the config's ``engine``, else torch) is onnx; returns ``(network, engine)``."""
    import torch

    parser["bundle_root"] = bundle_dir
    parser["device"] = f"$torch.device('{device}')"
    network = parser.get_parsed_content("network")
    state = torch.load(weights, map_location=torch.device(device), weights_only=True)
    network.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
    network.eval()
    engine = engine or parser.get("engine", "torch")
    if engine not in ENGINES:
        raise UsageError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}.")
    if engine == "onnx":
        size = parser.get_parsed_content(input_size_id)
        channels = int(parser.get("_meta_#network_data_format#inputs#image#num_channels", default_channels))
        network = OnnxNetwork(network, (channels, *size))
    return network, engine


def check_volume(image, source: str) -> None:
    """Reject input a 3D CT bundle cannot segment meaningfully, naming the file and the problem."""
    import torch

    spatial = tuple(image.shape[-3:]) if image.ndim >= 3 else tuple(image.shape)
    if image.ndim == 4 and image.shape[-1] > 1:
        raise ValueError(f"{source}: expected a 3D volume, got a 4D volume of shape {tuple(image.shape)} (e.g. a cine "
                         f"series with one frame per phase); segment one 3D frame at a time.")
    if image.ndim != 3 or min(spatial) < 1:
        raise ValueError(f"{source}: expected a 3D volume, got an array of shape {tuple(image.shape)}.")
    if not torch.isfinite(torch.as_tensor(image)).all():
        raise ValueError(f"{source}: the volume holds NaN or infinite values.")


def check_header(case: Case) -> None:
    """Fail fast, before any voxel is read: unreadable headers, volumes too large to hold, DICOM series whose slices
    do not form one regular grid (:func:`check_dicom_series`)."""
    if case.problem:
        raise ValueError(f"{case.input}: {case.problem}.")
    if case.kind == "nifti":
        import nibabel as nib

        try:
            shape = tuple(int(n) for n in nib.load(case.input).header.get_data_shape())
        except Exception as e:
            raise ValueError(f"{case.input}: not a readable NIfTI file ({str(e).splitlines()[0] if str(e) else e!r}).")
    else:
        shape = check_dicom_series(case)
    size = 4 * int(np.prod(shape, dtype=np.float64))  # bytes once loaded as float32
    if size > MAX_VOLUME_BYTES:
        raise ValueError(f"{case.input}: the header claims a volume of shape {shape} ({size / 2**30:.1f} GiB as "
                         f"float32), over the {MAX_VOLUME_BYTES / 2**30:.0f} GiB limit.")


# header fields every slice of a series must share; numbers compared within an absolute tolerance
SERIES_FIELDS = {"Rows": 0, "Columns": 0, "PixelSpacing": 1e-3, "ImageOrientationPatient": 1e-4, "BitsAllocated": 0,
                 "PixelRepresentation": 0, "SamplesPerPixel": 0}
IN_PLANE_TOLERANCE = 0.1  # of a pixel: how far a slice's position may stray from the line along the slice normal
SPACING_TOLERANCE = 0.1  # of the median step: how far one step between neighbouring slices may differ from it


def _series_headers(case: Case) -> list[tuple[str, object]]:
    import pydicom

    headers = []
    for name in sorted(os.listdir(case.input)):
        path = os.path.join(case.input, name)
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue  # not DICOM (reported by discovery when it claims to be)
        if str(getattr(ds, "SeriesInstanceUID", "") or "") == case.series_uid:
            headers.append((path, ds))
    return headers


def _field(ds, name: str):
    value = ds.get(name)
    if value is None:
        return None
    return tuple(float(v) for v in value) if name in ("PixelSpacing", "ImageOrientationPatient") else int(value)


def _check_same_fields(headers: list[tuple[str, object]]) -> None:
    """Every slice has the series' value (its most common one) of each field in ``SERIES_FIELDS``."""
    for name, tolerance in SERIES_FIELDS.items():
        values = [_field(ds, name) for _, ds in headers]
        common = max(set(values), key=values.count)
        for (path, _), value in zip(headers, values):
            same = value == common or (isinstance(value, tuple) and isinstance(common, tuple)
                                       and len(value) == len(common)
                                       and np.allclose(value, common, rtol=0, atol=tolerance))
            if not same:
                raise ValueError(f"{path}: {name} is {value} where the other slices of the series have {common}; "
                                 f"the slices do not form one volume.")


def check_dicom_series(case: Case) -> tuple[int, ...]:
    """The series' shape from its headers, after checking that its slices form one regular grid: the same
    ``SERIES_FIELDS``, positions on one line along the slice normal, even steps (no gap, no duplicate). Multi-frame
    (enhanced) files are refused by name."""
    headers = _series_headers(case)
    for path, ds in headers:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1:
            raise ValueError(f"{path}: an enhanced (multi-frame) DICOM file of {frames} frames, which this tool does "
                             f"not read; convert it to NIfTI (e.g. dcm2niix) or to single-frame slices first.")
    positioned = [(path, ds) for path, ds in headers if "ImagePositionPatient" in ds]
    if not positioned:
        raise ValueError(f"{case.input}: no DICOM image slices with a position were found for this series.")
    if len(positioned) < len(headers):  # pydicom reads a truncated file's header as far as it goes, without a word
        incomplete = next(path for path, ds in headers if "ImagePositionPatient" not in ds)
        raise ValueError(f"{incomplete}: a file of this series without ImagePositionPatient (a truncated or damaged "
                         f"slice, or not an image); the series would be incomplete.")
    headers = positioned
    _check_same_fields(headers)
    orientation = np.asarray(headers[0][1].get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), dtype=np.float64)
    axes = np.stack([orientation[:3], orientation[3:], np.cross(orientation[:3], orientation[3:])])
    coords = np.asarray([axes @ np.asarray(ds.ImagePositionPatient, dtype=np.float64) for _, ds in headers])
    pixel = min(_field(headers[0][1], "PixelSpacing") or (1.0,))
    off_line = np.abs(coords[:, :2] - np.median(coords[:, :2], axis=0)).max(axis=1)
    if off_line.max() > max(IN_PLANE_TOLERANCE * pixel, 1e-2):
        worst = int(off_line.argmax())
        raise ValueError(f"{headers[worst][0]}: ImagePositionPatient lies {off_line[worst]:.2f} mm off the line of the "
                         f"other slices along the slice normal; the slices do not form one volume.")
    order = np.argsort(coords[:, 2], kind="stable")
    positions = coords[order, 2]
    steps = np.diff(positions)
    if len(steps):
        spacing = float(np.median(steps))
        if steps.min() < 1e-3 * max(spacing, 1e-3):
            raise ValueError(_duplicate_positions_message(case))
        gaps = np.flatnonzero(steps > 1.5 * spacing)
        if len(gaps):
            i = int(gaps[0])
            raise ValueError(f"{case.input}: missing slice(s) between positions {positions[i]:.2f} and "
                             f"{positions[i + 1]:.2f} mm (slice spacing {spacing:.2f} mm); a slice file is missing "
                             f"or unreadable.")
        uneven = np.flatnonzero(np.abs(steps - spacing) > SPACING_TOLERANCE * spacing)
        if len(uneven):
            i = int(uneven[0])
            raise ValueError(f"{headers[order[i + 1]][0]}: uneven slice spacing, {steps[i]:.2f} mm from the previous "
                             f"slice where the series' spacing is {spacing:.2f} mm.")
    rows, columns = _field(headers[0][1], "Rows") or 0, _field(headers[0][1], "Columns") or 0
    return rows, columns, len(positions)


def _duplicate_positions_message(case: Case) -> str:
    """Why a series with repeated slice positions is refused: a multi-phase cine series, or duplicates."""
    from tools.split_cine_phases import cine_phases

    try:
        phases = cine_phases(case.input, case.series_uid)
    except ValueError:
        phases = []
    if len(phases) > 1:
        return (f"{case.input}: a multi-phase (cine) series, {len(phases)} phases x {len(phases[0])} slice positions; "
                f"segment one phase at a time: python tools/split_cine_phases.py {case.input} PHASES_DIR "
                f"[--phases '[ED, ES]'] writes one folder per phase, then run on PHASES_DIR.")
    return (f"{case.input}: two slices share one position; the series holds duplicates or several acquisitions "
            f"(split it into one folder per volume).")


SQUEEZED_KEY = "litemed_squeezed_from"  # meta key: the shape a volume had before its trailing size-1 dimensions went


def squeeze_trailing_dims(image):
    """A NIfTI volume of shape (x, y, z, 1) or (x, y, z, 1, 1), as some converters write one 3D volume, as (x, y, z);
    the shape it had is kept in its meta for the case's message. Real 4D data is left for :func:`check_volume`."""
    original = tuple(image.shape)
    while image.ndim > 3 and image.shape[-1] == 1:
        image = image.squeeze(-1)
    if tuple(image.shape) != original:
        image.meta["original_channel_dim"] = "no_channel"  # the dropped dimension was no channel
        image.meta[SQUEEZED_KEY] = original
    return image


def volume_warning(image) -> str:
    """A message for input that is valid but suspicious or was adapted (segmented anyway)."""
    notes = []
    if SQUEEZED_KEY in getattr(image, "meta", {}):
        notes.append(f"note: trailing size-1 dimensions squeezed, shape {image.meta[SQUEEZED_KEY]} read as "
                     f"{tuple(image.shape)}")
    low, high = float(image.min()), float(image.max())
    if low == high:
        notes.append(f"warning: every voxel is {low:g}; the volume holds no image")
    return "; ".join(notes)


def save_label(label, output_path: str) -> None:
    """Write a uint8 label NIfTI with the label's affine, under a temporary name first."""
    from networks.data import write_nifti_atomic

    array = np.asarray(label.detach().cpu().numpy() if hasattr(label, "detach") else label)
    array = array[0] if array.ndim == 4 else array
    affine = np.asarray(label.affine, dtype=np.float64) if hasattr(label, "affine") else np.eye(4)
    write_nifti_atomic(array.astype(np.uint8), affine, output_path)


def label_volumes_ml(label, names: dict[int, str]) -> dict[str, float]:
    array = np.asarray(label.detach().cpu().numpy() if hasattr(label, "detach") else label)
    voxel_ml = abs(float(np.linalg.det(np.asarray(label.affine, dtype=np.float64)[:3, :3]))) / 1000.0
    counts = np.bincount(array.astype(np.int64).ravel(), minlength=max(names, default=0) + 1)
    return {names.get(i, str(i)): round(float(counts[i]) * voxel_ml, 2) for i in range(1, len(counts))}


def write_summary(output_dir: str, results: list[Result]) -> None:
    """summary.csv (one column per labelled structure's volume in ml after the fixed ones) and summary.json, each
    written atomically."""
    volume_names = list(dict.fromkeys(name for r in results for name in r.volumes_ml))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*SUMMARY_FIELDS, *(f"{n}_ml" for n in volume_names)],
                            extrasaction="ignore")
    writer.writeheader()
    for r in results:
        writer.writerow({**asdict(r), "seconds": f"{r.seconds:.2f}", **{f"{n}_ml": v for n, v in r.volumes_ml.items()}})
    from networks.data import write_atomic

    write_atomic(os.path.join(output_dir, "summary.csv"), buffer.getvalue())
    write_atomic(os.path.join(output_dir, "summary.json"), json.dumps([asdict(r) for r in results], indent=2))


def check_output_dir(output_dir: str) -> None:
    """Create OUTPUT_DIR, prove it writable, and remove temporary files a killed run left behind."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=output_dir, prefix=TMP_PREFIX)
        os.close(handle)
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"{output_dir}: output folder is not writable ({e.strerror or e}).") from e
    remove_temporary_files(output_dir)


def remove_temporary_files(output_dir: str) -> None:
    """Remove the temporary files of writes that never finished (their process was killed)."""
    for name in os.listdir(output_dir):
        if name.startswith(TMP_PREFIX):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(output_dir, name))


class _ReadAhead:
    """Iterates ``(case, {"image": volume})``, reading up to ``num_workers`` cases ahead in threads (inline for 0).

    A reading error is raised by ``take_volume(item)``, in the consumer. Nothing here keeps a volume once it is handed
    over, so the caller can release it (``dict.pop``) while its case is still being segmented."""

    def __init__(self, cases: list[Case], load, num_workers: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.load = load
        self.upcoming = iter(cases)
        self.pool = ThreadPoolExecutor(num_workers) if num_workers > 0 else None
        self.queue = deque(self._start(case) for case in itertools.islice(self.upcoming, max(num_workers, 1)))

    def _start(self, case: Case):
        return case, (self.pool.submit(read_case, self.load, case) if self.pool else None)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[Case, dict]:
        if not self.queue:
            if self.pool:
                self.pool.shutdown()
            raise StopIteration
        case, future = self.queue.popleft()
        following = next(self.upcoming, None)
        if following is not None:
            self.queue.append(self._start(following))
        return case, (future.result() if future else read_case(self.load, case))


def read_case(load, case: Case) -> dict:
    """``{"image": volume}``, or ``{"error": exception}`` when reading failed (raised by :func:`take_volume`)."""
    try:
        return {"image": load(case)}
    except Exception as e:
        return {"error": e}


def take_volume(item: dict):
    """The volume :class:`_ReadAhead` read for a case, taken out of ``item``; re-raises its reading error."""
    if "error" in item:
        raise item.pop("error")
    return item.pop("image")


def plan(input: str, output_dir: str, dicom_seg: bool = False, overlay: bool = False,
         overwrite: bool = False, ignored: list[str] | None = None) -> tuple[list[Case], list[Case]]:
    """Every case under INPUT with its output paths in OUTPUT_DIR, and the cases still to do: a case whose label (and
    DICOM SEG, when asked for) exists is complete and skipped, unless ``overwrite``. Both engines run exactly these
    cases. Files that are neither NIfTI nor DICOM are appended to ``ignored``."""
    cases = discover(input, ignored)
    if not cases:
        raise UsageError(f"{input}: no NIfTI files or DICOM series found.")
    for case in cases:
        case.outputs = {"label": os.path.join(output_dir, f"{case.name}_seg.nii.gz")}
        if dicom_seg and case.kind == "dicom":
            case.outputs["dicom_seg"] = os.path.join(output_dir, f"{case.name}_seg.dcm")
        if overlay:
            case.outputs["overlay"] = os.path.join(output_dir, f"{case.name}_overlay.png")
    todo = [case for case in cases if overwrite
            or not all(os.path.isfile(case.outputs[k]) for k in ("label", "dicom_seg") if k in case.outputs)]
    return cases, todo


def process_case(runner: BundleRunner, case: Case, item: dict | None = None) -> Result:
    """Segment one case and write its outputs (each under a temporary name, then renamed, so a retried case overwrites
    cleanly). ``item`` is what :func:`read_case` gave (read here when None). Never raises: a failure is a failed
    Result whose message names the input and the problem."""
    from tools.dicom_seg import source_slices, write_dicom_seg

    start = time.perf_counter()
    try:
        if item is None:
            item = read_case(runner.load, case)
        if "dicom_seg" in case.outputs:
            source_slices(case.input, case.series_uid)  # fail before any work when SEG is impossible
        warning = volume_warning(item["image"]) if "image" in item else ""
        label = runner.segment(item, case.input)  # takes the volume out of item: freed while inferring
        if "dicom_seg" in case.outputs:
            write_dicom_seg(label, case.input, case.series_uid, runner.labels, case.outputs["dicom_seg"],
                            runner.name, runner.version)
        save_label(label, case.outputs["label"])
        if "overlay" in case.outputs:
            from tools.overlay import save_overlay

            save_overlay(runner.load(case), label, case.outputs["overlay"], runner.labels)
        return Result(case.name, case.input, "ok", case.outputs["label"], time.perf_counter() - start,
                      warning, label_volumes_ml(label, runner.labels))
    except Exception as e:  # one bad case must not stop the batch
        return failed_result(case, e, time.perf_counter() - start)


def failed_result(case: Case, error: Exception, seconds: float = 0.0) -> Result:
    """A failed row: the error's first line, prefixed with the input unless it already names it."""
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    if case.input not in message:
        message = f"{case.input}: {message}"
    return Result(case.name, case.input, "failed", "", seconds, message)


class Summary:
    """The summary rows of a batch: a skipped row for each complete case, then one row per case as it finishes;
    summary.csv and summary.json are rewritten (atomically) after each, so a killed run leaves what finished."""

    def __init__(self, output_dir: str, cases: list[Case], todo: list[Case], ignored_files: int = 0) -> None:
        self.output_dir, self.cases, self.ignored_files = output_dir, cases, ignored_files
        pending = {case.name for case in todo}
        self.results = {case.name: Result(case.name, case.input, "skipped", case.outputs["label"], 0.0, "output exists")
                        for case in cases if case.name not in pending}
        self.progress = _progress(len(todo))

    def record(self, result: Result) -> None:
        self.results[result.case] = result
        (log.error if result.status == "failed" else log.info)(
            "case %s: %s in %.1f s %s", result.case, result.status, result.seconds, result.message)
        self.progress.update()
        write_summary(self.output_dir, [self.results[c.name] for c in self.cases if c.name in self.results])

    def finish(self) -> int:
        """Write the final summary and log the counts; the exit code (1 when any case failed)."""
        self.progress.close()
        return finish_batch(self.output_dir, [self.results[c.name] for c in self.cases if c.name in self.results],
                            ignored_files=self.ignored_files)


def finish_batch(output_dir: str, results: list[Result], unit: str = "cases", ignored_files: int = 0) -> int:
    """Write the final summary of a batch and log its counts (and the files skipped as neither NIfTI nor DICOM);
    the exit code (1 when any case failed)."""
    write_summary(output_dir, results)
    counts = {status: sum(r.status == status for r in results) for status in ("ok", "skipped", "failed")}
    ignored = f"; {ignored_files} other files (neither NIfTI nor DICOM) ignored" if ignored_files else ""
    log.info("%d %s: %d ok, %d skipped, %d failed%s", len(results), unit, *counts.values(), ignored)
    return 1 if counts["failed"] else 0


def run(bundle_dir: str, input: str, output_dir: str, device: str = "cpu", overlay: bool = False,
        num_threads: int = 0, num_workers: int = 0, dicom_seg: bool = False, engine: str | None = None,
        ray_address: str | None = None, overrides: dict | None = None, overwrite: bool = False) -> int:
    """Segment every case under INPUT with the bundle in BUNDLE_DIR, its inference config's ids set from
    ``overrides``; returns the exit code. ``overwrite`` redoes cases whose outputs exist. With ``ray_address`` the
    cases run on a Ray cluster (tools/ray_engine.py); otherwise here, one after another."""
    if ray_address:
        return _run_on_ray(bundle_dir, input, output_dir, device, overlay, num_threads, dicom_seg, engine, ray_address,
                           overrides, overwrite)
    import torch

    if num_threads > 0:
        torch.set_num_threads(num_threads)
    check_output_dir(output_dir)
    ignored: list[str] = []
    cases, todo = plan(input, output_dir, dicom_seg, overlay, overwrite, ignored)
    runner = BundleRunner(bundle_dir, device, engine=engine, overrides=overrides)
    summary = Summary(output_dir, cases, todo, len(ignored))
    for case, item in _ReadAhead(todo, runner.load, num_workers):
        summary.record(process_case(runner, case, item))
    return summary.finish()


def _run_on_ray(bundle_dir: str, input: str, output_dir: str, device: str, overlay: bool, num_threads: int,
                dicom_seg: bool, engine: str | None, ray_address: str, overrides: dict | None,
                overwrite: bool) -> int:
    """The same plan, processing and summary as :func:`run`; Ray decides where each case runs. Paths are made
    absolute: every node resolves them on the shared filesystem. Nothing is written before the cluster answers."""
    try:
        import ray  # noqa: F401
    except ImportError as e:
        raise UsageError("--ray_address needs Ray, which is not installed; install it with: "
                         'pip install -e ".[distributed]"') from e
    from tools import ray_engine

    if engine not in (None, *ENGINES):
        raise UsageError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}.")
    bundle_dir, input, output_dir = (os.path.abspath(p) for p in (bundle_dir, input, output_dir))
    config_file, _ = check_bundle(bundle_dir)
    if overrides:  # a misspelt id stops the batch here, not as a failure of every case on the workers
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(config_file)
        apply_overrides(parser, overrides, config_file)
    with ray_engine.connect(ray_address):
        check_output_dir(output_dir)
        ignored: list[str] = []
        cases, todo = plan(input, output_dir, dicom_seg, overlay, overwrite, ignored)
        summary = Summary(output_dir, cases, todo, len(ignored))
        settings = {"bundle_dir": bundle_dir, "device": device, "engine": engine, "num_threads": num_threads,
                    "overrides": overrides or {}}
        ray_engine.process_all(todo, settings, summary.record)
        remove_temporary_files(output_dir)  # left by workers killed mid-write; their cases were redone elsewhere
        return summary.finish()


def _progress(total: int):
    """A tqdm bar on a terminal; elsewhere a stand-in, and the per-case log lines carry the progress."""
    from tqdm import tqdm

    return tqdm(total=total, unit="case", disable=not sys.stderr.isatty())


def _classification_run(bundle_dir: str):
    """``tools.classify.run`` when BUNDLE_DIR is a classification bundle (metadata output format ``classes``: images
    in, ``predictions.csv`` out), else None."""
    sys.modules.setdefault("tools.infer", sys.modules[__name__])  # run as a script: tools.classify shares UsageError
    from tools.classify import is_classification_bundle, run as classify

    return classify if is_classification_bundle(bundle_dir) else None


def _image2d_segmentation_run(bundle_dir: str):
    """``tools.segment2d.run`` when BUNDLE_DIR segments 2D images (PNG masks out), else None."""
    sys.modules.setdefault("tools.infer", sys.modules[__name__])
    from tools.segment2d import is_image2d_segmentation_bundle, run as segment2d

    return segment2d if is_image2d_segmentation_bundle(bundle_dir) else None


def check_device(device: str) -> None:
    """A usage error unless torch can run on ``device`` here (``cpu``, ``cuda``, ``cuda:N``, ``mps``)."""
    import torch

    try:
        chosen = torch.device(str(device))
    except RuntimeError as e:
        raise UsageError(f"--device {device}: not a device name torch knows (cpu, cuda, cuda:N).") from e
    if chosen.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"--device {device}: torch sees no CUDA GPU on this machine; run with --device cpu.")
        if chosen.index is not None and chosen.index >= count:
            raise UsageError(f"--device {device}: torch sees {count} CUDA GPU(s), numbered 0 to {count - 1}.")
    elif chosen.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: MPS is not available on this machine; run with --device cpu.")
    elif chosen.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {device}: this tool runs on cpu, cuda or mps.")


def main(bundle_dir: str, input: str, output_dir: str, device: str = "cpu", overlay: bool = False,
         num_threads: int = 0, num_workers: int = 0, dicom_seg: bool = False, engine: str | None = None,
         ray_address: str | None = None, overwrite: bool = False, **overrides) -> None:
    """Segment every case under INPUT (see the module docstring). ``num_workers`` threads read the next cases
    while the current one is segmented (each holds one volume in memory); ``num_threads`` sets torch's threads;
    ``dicom_seg`` also writes ``<case>_seg.dcm``, a DICOM Segmentation referencing the source series, for DICOM
    input (the series must carry its UIDs); ``engine`` is ``torch`` or ``onnx`` (ONNX Runtime on the CPU), by default
    the inference config's ``engine``. ``ray_address`` (``local``, ``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``)
    runs the cases on a Ray cluster, one task of ``num_threads`` CPUs (default 1) per case; INPUT, OUTPUT_DIR and
    BUNDLE_DIR must then be on a filesystem every node sees at the same path (``num_workers`` is not used).
    ``overwrite`` redoes the cases whose outputs exist instead of skipping them. Any other ``--ID VALUE`` sets that id
    of the bundle's inference config."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        if not ray_address:  # on a cluster the workers' devices count, not the driver's
            check_device(device)
        code = (_classification_run(bundle_dir) or _image2d_segmentation_run(bundle_dir) or run)(
            bundle_dir, input, output_dir, device, overlay, num_threads, num_workers, dicom_seg, engine, ray_address,
            overrides=overrides, overwrite=overwrite)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tools.infer import main as tools_main  # one module for the driver and Ray's workers, not __main__ and a copy

    fire.Fire(tools_main)
