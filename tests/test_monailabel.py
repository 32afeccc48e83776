"""Every volume segmentation bundle, exported by tools/export_bundle.py, in a real MONAI Label 0.8.5 server.

The server runs from its own environment (tools/make_monailabel_env.sh; ``LITEMED_MLVENV``, default /tmp/mlvenv),
which does not have this repository: ``networks`` can only come from the exported bundle. The sample app is copied
out of the installed wheel, the bundle unzipped into its model folder, and the server started offline on a free
loopback port (``--conf zoo_source local`` so no model-zoo lookup, ``--conf sam2 false`` so no SAM2 download, HOME
in a temporary folder). Checked: /info/ lists the model with the labels of its metadata; /infer on a real volume
(uploaded) and on a datastore volume in another orientation returns a label on the input's grid (shape, affine)
equal to this repository's own pipeline (tools/infer.py) and with structures labelled; /train runs one epoch on two
labelled samples and writes new weights. The server's process group is stopped by its PID in any case. Where strace
works, every connect() of the server and its children is recorded, and none may leave loopback.

Which bundles: every ``bundles/*_segmentation`` with ``models/model.pt`` whose input is a volume (a ``SliceInferer``
or a 3D ``spatial_shape``); the sample volume comes from ``../shared/data`` by modality (``tests/bundle_samples.py``:
the TotalSegmentator CT for CT bundles, an ACDC volume for cardiac MR), and a new volume bundle whose modality has no
sample there fails rather than being skipped. ``tests/test_export_bundle.py`` runs each exported bundle with
``python -m monai.bundle run`` in a venv without the repository and checks that ``networks`` came from the bundle.

Without the environment the test skips, except under CI=true, where it fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import zipfile

import nibabel as nib
import numpy as np
import pytest
import requests

from bundle_samples import exported, labelled_volumes, labels, volume_bundles

MLVENV = os.environ.get("LITEMED_MLVENV", "/tmp/mlvenv")
MLPYTHON = os.path.join(MLVENV, "bin", "python")
START_TIMEOUT = 240  # seconds for the server to answer /info/ on a busy 2-core machine
REQUEST_TIMEOUT = 300


@pytest.fixture(scope="module")
def mlpython(tmp_path_factory):
    """The MONAI Label environment's Python, checked to import monailabel and not to import this repository."""
    probe = ("import importlib.util, monailabel; "
             "assert importlib.util.find_spec('networks') is None, 'networks is importable'")
    elsewhere = str(tmp_path_factory.mktemp("probe"))  # not the repository as the working directory
    ok = os.path.isfile(MLPYTHON) and subprocess.run([MLPYTHON, "-c", probe], cwd=elsewhere, env=_server_env(elsewhere),
                                                     capture_output=True, timeout=120).returncode == 0
    if not ok:
        message = (f"{MLVENV}: no usable MONAI Label environment (monailabel importable, this repository not); "
                   f"build it with tools/make_monailabel_env.sh")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return MLPYTHON


def _server_env(home: str) -> dict:
    """The environment of the server: nothing of this repository, no network lookups, caches in ``home``."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PATH=os.path.join(MLVENV, "bin") + os.pathsep + env.get("PATH", ""), HOME=home,
               BUNDLE_DOWNLOAD_SRC="local", HF_HUB_OFFLINE="1", MONAI_LABEL_TRACKING_ENABLED="false",
               OMP_NUM_THREADS="2", PYTHONPATH="")
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _tail(path: str, n: int = 4000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-n:]


def _check_label(label_path: str, image_path: str, bundle: str, expected: np.ndarray) -> None:
    """The returned label lies on the input's grid, holds only the bundle's ids, labels structures and equals what
    this repository's pipeline gives on the same file."""
    label, image = nib.load(label_path), nib.load(image_path)
    assert label.shape == image.shape, (label.shape, image.shape)
    np.testing.assert_allclose(label.affine, image.affine, atol=1e-3)
    values = np.rint(np.asarray(label.dataobj)).astype(np.int64)
    found = set(np.unique(values).tolist())
    assert found <= {0, *labels(bundle).values()}, found
    assert found - {0}, f"{label_path}: no structure labelled"
    agreement = float((values == expected).mean())
    assert agreement >= 0.99, f"{label_path}: agrees with tools/infer.py on {agreement:.4f} of the voxels only"


