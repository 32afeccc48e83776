"""tools/infer.py: discovery, outputs on the input grid, summary, resumability, bad input and exit codes."""

import csv
import os
import shutil
import stat
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from helpers import REPO, make_ct_volume, shared_data

from networks.batch.runners import run
from networks.batch.volumes import discover


def _summary(folder):
    with open(os.path.join(folder, "summary.csv")) as f:
        return list(csv.DictReader(f))


def _nifti(path, array, affine=None):
    nib.save(nib.Nifti1Image(array, np.diag([1.5, 1.5, 3.0, 1.0]) if affine is None else affine), str(path))
    return str(path)


def test_discovery_groups_dicom_series_and_ignores_junk(tmp_path):
    dicom = shared_data("ct_dicom_series", "totalsegmentator_example_ct")
    shutil.copytree(dicom, tmp_path / "in" / "series a")
    (tmp_path / "in" / "series a" / "notes.txt").write_text("not dicom")
    _nifti(tmp_path / "in" / "vol é.nii.gz", make_ct_volume()[0])
    cases = discover(str(tmp_path / "in"))
    assert [(c.kind, os.path.basename(c.input)) for c in cases] == [("nifti", "vol é.nii.gz"), ("dicom", "series a")]
    assert len({c.name for c in cases}) == 2


def test_segments_nifti_and_dicom_on_their_own_grid(random_weight_bundle, tmp_path):
    from monai.transforms import LoadImage

    source = tmp_path / "in"
    shutil.copytree(shared_data("ct_dicom_series", "totalsegmentator_example_ct"), source / "dicom")
    shutil.copy(shared_data("ct_nifti_3d", "example_ct_sm.nii.gz"), source / "ct.nii.gz")
    out = tmp_path / "out"
    assert run(str(random_weight_bundle), str(source), str(out), overlay=True) == 0
    rows = _summary(out)
    assert list(rows[0])[:6] == ["case", "input", "status", "output", "seconds", "message"]
    assert {"liver_ml", "pancreas_ml"} <= set(rows[0])
    assert [r["status"] for r in rows] == ["ok", "ok"]
    by_input = {os.path.basename(r["input"]): r for r in rows}
    nifti_out = nib.load(by_input["ct.nii.gz"]["output"])
    nifti_in = nib.load(str(source / "ct.nii.gz"))
    assert nifti_out.shape == nifti_in.shape and nifti_out.get_data_dtype() == np.uint8
    np.testing.assert_allclose(nifti_out.affine, nifti_in.affine, atol=1e-4)
    dicom_in = LoadImage(image_only=True)(str(source / "dicom"))
    dicom_out = nib.load(by_input["dicom"]["output"])
    assert dicom_out.shape == tuple(dicom_in.shape)
    np.testing.assert_allclose(dicom_out.affine, np.asarray(dicom_in.affine), atol=1e-3)
    assert all(os.path.isfile(os.path.join(out, f"{r['case']}_overlay.png")) for r in rows)
    assert not [f for f in os.listdir(out) if f.startswith(".tmp_")]
    modes = {stat.S_IMODE(os.stat(out / name).st_mode) for name in os.listdir(out)}
    assert modes == {0o666 & ~_umask()}  # overlays, labels and summaries alike take the umask's permissions
    # a rerun skips every finished case and recomputes nothing
    assert run(str(random_weight_bundle), str(source), str(out)) == 0
    assert [r["status"] for r in _summary(out)] == ["skipped", "skipped"]
    # --overwrite redoes them: a damaged output is written anew
    label = by_input["ct.nii.gz"]["output"]
    expected = np.asarray(nifti_out.dataobj)
    with open(label, "wb") as f:
        f.write(b"damaged")
    assert run(str(random_weight_bundle), str(source), str(out), overwrite=True) == 0
    assert [r["status"] for r in _summary(out)] == ["ok", "ok"]
    np.testing.assert_array_equal(np.asarray(nib.load(label).dataobj), expected)


