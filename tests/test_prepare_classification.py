"""tools/prepare_classification.py: each original layout -> datalist.json with patient- or source-disjoint,
stratified training/validation/test lists (real samples where they exist here, synthetic layouts otherwise)."""

import csv
import json
import os
from collections import Counter

import numpy as np
import pytest

from helpers import make_photo, shared_data

from tools import prepare_classification as prep

from networks.data import load_datalist


def _lists(datalist_file):
    return {k: load_datalist(str(datalist_file), k) for k in ("training", "validation", "test")}


def _check_disjoint_and_stratified(lists, classes):
    groups = {k: {i["group"] for i in v} for k, v in lists.items()}
    assert not groups["training"] & groups["validation"]
    assert not groups["training"] & groups["test"]
    assert not groups["validation"] & groups["test"]
    total = sum(len(v) for v in lists.values())
    for name, fraction in (("training", 0.7), ("validation", 0.15), ("test", 0.15)):
        counts = Counter(i["label"] for i in lists[name])
        assert set(counts) == set(range(len(classes))), (name, counts)  # every class on every side
        assert abs(len(lists[name]) - fraction * total) <= 0.05 * total + 3, (name, len(lists[name]))
    for item in lists["training"]:
        assert os.path.isfile(item["image"]) and classes[item["label"]] == item["class_name"]


def test_monkeypox_real_sample_split_by_patient(tmp_path):
    src = shared_data("monkeypox")
    path = prep.monkeypox(src, str(tmp_path / "out"))
    lists = _lists(path)
    _check_disjoint_and_stratified(lists, ["others", "monkeypox"])
    items = [i for v in lists.values() for i in v]
    assert len(items) == 169 and Counter(i["class_name"] for i in items) == {"others": 93, "monkeypox": 76}
    by_name = {os.path.basename(i["image"]): i for i in items if "Monkey Pox" in i["image"]}
    assert by_name["P13_1.jpg"]["group"] == by_name["P13_2.jpg"]["group"] == "monkeypox/P13"
    sides = {k: {i["group"] for i in v} for k, v in lists.items()}
    assert sum("monkeypox/P7" in s for s in sides.values()) == 1  # all 4 images of P7 on one side
    with open(path) as f:
        stored = json.load(f)
    assert stored["classes"] == ["others", "monkeypox"] and not os.path.isabs(stored["training"][0]["image"])
    assert prep.monkeypox(src, str(tmp_path / "again")) and _lists(tmp_path / "again" / "datalist.json") == lists


def test_covid_ct_real_sample_split_by_source_paper(tmp_path):
    lists = _lists(prep.covid_ct(shared_data("covid_ct"), str(tmp_path / "out")))
    _check_disjoint_and_stratified(lists, ["non_covid", "covid"])
    items = [i for v in lists.values() for i in v]
    assert len(items) == 121
    groups = {i["group"] for i in items}
    assert len([g for g in groups if g.startswith("covid/")]) == 22  # source papers, as the sample notes count
    assert len([g for g in groups if g.startswith("non_covid/")]) == 53
    assert prep.ucsd_source("2020.03.04.20030395-p27-108%4.png", covid=True) == "2020.03.04.20030395"
    assert prep.ucsd_source("kjr-21-e24-p2-8.png", covid=True) == "kjr-21-e24"
    assert prep.ucsd_source("65%1.jpg", covid=False) == "65"


def test_sarscov2_runs_of_neighbouring_numbers_stay_together(tmp_path, capsys):
    src = tmp_path / "sarscov2"
    for i in range(60):
        make_photo(src / "COVID" / f"Covid ({i * 3 + 1}).png", 1, seed=i, mode="RGB" if i % 2 else "RGBA")
        make_photo(src / "non-COVID" / f"Non-Covid ({i * 3 + 2}).png", 0, seed=i, mode="RGBA")
    lists = _lists(prep.sarscov2(str(src), str(tmp_path / "out")))
    _check_disjoint_and_stratified(lists, ["non_covid", "covid"])
    groups = {i["group"] for v in lists.values() for i in v}
    assert groups == {f"{c}/run {n}" for c in ("covid", "non_covid") for n in range(9)}  # numbers 1-179, blocks of 20
    owner = {}
    for name, items in lists.items():
        for item in items:
            assert owner.setdefault(item["group"], name) == name
    assert "runs of 20 neighbouring image numbers" in capsys.readouterr().out
    assert prep.sarscov2_run("Covid (104).png", 20) == "run 5" and prep.sarscov2_run("x.png", 20) == "x.png"
    with pytest.raises(FileNotFoundError, match="non-COVID"):
        prep.sarscov2(str(src / "COVID"), str(tmp_path / "bad"))


