"""The six LiteNeXt 2D segmentation bundles: transforms, metrics, training (SERP on/off, resume), evaluation and batch
inference through tools/infer.py (PNG/JPG/BMP/TIFF/DICOM in, 0/1 PNG masks of the image's size out)."""

import csv
import json
import os
import sqlite3
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import BUNDLES, REPO

from networks.data import write_datalist
from networks.segmentation2d import (BinarySegmentationReport, binary_metrics, eval_transforms,
                                     summarise_metrics, train_transforms)
from networks.training import read_weights

LITENEXT_BUNDLES = [f"{name}_litenext_segmentation" for name in
                    ("dsb2018", "glas", "isic2018", "ph2", "sunnybrook", "lungxray")]
INFER = os.path.join(REPO, "tools", "infer.py")


def _blob_image(path, shape=(48, 64), grey=False, seed=0, center=(20, 24), radius=9):
    """A noisy image with a bright disc, and its 0/1 mask; returns the mask."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[: shape[0], : shape[1]]
    mask = ((y - center[0]) ** 2 + (x - center[1]) ** 2 < radius**2).astype(np.uint8)
    grey_image = np.clip(40 + 170 * mask + rng.normal(0, 10, shape), 0, 255).astype(np.uint8)
    image = grey_image if grey else np.dstack([grey_image, grey_image // 2, 255 - grey_image])
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    Image.fromarray(image).save(str(path))
    return mask


def test_train_transforms_follow_the_litenext_recipe(tmp_path):
    mask = _blob_image(tmp_path / "a.png", grey=True, center=(10, 12), radius=6)
    Image.fromarray(mask * 255).save(str(tmp_path / "a_mask.png"))
    item = {"image": str(tmp_path / "a.png"), "label": str(tmp_path / "a_mask.png")}
    transform = train_transforms((64, 64))
    transform.set_random_state(0)
    reference = eval_transforms((64, 64))(item)
    assert reference["image"].shape == (3, 64, 64) and reference["label"].shape == (1, 64, 64)
    assert torch.equal(reference["image"][0], reference["image"][2])  # grey replicated to RGB
    moved = 0
    for _ in range(6):
        out = transform(item)
        assert out["image"].shape == (3, 64, 64) and out["label"].shape == (1, 64, 64)
        assert set(torch.unique(out["label"]).tolist()) <= {0.0, 1.0}
        moved += not torch.equal(out["label"], reference["label"])
        rotate = transform.transforms[-4]  # every sample is rotated within +-20 degrees
        assert type(rotate).__name__ == "RandRotated" and rotate.prob == 1.0
        assert abs(rotate.rand_rotate.x) <= np.radians(20) + 1e-6
    assert moved == 6
    names = [type(t).__name__ for t in transform.transforms]
    assert names[-4:] == ["RandRotated", "RandFlipd", "RandGaussianSmoothd", "RandFlipd"]
    assert [t.prob for t in transform.transforms[-3:]] == [0.5, 0.5, 0.1]


def test_intensity_augmentation_changes_grey_levels_only(tmp_path):
    mask = _blob_image(tmp_path / "a.png", grey=True, center=(10, 12), radius=6)
    Image.fromarray(mask * 255).save(str(tmp_path / "a_mask.png"))
    item = {"image": str(tmp_path / "a.png"), "label": str(tmp_path / "a_mask.png")}
    geometric = dict(rotate_degrees=0.0, hflip_prob=0.0, blur_prob=0.0, vflip_prob=0.0)
    plain = train_transforms((64, 64), **geometric)(item)
    transform = train_transforms((64, 64), intensity_prob=1.0, **geometric)
    transform.set_random_state(0)
    means = []
    for _ in range(6):
        out = transform(item)
        assert torch.equal(out["label"], plain["label"])
        assert 0.0 <= out["image"].min() and out["image"].max() <= 1.0
        means.append(float(out["image"].mean()))
    assert max(means) - min(means) > 0.05 and not any(np.isclose(m, float(plain["image"].mean())) for m in means)


def test_eval_transforms_keep_the_original_mask_for_test_metrics(tmp_path):
    _blob_image(tmp_path / "a.png", shape=(30, 50))
    Image.fromarray(np.ones((30, 50), np.uint8)).save(str(tmp_path / "m.png"))
    out = eval_transforms((64, 64), resize_label=False)({"image": str(tmp_path / "a.png"),
                                                          "label": str(tmp_path / "m.png")})
    assert out["image"].shape == (3, 64, 64) and out["label"].shape == (1, 30, 50)
    Image.fromarray(np.ones((31, 50), np.uint8)).save(str(tmp_path / "wrong.png"))
    with pytest.raises(RuntimeError) as error:  # MONAI wraps it; the cause names the mask, the image and both sizes
        eval_transforms((64, 64))({"image": str(tmp_path / "a.png"), "label": str(tmp_path / "wrong.png")})
    assert "wrong.png: mask size (31, 50) differs from image" in str(error.value.__cause__)


def test_binary_metrics_and_their_means():
    gt = np.zeros((4, 4), np.uint8)
    gt[:2, :2] = 1  # 4 pixels
    pred = np.zeros((4, 4), np.uint8)
    pred[:2, :3] = 1  # 6 pixels, 4 true
    m = binary_metrics(pred, gt)
    assert m == pytest.approx({"dice": 0.8, "iou": 4 / 6, "precision": 4 / 6, "recall": 1.0})
    empty = binary_metrics(pred, np.zeros_like(gt))
    assert np.isnan(empty["dice"]) and np.isnan(empty["recall"])
    rows = [{"gt_pixels": 4, "pred_pixels": 6, **m}, {"gt_pixels": 0, "pred_pixels": 6, **empty},
            {"gt_pixels": 4, "pred_pixels": 0, **binary_metrics(np.zeros_like(gt), gt)}]
    summary = summarise_metrics(rows)
    assert summary["dice"] == pytest.approx(0.4) and summary["images"] == 2 and summary["empty_gt_images"] == 1


@pytest.fixture
def synthetic_dataset(tmp_path):
    """The common converted layout (images/, masks/, datalist.json) with 6 training, 2 validation, 2 test images."""
    root = tmp_path / "data"
    items = []
    for i in range(10):
        mask = _blob_image(root / "images" / f"c{i}.png", seed=i, center=(18 + i, 20 + 2 * i))
        os.makedirs(root / "masks", exist_ok=True)
        Image.fromarray(mask).save(str(root / "masks" / f"c{i}.png"))
        items.append({"image": str(root / "images" / f"c{i}.png"), "label": str(root / "masks" / f"c{i}.png"),
                      "case": f"c{i}"})
    write_datalist(str(root / "datalist.json"), items[:6], items[6:8], items[8:])
    return root


def _bundle_copy(tmp_path, name="glas_litenext_segmentation"):
    bundle = tmp_path / name
    shutil.copytree(os.path.join(BUNDLES, name, "configs"), bundle / "configs")
    (bundle / "models").mkdir()
    return bundle


def _monai_run(bundle, *args, run_id="training", config="configs/train.json"):
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config, "--bundle_root", ".",
               "--num_threads", "1", *args]
    if run_id != "training":
        command.remove("--num_threads"), command.remove("1")
    result = subprocess.run(command, cwd=bundle, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def test_training_with_serp_resumes_and_evaluates_on_the_original_grid(tmp_path, synthetic_dataset):
    bundle = _bundle_copy(tmp_path)
    # constant lr (power 0): with the default decay, a first run of 1 epoch ends at lr 0 and its resume learns nothing
    common = ["--dataset_dir", str(synthetic_dataset), "--image_size", "[64, 64]", "--train#dataloader#batch_size", "3",
              "--train#lr_scheduler#power", "0"]
    _monai_run(bundle, *common, "--train#trainer#max_epochs", "1")
    checkpoints = bundle / "models" / "checkpoints"
    first = torch.load(next(checkpoints.glob("*epoch=1.pt")), weights_only=True)
    assert any(k.startswith("projector_s.") for k in first["serp"])  # SERP on by default: projectors trained
    assert (bundle / "models" / "model.pt").is_file()
    network = read_weights(str(next(checkpoints.glob("*epoch=1.pt"))))  # what --score_weights and fine-tuning read
    assert network.keys() == torch.load(bundle / "models" / "model.pt", weights_only=True).keys()
    result = _monai_run(bundle, *common, "--train#trainer#max_epochs", "2")
    assert (checkpoints / "checkpoint_epoch=2.pt").is_file()
    assert "Epoch[1]" not in result.stderr + result.stdout and "Epoch[2]" in result.stderr + result.stdout  # resumed
    second = torch.load(checkpoints / "checkpoint_epoch=2.pt", weights_only=True)
    assert second["trainer"]["iteration"] == 2 * second["trainer"]["epoch_length"]
    key = "projector_s.0.weight"
    assert not torch.equal(first["serp"][key], second["serp"][key])

    _monai_run(bundle, "--dataset_dir", str(synthetic_dataset), "--image_size", "[64, 64]", run_id="run",
               config="['configs/inference.json','configs/evaluate.json']")
    with open(bundle / "eval" / "test" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == ["c8.png", "c9.png"]
    assert all(int(r["gt_pixels"]) == int(np.asarray(Image.open(synthetic_dataset / "masks" / r["case"])).sum())
               for r in rows)  # metrics on the original 48x64 masks
    summary = json.loads((bundle / "eval" / "test" / "summary.json").read_text())
    assert set(summary) >= {"dice", "iou", "precision", "recall", "images"} and summary["images"] == 2


def test_training_without_serp_or_mwl(tmp_path, synthetic_dataset):
    """The switches: ``use_serp`` false trains the plain network (projectors untouched), ``use_marginal_weight_loss``
    false uses Dice + BCE. Given as the command line gives them (``--use_serp false`` arrives as the string
    "false"); in-process: the bundle's own config, parsed as MONAI's runner does."""
    from monai.bundle import ConfigParser
    from monai.losses import DiceCELoss

    from networks import MarginalWeightLoss

    bundle = _bundle_copy(tmp_path, "lungxray_litenext_segmentation")
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.json"))
    parser.update({"bundle_root": str(bundle), "dataset_dir": str(synthetic_dataset), "image_size": [64, 64],
                   "use_serp": "false", "use_marginal_weight_loss": "false", "train#trainer#max_epochs": 1,
                   "train#dataloader#batch_size": 3, "validate#handlers": []})
    parser.parse()
    assert isinstance(parser.get_parsed_content("loss"), DiceCELoss)
    serp = parser.get_parsed_content("serp")
    before = {k: v.clone() for k, v in serp.state_dict().items()}
    parser.get_parsed_content("train#trainer").run()
    after = serp.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("projector", "predictor")))
    assert not torch.equal(before["network.head.weight"], after["network.head.weight"])

    default = ConfigParser()
    default.read_config(str(bundle / "configs" / "train.json"))
    assert isinstance(default.get_parsed_content("loss"), MarginalWeightLoss)


def _mlflow_losses(root) -> list[float]:
    with sqlite3.connect(str(root / "eval" / "mlruns.db")) as db:  # the bundle's default tracking store
        return [value for (value,) in db.execute("select value from metrics where key = 'train_loss'")]


def test_every_training_option_trains_and_tracks_to_mlflow(tmp_path, synthetic_dataset):
    """The documented options that change the handlers or the loss, from the command line as users type them, with
    ``--tracking mlflow``: SERP and Marginal Weight Loss on (the defaults), then both off starting from the first run's
    weights (``--pretrained_weights``). Each writes models/model.pt and its losses (one number per iteration) reach
    the MLflow store; with SERP on, the trainer's output used to be a tuple that MONAI's MLflow handler rejected."""
    pytest.importorskip("mlflow")
    common = ["--dataset_dir", str(synthetic_dataset), "--image_size", "[32, 32]", "--train#dataloader#batch_size",
              "3", "--train#trainer#max_epochs", "1", "--tracking", "mlflow"]
    first = _bundle_copy(tmp_path / "defaults", "dsb2018_litenext_segmentation")
    second = _bundle_copy(tmp_path / "plain", "dsb2018_litenext_segmentation")
    _monai_run(first, *common)
    _monai_run(second, *common, "--use_serp", "false", "--use_marginal_weight_loss", "false",
               "--pretrained_weights", str(first / "models" / "model.pt"))
    for bundle in (first, second):
        assert (bundle / "models" / "model.pt").is_file()
        losses = _mlflow_losses(bundle)
        assert len(losses) == 2 and all(np.isfinite(losses)), losses  # 6 images at batch 3: 2 iterations


@pytest.mark.parametrize("validation", [True, False], ids=["validated", "no_validation_data"])
def test_multi_gpu_train_on_cpu_with_gloo_writes_from_rank_0_only(tmp_path, synthetic_dataset, validation):
    """torchrun, 2 processes: both train, only rank 0 saves checkpoints and writes logs (handlers chosen by type,
    ``networks.training.handlers_for_rank``), with validation (best model kept) and without (final model saved)."""
    bundle = _bundle_copy(tmp_path, "dsb2018_litenext_segmentation")
    if not validation:
        datalist = json.loads((synthetic_dataset / "datalist.json").read_text())
        datalist["validation"] = []
        (synthetic_dataset / "datalist.json").write_text(json.dumps(datalist))
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    logs = tmp_path / "rank_logs"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         f"--master_port={29519 + validation}", "--log-dir", str(logs), "--redirects", "3", "--tee", "3",
         "-m", "monai.bundle", "run", "training", "--config_file",
         "['configs/train.json','configs/multi_gpu_train.json']", "--dataset_dir", str(synthetic_dataset),
         "--bundle_root", ".", "--image_size", "[32, 32]", "--num_threads", "1", "--train#dataloader#batch_size", "3",
         "--train#trainer#max_epochs", "1"], cwd=bundle, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert os.listdir(bundle / "models" / "checkpoints") == ["checkpoint_epoch=1.pt"]
    assert (bundle / "models" / "model.pt").is_file()
    by_rank = {}
    for folder, _, files in os.walk(logs):
        if "stderr.log" in files:
            text = "".join(open(os.path.join(folder, f)).read() for f in ("stdout.log", "stderr.log"))
            by_rank[int(os.path.basename(folder))] = text
    assert sorted(by_rank) == [0, 1]
    assert "Saved checkpoint" in by_rank[0] and ("Metrics --" in by_rank[0]) == validation  # StatsHandler's line
    assert "Epoch[1] Complete" in by_rank[1]  # rank 1 trains (ignite's own log line), and writes nothing
    assert "Saved checkpoint" not in by_rank[1] and "Metrics --" not in by_rank[1]
    events = [name for name in os.listdir(bundle / "eval") if name.startswith("events.out.tfevents")]
    assert events and len({name.split(".")[-2] for name in events}) == 1  # TensorBoard files of one process (pid)


@pytest.mark.parametrize("validation", [True, False], ids=["interval_past_max_epochs", "no_validation_data"])
def test_training_validates_at_least_once_or_saves_the_final_model(tmp_path, synthetic_dataset, validation):
    """models/model.pt is written by a run shorter than the validation interval (validated at its last epoch), and
    by a run without validation data (the final network); what MONAI Label's short /train runs need."""
    from monai.bundle import ConfigParser

    bundle = _bundle_copy(tmp_path, "dsb2018_litenext_segmentation")
    datalist = json.loads((synthetic_dataset / "datalist.json").read_text())
    if not validation:
        datalist["validation"] = []
        (synthetic_dataset / "datalist.json").write_text(json.dumps(datalist))
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.json"))
    parser.update({"bundle_root": str(bundle), "dataset_dir": str(synthetic_dataset), "image_size": [32, 32],
                   "use_serp": False, "train#trainer#max_epochs": 1, "validate#interval": 5,
                   "train#dataloader#batch_size": 3, "output_dir": str(tmp_path / "eval")})
    parser.parse()
    trainer = parser.get_parsed_content("train#trainer")
    trainer.run()
    assert (bundle / "models" / "model.pt").is_file()
    evaluator = parser.get_parsed_content("validate#evaluator")
    assert evaluator.state.epoch == (1 if validation else 0)
    saved = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert torch.equal(saved["head.weight"] if "head.weight" in saved else saved["model"]["head.weight"],
                       parser.get_parsed_content("network").state_dict()["head.weight"])


