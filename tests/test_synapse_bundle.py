"""The Synapse bundle's configs run as users run them: training with resume, evaluation, inference, DDP."""

import csv
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from helpers import REPO, SYNAPSE, shared_data

# small settings so a training epoch takes seconds on a CPU
FAST = ["--roi_size", "[64, 64]", "--num_threads", "2", "--train#dataloader#batch_size", "4",
        "--validate#interval", "1"]


def _bundle(*args, cwd=SYNAPSE, timeout=600):
    env = {**os.environ, "PYTHONPATH": REPO}
    result = subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def test_metadata_valid_offline():
    import jsonschema

    with open(os.path.join(REPO, "schemas", "meta_schema_20240725.json")) as f:
        schema = json.load(f)
    with open(os.path.join(SYNAPSE, "configs", "metadata.json")) as f:
        meta = json.load(f)
    jsonschema.validate(meta, schema)
    assert meta["version"] in meta["changelog"]
    channels = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert list(channels.values()) == ["background", "spleen", "right_kidney", "left_kidney", "gallbladder", "liver",
                                       "stomach", "aorta", "pancreas"]


def test_train_losses_compute_dice_over_the_batch():
    # per-image Dice taught LTMedNeXt-T to never predict the kidneys, gallbladder, aorta or pancreas (most slices
    # lack them, and any probability left on an absent class costs a whole class of Dice): see the bundle's docs
    with open(os.path.join(SYNAPSE, "configs", "train.json")) as f:
        config = json.load(f)
    assert config["dice_ce_loss"]["batch"] is True
    assert config["marginal_weight_loss"]["batch"] is True


def test_train_checkpoints_every_epoch_and_resumes(synthetic_synapse, tmp_path):
    root = tmp_path / "run"
    common = ["run", "training", "--config_file", "configs/train.json", "--dataset_dir", str(synthetic_synapse),
              "--bundle_root", str(root), *FAST]
    _bundle(*common, "--train#trainer#max_epochs", "1")
    checkpoints = os.listdir(root / "models" / "checkpoints")
    assert checkpoints == ["checkpoint_epoch=1.pt"]
    assert (root / "models" / "model.pt").is_file()
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(root / "eval"))
    log = _bundle(*common, "--train#trainer#max_epochs", "2")
    assert "Epoch: 2/2" in log and "Epoch: 1/2" not in log  # resumed after epoch 1
    from networks.training import latest_checkpoint

    assert os.path.basename(latest_checkpoint(str(root / "models" / "checkpoints"))) == "checkpoint_epoch=2.pt"


def test_train_with_each_loss_and_pretrained_weights_tracks_to_mlflow(synthetic_synapse, tmp_path):
    """Marginal Weight Loss on, then off (Dice + CE) starting from the first run's weights, both with ``--tracking
    mlflow``: each writes models/model.pt and its per-iteration losses reach the MLflow store."""
    pytest.importorskip("mlflow")
    import sqlite3

    first, second = tmp_path / "mwl", tmp_path / "dice_ce"
    for root, options in ((first, ["--use_marginal_weight_loss", "True"]),
                          (second, ["--use_marginal_weight_loss", "False", "--pretrained_weights",
                                    str(first / "models" / "model.pt")])):
        _bundle("run", "--config_file", "configs/train.json", "--dataset_dir", str(synthetic_synapse),
                "--bundle_root", str(root), *FAST, "--train#trainer#max_epochs", "1", *options, "--tracking", "mlflow")
        assert (root / "models" / "model.pt").is_file()
        with sqlite3.connect(str(root / "eval" / "mlruns.db")) as db:  # the bundle's default tracking store
            assert db.execute("select count(*) from runs").fetchone()[0] == 1
            losses = [v for (v,) in db.execute("select value from metrics where key = 'train_loss'")]
        assert losses and all(np.isfinite(losses)), losses


def test_evaluate_writes_per_case_metrics(synthetic_synapse, random_weight_bundle):
    _bundle("run", "--config_file", "['configs/inference.json','configs/evaluate.json']", "--meta_file",
            "configs/metadata.json", "--bundle_root", str(random_weight_bundle), "--dataset_dir",
            str(synthetic_synapse), "--roi_size", "[64, 64]", cwd=str(random_weight_bundle))
    with open(random_weight_bundle / "eval" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 16 and {r["case"] for r in rows} == {"case2.nii.gz", "case3.nii.gz"}
    summary = (random_weight_bundle / "eval" / "summary.md").read_text()
    assert "TransUNet protocol" in summary and "| liver |" in summary


def test_inference_config_restores_input_grid(random_weight_bundle, tmp_path):
    ct = shared_data("ct_nifti_3d", "example_ct_sm.nii.gz")
    out = tmp_path / "out"
    _bundle("run", "--config_file", "configs/inference.json", "--meta_file", "configs/metadata.json",
            "--bundle_root", str(random_weight_bundle), "--dataset_dir", os.path.dirname(ct),
            "--datalist", f"$[{{'image': '{ct}'}}]", "--output_dir", str(out), cwd=str(random_weight_bundle))
    written = nib.load(str(out / "example_ct_sm_seg.nii.gz"))
    source = nib.load(ct)
    assert written.shape == source.shape
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-4)


@pytest.mark.slow
def test_multi_gpu_train_on_cpu_with_gloo(synthetic_synapse, tmp_path):
    root = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         "--master_port=29517", "-m", "monai.bundle", "run", "--config_file",
         "['configs/train.json','configs/multi_gpu_train.json']", "--dataset_dir", str(synthetic_synapse),
         "--bundle_root", str(root), "--roi_size", "[64, 64]", "--num_threads", "1",
         "--train#dataloader#batch_size", "2", "--train#trainer#max_epochs", "1", "--validate#interval", "1"],
        cwd=SYNAPSE, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert os.listdir(root / "models" / "checkpoints") == ["checkpoint_epoch=1.pt"]
    assert (root / "models" / "model.pt").is_file()