@pytest.mark.slow
@pytest.mark.parametrize("bundle", volume_bundles(), ids=os.path.basename)
def test_bundle_in_monailabel_server(bundle, mlpython, tmp_path):
    from networks.batch.volumes import Case, VolumeSegmenter

    name = os.path.basename(bundle)
    samples = labelled_volumes(bundle, str(tmp_path / "samples"))
    home = tmp_path / "home"
    home.mkdir()
    env = _server_env(str(home))

    # the app from the installed wheel; the self-contained bundle in its model folder
    subprocess.run([mlpython, "-m", "monailabel.main", "apps", "--download", "--name", "monaibundle", "--output",
                    str(tmp_path / "apps")], cwd=tmp_path, env=env, check=True, capture_output=True, timeout=120)
    app = tmp_path / "apps" / "monaibundle"
    with zipfile.ZipFile(exported(bundle)) as archive:
        archive.extractall(app / "model")
    weights = app / "model" / name / "models" / "model.pt"
    weights_before = _sha256(str(weights))

    # datastore: the two labelled volumes ("crop" sorts first and is the one training uses)
    studies = tmp_path / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for key in ("crop", "full"):
        image, label = samples[key]
        shutil.copy(image, studies / f"{key}.nii.gz")
        shutil.copy(label, studies / "labels" / "final" / f"{key}.nii.gz")

    # what this repository's own pipeline gives on the same files, to compare the server's answers with
    runner = VolumeSegmenter(bundle, "cpu")
    expected = {key: np.asarray(runner(Case(key, samples[key][0], "nifti")))[0].astype(np.int64) for key in samples}

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    command = [mlpython, "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies),
               "--conf", "models", name, "--conf", "zoo_source", "local", "--conf", "sam2", "false",
               "--host", "127.0.0.1", "--port", str(port)]
    connects = tmp_path / "connect.log"
    if _strace_works():  # record every connect() of the server and its children, to check it stays on loopback
        command = ["strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=connect", "-o", str(connects), *command]
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        info = None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                response = requests.get(f"{url}/info/", timeout=10)
                if response.status_code == 200:
                    info = response.json()
                    break
            except requests.ConnectionError:
                pass
            time.sleep(2)
        assert info is not None, f"server did not answer /info/ (exit code {server.poll()}):\n{_tail(log_path)}"

        assert name in info["models"], (info["models"].keys(), _tail(str(log_path)))
        assert info["models"][name]["labels"] == labels(bundle)
        assert info["models"][name]["type"] == "segmentation"
        assert name in info["trainers"]

        # a real volume uploaded, and a datastore volume stored in another orientation
        image = samples["full"][0]
        with open(image, "rb") as f:
            response = requests.post(f"{url}/infer/{name}", params={"output": "image"}, files={"file": f},
                                     data={"params": json.dumps({"device": "cpu"})}, timeout=REQUEST_TIMEOUT)
        assert response.status_code == 200, response.text[:2000] + _tail(str(log_path))
        (tmp_path / "full_label.nii.gz").write_bytes(response.content)
        _check_label(str(tmp_path / "full_label.nii.gz"), image, bundle, expected["full"])

        response = requests.post(f"{url}/infer/{name}", params={"image": "crop", "output": "image"},
                                 data={"params": json.dumps({"device": "cpu"})}, timeout=REQUEST_TIMEOUT)
        assert response.status_code == 200, response.text[:2000] + _tail(str(log_path))
        (tmp_path / "crop_label.nii.gz").write_bytes(response.content)
        _check_label(str(tmp_path / "crop_label.nii.gz"), samples["crop"][0], bundle, expected["crop"])

        # one short epoch on the two labelled volumes: one trains, one validates and selects the weights
        response = requests.post(f"{url}/train/{name}", params={"run_sync": "true"}, timeout=REQUEST_TIMEOUT,
                                 json={"max_epochs": 1, "device": "cpu", "val_split": 0.5, "tracking": "None",
                                       "multi_gpu": False, "pretrained": True})
        assert response.status_code == 200, response.text[:2000] + _tail(str(log_path))
        log = _tail(str(log_path), 200_000)
        assert "Total Records for Training: 1" in log and "Epoch[1] Complete" in log, log[-4000:]
        assert os.path.isfile(app / "model" / name / "models" / "checkpoints" / "checkpoint_epoch=1.pt")
        assert _sha256(str(weights)) != weights_before, "training did not write new weights to models/model.pt"
    finally:
        _stop(server)
    if connects.exists():
        outside = [line for line in connects.read_text().splitlines() if "connect(" in line and "AF_INET" in line
                   and 'inet_addr("127.0.0.1")' not in line and 'inet_pton(AF_INET6, "::1"' not in line]
        assert not outside, "the server connected beyond loopback:\n" + "\n".join(outside[:20])
    else:
        print("strace not usable here: outbound connections of the server were not recorded")


def _strace_works() -> bool:
    if not shutil.which("strace"):
        return False
    probe = subprocess.run(["strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=connect", "-o", os.devnull, "true"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


def _stop(server: subprocess.Popen) -> None:
    """Stop the server and whatever it started (its own process group, whose id is the server's PID)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=20)
            return
        except subprocess.TimeoutExpired:
            continue
