"""The classification bundles' configs run as users run them: training with resume and MLflow, evaluation with a
confusion matrix, MONAI's own inference runner; the shipped weights still classify real held-out images."""

import csv
import json
import math
import os
import sqlite3
import subprocess
import sys

import pytest

from helpers import CLASSIFICATION_BUNDLES, COVID19_SLICES, MONKEYPOX, REPO, SARSCOV2, shared_data

# small settings so an epoch takes seconds on a CPU
FAST = ["--image_size", "[64, 64]", "--num_threads", "2", "--train#dataloader#batch_size", "4",
        "--train#trainer#max_epochs"]


def _bundle(*args, cwd=MONKEYPOX, timeout=600):
    env = {**os.environ, "PYTHONPATH": REPO}
    result = subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.parametrize("bundle", CLASSIFICATION_BUNDLES, ids=os.path.basename)
def test_metadata_valid_offline_and_consistent_with_configs(bundle):
    import jsonschema

    with open(os.path.join(REPO, "schemas", "meta_schema_20240725.json")) as f:
        schema = json.load(f)
    with open(os.path.join(bundle, "configs", "metadata.json")) as f:
        meta = json.load(f)
    jsonschema.validate(meta, schema)
    assert meta["version"] in meta["changelog"]
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["format"] == "classes" and pred["num_channels"] == len(pred["channel_def"])
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [224, 224]
    for name in ("inference.json", "train.json"):
        with open(os.path.join(bundle, "configs", name)) as f:
            config = json.load(f)
        assert config["num_classes"] == pred["num_channels"] and config["image_size"] == [224, 224], name
    expected = {MONKEYPOX: ["others", "monkeypox"], SARSCOV2: ["non_covid", "covid"],
                COVID19_SLICES: ["normal", "covid", "cap"]}[bundle]
    assert [pred["channel_def"][str(i)] for i in range(len(expected))] == expected
    assert (meta.get("weights_shipped", True) is False) == (bundle == COVID19_SLICES)
    if bundle == SARSCOV2:  # trained on the dataset it is for; UCSD COVID-CT is an external test only
        assert meta["trained_on"].startswith("SARS-CoV-2 CT-scan") and "UCSD" not in meta["trained_on"]


@pytest.mark.parametrize("bundle", CLASSIFICATION_BUNDLES, ids=os.path.basename)
def test_pretrained_encoder_option_initialises_the_training_network(bundle):
    """``--pretrained_encoder models/model.pt`` of an LTMedNeXt segmentation bundle starts training from its encoder
    (parsed as MONAI's runner parses the config); the default starts from scratch."""
    import torch
    from monai.bundle import ConfigParser

    checkpoint = os.path.join(REPO, "bundles", "acdc_ltmednext_segmentation", "models", "model.pt")
    source = torch.load(checkpoint, weights_only=True)
    for path, expected in (("", False), (checkpoint, True)):
        parser = ConfigParser()
        parser.read_config(os.path.join(bundle, "configs", "train.json"))
        parser.update({"pretrained_encoder": path, "device": "$torch.device('cpu')"})
        network = parser.get_parsed_content("network")
        loaded = network.state_dict()["encoder.stages.3.1.gamma_mlp"]
        assert torch.equal(loaded, source["encoder.stages.3.1.gamma_mlp"]) == expected


def test_train_checkpoints_every_epoch_resumes_and_tracks_to_mlflow(synthetic_photos, tmp_path):
    pytest.importorskip("mlflow")
    root = tmp_path / "run"
    common = ["run", "training", "--config_file", "configs/train.json", "--dataset_dir", str(synthetic_photos),
              "--bundle_root", str(root), *FAST]
    _bundle(*common, "1", "--tracking", "mlflow")
    assert os.listdir(root / "models" / "checkpoints") == ["checkpoint_epoch=1.pt"]
    assert (root / "models" / "model.pt").is_file()
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(root / "eval"))
    with sqlite3.connect(str(root / "eval" / "mlruns.db")) as db:
        metrics = {row[0] for row in db.execute("select key from metrics")}
    assert {"train_loss", "val_balanced_accuracy", "val_auc"} <= metrics
    log = _bundle(*common, "2")
    assert "Epoch: 2/2" in log and "Epoch: 1/2" not in log  # resumed after epoch 1
    from networks.training import latest_checkpoint

    assert os.path.basename(latest_checkpoint(str(root / "models" / "checkpoints"))) == "checkpoint_epoch=2.pt"
    import torch

    from networks import LTMedNeXtClassifier

    state = torch.load(str(root / "models" / "model.pt"), weights_only=True)
    LTMedNeXtClassifier(3, 2, "T").load_state_dict(state)  # the best model is a plain state dict