def test_sarscov2_real_release_converts(tmp_path):
    path = prep.sarscov2(shared_data("sarscov2_ct"), str(tmp_path / "out"))
    with open(path) as f:
        datalist = json.load(f)
    assert sum(len(datalist[k]) for k in ("training", "validation", "test")) == 327
    sides = [{i["group"] for i in datalist[k]} for k in ("training", "validation", "test")]
    assert not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])


def test_covid19_ct_slices_published_layout_split_by_patient(tmp_path):
    """A small sample in the Large COVID-19 CT slice dataset's layout: curated_data/curated_data/{1NonCOVID,2COVID,
    3CAP}/ and meta_data_{normal,covid,cap}.csv mapping each file name to its patient."""
    src = tmp_path / "large-covid19-ct-slice-dataset"
    folders = {"normal": "1NonCOVID", "covid": "2COVID", "cap": "3CAP"}
    tables = {"normal": "meta_data_normal.csv", "covid": "meta_data_covid.csv", "cap": "meta_data_cap.csv"}
    patients = {}
    for label, (name, folder) in enumerate(folders.items()):
        rows = []
        for p in range(8):
            for s in range(1 + p % 3):  # 1-3 slices per patient
                file_name = f"{name}_patient{p}_IM{s:04d}.png"
                make_photo(src / "curated_data" / "curated_data" / folder / file_name, label % 2, seed=p, mode="L")
                rows.append({"File name": file_name, "Patient ID": f"{name}{p}", "Slice": s})
                patients[file_name] = f"patient/{name}{p}"
        with open(src / tables[name], "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["File name", "Patient ID", "Slice"])
            writer.writeheader()
            writer.writerows(rows[:-1] if name == "cap" else rows)  # one CAP slice missing from its table
    path = prep.covid19_ct_slices(str(src), str(tmp_path / "out"))
    lists = _lists(path)
    _check_disjoint_and_stratified(lists, ["normal", "covid", "cap"])
    items = [i for v in lists.values() for i in v]
    assert len(items) == 3 * 15  # 1, 2, 3, 1, 2, 3, 1, 2 slices for the 8 patients of each class
    unmatched = [i for i in items if i["group"] == f"cap/{os.path.basename(i['image'])}"]
    assert len(unmatched) == 1  # its own group, not silently merged
    for item in items:
        if item not in unmatched:
            assert item["group"] == patients[os.path.basename(item["image"])]
    os.remove(src / "meta_data_cap.csv")
    with pytest.raises(FileNotFoundError, match="meta_data_cap.csv"):
        prep.covid19_ct_slices(str(src), str(tmp_path / "bad"))


def test_pneumoniamnist_arrays_become_pngs(tmp_path):
    rng = np.random.default_rng(0)
    npz = tmp_path / "pneumoniamnist.npz"
    np.savez_compressed(npz, train_images=rng.integers(0, 255, (40, 28, 28), dtype=np.uint8),
                        train_labels=np.repeat([[0], [1]], 20, axis=0).astype(np.uint8))
    lists = _lists(prep.pneumoniamnist(str(npz), str(tmp_path / "out")))
    _check_disjoint_and_stratified(lists, ["normal", "pneumonia"])
    from PIL import Image

    first = lists["training"][0]
    assert Image.open(first["image"]).size == (28, 28) and first["image"].startswith(str(tmp_path / "out"))


def test_pneumoniamnist_real_sample(tmp_path):
    npz = shared_data("pneumoniamnist", "pneumoniamnist_balanced_train.npz")
    lists = _lists(prep.pneumoniamnist(npz, str(tmp_path / "out")))
    assert sum(len(v) for v in lists.values()) == 2428
    assert Counter(i["label"] for i in lists["test"])[0] == pytest.approx(182, abs=2)  # 15% of 1214 per class
