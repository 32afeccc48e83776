"""tools/crossval.py: folds by patient (every case in exactly one fold, no patient on two sides), inner validation
from the training folds only, and a whole run on a LiteNeXt bundle with its tables, resumed by a rerun."""

import csv
import json
import os
import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from helpers import BUNDLES, REPO

from networks.data import write_datalist
from tools.crossval import (fold_lists, group_key, prepare_folds, read_case_metrics, run_fold, split_folds,
                            write_tables)


def _patients_items(n_patients=13, seed=0):
    rng = np.random.default_rng(seed)
    items = []
    for p in range(n_patients):
        for phase in range(int(rng.integers(1, 4))):
            items.append({"image": f"p{p}_{phase}.nii.gz", "case": f"p{p}_{phase}", "patient": f"p{p}",
                          "group": ["DCM", "HCM", "NOR"][p % 3]})
    return items


@pytest.mark.parametrize("folds", [2, 3, 5])
def test_every_case_in_one_fold_and_no_patient_on_two_sides(folds):
    items = _patients_items()
    parts = split_folds(items, folds, seed=3)
    assert len(parts) == folds and all(parts)
    seen = Counter(item["case"] for part in parts for item in part)
    assert set(seen) == {item["case"] for item in items} and set(seen.values()) == {1}
    owner = {}
    for k, part in enumerate(parts):
        for item in part:
            assert owner.setdefault(item["patient"], k) == k  # a patient's cases all in one fold
    for k in range(folds):
        training, validation, test = fold_lists(parts, k, 0.2, seed=3)
        sides = [{i["patient"] for i in side} for side in (training, validation, test)]
        assert validation and not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])
        assert sorted(i["case"] for i in training + validation + test) == sorted(i["case"] for i in items)
    assert split_folds(items, folds, seed=3) == parts  # reproducible from the seed


def test_groups_and_strata_are_taken_from_the_items():
    assert group_key(_patients_items()) == "patient"
    sources = [{"image": f"{i}.png", "label": i % 2, "group": f"paper{i // 3}"} for i in range(18)]
    assert group_key(sources) == "group"
    parts = split_folds(sources, 3, seed=0)
    assert all({item["label"] for item in part} == {0, 1} for part in parts)  # each class in every fold
    assert group_key([{"image": "a.png", "case": "a"}]) is None
    with pytest.raises(ValueError, match="3 folds need at least 3 patients"):
        split_folds([{"image": "a", "patient": "x"}, {"image": "b", "patient": "y"}], 3)


def test_per_case_metrics_of_each_bundle_kind(tmp_path):
    (tmp_path / "seg2d").mkdir()
    (tmp_path / "seg2d" / "metrics.csv").write_text("case,dice,iou,gt_pixels\na.png,0.8,0.7,10\nb.png,nan,nan,0\n")
    assert read_case_metrics(str(tmp_path / "seg2d")) == ([{"case": "a.png", "metric": 0.8}], {})
    (tmp_path / "vol").mkdir()
    (tmp_path / "vol" / "metrics.csv").write_text(
        "case,organ,gt_present,dice,hd95_voxels,hd95_mm\nc1,LV,True,0.9,1,1\nc1,RV,True,0.7,1,1\n"
        "c1,MYO,False,0.0,,\nc2,LV,True,0.8,1,1\n")
    cases, breakdown = read_case_metrics(str(tmp_path / "vol"))
    assert cases == [{"case": "c1", "metric": pytest.approx(0.8)}, {"case": "c2", "metric": 0.8}]
    assert breakdown == {"LV": pytest.approx(0.85), "RV": 0.7}
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "predictions.csv").write_text(
        "image,label,prediction,p_a,p_b\nx/1.png,a,a,1,0\n2.png,b,a,1,0\n")
    assert [c["metric"] for c in read_case_metrics(str(tmp_path / "cls"))[0]] == [1.0, 0.0]
    (tmp_path / "cls" / "metrics.csv").write_text("metric,value\naccuracy,0.5\nbalanced_accuracy,0.5\nauc,0.25\n")
    cases, breakdown = read_case_metrics(str(tmp_path / "cls"))
    assert breakdown == {"balanced_accuracy": 0.5, "auc": 0.25}
    results = {0: {"cases": cases, "breakdown": breakdown, "n": 2, "mean": 0.5},
               1: {"cases": [{"case": "3.png", "metric": 1.0}], "breakdown": {"balanced_accuracy": 1.0, "auc": 0.75},
                   "n": 1, "mean": 1.0}}
    summary = write_tables(str(tmp_path), "bundles/x", 2, results, "cmd")
    assert summary["breakdown_fold_mean"] == {"auc": 0.5, "balanced_accuracy": 0.75}
    table = (tmp_path / "crossval.md").read_text().splitlines()
    assert table[-5:] == ["| fold | cases | mean | auc | balanced_accuracy |", "| --- | --- | --- | --- | --- |",
                          "| 0 | 2 | 0.5000 | 0.2500 | 0.5000 |", "| 1 | 1 | 1.0000 | 0.7500 | 1.0000 |",
                          "| mean of folds | 3 | 0.7500 | 0.5000 | 0.7500 |"]


