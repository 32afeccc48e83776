"""Write a MONAI datalist for the classification bundles from each dataset's original folder layout.

Every layout becomes the same thing: ``OUT_DIR/datalist.json`` with ``training``, ``validation`` and ``test`` lists of
``{"image": path, "label": class index, "class_name": ..., "group": patient or source}``, image paths relative to the
datalist (the images stay where they are; only pneumoniamnist, stored as arrays, is written out as PNG), plus
``classes`` (names in index order), ``grouping`` and the split settings. The split keeps each group (patient, or
source paper when no patient id exists) on one side and each class in the same proportions on every side
(``networks.data.grouped_stratified_split``; fixed ``seed``). Layouts:

* ``monkeypox``: Monkeypox Skin Lesion Dataset, ``Monkey Pox/`` and ``Others/`` folders of JPGs; patient = the file
  name before ``_`` (``P13_2.jpg`` -> P13). Classes: 0 others (chickenpox, measles), 1 monkeypox.
* ``covid_ct``: UCSD COVID-CT, ``CT_COVID/`` and ``CT_NonCOVID/`` (directly or under ``Images-processed/``); group =
  the source paper (COVID: the name before ``-p<page>`` or ``%``) or source group (non-COVID: the name before
  ``%``). Classes: 0 non_covid, 1 covid.
* ``sarscov2``: SARS-CoV-2 CT-scan dataset (Soares et al.), ``COVID/Covid (N).png`` and ``non-COVID/Non-Covid
  (N).png``. It has no patient id; neighbouring numbers are likely one patient, so runs of ``--block`` (20)
  neighbouring numbers form a group, a stand-in for patients. Images are RGB or RGBA: the loader turns every one
  into the same RGB (opaque alpha dropped), so the colour mode carries no label. Classes: 0 non_covid, 1 covid.
* ``covid19_ct_slices``: Large COVID-19 CT scan slice dataset (Maftouni et al.), ``curated_data/curated_data/``
  with ``1NonCOVID/``, ``2COVID/``, ``3CAP/`` and the ``meta_data_normal.csv``, ``meta_data_covid.csv``,
  ``meta_data_cap.csv`` tables (``File name``, ``Patient ID``); group = the patient id (an image missing from the
  tables is its own group, and counted in the report). Classes: 0 normal, 1 covid, 2 cap.
* ``pneumoniamnist``: a PneumoniaMNIST ``.npz`` (``train_images``/``train_labels``, or ``images``/``labels``),
  written as PNGs under ``OUT_DIR/images/``; no patient id (one group per image). Classes: 0 normal, 1 pneumonia.

Examples::

    python tools/prepare_classification.py monkeypox ../shared/data/monkeypox data/monkeypox
    python tools/prepare_classification.py covid_ct ../shared/data/covid_ct data/covid_ct
    python tools/prepare_classification.py sarscov2 /data/sarscov2-ctscan-dataset data/sarscov2
    python tools/prepare_classification.py covid19_ct_slices /data/large-covid19-ct-slice-dataset data/covid19_ct_slices
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections import Counter

import fire

from networks.data import grouped_stratified_split
from networks.image_io import find_images
from networks.data import write_datalist

FRACTIONS = (0.7, 0.15, 0.15)  # training, validation, test
SEED = 0
SPLITS = ("training", "validation", "test")
log = logging.getLogger("prepare_classification")


def _class_folder(src: str, names: tuple[str, ...], parents: tuple[str, ...] = ("",)) -> str:
    """The first of ``names`` found directly under ``src`` or under one of ``parents`` (case-insensitive)."""
    for parent in parents:
        folder = os.path.join(src, parent) if parent else src
        if not os.path.isdir(folder):
            continue
        entries = {e.lower(): e for e in os.listdir(folder)}
        for name in names:
            if name.lower() in entries and os.path.isdir(os.path.join(folder, entries[name.lower()])):
                return os.path.join(folder, entries[name.lower()])
    where = " or ".join(os.path.join(src, p) if p else src for p in parents)
    raise FileNotFoundError(f"{where}: no folder named {' or '.join(names)} (is this the right layout?).")


def _items(folder: str, label: int, class_name: str, group) -> list[dict]:
    images = find_images(folder)
    if not images:
        raise FileNotFoundError(f"{folder}: no images found.")
    return [{"image": os.path.abspath(p), "label": label, "class_name": class_name, "group": group(p)} for p in images]


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _write(out_dir: str, items: list[dict], classes: list[str], dataset: str, grouping: str,
           fractions=FRACTIONS, seed: int = SEED) -> str:
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3:
        raise ValueError(f"fractions are training, validation, test: three numbers, got {list(fractions)}.")
    splits = grouped_stratified_split(items, fractions, seed)
    path = os.path.join(out_dir, "datalist.json")
    write_datalist(path, *splits, dataset=dataset, classes=classes, grouping=grouping, fractions=list(fractions),
                   seed=seed)
    for name, split in zip(SPLITS, splits):
        counts = Counter(item["class_name"] for item in split)
        print(f"{name}: {len(split)} images, {len({i['group'] for i in split})} groups "
              f"({', '.join(f'{c} {counts[c]}' for c in classes)})")
    return path


def monkeypox(src: str, out_dir: str, fractions=FRACTIONS, seed: int = SEED) -> str:
    """Monkeypox Skin Lesion Dataset: ``SRC/Monkey Pox/*.jpg`` and ``SRC/Others/*.jpg`` (or under ``Original
    Images/``); the patient is the file name's part before ``_``."""
    parents = ("", "Original Images", "Original_Images")
    items = []
    for label, (class_name, folder_names) in enumerate((("others", ("Others",)),
                                                        ("monkeypox", ("Monkey Pox", "Monkey_Pox", "Monkeypox")))):
        folder = _class_folder(src, folder_names, parents)
        items += _items(folder, label, class_name, lambda p, c=class_name: f"{c}/{_stem(p).split('_')[0]}")
    return _write(out_dir, items, ["others", "monkeypox"], "Monkeypox Skin Lesion Dataset",
                  "patient: the file name before '_' (per class folder)", fractions, seed)


def ucsd_source(name: str, covid: bool) -> str:
    """UCSD COVID-CT source of a file name: COVID, the paper id before ``-p<page>`` or ``%``; non-COVID, the name
    before ``%``."""
    stem = os.path.splitext(os.path.basename(name))[0]
    return re.split(r"-p\d+|%" if covid else r"%", stem, maxsplit=1)[0]


def covid_ct(src: str, out_dir: str, fractions=FRACTIONS, seed: int = SEED) -> str:
    """UCSD COVID-CT: ``SRC/CT_COVID`` and ``SRC/CT_NonCOVID`` (or under ``Images-processed/``); grouped by source
    paper (COVID) or source group (non-COVID), as described in the dataset's sample notes."""
    parents = ("", "Images-processed")
    items = []
    for label, (class_name, folder_name) in enumerate((("non_covid", "CT_NonCOVID"), ("covid", "CT_COVID"))):
        folder = _class_folder(src, (folder_name,), parents)
        items += _items(folder, label, class_name,
                        lambda p, c=class_name: f"{c}/{ucsd_source(p, covid=c == 'covid')}")
    return _write(out_dir, items, ["non_covid", "covid"], "UCSD COVID-CT",
                  "source: COVID paper id (name before '-p<page>' or '%'), non-COVID source group (name before '%')",
                  fractions, seed)


def sarscov2_run(path: str, block: int) -> str:
    """The stand-in patient of ``Covid (N).png`` / ``Non-Covid (N).png``: its block of ``block`` neighbouring numbers
    (N // block), per class; a name without a number is its own group."""
    number = re.search(r"\((\d+)\)", os.path.basename(path))
    return f"run {int(number.group(1)) // block}" if number else os.path.basename(path)


def sarscov2(src: str, out_dir: str, fractions=FRACTIONS, seed: int = SEED, block: int = 20) -> str:
    """SARS-CoV-2 CT-scan dataset: ``SRC/COVID/*.png`` and ``SRC/non-COVID/*.png``. The release publishes no patient
    id; neighbouring numbers are likely slices of one patient, so runs of ``block`` neighbouring numbers stay on one
    side of the split (a stand-in for patients, not a guarantee)."""
    items = []
    for label, (class_name, names) in enumerate((("non_covid", ("non-COVID", "non_COVID", "NonCOVID")),
                                                 ("covid", ("COVID",)))):
        folder = _class_folder(src, names)
        items += _items(folder, label, class_name, lambda p, c=class_name: f"{c}/{sarscov2_run(p, int(block))}")
    print(f"note: no patient id in this dataset; runs of {block} neighbouring image numbers stay together instead.")
    return _write(out_dir, items, ["non_covid", "covid"], "SARS-CoV-2 CT-scan dataset",
                  f"stand-in for patients: runs of {block} neighbouring image numbers per class (N // {block}); the "
                  "release has no patient id", fractions, seed)


COVID19_SLICES = (("normal", "1NonCOVID", "meta_data_normal.csv"), ("covid", "2COVID", "meta_data_covid.csv"),
                  ("cap", "3CAP", "meta_data_cap.csv"))


def _patients(tables: list[str]) -> dict[str, str]:
    """File name -> patient id from the dataset's metadata tables."""
    patients = {}
    for table in tables:
        with open(table, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not {"File name", "Patient ID"} <= set(reader.fieldnames or ()):
                raise ValueError(f"{table}: expected the columns 'File name' and 'Patient ID', found "
                                 f"{reader.fieldnames}.")
            for row in reader:
                if row["File name"] and row["Patient ID"]:
                    patients[row["File name"].strip()] = row["Patient ID"].strip()
    return patients


def covid19_ct_slices(src: str, out_dir: str, fractions=FRACTIONS, seed: int = SEED) -> str:
    """Large COVID-19 CT scan slice dataset: ``SRC/curated_data/curated_data/{1NonCOVID,2COVID,3CAP}/*.png`` and
    ``SRC/meta_data_{normal,covid,cap}.csv``; grouped by the tables' ``Patient ID``."""
    parents = ("curated_data/curated_data", "curated_data", "")
    tables = []
    for _, _, table in COVID19_SLICES:
        found = [os.path.join(src, p, table) for p in ("", "curated_data", "curated_data/curated_data")
                 if os.path.isfile(os.path.join(src, p, table))]
        if not found:
            raise FileNotFoundError(f"{src}: metadata table {table} not found (it gives each image's patient).")
        tables.append(found[0])
    patients = _patients(tables)
    unmatched = Counter()
    items = []
    for label, (class_name, folder_name, _) in enumerate(COVID19_SLICES):
        folder = _class_folder(src, (folder_name,), parents)

        def group(path: str, c: str = class_name) -> str:
            name = os.path.basename(path)
            if name in patients:
                return f"patient/{patients[name]}"
            unmatched[c] += 1
            return f"{c}/{name}"

        items += _items(folder, label, class_name, group)
    if unmatched:
        log.warning("%d images are not in the metadata tables (%s); each is its own group.", sum(unmatched.values()),
                    ", ".join(f"{c} {n}" for c, n in unmatched.items()))
        print(f"note: {sum(unmatched.values())} images without a patient id in the tables; one group each.")
    return _write(out_dir, items, [c for c, _, _ in COVID19_SLICES], "Large COVID-19 CT scan slice dataset",
                  "patient: 'Patient ID' of meta_data_{normal,covid,cap}.csv", fractions, seed)


def pneumoniamnist(npz: str, out_dir: str, fractions=FRACTIONS, seed: int = SEED) -> str:
    """PneumoniaMNIST arrays (``train_images``/``train_labels`` or ``images``/``labels``) written as PNGs under
    ``OUT_DIR/images/<class>/``; no patient id, one group per image."""
    import numpy as np
    from PIL import Image

    classes = ["normal", "pneumonia"]
    with np.load(npz) as data:
        key = "train" if "train_images" in data else ""
        images = data[f"{key}_images" if key else "images"]
        labels = data[f"{key}_labels" if key else "labels"].reshape(-1).astype(int)
    items = []
    for i, (image, label) in enumerate(zip(images, labels)):
        path = os.path.join(out_dir, "images", classes[label], f"{i:05d}.png")
        if not os.path.isfile(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = os.path.join(os.path.dirname(path), f".tmp_{i:05d}.png")
            Image.fromarray(np.asarray(image, dtype=np.uint8)).save(tmp)
            os.replace(tmp, path)
        items.append({"image": os.path.abspath(path), "label": int(label), "class_name": classes[label],
                      "group": f"{classes[label]}/{i:05d}"})
    return _write(out_dir, items, classes, "PneumoniaMNIST", "none: no patient id; one group per image", fractions,
                  seed)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    fire.Fire({"monkeypox": monkeypox, "covid_ct": covid_ct, "sarscov2": sarscov2,
               "covid19_ct_slices": covid19_ct_slices, "pneumoniamnist": pneumoniamnist})
