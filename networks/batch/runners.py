"""One batch of any bundle: :func:`run` reads the bundle once, picks the runner of its kind from :data:`RUNNERS`, and
returns the exit code (0 every case ok or skipped, 1 some case failed; a :class:`UsageError` for exit code 2).

Every runner plans its cases, skips the complete ones (unless ``overwrite``), processes the rest one by one (a case
that fails is a failed row and the batch goes on) and keeps one :class:`BatchSummary`. A new kind of bundle is a
predictor in its own module, a runner here and a line in :data:`RUNNERS` (and its kind in :class:`BundleSpec`).
"""

from __future__ import annotations

import os
import time
from typing import Callable

import numpy as np

from networks.batch import engines, images, volumes
from networks.batch.core import (CLASSIFICATION, IMAGE_SEGMENTATION, VOLUME_SEGMENTATION, BatchOptions, BatchSummary,
                                 BundleSpec, Result, UsageError, check_engine, check_output_dir, failed_result,
                                 remove_temporary_files, set_threads)
from networks.batch.writers import PREDICTIONS, read_predictions, write_predictions


def segment_volumes(spec: BundleSpec, input: str, output_dir: str, options: BatchOptions) -> int:
    """NIfTI files and DICOM series -> ``<case>_seg.nii.gz`` (and ``_seg.dcm``, ``_overlay.png`` when asked), here or
    on a Ray cluster (``options.ray_address``)."""
    if options.ray_address:
        return _segment_volumes_on_ray(spec, input, output_dir, options)
    set_threads(options.num_threads)
    check_output_dir(output_dir)
    ignored: list[str] = []
    cases, todo = volumes.plan(input, output_dir, options.dicom_seg, options.overlay, options.overwrite, ignored)
    runner = volumes.VolumeSegmenter(spec.bundle_dir, options.device, engine=options.engine,
                                     overrides=options.overrides)
    summary = BatchSummary(output_dir, cases, _skipped(cases, todo), ignored_files=len(ignored))
    engines.process_here(todo, runner, options.num_workers, summary.record)
    return summary.finish()


def _skipped(cases: list[volumes.Case], todo: list[volumes.Case]) -> dict[str, Result]:
    pending = {case.name for case in todo}
    return {c.name: Result(c.name, c.input, "skipped", c.outputs["label"], 0.0, "output exists")
            for c in cases if c.name not in pending}


def _segment_volumes_on_ray(spec: BundleSpec, input: str, output_dir: str, options: BatchOptions) -> int:
    """The same plan, processing and summary as in-process; Ray decides where each case runs. Paths are made
    absolute: every node resolves them on the shared filesystem. Nothing is written before the cluster answers."""
    try:
        import ray  # noqa: F401
    except ImportError as e:
        raise UsageError("--ray_address needs Ray, which is not installed; install it with: "
                         'pip install -e ".[distributed]"') from e
    from networks.batch import ray_engine

    check_engine(options.engine)
    bundle_dir, input, output_dir = (os.path.abspath(p) for p in (spec.bundle_dir, input, output_dir))
    spec = BundleSpec(bundle_dir)
    spec.check()
    spec.parser(options.overrides)  # a misspelt id stops the batch here, not as a failure of every case on the workers
    with ray_engine.connect(options.ray_address):
        check_output_dir(output_dir)
        ignored: list[str] = []
        cases, todo = volumes.plan(input, output_dir, options.dicom_seg, options.overlay, options.overwrite, ignored)
        summary = BatchSummary(output_dir, cases, _skipped(cases, todo), ignored_files=len(ignored))
        settings = {"bundle_dir": bundle_dir, "device": options.device, "engine": options.engine,
                    "num_threads": options.num_threads, "overrides": options.overrides}
        ray_engine.process_all(todo, settings, summary.record)
        remove_temporary_files(output_dir)  # left by workers killed mid-write; their cases were redone elsewhere
        return summary.finish()


def segment_images(spec: BundleSpec, input: str, output_dir: str, options: BatchOptions) -> int:
    """2D images -> ``<case>_seg.png``, an 8-bit 0/1 mask with the image's height and width."""
    from networks.segmentation2d import save_mask_png

    set_threads(options.num_threads)
    check_output_dir(output_dir)
    cases = images.discover(input)
    outputs = {c.name: os.path.join(output_dir, f"{c.name}_seg.png") for c in cases}
    skipped = {c.name: Result(c.name, c.input, "skipped", outputs[c.name], 0.0, "output exists")
               for c in cases if os.path.isfile(outputs[c.name]) and not options.overwrite}
    runner = images.ImageSegmenter(spec.bundle_dir, options.device, engine=options.engine,
                                   overrides=options.overrides)  # checks the overrides even when all is done
    summary = BatchSummary(output_dir, cases, skipped, unit="images")
    for case in (c for c in cases if c.name not in skipped):
        start = time.perf_counter()
        try:
            mask = runner.segment(case.input)
            save_mask_png(mask, outputs[case.name])
            fraction = float(mask.mean())
            message = "warning: empty mask (no foreground found)" if fraction == 0 else f"foreground {fraction:.2%}"
            summary.record(Result(case.name, case.input, "ok", outputs[case.name], time.perf_counter() - start,
                                  message))
        except Exception as e:  # one bad image must not stop the batch
            summary.record(failed_result(case, e, time.perf_counter() - start))
    return summary.finish()