def test_bad_cases_are_reported_and_the_batch_goes_on(random_weight_bundle, tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    image = make_ct_volume()[0]
    _nifti(source / "a_good.nii.gz", image)
    (source / "b_corrupt.nii.gz").write_bytes(b"\x1f\x8b this is not a volume")
    nan_image = image.copy()
    nan_image[0, 0, 0] = np.nan
    _nifti(source / "c_nan.nii.gz", nan_image)
    _nifti(source / "d_4d.nii.gz", np.stack([image, image], -1))
    out = tmp_path / "out"
    assert run(str(random_weight_bundle), str(source), str(out)) == 1
    rows = {r["case"]: r for r in _summary(out)}
    assert rows["a_good"]["status"] == "ok"
    for name, problem in (("b_corrupt", ""), ("c_nan", "NaN"), ("d_4d", "3D volume")):
        assert rows[name]["status"] == "failed" and rows[name]["output"] == ""
        assert f"{name}.nii.gz" in rows[name]["message"] and problem in rows[name]["message"]
    assert sorted(os.listdir(out)) == ["a_good_seg.nii.gz", "summary.csv", "summary.json"]


def _dicom_copy(tmp_path, keep=lambda i: True, name="séries 1"):
    """The real 20-slice CT series, copied with only the slices for which ``keep(index)`` is true."""
    source = shared_data("ct_dicom_series", "totalsegmentator_example_ct")
    target = tmp_path / "in" / name
    target.mkdir(parents=True)
    for i, name in enumerate(sorted(os.listdir(source))):
        if keep(i):
            shutil.copy(os.path.join(source, name), target / name)
    return target


def test_more_bad_input_is_reported_with_its_reason(random_weight_bundle, tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    image = make_ct_volume()[0]
    (source / "empty.nii.gz").write_bytes(b"")
    (source / "text.nii").write_text("hello, not an image")
    _nifti(source / "flat.nii.gz", image[..., 0])
    huge = nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4))
    huge.header.set_data_shape((4096, 4096, 4096))  # the header lies: 256 GiB claimed, a few bytes stored
    with open(source / "huge.nii", "wb") as f:
        f.write(huge.header.binaryblock + b"\0" * 4 + np.zeros(8, np.int16).tobytes())
    _nifti(source / "zeros.nii.gz", np.zeros_like(image))
    out = tmp_path / "out"
    assert run(str(random_weight_bundle), str(source), str(out), num_workers=2) == 1
    rows = {r["case"]: r for r in _summary(out)}
    for name, problem in (("empty", "NIfTI"), ("text", "NIfTI"), ("flat", "3D volume"), ("huge", "GiB limit")):
        assert rows[name]["status"] == "failed", rows[name]
        assert name in rows[name]["message"] and problem in rows[name]["message"], rows[name]["message"]
    assert rows["zeros"]["status"] == "ok" and "holds no image" in rows["zeros"]["message"]
    assert nib.load(rows["zeros"]["output"]).shape == image.shape


def test_dicom_series_with_a_missing_slice_fails_clearly(random_weight_bundle, tmp_path):
    series = _dicom_copy(tmp_path, keep=lambda i: i != 9)
    out = tmp_path / "out"
    assert run(str(random_weight_bundle), str(series.parent), str(out)) == 1
    (row,) = _summary(out)
    assert row["status"] == "failed" and "missing slice" in row["message"] and "séries 1" in row["message"]


@pytest.mark.parametrize("index", [7, 19], ids=["middle", "last"])
def test_dicom_series_with_a_corrupt_slice_fails_clearly(random_weight_bundle, tmp_path, index):
    """A truncated slice (pydicom reads its header as far as it goes, without a word) fails its series naming the
    file, also when it is the last slice, where no gap shows: never a shorter volume called ok."""
    series = _dicom_copy(tmp_path)
    victim = sorted(series.iterdir())[index]
    victim.write_bytes(victim.read_bytes()[:600])
    (series / "junk.dat").write_bytes(os.urandom(2048))
    out = tmp_path / "out"
    assert run(str(random_weight_bundle), str(series.parent), str(out)) == 1
    (row,) = _summary(out)
    assert row["status"] == "failed" and row["message"].startswith(f"{victim}: a file of this series without "
                                                                   "ImagePositionPatient"), row