def test_train_from_a_pretrained_encoder_tracks_to_mlflow(synthetic_photos, tmp_path):
    """``--pretrained_encoder`` (the documented way to start a classifier from a segmentation bundle's encoder) with
    ``--tracking mlflow``: trains, writes models/model.pt, and its losses reach the MLflow store."""
    pytest.importorskip("mlflow")
    root = tmp_path / "run"
    encoder = os.path.join(REPO, "bundles", "synapse_ltmednext_segmentation", "models", "model.pt")
    _bundle("run", "training", "--config_file", "configs/train.json", "--dataset_dir", str(synthetic_photos),
            "--bundle_root", str(root), *FAST, "1", "--pretrained_encoder", encoder, "--tracking", "mlflow")
    assert (root / "models" / "model.pt").is_file()
    with sqlite3.connect(str(root / "eval" / "mlruns.db")) as db:
        losses = [v for (v,) in db.execute("select value from metrics where key = 'train_loss'")]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), losses  # 8 images at batch 4


def test_multi_gpu_train_on_cpu_with_gloo(synthetic_photos, tmp_path):
    root = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         "--master_port=29521", "-m", "monai.bundle", "run", "training", "--config_file",
         "['configs/train.json','configs/multi_gpu_train.json']", "--dataset_dir", str(synthetic_photos),
         "--bundle_root", str(root), "--image_size", "[64, 64]", "--num_threads", "1", "--train#dataloader#batch_size",
         "2", "--train#trainer#max_epochs", "1"], cwd=MONKEYPOX, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert os.listdir(root / "models" / "checkpoints") == ["checkpoint_epoch=1.pt"]
    assert (root / "models" / "model.pt").is_file()


def test_evaluate_writes_metrics_and_confusion_matrix(synthetic_photos, random_weight_classifier):
    _bundle("run", "--config_file", "['configs/inference.json','configs/evaluate.json']", "--meta_file",
            "configs/metadata.json", "--bundle_root", str(random_weight_classifier), "--dataset_dir",
            str(synthetic_photos), cwd=str(random_weight_classifier))
    out = random_weight_classifier / "eval"
    assert {"metrics.csv", "confusion_matrix.csv", "confusion_matrix.png", "predictions.csv"} <= set(os.listdir(out))
    with open(out / "metrics.csv") as f:
        metrics = {row["metric"]: row["value"] for row in csv.DictReader(f)}
    assert metrics["n"] == "2" and {"accuracy", "balanced_accuracy", "f1_macro", "auc"} <= set(metrics)
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [os.path.basename(r["image"]) for r in rows] == ["p5_10.png", "p5_11.png"]  # the test split


def test_monai_runner_inference_writes_class_probabilities(synthetic_photos, random_weight_classifier, tmp_path):
    out = tmp_path / "out"
    _bundle("run", "--config_file", "configs/inference.json", "--meta_file", "configs/metadata.json",
            "--bundle_root", str(random_weight_classifier), "--dataset_dir", str(synthetic_photos / "class1"),
            "--output_dir", str(out), cwd=str(random_weight_classifier))
    with open(out / "predictions.csv") as f:
        rows = list(csv.reader(f))
    assert len(rows) == 6 and all(len(r) == 3 for r in rows)  # file name, p(others), p(monkeypox)
    assert all(abs(float(r[1]) + float(r[2]) - 1) < 1e-4 for r in rows)


@pytest.mark.parametrize("bundle,layout,folder", [(MONKEYPOX, "monkeypox", "monkeypox"),
                                                 (SARSCOV2, "sarscov2", "sarscov2_ct")], ids=["monkeypox", "sarscov2"])
def test_shipped_weights_reproduce_the_documented_test_metrics(bundle, layout, folder, tmp_path):
    """The shipped weights, through networks.batch.images, on the held-out test split (patients/sources never
    trained or selected on) give the accuracy and AUC that metadata and docs/README.md state: catches broken or
    swapped weights and preprocessing drift between training, evaluation and inference."""
    import numpy as np

    from networks.classification import classification_metrics
    from networks.data import load_datalist
    from tools import prepare_classification
    from networks.batch.images import ImageClassifier

    with open(os.path.join(bundle, "configs", "metadata.json")) as f:
        expected = json.load(f)["eval_metrics"]
    path = getattr(prepare_classification, layout)(shared_data(folder), str(tmp_path / "data"))
    test = load_datalist(path, "test")
    runner = ImageClassifier(bundle)
    probabilities = runner.predict([runner.load(item["image"]) for item in test])
    labels = [item["label"] for item in test]
    result = classification_metrics(labels, np.asarray(probabilities), len(runner.class_names))
    assert round(result["accuracy"], 4) == expected["test_accuracy"]
    assert abs(result["auc"] - expected["test_auc"]) < 2e-3  # resize through the runner vs the evaluation config