def classify_images(spec: BundleSpec, input: str, output_dir: str, options: BatchOptions) -> int:
    """2D images -> one ``predictions.csv`` row each (``case,input,prediction,p_<class>...``), ``batch_size`` images
    through the network at once; a rerun skips the images already in it."""
    if options.batch_size < 1:
        raise UsageError(f"batch_size must be at least 1, got {options.batch_size}.")
    set_threads(options.num_threads)
    check_output_dir(output_dir)
    cases = images.discover(input)
    runner = images.ImageClassifier(spec.bundle_dir, options.device, engine=options.engine,
                                    overrides=options.overrides)
    path = os.path.join(output_dir, PREDICTIONS)
    rows = read_predictions(path, runner.class_names)
    skipped = {c.name: Result(c.name, c.input, "skipped", path, 0.0, "already in predictions.csv") for c in cases
               if c.name in rows and rows[c.name]["input"] == c.input and not options.overwrite}
    todo = [c for c in cases if c.name not in skipped]
    order = [c.name for c in cases] + [name for name in rows if name not in {c.name for c in cases}]
    summary = BatchSummary(output_dir, cases, skipped, unit="images")
    for start in range(0, len(todo), options.batch_size):
        results = _classify_batch(runner, todo[start:start + options.batch_size], rows, path)
        write_predictions(path, [rows[n] for n in order if n in rows], runner.class_names)
        for result in results:
            summary.record(result, write=False)
        summary.write()
    return summary.finish()


def _classify_batch(runner: images.ImageClassifier, batch: list[images.Image2D], rows: dict, path: str) -> list[Result]:
    """Load and classify ``batch``, adding a ``predictions.csv`` row to ``rows`` per image classified."""
    results, loaded = {}, []
    for case in batch:
        began = time.perf_counter()
        try:
            image = runner.load(case.input)
            warning = ("warning: every pixel has one value; the image holds nothing to classify"
                       if float(image.min()) == float(image.max()) else "")
            loaded.append((case, image, warning, time.perf_counter() - began))
        except Exception as e:  # one bad image must not stop the batch
            results[case.name] = failed_result(case, e, time.perf_counter() - began)
    if loaded:
        began = time.perf_counter()
        try:
            probabilities = runner.predict([image for _, image, _, _ in loaded])
        except Exception as e:
            for case, _, _, seconds in loaded:
                results[case.name] = failed_result(case, e, seconds)
        else:
            share = (time.perf_counter() - began) / len(loaded)
            for (case, _, warning, seconds), p in zip(loaded, probabilities):
                prediction = runner.class_names[int(np.argmax(p))]
                rows[case.name] = {"case": case.name, "input": case.input, "prediction": prediction,
                                   **{f"p_{c}": f"{v:.6f}" for c, v in zip(runner.class_names, p)}}
                results[case.name] = Result(case.name, case.input, "ok", path, seconds + share,
                                            warning or f"{prediction} ({float(np.max(p)):.3f})")
    return [results[case.name] for case in batch]


Runner = Callable[[BundleSpec, str, str, BatchOptions], int]
# kind -> (runner, the options that only volume bundles take and this kind refuses)
RUNNERS: dict[str, tuple[Runner, tuple[str, ...]]] = {
    VOLUME_SEGMENTATION: (segment_volumes, ()),
    IMAGE_SEGMENTATION: (segment_images, ("overlay", "dicom_seg", "ray_address")),
    CLASSIFICATION: (classify_images, ("overlay", "dicom_seg", "ray_address")),
}


def run(bundle_dir: str, input: str, output_dir: str, **options) -> int:
    """Run the bundle in BUNDLE_DIR on every case under INPUT into OUTPUT_DIR (``options``: the fields of
    :class:`BatchOptions`); returns the exit code."""
    options = BatchOptions(**{**options, "overrides": options.get("overrides") or {}})
    spec = BundleSpec(bundle_dir)
    runner, refused = RUNNERS[spec.kind]
    given = [f"--{name}" for name in refused if getattr(options, name)]
    if given:
        verb = "segments" if spec.kind == IMAGE_SEGMENTATION else "classifies"
        raise UsageError(f"{bundle_dir} {verb} 2D images in this process: {', '.join(given)} are for volume bundles.")
    return runner(spec, input, output_dir, options)
