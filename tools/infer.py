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

Cases run here, one after another, unless ``--ray_address`` sends them to a Ray cluster
(``networks/batch/ray_engine.py``, imported only then; ``pip install -e ".[distributed]"``): the same plan, per-case
processing and summary, only where each case runs differs. BUNDLE_DIR, INPUT and OUTPUT_DIR must then be on a
filesystem every node sees.

A classification bundle (metadata output format ``classes``) writes ``predictions.csv`` for 2D images, a 2D
segmentation bundle (``png`` among its data types) one ``<case>_seg.png`` 0/1 mask per image; both keep the same summary
and exit codes. This file is the command line only; the engine is ``networks.batch`` (``docs/architecture.md``).

Exit codes: 0 every case ok or skipped, 1 some case failed, 2 usage error (bundle missing, output not writable, Ray
not installed, Ray address malformed or unreachable).

Examples::

    python tools/infer.py bundles/synapse_ltmednext_segmentation samples/ct_dicom out/
    python tools/infer.py bundles/synapse_ltmednext_segmentation /data/dicom out/ --overlay --device cpu
    python tools/infer.py bundles/acdc_ltmednext_segmentation /data/cmr out/ --test_time_augmentation false
    python tools/infer.py bundles/synapse_ltmednext_segmentation /nfs/studies /nfs/out --ray_address 10.0.0.1:6379
"""

from __future__ import annotations

import logging
import sys

import fire

from networks.batch.core import UsageError, check_device
from networks.batch.runners import run


def main(bundle_dir: str, input: str, output_dir: str, device: str = "cpu", overlay: bool = False,
         num_threads: int = 0, num_workers: int = 0, dicom_seg: bool = False, engine: str | None = None,
         ray_address: str | None = None, overwrite: bool = False, **overrides) -> None:
    """Run the bundle on every case under INPUT (see the module docstring). ``num_workers`` threads read the next
    volumes while the current one is segmented (each holds one volume in memory); ``num_threads`` sets torch's threads;
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
        code = run(bundle_dir, input, output_dir, device=device, overlay=overlay, num_threads=num_threads,
                   num_workers=num_workers, dicom_seg=dicom_seg, engine=engine, ray_address=ray_address,
                   overrides=overrides, overwrite=overwrite)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    fire.Fire(main)
