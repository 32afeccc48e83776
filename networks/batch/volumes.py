"""Volume segmentation (NIfTI files and DICOM series): discovery, header checks before any voxel is read, the
segmenter built from the bundle's inference config, the plan of a batch, and the processing of one case.

A case's life: :func:`discover` finds it (a NIfTI file or one DICOM series); :func:`plan` gives it its output paths
and skips it when they exist; an engine (:mod:`networks.batch.engines`, :mod:`networks.batch.ray_engine`) decides
where :func:`process_case` runs for it: :func:`check_header`, read, :meth:`VolumeSegmenter.segment`, the writers of
:mod:`networks.batch.writers`, and one :class:`~networks.batch.core.Result`, the case's summary row.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field

import numpy as np

from networks.batch.core import BundleSpec, Result, UsageError, failed_result, load_network
from networks.batch.writers import save_label, save_overlay
from networks.data import first_line

NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
MAX_VOLUME_BYTES = 4 * 2**30  # a volume larger than this as float32 is refused before it is read


@dataclass
class Case:
    """One unit of work: a NIfTI file or one DICOM series (its files, ordered later by the reader)."""

    name: str
    input: str
    kind: str  # "nifti", "dicom", or "unreadable" (a file that claims to be DICOM but cannot be parsed)
    series_uid: str = ""
    problem: str = ""  # set by discovery when the case cannot be read as it stands (an "unreadable" file)
    outputs: dict = field(default_factory=dict)  # "label", "dicom_seg", "overlay" -> path; set by plan()


def _case_name(path: str, root: str) -> str:
    relative = os.path.relpath(path, root) if os.path.isdir(root) and path != root else os.path.basename(path)
    for suffix in NIFTI_SUFFIXES:
        if relative.endswith(suffix):
            relative = relative[: -len(suffix)]
    return re.sub(r"[\\/]+", "__", relative).strip("_.") or "case"


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
            problem = first_line(e)
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


class VolumeSegmenter:
    """The network, preprocessing, inferer and postprocessing of a volume bundle's inference config, loaded once."""

    def __init__(self, bundle_dir: str, device: str = "cpu", extra_configs: tuple[str, ...] = (),
                 weights: str | None = None, engine: str | None = None, overrides: dict | None = None) -> None:
        import torch
        from monai.transforms import Compose, LoadImaged, SaveImaged

        spec = BundleSpec(bundle_dir)
        weights = spec.check(weights)
        parser = spec.parser(overrides, extra_configs)
        self.labels, self.name, self.version = spec.labels, spec.name, spec.version
        self.device = torch.device(device)
        self.network, self.engine = load_network(parser, bundle_dir, weights, device, engine, "roi_size", 1)
        self.preprocessing = parser.get_parsed_content("preprocessing")
        self.inferer = parser.get_parsed_content("inferer")
        post = parser.get_parsed_content("postprocessing")
        # like MONAI Label: the batch writes outputs itself (atomically), so the bundle's SaveImaged is dropped
        self.postprocessing = Compose([t for t in post.transforms if not isinstance(t, SaveImaged)])
        if not isinstance(self.preprocessing.transforms[0], LoadImaged):
            raise UsageError(f"{spec.config_file}: preprocessing must start with LoadImaged.")
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
            raise ValueError(f"{case.input}: not a readable NIfTI file ({first_line(e)}).")
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


def label_volumes_ml(label, names: dict[int, str]) -> dict[str, float]:
    array = np.asarray(label.detach().cpu().numpy() if hasattr(label, "detach") else label)
    voxel_ml = abs(float(np.linalg.det(np.asarray(label.affine, dtype=np.float64)[:3, :3]))) / 1000.0
    counts = np.bincount(array.astype(np.int64).ravel(), minlength=max(names, default=0) + 1)
    return {names.get(i, str(i)): round(float(counts[i]) * voxel_ml, 2) for i in range(1, len(counts))}


# --------------------------------------------------------------- cine series (tools/split_cine_phases.py)
def _slice_position(ds) -> float:
    orientation = np.asarray(ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), dtype=np.float64)
    return float(np.dot(np.cross(orientation[:3], orientation[3:]), np.asarray(ds.ImagePositionPatient, float)))


def cine_phases(folder: str, series_uid: str | None = None) -> list[list[str]]:
    """The files of the series in ``folder`` as phases (each a list of files, one per slice position).

    One phase when every position occurs once. Raises ValueError naming the folder when positions repeat unevenly
    (duplicates or a broken export rather than a cine series) or no file has a position.
    """
    import pydicom

    by_position: dict[float, list[tuple[float, int, str]]] = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        if "ImagePositionPatient" not in ds:
            continue
        if series_uid is not None and str(getattr(ds, "SeriesInstanceUID", "") or "") != series_uid:
            continue
        trigger = float(ds.get("TriggerTime", np.nan) or np.nan)
        order = (trigger if np.isfinite(trigger) else float(ds.get("InstanceNumber", 0) or 0))
        by_position.setdefault(round(_slice_position(ds), 2), []).append((order, int(ds.get("InstanceNumber", 0) or 0),
                                                                          path))
    if not by_position:
        raise ValueError(f"{folder}: no DICOM image slices with a position were found.")
    counts = {len(files) for files in by_position.values()}
    if len(counts) != 1:
        raise ValueError(f"{folder}: slice positions repeat unevenly ({min(counts)} to {max(counts)} files per "
                         f"position): duplicates or an incomplete export, not a regular cine series.")
    positions = sorted(by_position)
    ordered = [sorted(by_position[p]) for p in positions]
    return [[files[k][2] for files in ordered] for k in range(counts.pop())]


def read_case(load, case: Case) -> dict:
    """``{"image": volume}``, or ``{"error": exception}`` when reading failed (raised by :func:`take_volume`)."""
    try:
        return {"image": load(case)}
    except Exception as e:
        return {"error": e}


def take_volume(item: dict):
    """The volume :func:`read_case` read for a case, taken out of ``item``; re-raises its reading error."""
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


def process_case(runner: VolumeSegmenter, case: Case, item: dict | None = None) -> Result:
    """Segment one case and write its outputs (each under a temporary name, then renamed, so a retried case overwrites
    cleanly). ``item`` is what :func:`read_case` gave (read here when None). Never raises: a failure is a failed
    Result whose message names the input and the problem."""
    from networks.batch.dicom_seg import source_slices, write_dicom_seg

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
            save_overlay(runner.load(case), label, case.outputs["overlay"], runner.labels)
        return Result(case.name, case.input, "ok", case.outputs["label"], time.perf_counter() - start,
                      warning, label_volumes_ml(label, runner.labels))
    except Exception as e:  # one bad case must not stop the batch
        return failed_result(case, e, time.perf_counter() - start)