@pytest.fixture(scope="module")
def random_litenext_bundle(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("litenext")
    bundle = _bundle_copy(tmp_path, "isic2018_litenext_segmentation")
    torch.manual_seed(0)
    torch.save(__import__("networks").LiteNeXt().state_dict(), str(bundle / "models" / "model.pt"))
    return bundle


def _dicom_image(path, shape=(40, 52)):
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "MR"
    ds.Rows, ds.Columns = shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.random.default_rng(0).integers(0, 4000, shape).astype(np.uint16).tobytes()
    pydicom.dcmwrite(str(path), ds, enforce_file_format=True)


def _infer(*args):
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, INFER, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300)


def test_infer_writes_one_mask_per_image_with_its_size(tmp_path, random_litenext_bundle):
    inputs = tmp_path / "in"
    _blob_image(inputs / "rgb.png", shape=(48, 64))
    _blob_image(inputs / "sub" / "grey.jpg", shape=(37, 29), grey=True)
    _blob_image(inputs / "sub" / "scan.bmp", shape=(50, 40))
    Image.fromarray(np.random.default_rng(1).integers(0, 60000, (33, 45)).astype(np.uint16)).save(
        str(inputs / "wide.tif"))
    _dicom_image(inputs / "slice.dcm")
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "out"
    result = _infer(random_litenext_bundle, inputs, out)
    assert result.returncode == 1, result.stderr[-3000:]  # one case failed, the rest went on
    with open(out / "summary.csv") as f:
        reader = csv.DictReader(f)
        rows = {r["case"]: r for r in reader}
        assert reader.fieldnames == ["case", "input", "status", "output", "seconds", "message"]
    assert rows["broken"]["status"] == "failed" and "broken.png" in rows["broken"]["message"]
    sizes = {"rgb": (48, 64), "sub__grey": (37, 29), "sub__scan": (50, 40), "wide": (33, 45), "slice": (40, 52)}
    for case, size in sizes.items():
        assert rows[case]["status"] == "ok", rows[case]
        mask = np.asarray(Image.open(out / f"{case}_seg.png"))
        assert mask.shape == size and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
        assert rows[case]["output"] == str(out / f"{case}_seg.png")
    assert not [n for n in os.listdir(out) if n.startswith(".tmp_")]

    os.remove(out / "rgb_seg.png")
    from networks.batch.core import UsageError
    from networks.batch.runners import run

    assert run(str(random_litenext_bundle), str(inputs), str(out)) == 1  # in-process: the same path, faster
    with open(out / "summary.csv") as f:
        status = {r["case"]: r["status"] for r in csv.DictReader(f)}
    assert status["rgb"] == "ok" and status["slice"] == "skipped"
    assert status["broken"] == "failed"
    assert run(str(random_litenext_bundle), str(inputs), str(out), overwrite=True) == 1
    with open(out / "summary.csv") as f:
        status = {r["case"]: r["status"] for r in csv.DictReader(f)}
    assert status == {**{case: "ok" for case in sizes}, "broken": "failed"}
    # with every mask written, a misspelt config id is still a usage error
    with pytest.raises(UsageError, match="imgae_size"):
        run(str(random_litenext_bundle), str(inputs / "sub"), str(out), overrides={"imgae_size": [64, 64]})