def test_fixed_training_cases_join_every_fold_and_are_never_held_out(tmp_path):
    items = _patients_items()
    seen = [{**item, "case": "seen_" + item["case"], "patient": "seen_" + item["patient"]} for item in items[:6]]
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": items, "validation": [], "test": [], "pretrained_on": seen}))
    folders = prepare_folds(str(datalist), str(tmp_path / "cv"), 3, ["training"], 0, 0.2, ["pretrained_on"])
    held_out = []
    for folder in folders:
        with open(os.path.join(folder, "datalist.json")) as f:
            fold = json.load(f)
        cases = {side: {item["case"] for item in fold[side]} for side in ("training", "validation", "test")}
        assert {item["case"] for item in seen} <= cases["training"]
        assert not {item["case"] for item in seen} & (cases["validation"] | cases["test"])
        held_out += cases["test"]
    assert sorted(held_out) == sorted(item["case"] for item in items)
    datalist.write_text(json.dumps({"training": items, "pretrained_on": items[:2]}))
    with pytest.raises(ValueError, match="2 cases are both in the folded lists and in --fixed_training"):
        prepare_folds(str(datalist), str(tmp_path / "cv2"), 3, ["training"], 0, 0.2, ["pretrained_on"])


def test_a_finished_fold_of_an_earlier_version_is_read_back(tmp_path):
    (tmp_path / "result.json").write_text(json.dumps({"cases": [], "structures": {"LV": 0.9}, "n": 0, "mean": 0.0}))
    assert run_fold("unused", str(tmp_path), {}, {})["breakdown"] == {"LV": 0.9}  # no training, no evaluation


def test_two_runs_in_one_folder_are_refused(tmp_path):
    import fcntl

    from tools.crossval import crossval

    datalist = _blob_dataset(tmp_path / "data")
    (tmp_path / "cv").mkdir()
    with open(tmp_path / "cv" / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ValueError, match="another crossval run is using this folder"):
            crossval(os.path.join(BUNDLES, "dsb2018_litenext_segmentation"), str(datalist), 2, str(tmp_path / "cv"))
    assert not (tmp_path / "cv" / "folds.json").exists()


def _blob_dataset(root, n=8):
    items = []
    y, x = np.mgrid[:40, :48]
    for i in range(n):
        rng = np.random.default_rng(i)
        mask = ((y - 15 - i) ** 2 + (x - 20 - i) ** 2 < 64).astype(np.uint8)
        image = np.clip(rng.normal(90, 10, (40, 48, 3)) + mask[..., None] * 100, 0, 255).astype(np.uint8)
        for folder, array in (("images", image), ("masks", mask)):
            os.makedirs(root / folder, exist_ok=True)
            Image.fromarray(array).save(str(root / folder / f"c{i}.png"))
        items.append({"image": str(root / "images" / f"c{i}.png"), "label": str(root / "masks" / f"c{i}.png"),
                      "case": f"c{i}"})
    write_datalist(str(root / "datalist.json"), items[:6], items[6:7], items[7:])
    return root / "datalist.json"


