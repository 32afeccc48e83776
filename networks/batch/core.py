"""What every kind of batch shares: the bundle read once, the options, results, the one summary, and the network loader.

Nothing here knows volumes or 2D images; :mod:`networks.batch.volumes` and :mod:`networks.batch.images` build on it.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field

from networks.data import TMP_PREFIX, first_line, write_atomic

ENGINES = ("torch", "onnx")
SUMMARY_FIELDS = ("case", "input", "status", "output", "seconds", "message")
VOLUME_SEGMENTATION, IMAGE_SEGMENTATION, CLASSIFICATION = "volume segmentation", "2D segmentation", "classification"
CLASSIFICATION_FORMATS = ("classes", "classification")
log = logging.getLogger("infer")


class UsageError(Exception):
    """A problem with the command line itself (exit code 2)."""


@dataclass
class Result:
    """One summary row."""

    case: str
    input: str
    status: str  # "ok", "skipped" or "failed"
    output: str = ""
    seconds: float = 0.0
    message: str = ""
    volumes_ml: dict = field(default_factory=dict)  # volume segmentation: structure -> ml, one summary column each


@dataclass
class BatchOptions:
    """The options of ``tools/infer.py`` (its docstring says what each does); ``overrides`` set ids of the bundle's
    inference config."""

    device: str = "cpu"
    overlay: bool = False
    num_threads: int = 0
    num_workers: int = 0
    dicom_seg: bool = False
    engine: str | None = None
    ray_address: str | None = None
    overrides: dict = field(default_factory=dict)
    overwrite: bool = False
    batch_size: int = 8


def error_message(error: Exception, path: str) -> str:
    """The error's first line, prefixed with ``path`` unless it already names it."""
    message = first_line(error)
    return message if path in message else f"{path}: {message}"


def failed_result(case, error: Exception, seconds: float = 0.0) -> Result:
    """A failed row for ``case`` (anything with ``name`` and ``input``)."""
    return Result(case.name, case.input, "failed", "", seconds, error_message(error, case.input))


class BundleSpec:
    """A bundle read once: its paths, metadata, version, label or class names, and its kind (from metadata: class
    probabilities out is classification; a segmentation with ``png`` among the data types is 2D segmentation; any
    other segmentation is volume segmentation)."""

    def __init__(self, bundle_dir: str) -> None:
        self.bundle_dir = bundle_dir
        self.name = os.path.basename(os.path.abspath(bundle_dir))
        self.config_file = os.path.join(bundle_dir, "configs", "inference.json")
        self.meta_file = os.path.join(bundle_dir, "configs", "metadata.json")
        self.weights = os.path.join(bundle_dir, "models", "model.pt")
        try:
            with open(self.meta_file) as f:
                self.metadata = json.load(f)
        except (OSError, ValueError):
            self.metadata = {}
        self.version = str(self.metadata.get("version", "0"))
        self.pred = self.metadata.get("network_data_format", {}).get("outputs", {}).get("pred", {})
        channel_def = self.pred.get("channel_def", {})
        self.labels = {int(k): str(v) for k, v in channel_def.items()}  # label value or class index -> name
        pred_format = str(self.pred.get("format", "")).lower()
        if pred_format in CLASSIFICATION_FORMATS:
            self.kind = CLASSIFICATION
        elif pred_format == "segmentation" and "png" in str(self.metadata.get("data_type", "")).lower():
            self.kind = IMAGE_SEGMENTATION
        else:
            self.kind = VOLUME_SEGMENTATION

    def check(self, weights: str | None = None) -> str:
        """The weights to load; UsageError naming what is missing (config, metadata of a 2D bundle, weights)."""
        required = [self.config_file] + ([self.meta_file] if self.kind != VOLUME_SEGMENTATION else [])
        for path in required:
            if not os.path.isfile(path):
                raise UsageError(f"{path}: not found; is {self.bundle_dir} a bundle?")
        weights = weights or self.weights
        if not os.path.isfile(weights):
            raise UsageError(f"{weights}: not found; {self.bundle_dir} has no trained weights: train it first (see its "
                             f"docs/README.md).")
        return weights

    def parser(self, overrides: dict | None = None, extra_configs: tuple[str, ...] = ()):
        """A ConfigParser of the inference config (and ``extra_configs``) with the metadata and ``overrides``."""
        from monai.bundle import ConfigParser

        for path in extra_configs:
            if not os.path.isfile(path):
                raise UsageError(f"{path}: not found.")
        parser = ConfigParser()
        parser.read_config([self.config_file, *extra_configs])
        apply_overrides(parser, overrides, self.config_file)
        if os.path.isfile(self.meta_file):
            parser.read_meta(self.meta_file)
        return parser


