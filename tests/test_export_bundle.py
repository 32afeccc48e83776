"""tools/export_bundle.py: an exported zip runs where this repository is not installed.

Covered: every volume segmentation bundle with weights, one 2D LiteNeXt segmentation bundle (DSB2018) and one
classifier (Monkeypox); every bundle's configs are checked to reach ``networks`` only through ``_target_``.

The clean environment is a venv made here (``--without-pip``) that sees the project venv's site-packages through a
plain path line: Python does not process the ``.pth`` files of such a path, so the editable install of this
repository (a ``.pth`` import hook) is absent, and the working directory is a temporary folder. The test first checks
that ``networks`` cannot be imported there, then runs the exported bundle with ``python -m monai.bundle run`` and
checks the label and that ``networks`` came from the unzipped bundle.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import nibabel as nib
import numpy as np
import pytest

from PIL import Image

from bundle_samples import exported, labelled_volumes, labels, volume_bundles
from helpers import BUNDLES, SYNAPSE, shared_data
from tools.export_bundle import UsageError, export, networks_expressions
from tools.verify_bundle import sha256


@pytest.fixture(scope="module")
def clean_python(tmp_path_factory):
    """A Python with the project's dependencies but without this repository."""
    venv = tmp_path_factory.mktemp("clean") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    with open(os.path.join(site, "project_dependencies.pth"), "w") as f:
        f.write("\n".join(sorted(paths)) + "\n")
    return str(python)


def _clean_env() -> dict:
    return {**{k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}, "OMP_NUM_THREADS": "2"}


def _unzip(archive: str, target) -> str:
    with zipfile.ZipFile(archive) as z:
        names = z.namelist()
        z.extractall(target)
    return os.path.join(str(target), names[0].split("/")[0])


@pytest.mark.parametrize("bundle", volume_bundles(), ids=os.path.basename)
def test_exported_bundle_runs_without_the_repository(bundle, clean_python, tmp_path):
    root = _unzip(exported(bundle), tmp_path / "unzipped")
    name = os.path.basename(bundle)
    assert os.path.basename(root) == name
    for path in ("networks/__init__.py", "networks/ltmednext.py", "models/model.ts", "models/model.pt",
                 "configs/inference_torchscript.json", "LICENSE"):
        assert os.path.isfile(os.path.join(root, path)), path
    assert not os.path.isdir(os.path.join(root, "networks", "__pycache__"))
    with open(os.path.join(root, "configs", "metadata.json")) as f:
        meta = json.load(f)
    assert "litemed-bundles" not in meta["required_packages_version"]
    assert meta["model_sha256"]["models/model.ts"] == sha256(os.path.join(root, "models", "model.ts"))

    image = labelled_volumes(bundle, str(tmp_path / "samples"))["full"][0]
    _run_both_engines(clean_python, root, image, tmp_path)
    outputs = {}
    for engine in ("torchscript", "network_def"):
        written = [p for p in os.listdir(tmp_path / engine) if p.endswith(".nii.gz")]
        assert len(written) == 1, written
        outputs[engine] = nib.load(str(tmp_path / engine / written[0]))

    source = nib.load(image)
    label = np.asarray(outputs["network_def"].dataobj)
    assert outputs["network_def"].shape == source.shape
    np.testing.assert_allclose(outputs["network_def"].affine, source.affine, atol=1e-3)
    assert set(np.unique(label).tolist()) - {0} and set(np.unique(label).tolist()) <= {0, *labels(bundle).values()}
    assert float((label == np.asarray(outputs["torchscript"].dataobj)).mean()) >= 0.999


def _run_both_engines(clean_python, root, image, tmp_path) -> None:
    """Run the unzipped bundle on ``image`` in the clean Python, TorchScript first, then network_def + model.pt, and
    check where ``networks`` came from: nowhere before, then the bundle's copy with either config (with TorchScript
    for the transforms only: the volume bundles' ArgmaxLabelsd, the 2D bundles' image reading and writing). Outputs
    go to ``tmp_path/<engine>``."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    configs = {"torchscript": ["inference.json", "inference_torchscript.json"], "network_def": ["inference.json"]}
    script = ("import importlib.util, sys\nfrom monai.bundle import run\n"
              "print('NETWORKS_FROM', 'before', importlib.util.find_spec('networks'))\n")
    for engine, files in configs.items():
        script += (f"run(config_file={[os.path.join(root, 'configs', c) for c in files]!r}, bundle_root={root!r}, "
                   f"datalist=[{{'image': {image!r}}}], output_dir={str(tmp_path / engine)!r})\n"
                   f"print('NETWORKS_FROM', {engine!r}, getattr(sys.modules.get('networks'), '__file__', None))\n")
    result = subprocess.run([clean_python, "-c", script], cwd=elsewhere, env=_clean_env(), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    imported_from = dict(line.split()[1:] for line in result.stdout.splitlines() if line.startswith("NETWORKS_FROM"))
    copy = os.path.join(root, "networks", "__init__.py")
    assert imported_from == {"before": "None", "torchscript": copy, "network_def": copy}


def test_exported_2d_segmentation_bundle_runs_without_the_repository(clean_python, tmp_path):
    """DSB2018 LiteNeXt: a real DSB2018 PNG in, a 0/1 mask PNG of the image's size out, the same with TorchScript."""
    bundle = os.path.join(BUNDLES, "dsb2018_litenext_segmentation")
    image = sorted(glob.glob(os.path.join(shared_data("dsb2018", "images"), "*.png")))[0]
    root = _unzip(exported(bundle), tmp_path / "unzipped")
    assert os.path.isfile(os.path.join(root, "networks", "litenext.py"))
    _run_both_engines(clean_python, root, image, tmp_path)
    masks = {}
    for engine in ("torchscript", "network_def"):
        written = os.listdir(tmp_path / engine)
        assert written == [os.path.basename(image)[:-4] + "_seg.png"], written
        masks[engine] = np.asarray(Image.open(tmp_path / engine / written[0]))
    with Image.open(image) as source:
        assert masks["network_def"].shape == (source.height, source.width)
    assert set(np.unique(masks["network_def"]).tolist()) == {0, 1}  # nuclei found, and background
    assert float((masks["network_def"] == masks["torchscript"]).mean()) >= 0.999