def _crossval(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "crossval.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


def test_crossval_runs_a_bundle_writes_tables_and_resumes(tmp_path):
    import torch

    bundle = tmp_path / "dsb2018_litenext_segmentation"
    shutil.copytree(os.path.join(BUNDLES, "dsb2018_litenext_segmentation", "configs"), bundle / "configs")
    datalist = _blob_dataset(tmp_path / "data")
    out = tmp_path / "cv"
    args = [str(bundle), str(datalist), "--folds", "2", "--output", str(out), "--val_fraction", "0.2",
            "--image_size", "[32, 32]", "--use_serp", "false", "--train#trainer#max_epochs", "1", "--num_threads", "1",
            "--train#dataloader#batch_size", "2", "--parallel", "2"]  # the two folds side by side, as on 2 cores
    done = _crossval(*args)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    with open(out / "crossval_cases.csv") as f:
        cases = list(csv.DictReader(f))
    assert sorted(c["case"] for c in cases) == [f"c{i}.png" for i in range(7)]  # the test list (c7) stays out
    for k in (0, 1):
        fold = json.loads((out / f"fold_{k}" / "datalist.json").read_text())
        held_out = {os.path.basename(i["image"]) for i in fold["test"]}
        assert held_out == {c["case"] for c in cases if c["fold"] == str(k)}
        assert not held_out & {os.path.basename(i["image"]) for i in fold["training"] + fold["validation"]}
    summary = json.loads((out / "crossval.json").read_text())
    assert summary["cases"] == 7 and summary["finished_folds"] == 2
    assert summary["case_mean"] == pytest.approx(np.mean([float(c["metric"]) for c in cases]), abs=1e-4)
    assert "mean +- sd over cases" in (out / "crossval.md").read_text()

    stamp = os.path.getmtime(out / "fold_0" / "result.json")
    os.remove(out / "fold_1" / "result.json")  # fold 1 trained but not evaluated: only its evaluation reruns
    again = _crossval(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert os.path.getmtime(out / "fold_0" / "result.json") == stamp
    assert (out / "fold_1" / "crossval.log").read_text().count("run training") == 1
    assert json.loads((out / "crossval.json").read_text())["cases"] == 7

    other = _crossval(*args[:3], "3", *args[4:])  # another split into the same folder is refused
    assert other.returncode == 2 and "holds another split" in other.stderr

    scored = tmp_path / "scored"  # the same split, each fold scoring the weights its training chose: same results
    done = _crossval(*args[:5], str(scored), *args[6:], "--score_weights", str(out / "fold_{fold}/models/model.pt"))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    for k in (0, 1):
        assert "run training" not in (scored / f"fold_{k}" / "crossval.log").read_text()
        assert not (scored / f"fold_{k}" / "models" / "checkpoints").exists()
        trained, only_scored = (json.loads((d / f"fold_{k}" / "result.json").read_text()) for d in (out, scored))
        assert [(c["case"], round(c["metric"], 4)) for c in only_scored["cases"]] == \
            [(c["case"], round(c["metric"], 4)) for c in trained["cases"]]
        weights = [torch.load(d / f"fold_{k}" / "models" / "model.pt", weights_only=True) for d in (out, scored)]
        assert weights[0].keys() == weights[1].keys()
        assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def test_training_and_evaluation_get_the_options_their_configs_have(tmp_path):
    from tools.crossval import EVALUATION_CONFIGS, TRAINING_CONFIGS, crossval, overrides_for

    bundle = os.path.join(BUNDLES, "sunnybrook_litenext_segmentation")
    given = {"image_size": "[32, 32]", "learning_rate": 0.001, "train#trainer#max_epochs": 2,
             "inferer#rotations": False, "inferer#spatial_axes": "[3, 2]"}  # a new argument of an existing object
    assert overrides_for(bundle, TRAINING_CONFIGS, given) == {
        "image_size": "[32, 32]", "learning_rate": 0.001, "train#trainer#max_epochs": 2}
    assert overrides_for(bundle, EVALUATION_CONFIGS, given) == {
        "image_size": "[32, 32]", "learning_rate": 0.001, "inferer#rotations": False, "inferer#spatial_axes": "[3, 2]"}
    with pytest.raises(ValueError, match="--no_such_object#size: no such place"):
        crossval(bundle, str(tmp_path / "datalist.json"), output=str(tmp_path / "cv"), **{"no_such_object#size": 1})


def test_score_weights_takes_a_checkpoints_network_and_refuses_other_weights(tmp_path):
    import torch

    from tools.crossval import install_weights

    weights = {"conv.weight": torch.arange(6.0).reshape(2, 3)}
    torch.save({"model": weights, "optimizer": {"state": {}}}, tmp_path / "checkpoint_epoch=5.pt")
    install_weights(str(tmp_path / "checkpoint_epoch=5.pt"), str(tmp_path / "fold_0"))
    loaded = torch.load(tmp_path / "fold_0" / "models" / "model.pt", weights_only=True)
    assert list(loaded) == ["conv.weight"] and torch.equal(loaded["conv.weight"], weights["conv.weight"])
    install_weights(str(tmp_path / "checkpoint_epoch=5.pt"), str(tmp_path / "fold_0"))  # a rerun: kept
    torch.save(weights, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="already holds other weights"):
        install_weights(str(tmp_path / "model.pt"), str(tmp_path / "fold_0"))
    with pytest.raises(FileNotFoundError, match="missing.pt: --score_weights file not found"):
        install_weights(str(tmp_path / "missing.pt"), str(tmp_path / "fold_1"))