def test_infer_usage_errors_for_2d_bundles(tmp_path, random_litenext_bundle, capsys):
    from tools.infer import main

    _blob_image(tmp_path / "in" / "a.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    for bundle, input, extra, message in (
            (random_litenext_bundle, tmp_path / "in", {"dicom_seg": True}, "segments 2D images"),
            (random_litenext_bundle, tmp_path / "in", {"ray_address": "local"}, "--ray_address are for volume"),
            (random_litenext_bundle, empty, {}, "no 2D images"),
            (random_litenext_bundle, tmp_path / "in", {"imgae_size": [64, 64]}, "--imgae_size"),
            (os.path.join(BUNDLES, "lungxray_litenext_segmentation"), tmp_path / "in", {}, "train it first")):
        with pytest.raises(SystemExit) as exit_info:
            main(str(bundle), str(input), str(tmp_path / "out"), **extra)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_every_litenext_bundle_declares_the_recipe():
    for name in LITENEXT_BUNDLES:
        with open(os.path.join(BUNDLES, name, "configs", "train.json")) as f:
            train = json.load(f)
        with open(os.path.join(BUNDLES, name, "configs", "metadata.json")) as f:
            meta = json.load(f)
        with open(os.path.join(BUNDLES, name, "configs", "inference.json")) as f:
            inference = json.load(f)
        size = meta["network_data_format"]["inputs"]["image"]["spatial_shape"]  # 256x256, GlaS 512x512 (its card)
        assert train["image_size"] == inference["image_size"] == size and train["use_serp"] is True
        assert train["use_marginal_weight_loss"] is True and train["network_def"]["_target_"] == "networks.LiteNeXt"
        assert train["train"]["preprocessing"]["_target_"] == "networks.segmentation2d.train_transforms"
        assert meta["network_data_format"]["outputs"]["pred"]["format"] == "segmentation"
        assert "png" in meta["data_type"]


def test_segmentation_report_writes_per_image_rows(tmp_path):
    from monai.data import MetaTensor

    report = BinarySegmentationReport(str(tmp_path))
    gt = MetaTensor(torch.zeros(1, 4, 4), meta={"filename_or_obj": "/x/a.png"})
    gt[0, :2, :2] = 1
    pred = torch.zeros(1, 4, 4)
    pred[0, :2, :3] = 1

    class Engine:
        class state:
            output = [{"pred": pred, "label": gt}]
            metrics = {}

    report.collect(Engine)
    summary = report.write(Engine)
    assert summary["dice"] == pytest.approx(0.8) and Engine.state.metrics["test_dice"] == pytest.approx(0.8)
    assert (tmp_path / "metrics.csv").read_text().splitlines()[1].startswith("a.png,4,6,0.800000")