def test_exported_classifier_runs_without_the_repository(clean_python, tmp_path):
    """Monkeypox LTMedNeXtClassifier: a real photo in, one row of 2 class probabilities out, the same with
    TorchScript."""
    bundle = os.path.join(BUNDLES, "monkeypox_ltmednext_classification")
    image = sorted(glob.glob(os.path.join(shared_data("monkeypox", "Monkey Pox"), "*.jpg")))[0]
    root = _unzip(exported(bundle), tmp_path / "unzipped")
    _run_both_engines(clean_python, root, image, tmp_path)
    probabilities = {}
    for engine in ("torchscript", "network_def"):
        with open(tmp_path / engine / "predictions.csv") as f:
            rows = [line.strip().split(",") for line in f if line.strip()]
        assert len(rows) == 1 and rows[0][0] == image, rows
        probabilities[engine] = np.array([float(v) for v in rows[0][1:]])
    probability = probabilities["network_def"]
    assert probability.shape == (2,) and np.all(probability >= 0) and probability.sum() == pytest.approx(1, abs=1e-4)
    np.testing.assert_allclose(probabilities["torchscript"], probabilities["network_def"], atol=1e-4)


@pytest.mark.parametrize("bundle", sorted(os.path.dirname(p) for p in glob.glob(os.path.join(BUNDLES, "*", "configs"))),
                         ids=os.path.basename)
def test_every_bundle_reaches_networks_only_through_target(bundle):
    """What export refuses: a $ expression using networks (MONAI evaluates it before the bundle root is on
    sys.path). Cheap, so it covers the bundles without weights too, which export cannot take."""
    assert networks_expressions(bundle) == []


def test_volume_bundles_are_told_from_2d_image_bundles(tmp_path):
    """Volume bundles (SliceInferer or a 3D input) are tested in MONAI Label; a 2D image bundle is not."""
    from bundle_samples import serves_volumes

    assert SYNAPSE in volume_bundles()
    image_bundle = tmp_path / "x_segmentation"
    shutil.copytree(os.path.join(SYNAPSE, "configs"), image_bundle / "configs")
    config = json.loads((image_bundle / "configs" / "inference.json").read_text())
    config["inferer"] = {"_target_": "SimpleInferer"}
    (image_bundle / "configs" / "inference.json").write_text(json.dumps(config))
    assert not serves_volumes(str(image_bundle))
    meta = json.loads((image_bundle / "configs" / "metadata.json").read_text())
    meta["network_data_format"]["inputs"]["image"]["spatial_shape"] = [96, 96, 96]
    (image_bundle / "configs" / "metadata.json").write_text(json.dumps(meta))
    assert serves_volumes(str(image_bundle))


def test_export_refuses_networks_expressions(tmp_path):
    """MONAI evaluates $ imports before it puts the bundle root on sys.path: a $networks expression would fail in
    the exported bundle, so export names it instead of writing a zip that breaks later."""
    bundle = tmp_path / "synapse_ltmednext_segmentation"
    shutil.copytree(os.path.join(SYNAPSE, "configs"), bundle / "configs")
    (bundle / "models").mkdir()
    (bundle / "models" / "model.pt").write_bytes(b"")
    train = json.loads((bundle / "configs" / "train.json").read_text())
    train["train_datalist"] = "$networks.data.load_datalist(@datalist_file, 'training')"
    (bundle / "configs" / "train.json").write_text(json.dumps(train))
    with pytest.raises(UsageError, match=r"configs/train.json: train_datalist"):
        export(str(bundle), str(tmp_path / "out.zip"))
    assert not os.path.exists(tmp_path / "out.zip")
    with pytest.raises(UsageError, match="not found"):
        export(str(tmp_path / "missing"), str(tmp_path / "out.zip"))
    with pytest.raises(UsageError, match=r"\.zip"):
        export(SYNAPSE, str(tmp_path / "out.tar"))
