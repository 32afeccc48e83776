"""tools/infer.py --ray_address: a real Ray cluster of two nodes on this machine (ray.cluster_utils.Cluster).

A worker killed with SIGKILL and a node removed mid-batch, bad input, Ray missing, wrong addresses. Every Ray process
these tests start keeps its traffic on loopback (``ray_env``: see the project's env_stack notes on Ray 2.60) and
is gone after the tests. Skipped only where Ray is not installed (``pip install -e ".[distributed]"``).
"""

import contextlib
import csv
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import nibabel as nib
import numpy as np
import pytest

from helpers import REPO, make_ct_volume

if importlib.util.find_spec("ray") is None:
    if os.environ.get("CI", "").lower() == "true":  # .ci/run installs the extra: there, a missing Ray is a failure
        pytest.fail('Ray is not installed in CI; .ci/run must pip install -e ".[distributed]"', pytrace=False)
    pytest.skip('Ray is not installed; pip install -e ".[distributed]" (CI installs it)', allow_module_level=True)

from networks.batch.core import UsageError
from networks.batch.runners import run

INFER = os.path.join(REPO, "tools", "infer.py")
NODE = {"num_cpus": 1, "object_store_memory": 80 * 2**20}


@pytest.fixture(scope="module")
def ray_env(tmp_path_factory):
    """The environment of every Ray process these tests start (the cluster's and the drivers'): addresses stay
    127.0.0.1, no usage stats, no cloud metadata probe (the provider is read from HOME), auth mode set explicitly.
    Yields HOME, which also tags those processes; none of them may outlive the module. Ray reads some of these when
    it is imported, so this module imports it only here, after setting them."""
    home = tmp_path_factory.mktemp("ray_home")
    (home / "ray_bootstrap_config.yaml").write_text("provider:\n  type: local\n")
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                           "RAY_AUTH_MODE": "disabled", "HOME": str(home)}.items():
            patch.setenv(key, value)
        assert "ray" not in sys.modules, "Ray was imported before its environment was set"
        import ray  # noqa: F401

        yield str(home)
    deadline = time.time() + 120  # Ray's processes exit within seconds; a starved CPU can stretch that
    while _processes_with_home(str(home)) and time.time() < deadline:
        time.sleep(0.5)
    left = _processes_with_home(str(home))
    for pid in left:  # ours (they carry this HOME): do not leave them running, but report them
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"Ray processes left behind: {left}"


@pytest.fixture(scope="module")
def cluster(ray_env):
    """A head (with a Ray Client server, ``cluster.client_address``) and a second node, 1 CPU each; every node's
    address is 127.0.0.1."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster()
    try:  # the head is the first node added; inside try, so that a node which fails to start is shut down too
        client_port = _free_port()
        cluster.add_node(**NODE, include_dashboard=False, ray_client_server_port=client_port)
        cluster.add_node(**NODE)
        cluster.client_address = f"ray://127.0.0.1:{client_port}"
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        try:
            nodes = [n for n in ray.nodes() if n["Alive"]]
        finally:
            ray.shutdown()
        assert len(nodes) == 2 and {n["NodeManagerAddress"] for n in nodes} == {"127.0.0.1"}, nodes
        assert cluster.address.startswith("127.0.0.1:")
        yield cluster
    finally:
        cluster.shutdown()


@pytest.fixture
def ray_bundle(random_weight_bundle):
    """The random-weight bundle with the last layer's bias zeroed, so that its labels vary across a volume (with the
    bias, every voxel gets one class) and comparing outputs voxel for voxel compares something."""
    import torch

    path = random_weight_bundle / "models" / "model.pt"
    state = torch.load(str(path), weights_only=True)
    state["head.4.bias"].zero_()
    torch.save(state, str(path))
    return random_weight_bundle


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_with_home(home):
    """Processes other than this one whose environment holds HOME=home: those the tests started."""
    found, marker = [], f"HOME={home}".encode() + b"\0"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if marker in f.read() and int(pid) != os.getpid():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def _busy_workers(raylet_pid):
    """Worker processes of the node whose raylet is ``raylet_pid`` that are running a case right now (Ray titles a
    worker ``ray::<task>`` while it runs one, ``ray::IDLE`` otherwise)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read().split(b"\0")[0]
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if title.startswith(b"ray::segment_case") and parent == raylet_pid:
            pids.append(int(pid))
    return pids