def test_an_unparseable_slice_fails_its_series_and_is_named(random_weight_bundle, tmp_path):
    series = _dicom_copy(tmp_path)
    victim = sorted(series.iterdir())[19]
    victim.write_bytes(victim.read_bytes()[:128] + b"DICM" + os.urandom(200))  # the preamble, then garbage
    out = tmp_path / "out"
    assert run(str(random_weight_bundle), str(series.parent), str(out)) == 1
    rows = {r["input"]: r for r in _summary(out)}
    assert set(rows) == {str(series), str(victim)}
    assert rows[str(victim)]["status"] == "failed" and "cannot be parsed" in rows[str(victim)]["message"]
    assert rows[str(series)]["status"] == "failed" and victim.name in rows[str(series)]["message"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _edit_slice(series, index, **changes):
    """Set header fields of slice ``index`` of a copied series; returns its path."""
    import pydicom

    path = sorted(series.iterdir())[index]
    ds = pydicom.dcmread(path)
    for name, value in changes.items():
        setattr(ds, name, value(ds) if callable(value) else value)
    ds.save_as(path)
    return path


@pytest.mark.parametrize("field,value", [
    ("Rows", 256), ("Columns", 384), ("PixelSpacing", [0.7, 0.7]),
    ("ImageOrientationPatient", [1, 0, 0, 0, 0.96, 0.28]),
    ("BitsAllocated", 8), ("PixelRepresentation", lambda ds: 1 - int(ds.PixelRepresentation)), ("SamplesPerPixel", 3)])
def test_a_slice_that_does_not_fit_its_series_fails_naming_file_and_field(random_weight_bundle, tmp_path, field,
                                                                          value):
    series = _dicom_copy(tmp_path)
    victim = _edit_slice(series, 11, **{field: value})
    out = tmp_path / "out"
    assert run(str(random_weight_bundle), str(series.parent), str(out)) == 1
    (row,) = _summary(out)
    assert row["status"] == "failed" and row["output"] == ""
    assert row["message"].startswith(f"{victim}: {field} is "), row["message"]


def test_series_positions_must_lie_on_one_evenly_spaced_line(random_weight_bundle, tmp_path):
    """Positions: a slice shifted sideways, a slice moved along the normal (uneven steps), a multi-frame file; the
    batch goes on with the good volume. Tolerances: 0.1 pixel off the line, 10% of the step."""
    source = tmp_path / "in"
    shifted = _dicom_copy(tmp_path, name="shifted")
    _edit_slice(shifted, 5, ImagePositionPatient=lambda ds: [float(ds.ImagePositionPatient[0]) + 2.0,
                                                             *ds.ImagePositionPatient[1:]])
    uneven = _dicom_copy(tmp_path, name="uneven")
    moved = _edit_slice(uneven, 5, ImagePositionPatient=lambda ds: [*ds.ImagePositionPatient[:2],
                                                                    float(ds.ImagePositionPatient[2]) + 1.0])
    jitter = _dicom_copy(tmp_path, name="jitter")  # within the tolerances: segmented
    _edit_slice(jitter, 5, ImagePositionPatient=lambda ds: [float(ds.ImagePositionPatient[0]) + 0.05,
                                                            *ds.ImagePositionPatient[1:2],
                                                            float(ds.ImagePositionPatient[2]) + 0.1])
    multiframe = _dicom_copy(tmp_path, name="multiframe")
    enhanced = _edit_slice(multiframe, 0, NumberOfFrames=4)
    out = tmp_path / "out"
    assert run(str(random_weight_bundle), str(source), str(out)) == 1
    rows = {r["case"]: r for r in _summary(out)}
    assert rows["jitter"]["status"] == "ok"
    assert rows["shifted"]["status"] == "failed" and "off the line" in rows["shifted"]["message"]
    assert rows["uneven"]["message"].startswith(f"{moved}: uneven slice spacing")
    assert rows["multiframe"]["message"].startswith(f"{enhanced}: an enhanced (multi-frame) DICOM file of 4 frames")


def test_trailing_singleton_dimensions_are_squeezed(random_weight_bundle, tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    image, _, affine = make_ct_volume()
    _nifti(source / "a_3d.nii.gz", image, affine)
    _nifti(source / "b_x_y_z_1.nii.gz", image[..., None], affine)
    _nifti(source / "c_x_y_z_1_1.nii.gz", image[..., None, None], affine)
    _nifti(source / "d_two_phases.nii.gz", np.stack([image, image], -1), affine)
    out = tmp_path / "out"
    assert run(str(random_weight_bundle), str(source), str(out)) == 1
    rows = {r["case"]: r for r in _summary(out)}
    reference = np.asarray(nib.load(rows["a_3d"]["output"]).dataobj)
    for name in ("b_x_y_z_1", "c_x_y_z_1_1"):
        assert rows[name]["status"] == "ok" and "trailing size-1 dimensions squeezed" in rows[name]["message"]
        written = nib.load(rows[name]["output"])
        assert written.shape == image.shape
        np.testing.assert_array_equal(np.asarray(written.dataobj), reference)
    assert rows["d_two_phases"]["status"] == "failed" and "4D volume" in rows["d_two_phases"]["message"]


def test_unparseable_dicom_files_are_failed_rows_and_other_files_are_counted(random_weight_bundle, tmp_path, caplog):
    """A folder of '.dcm' files that cannot be parsed gave no row at all; now each is a failed row naming it, while
    README.txt, .DS_Store and a thumbnail are skipped and counted in the last log line."""
    import logging

    export = tmp_path / "in" / "export"
    export.mkdir(parents=True)
    (export / "IM0001.dcm").write_bytes(b"\0" * 64)
    (export / "IM0002.DCM").write_bytes(os.urandom(300))
    (export / "IM0003").write_bytes(b"\0" * 128 + b"DICM" + os.urandom(40))  # the preamble, then nothing usable
    (export / "README.txt").write_text("exported from PACS")
    (export / ".DS_Store").write_bytes(os.urandom(64))
    (export / "thumb.jpg").write_bytes(b"\xff\xd8\xff" + os.urandom(64))
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="infer"):
        assert run(str(random_weight_bundle), str(tmp_path / "in"), str(out)) == 1
    rows = _summary(out)
    assert sorted(os.path.basename(r["input"]) for r in rows) == ["IM0001.dcm", "IM0002.DCM", "IM0003"]
    assert all(r["status"] == "failed" and r["message"].startswith(r["input"]) and "cannot be parsed" in r["message"]
               for r in rows)
    assert "3 cases: 0 ok, 0 skipped, 3 failed; 3 other files (neither NIfTI nor DICOM) ignored" in caplog.text


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a machine without a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:1", "gpu"])
def test_an_unavailable_device_is_a_usage_error_before_anything_runs(random_weight_bundle, tmp_path, device):
    image = _nifti(tmp_path / "ct.nii.gz", make_ct_volume()[0])
    result = subprocess.run([sys.executable, os.path.join(REPO, "tools", "infer.py"), str(random_weight_bundle), image,
                             str(tmp_path / "out"), "--device", device], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and not (tmp_path / "out").exists()
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: --device {device}: "), result.stderr[-2000:]


def test_dicom_seg_references_the_series_and_matches_the_nifti(random_weight_bundle, tmp_path):
    import highdicom as hd
    import pydicom
    from pydicom.uid import CTImageStorage, generate_uid

    series = _dicom_copy(tmp_path)
    study_uid, series_uid = generate_uid(), generate_uid()
    for path in sorted(series.iterdir()):  # the shipped sample is anonymised without UIDs; give the copy some
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPClassUID = study_uid, series_uid, CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.save_as(path)
    out = tmp_path / "out"
    assert run(str(random_weight_bundle), str(series.parent), str(out), dicom_seg=True) == 0
    (row,) = _summary(out)
    seg_path = os.path.join(out, f"{row['case']}_seg.dcm")
    assert stat.S_IMODE(os.stat(seg_path).st_mode) == stat.S_IMODE(os.stat(row["output"]).st_mode) == 0o666 & ~_umask()
    seg = hd.seg.segread(seg_path)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    assert seg.StudyInstanceUID == study_uid
    assert [s.SegmentLabel for s in seg.SegmentSequence][:2] == ["spleen", "right kidney"]
    label = np.asarray(nib.load(row["output"]).dataobj)
    frame_segments = [item.SegmentIdentificationSequence[0].ReferencedSegmentNumber
                      for item in seg.PerFrameFunctionalGroupsSequence]
    pixels = seg.pixel_array.reshape(len(frame_segments), -1).sum(1)
    for number in range(1, 9):  # every segment holds as many pixels as the NIfTI label has voxels of it
        assert sum(p for s, p in zip(frame_segments, pixels) if s == number) == int((label == number).sum()), number
    assert run(str(random_weight_bundle), str(series.parent), str(out), dicom_seg=True) == 0
    assert [r["status"] for r in _summary(out)] == ["skipped"]


def test_dicom_seg_without_uids_fails_clearly(random_weight_bundle, tmp_path):
    series = _dicom_copy(tmp_path)
    out = tmp_path / "out"
    assert run(str(random_weight_bundle), str(series.parent), str(out), dicom_seg=True) == 1
    (row,) = _summary(out)
    assert "SOPInstanceUID" in row["message"] and "séries 1" in row["message"]


def test_leftovers_of_a_killed_run_are_removed(random_weight_bundle, tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    _nifti(source / "a.nii.gz", make_ct_volume()[0])
    out = tmp_path / "out"
    out.mkdir()
    (out / ".tmp_abc.nii.gz").write_bytes(b"half a file")
    assert run(str(random_weight_bundle), str(source), str(out)) == 0
    assert sorted(os.listdir(out)) == ["a_seg.nii.gz", "summary.csv", "summary.json"]


def test_kill_9_mid_batch_loses_nothing_and_the_rerun_finishes(random_weight_bundle, tmp_path):
    import signal
    import time

    source = tmp_path / "in"
    source.mkdir()
    for i in range(6):
        _nifti(source / f"case {i}.nii.gz", make_ct_volume(shape=(96, 80, 24), seed=i)[0])
    out = tmp_path / "out"
    command = [sys.executable, os.path.join(REPO, "tools", "infer.py"), str(random_weight_bundle), str(source), str(out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (out.exists() and any(n.endswith("_seg.nii.gz") for n in os.listdir(out))):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = sorted(n for n in os.listdir(out) if n.endswith("_seg.nii.gz"))
    assert 1 <= len(finished) < 6
    for name in finished:  # whatever exists under a final name is complete
        assert nib.load(str(out / name)).get_fdata().shape == (96, 80, 24)
    assert run(str(random_weight_bundle), str(source), str(out)) == 0
    rows = _summary(out)
    assert [r["status"] for r in rows].count("skipped") == len(finished)
    assert [r["status"] for r in rows].count("ok") == 6 - len(finished)
    assert not [n for n in os.listdir(out) if n.startswith(".tmp_")]


def test_onnx_engine_matches_torch(random_weight_bundle, tmp_path):
    import torch

    from networks.batch.volumes import VolumeSegmenter

    eager, onnx = VolumeSegmenter(str(random_weight_bundle)), VolumeSegmenter(str(random_weight_bundle), engine="onnx")
    x = torch.rand(3, 1, 224, 224)
    with torch.no_grad():
        assert float((onnx.network(x) - eager.network(x)).abs().max()) < 1e-4
    source = _nifti(tmp_path / "ct.nii.gz", make_ct_volume()[0])
    labels = {}
    for engine in ("torch", "onnx"):
        assert run(str(random_weight_bundle), source, str(tmp_path / engine), engine=engine) == 0
        labels[engine] = np.asarray(nib.load(str(tmp_path / engine / "ct_seg.nii.gz")).dataobj)
    assert (labels["torch"] == labels["onnx"]).mean() > 0.999


@pytest.mark.parametrize("problem", ["no_bundle", "no_input", "unwritable"])
def test_usage_errors_exit_2(problem, random_weight_bundle, tmp_path):
    image = _nifti(tmp_path / "ct.nii.gz", make_ct_volume()[0])
    bundle, source, out = str(random_weight_bundle), image, str(tmp_path / "out")
    if problem == "no_bundle":
        bundle = str(tmp_path / "missing_bundle")
    elif problem == "no_input":
        source = str(tmp_path / "missing.nii.gz")
    else:
        blocker = tmp_path / "file"
        blocker.write_text("x")
        out = str(blocker / "out")
    result = subprocess.run([sys.executable, os.path.join(REPO, "tools", "infer.py"), bundle, source, out],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error:" in result.stderr


def test_command_line_sets_ids_of_the_inference_config(random_weight_bundle, tmp_path, capsys):
    """``--keep_largest_component false`` reaches the bundle's postprocessing, as with ``monai.bundle run``; an id the
    config does not have is a usage error naming it, before any case runs."""
    from networks.transforms import KeepLargestComponentPerLabeld
    from networks.batch.volumes import VolumeSegmenter
    from tools.infer import main

    def keeps_largest(runner):
        return any(isinstance(t, KeepLargestComponentPerLabeld) for t in runner.postprocessing.transforms)

    assert keeps_largest(VolumeSegmenter(str(random_weight_bundle)))
    assert not keeps_largest(VolumeSegmenter(str(random_weight_bundle), overrides={"keep_largest_component": "false"}))
    source = _nifti(tmp_path / "ct.nii.gz", make_ct_volume()[0])
    with pytest.raises(SystemExit) as code:
        main(str(random_weight_bundle), source, str(tmp_path / "out"), keep_largest_component="false")
    assert code.value.code == 0 and _summary(tmp_path / "out")[0]["status"] == "ok"
    with pytest.raises(SystemExit) as code:
        main(str(random_weight_bundle), source, str(tmp_path / "typo"), keep_largest_componnet="false")
    assert code.value.code == 2
    assert "--keep_largest_componnet" in capsys.readouterr().err and not (tmp_path / "typo" / "summary.csv").exists()
