"""tools/verify_bundle.py: every shipped bundle passes; broken bundles are caught, one line per problem."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import BUNDLES, REPO

from tools.verify_bundle import expression_problem, record_hashes

SCRIPT = os.path.join(REPO, "tools", "verify_bundle.py")


def _verify(*bundles):
    return subprocess.run([sys.executable, SCRIPT, *map(str, bundles)], capture_output=True, text=True, timeout=600)


def test_every_shipped_bundle_passes():
    result = _verify()
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stdout == ""


def _edit_json(path, change):
    with open(path) as f:
        content = json.load(f)
    change(content)
    with open(path, "w") as f:
        json.dump(content, f)


def test_broken_bundles_are_caught(random_weight_bundle, tmp_path):
    source = tmp_path / "good"
    shutil.copytree(random_weight_bundle, source)
    for name in ("LICENSE", "docs"):
        src = os.path.join(BUNDLES, "synapse_ltmednext_segmentation", name)
        (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, source / name)
    _edit_json(source / "configs" / "metadata.json", lambda m: m.update(eval_metrics={}))
    record_hashes(str(source))
    broken = {name: tmp_path / name for name in ("missing_file", "bad_metadata", "channels", "tampered", "danger")}
    for folder in broken.values():
        shutil.copytree(source, folder)
    os.remove(broken["missing_file"] / "LICENSE")
    _edit_json(broken["bad_metadata"] / "configs" / "metadata.json", lambda m: m.pop("required_packages_version"))
    _edit_json(broken["channels"] / "configs" / "metadata.json",
               lambda m: m["network_data_format"]["outputs"]["pred"].update(num_channels=4))
    with open(broken["tampered"] / "models" / "model.pt", "ab") as f:
        f.write(b"\0")
    _edit_json(broken["danger"] / "configs" / "inference.json", lambda c: c.update(evil="$os.system('touch pwned')"))

    result = _verify(source, *broken.values())
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert not [line for line in lines if line.startswith("good:")]
    expected = {"missing_file": "LICENSE: missing", "bad_metadata": "required_packages_version",
                "channels": "output channels", "tampered": "sha256", "danger": "os.system"}
    for name, text in expected.items():
        mine = [line for line in lines if line.startswith(f"{name}:")]
        assert any(text in line for line in mine), (name, mine)
    assert not os.path.exists("pwned")


@pytest.mark.parametrize("expression,allowed", [
    ("$import glob", True),
    ("$import torch.distributed as dist", True),
    ("$os.path.join(@dataset_dir, 'datalist.json')", True),
    ("$[{'image': p} for p in sorted(glob.glob(os.path.join(@dataset_dir, '*.nii*')))]", True),
    ("$torch.device('cuda:' + os.environ['LOCAL_RANK'] if torch.cuda.is_available() else 'cpu')", True),
    ("$import subprocess", False),
    ("$os.system('ls')", False),
    ("$open('/etc/passwd').read()", False),
    ("$eval(@user_input)", False),
    ("$__import__('os').system('ls')", False),
    ("$torch.__class__.__base__", False),
    ("$(lambda: 0).__globals__", False),
])
def test_expression_allow_list(expression, allowed):
    assert (expression_problem(expression) is None) == allowed, expression_problem(expression)


def test_classification_bundle_checks(random_weight_classifier, tmp_path):
    """Classifiers: output (1, classes) instead of a spatial map; a bundle may declare that it ships no weights
    (then its network is checked on initial weights), but must not ship a model file while saying so."""
    source = tmp_path / "good"
    shutil.copytree(random_weight_classifier, source)
    _edit_json(source / "configs" / "metadata.json", lambda m: m.update(eval_metrics={}))
    record_hashes(str(source))
    broken = {name: tmp_path / name for name in ("channels", "spatial", "undeclared", "contradiction", "declared")}
    for folder in broken.values():
        shutil.copytree(source, folder)
    _edit_json(broken["channels"] / "configs" / "metadata.json",
               lambda m: m["network_data_format"]["outputs"]["pred"].update(num_channels=3))
    _edit_json(broken["spatial"] / "configs" / "inference.json",  # a segmentation network behind a classifier's metadata
               lambda c: c.update(network_def={"_target_": "networks.LTMedNeXt", "spatial_dims": 2, "in_channels": 3,
                                               "out_channels": 2, "size": "T"}))
    for name in ("undeclared", "declared", "spatial"):  # spatial: checked on initial weights, so its shape is reached
        shutil.rmtree(broken[name] / "models")
    for name in ("contradiction", "declared", "spatial"):
        _edit_json(broken[name] / "configs" / "metadata.json", lambda m: m.update(weights_shipped=False))
    for name in ("declared", "spatial"):
        _edit_json(broken[name] / "configs" / "metadata.json", lambda m: m.update(model_sha256={}))

    result = _verify(source, *broken.values())
    lines = result.stdout.splitlines()
    assert not [line for line in lines if line.startswith(("good:", "declared:"))], lines
    expected = {"channels": "output channels", "spatial": "a classifier", "undeclared": "models/model.pt: missing",
                "contradiction": "weights_shipped is false"}
    for name, text in expected.items():
        mine = [line for line in lines if line.startswith(f"{name}:")]
        assert any(text in line for line in mine), (name, mine)