def _raylet(node):
    return node.all_processes["raylet"][0].process.pid


def _volumes(folder, count, shape=(48, 40, 6)):
    folder.mkdir(parents=True)
    for i in range(count):
        image, _, affine = make_ct_volume(shape=shape, seed=i)
        nib.save(nib.Nifti1Image(image, affine), str(folder / f"case{i:02d}.nii.gz"))
    return folder


def _summary(folder):
    with open(os.path.join(folder, "summary.csv")) as f:
        return list(csv.DictReader(f))


def _finished(folder):
    try:
        with open(os.path.join(folder, "summary.json")) as f:
            return sum(r["status"] == "ok" for r in json.load(f))
    except (OSError, ValueError):
        return 0


def _labels(folder):
    return {name: nib.load(os.path.join(folder, name)) for name in sorted(os.listdir(folder))
            if name.endswith("_seg.nii.gz")}


def _assert_same_outputs(folder, reference):
    ours, theirs = _labels(folder), _labels(reference)
    assert sorted(ours) == sorted(theirs) and ours
    for name, image in ours.items():
        np.testing.assert_array_equal(np.asarray(image.dataobj), np.asarray(theirs[name].dataobj), err_msg=name)
        np.testing.assert_array_equal(image.affine, theirs[name].affine)


def _wait_for(condition, driver, log, seconds=600):  # generous: only a hang should reach it, not a busy CPU
    deadline = time.time() + seconds
    while time.time() < deadline:
        found = condition()
        if found:
            return found
        if driver.poll() is not None:
            pytest.fail(f"the driver exited ({driver.returncode}) early:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)
    pytest.fail(f"timed out; driver log:\n{log.read_text()[-3000:]}")


def test_worker_killed_and_node_lost_mid_batch(cluster, ray_bundle, tmp_path):
    count = 12
    # 48 slices a case: long enough that workers are still busy when the test looks (with 6 slices the faster
    # pipeline finished the whole batch between two polls)
    source = _volumes(tmp_path / "in", count, shape=(48, 40, 48))
    assert run(str(ray_bundle), str(source), str(tmp_path / "reference")) == 0  # the in-process engine
    out, log = tmp_path / "out", tmp_path / "driver.log"
    head, (second,) = cluster.head_node, cluster.worker_nodes
    with open(log, "w") as log_file:
        driver = subprocess.Popen([sys.executable, INFER, str(ray_bundle), str(source), str(out),
                                   "--ray_address", cluster.address], stdout=log_file, stderr=subprocess.STDOUT)
    try:
        # once a case has finished (and is in the summary already), the second node leaves while it runs another
        _wait_for(lambda: _finished(out) >= 1 and _busy_workers(_raylet(second)), driver, log)
        finished = _finished(out)
        cluster.remove_node(second)
        assert finished < count
        # once the head has finished one more, its busy worker is killed, while cases remain
        victim = _wait_for(lambda: _finished(out) > finished and _busy_workers(_raylet(head)), driver, log)[0]
        os.kill(victim, signal.SIGKILL)
        assert _finished(out) < count
        assert driver.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        cluster.add_node(**NODE)  # leave the module's cluster with two nodes
    rows = _summary(out)
    assert sorted(r["case"] for r in rows) == [f"case{i:02d}" for i in range(count)]  # each case exactly once
    assert {r["status"] for r in rows} == {"ok"}
    _assert_same_outputs(out, tmp_path / "reference")
    assert sorted(os.listdir(out)) == sorted([*_labels(out), "summary.csv", "summary.json"])  # nothing partial
    assert run(str(ray_bundle), str(source), str(out), ray_address=cluster.address) == 0
    assert [r["status"] for r in _summary(out)] == ["skipped"] * count


def test_bad_cases_fail_once_with_the_in_process_message(cluster, ray_bundle, tmp_path):
    source = _volumes(tmp_path / "in", 2)
    image = make_ct_volume()[0]
    (source / "b_corrupt.nii.gz").write_bytes(b"\x1f\x8b this is not a volume")
    nan_image = image.copy()
    nan_image[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(nan_image, np.eye(4)), str(source / "c_nan.nii.gz"))
    nib.save(nib.Nifti1Image(np.stack([image, image], -1), np.eye(4)), str(source / "d_4d.nii.gz"))
    assert run(str(ray_bundle), str(source), str(tmp_path / "reference")) == 1
    # through Ray Client (ray://) this time: the same tasks, the driver's Ray calls go through the head
    assert run(str(ray_bundle), str(source), str(tmp_path / "out"), ray_address=cluster.client_address) == 1
    rows, reference = _summary(tmp_path / "out"), _summary(tmp_path / "reference")
    assert [(r["case"], r["status"], r["message"]) for r in rows] == \
        [(r["case"], r["status"], r["message"]) for r in reference]
    assert sorted(r["status"] for r in rows) == ["failed"] * 3 + ["ok"] * 2
    _assert_same_outputs(tmp_path / "out", tmp_path / "reference")


def _dicom_series_with_uids(folder):
    import pydicom
    from pydicom.uid import CTImageStorage, generate_uid

    shutil.copytree(os.path.join(REPO, "samples", "ct_dicom", "totalsegmentator_example_ct"), folder)
    study_uid, series_uid = generate_uid(), generate_uid()
    for path in sorted(folder.iterdir()):  # the shipped sample is anonymised without UIDs; give the copy some
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPClassUID = study_uid, series_uid, CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.save_as(path)


def test_onnx_dicom_seg_and_overlay_on_a_local_instance(ray_env, ray_bundle, tmp_path):
    import highdicom as hd
    from PIL import Image

    source = _volumes(tmp_path / "in", 1)
    _dicom_series_with_uids(source / "series")
    options = {"engine": "onnx", "dicom_seg": True, "overlay": True}
    assert run(str(ray_bundle), str(source), str(tmp_path / "reference"), **options) == 0
    assert run(str(ray_bundle), str(source), str(tmp_path / "out"), ray_address="local", **options) == 0
    _assert_same_outputs(tmp_path / "out", tmp_path / "reference")
    names = sorted(os.listdir(tmp_path / "out"))
    assert names == sorted(os.listdir(tmp_path / "reference"))
    assert {"series_seg.dcm", "series_overlay.png", "case00_overlay.png"} <= set(names)
    for name in names:
        ours, theirs = tmp_path / "out" / name, tmp_path / "reference" / name
        if name.endswith(".dcm"):
            np.testing.assert_array_equal(hd.seg.segread(ours).pixel_array, hd.seg.segread(theirs).pixel_array)
        elif name.endswith(".png"):
            np.testing.assert_array_equal(np.asarray(Image.open(ours)), np.asarray(Image.open(theirs)))


def test_archive_inputs_give_the_in_process_rows_on_a_local_instance(ray_env, ray_bundle, tmp_path):
    """The checks on real-archive input (a slice of another matrix size, an unparseable '.dcm', a NIfTI with a trailing
    size-1 dimension) give the same rows through Ray as in-process."""
    import pydicom

    source = _volumes(tmp_path / "in", 1)
    image, _, affine = make_ct_volume()
    nib.save(nib.Nifti1Image(image[..., None], affine), str(source / "singleton.nii.gz"))
    series = source / "series"
    shutil.copytree(os.path.join(REPO, "samples", "ct_dicom", "totalsegmentator_example_ct"), series)
    victim = sorted(series.iterdir())[4]
    ds = pydicom.dcmread(victim)
    ds.Rows = 256
    ds.save_as(victim)
    (source / "export").mkdir()
    (source / "export" / "IM0001.dcm").write_bytes(b"not dicom at all")
    assert run(str(ray_bundle), str(source), str(tmp_path / "reference")) == 1
    assert run(str(ray_bundle), str(source), str(tmp_path / "out"), ray_address="local") == 1
    rows, reference = _summary(tmp_path / "out"), _summary(tmp_path / "reference")
    assert [(r["case"], r["status"], r["message"]) for r in rows] == \
        [(r["case"], r["status"], r["message"]) for r in reference]
    by_case = {r["case"]: r for r in rows}
    assert by_case["singleton"]["status"] == "ok" and "squeezed" in by_case["singleton"]["message"]
    assert by_case["series"]["message"].startswith(f"{victim}: Rows is 256")
    assert by_case["export__IM0001.dcm"]["status"] == "failed"
    _assert_same_outputs(tmp_path / "out", tmp_path / "reference")


def test_without_ray_installed_exits_2_with_the_install_command(random_weight_bundle, tmp_path):
    image, _, affine = make_ct_volume()
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "ct.nii.gz"))
    out = tmp_path / "out"
    hide_ray = ("import runpy, sys; sys.modules['ray'] = None; sys.argv = sys.argv[1:]; "
                "runpy.run_path(sys.argv[0], run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", hide_ray, INFER, str(random_weight_bundle),
                             str(tmp_path / "ct.nii.gz"), str(out), "--ray_address", "local"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert 'pip install -e ".[distributed]"' in line
    assert not out.exists()


def test_unreachable_or_malformed_address_exits_2_quickly_writing_nothing(cluster, random_weight_bundle, tmp_path):
    image, _, affine = make_ct_volume()
    source, out = tmp_path / "ct.nii.gz", tmp_path / "out"
    nib.save(nib.Nifti1Image(image, affine), str(source))
    result = subprocess.run([sys.executable, INFER, str(random_weight_bundle), str(source), str(out),
                             "--ray_address", f"127.0.0.1:{_free_port()}"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "cannot reach a Ray cluster" in result.stderr, result.stderr[-2000:]
    assert not out.exists()
    silent = socket.socket()  # a port that accepts connections but is not Ray
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    threading.Thread(target=lambda: silent.accept(), daemon=True).start()
    try:
        for address, problem in ((f"127.0.0.1:{_free_port()}", "cannot reach a Ray cluster"),
                                 (f"ray://127.0.0.1:{_free_port()}", "cannot reach a Ray cluster"),
                                 (f"127.0.0.1:{silent.getsockname()[1]}", "not as a Ray cluster"),
                                 (cluster.client_address[len("ray://"):], "Ray Client ports take ray://"),
                                 (f"ray://{cluster.address}", "not as a Ray Client server"),
                                 ("127.0.0.1:99999", "not a Ray address"), ("head node", "not a Ray address"),
                                 ("http://127.0.0.1:8265", "not a Ray address")):
            start = time.time()
            with pytest.raises(UsageError, match=problem):
                run(str(random_weight_bundle), str(source), str(out), ray_address=address)
            assert time.time() - start < 30 and not out.exists(), address
        with pytest.raises(UsageError, match="--keep_largest_componnet: .* has no id"):  # checked before dispatch
            run(str(random_weight_bundle), str(source), str(out), ray_address=cluster.address,
                overrides={"keep_largest_componnet": False})
        assert not out.exists()
    finally:
        silent.close()


def test_a_worker_loads_the_bundle_once_for_many_cases(ray_env, random_weight_bundle):
    from networks.transforms import KeepLargestComponentPerLabeld
    from networks.batch import ray_engine

    settings = {"bundle_dir": str(random_weight_bundle), "device": "cpu", "engine": None, "num_threads": 0,
                "overrides": {}}
    first = ray_engine._runner(settings)
    assert ray_engine._runner(dict(settings)) is first  # the next case in this worker process reuses it
    assert ray_engine._runner({**settings, "engine": "torch"}) is not first
    all_components = ray_engine._runner({**settings, "overrides": {"keep_largest_component": "false"}})
    assert not any(isinstance(t, KeepLargestComponentPerLabeld) for t in all_components.postprocessing.transforms)


def test_benchmark_reports_cases_per_minute_and_ray_overhead(ray_env, tmp_path):
    from tools.benchmark_ray import main

    output = tmp_path / "benchmark_ray.md"
    main(cases=2, shape="48,40,6", workers="1", threads=1, output=str(output))
    text = output.read_text()
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| Engine | Ray workers | Wall (s) | Cases/min |")
    assert [row.split("|")[1].strip() for row in table[2:]] == ["in-process, 1 torch thread",
                                                                 "Ray, 1 worker (1 node, 1 CPU)"]
    assert "s per case in steady state" in text and "labels equal the in-process ones" in text