def apply_overrides(parser, overrides: dict | None, config_file: str) -> None:
    """Set each ``id: value`` of ``overrides`` in ``parser`` (ids as MONAI writes them, ``inferer#sw_batch_size``);
    UsageError for an id the config does not have: a misspelt option must not pass unnoticed."""
    for key, value in (overrides or {}).items():
        if key not in parser:
            raise UsageError(f"--{key}: {config_file} has no id {key!r} (options of this tool: --device, --overlay, "
                             f"--num_threads, --num_workers, --dicom_seg, --engine, --ray_address, --overwrite).")
        parser[key] = value


def check_engine(engine: str | None) -> None:
    if engine not in (None, *ENGINES):
        raise UsageError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}.")


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
    check_engine(engine)
    if engine == "onnx":
        size = parser.get_parsed_content(input_size_id)
        channels = int(parser.get("_meta_#network_data_format#inputs#image#num_channels", default_channels))
        network = OnnxNetwork(network, (channels, *size))
    return network, engine


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


def set_threads(num_threads: int) -> None:
    import torch

    if num_threads > 0:
        torch.set_num_threads(num_threads)


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
    write_atomic(os.path.join(output_dir, "summary.csv"), buffer.getvalue())
    write_atomic(os.path.join(output_dir, "summary.json"), json.dumps([asdict(r) for r in results], indent=2))


class BatchSummary:
    """The summary of one batch of any kind: ``cases`` (anything with ``name`` and ``input``) in their order, the
    ``skipped`` rows of complete ones, then one row per case as it finishes; summary.csv and summary.json are rewritten
    (atomically) after each, so a killed run leaves what finished. :meth:`finish` gives the exit code."""

    def __init__(self, output_dir: str, cases: list, skipped: dict[str, Result], unit: str = "cases",
                 ignored_files: int = 0) -> None:
        from tqdm import tqdm

        self.output_dir, self.unit, self.ignored_files = output_dir, unit, ignored_files
        self.order = [c.name for c in cases]
        self.results = dict(skipped)
        # a bar on a terminal; elsewhere the per-case log lines carry the progress
        self.progress = tqdm(total=len(cases) - len(skipped), unit=unit[:-1], disable=not sys.stderr.isatty())

    def record(self, result: Result, write: bool = True) -> None:
        self.results[result.case] = result
        (log.error if result.status == "failed" else log.info)(
            "case %s: %s in %.2f s %s", result.case, result.status, result.seconds, result.message)
        self.progress.update()
        if write:
            self.write()

    def write(self) -> None:
        write_summary(self.output_dir, self.rows())

    def rows(self) -> list[Result]:
        return [self.results[name] for name in self.order if name in self.results]

    def finish(self) -> int:
        """Write the final summary and log the counts (and the files ignored by discovery); 1 when a case failed."""
        self.progress.close()
        results = self.rows()
        write_summary(self.output_dir, results)
        counts = {status: sum(r.status == status for r in results) for status in ("ok", "skipped", "failed")}
        ignored = f"; {self.ignored_files} other files (neither NIfTI nor DICOM) ignored" if self.ignored_files else ""
        log.info("%d %s: %d ok, %d skipped, %d failed%s", len(results), self.unit, *counts.values(), ignored)
        return 1 if counts["failed"] else 0
