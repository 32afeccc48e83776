"""2D image loading (networks.image_io, networks.transforms), grouped stratified splits (networks.data), class and
encoder weights (networks.training), classification metrics and the report handler (networks.classification)."""

import csv
import os
import re
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import make_photo
from networks.classification import ClassificationMetric, ClassificationReport, classification_metrics, roc_auc
from networks.data import grouped_stratified_split
from networks.image_io import find_images, read_image_rgb
from networks.training import class_weights
from networks.transforms import LoadImage2Dd

# ---------------------------------------------------------------------------------------------------------- metrics
BINARY_LABELS = [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
BINARY_P1 = [0.1, 0.4, 0.6, 0.2, 0.9, 0.8, 0.3, 0.7, 0.55, 0.65]


def test_binary_metrics_match_hand_computed_values():
    probs = np.stack([1 - np.asarray(BINARY_P1), BINARY_P1], 1)
    m = classification_metrics(BINARY_LABELS, probs)
    # predictions 0 0 1 0 | 1 1 0 1 1 1: TN 3, FP 1, FN 1, TP 5
    assert m["confusion_matrix"] == [[3, 1], [1, 5]]
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 5 / 6) / 2)
    assert m["f1_macro"] == pytest.approx((0.75 + 10 / 12) / 2)
    assert m["per_class"][1]["precision"] == pytest.approx(5 / 6)
    assert m["auc"] == pytest.approx(21 / 24)  # 21 of the 24 positive/negative pairs ranked right
    assert m["n"] == 10


def test_three_class_metrics_match_hand_computed_values():
    probs = [[.7, .2, .1], [.1, .6, .3], [.2, .3, .5], [.5, .3, .2]]
    m = classification_metrics([0, 1, 2, 2], probs)
    assert m["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [1, 0, 1]]
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["balanced_accuracy"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert m["f1_macro"] == pytest.approx((2 / 3 + 1 + 2 / 3) / 3)
    assert m["auc"] == pytest.approx((1 + 1 + 0.75) / 3)  # one-vs-rest, macro


def test_auc_ties_and_undefined_cases():
    assert roc_auc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == pytest.approx(0.5)
    assert roc_auc([0.2, 0.4, 0.4, 0.9], [0, 0, 1, 1]) == pytest.approx((0.5 + 1 + 1 + 1) / 4)
    assert np.isnan(roc_auc([0.1, 0.2], [1, 1]))
    with pytest.raises(ValueError, match="labels must lie"):
        classification_metrics([0, 3], [[0.5, 0.5], [0.5, 0.5]])


def test_ignite_metric_gathers_batches_like_the_function():
    metric = ClassificationMetric("auc", num_classes=2)
    probs = torch.tensor(np.stack([1 - np.asarray(BINARY_P1), BINARY_P1], 1), dtype=torch.float32)
    labels = torch.tensor(BINARY_LABELS)
    metric.reset()
    metric.update((list(probs[:4]), list(labels[:4])))  # decollated, as MONAI evaluators give
    metric.update((probs[4:], labels[4:]))  # or a batch tensor
    assert metric.compute() == pytest.approx(21 / 24)
    with pytest.raises(ValueError):
        ClassificationMetric("dice")


def test_class_weights_balance_the_classes():
    items = [{"label": 0}] * 6 + [{"label": 1}] * 2
    weights = class_weights(items, 2)
    assert weights.tolist() == pytest.approx([0.5, 1.5])  # inverse frequency (1:3), mean 1
    assert float((weights * torch.tensor([6.0, 2.0])).std()) < 1e-6  # each class contributes the same
    assert class_weights(items, 3).tolist()[2] == 0.0


# ----------------------------------------------------------------------------------------------------------- splits
def _grouped_items(seed=0):
    rng = np.random.default_rng(seed)
    items = []
    for g in range(40):
        label = int(g < 15)  # 15 groups of class 1, 25 of class 0
        for k in range(int(rng.integers(1, 5))):
            items.append({"image": f"g{g}_{k}.png", "label": label, "group": f"g{g}"})
    return items


def test_split_is_group_disjoint_stratified_and_seeded():
    items = _grouped_items()
    splits = grouped_stratified_split(items, (0.7, 0.15, 0.15), seed=0)
    assert sum(len(s) for s in splits) == len(items)
    groups = [{i["group"] for i in s} for s in splits]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    totals = Counter(i["label"] for i in items)
    for split, fraction in zip(splits, (0.7, 0.15, 0.15)):
        counts = Counter(i["label"] for i in split)
        for label in (0, 1):  # every class on every side, near its share (groups hold at most 4 images)
            assert abs(counts[label] - fraction * totals[label]) <= 4, (label, counts, fraction)
    assert grouped_stratified_split(items, (0.7, 0.15, 0.15), seed=0) == splits
    assert grouped_stratified_split(items, (0.7, 0.15, 0.15), seed=1) != splits
    assert [i["image"] for i in splits[0]] == [i["image"] for i in items if i in splits[0]]  # input order kept


def test_split_gives_every_side_each_class_when_groups_are_few():
    items = [{"image": f"{c}{g}", "label": c, "group": f"{c}{g}"} for c in (0, 1) for g in range(3)]
    splits = grouped_stratified_split(items, (0.7, 0.15, 0.15))
    assert [sorted(i["label"] for i in s) for s in splits] == [[0, 1], [0, 1], [0, 1]]


# ---------------------------------------------------------------------------------------------------------- loading
def _dicom(path, pixels, window=None):
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype(np.int16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return str(path)


def test_any_image_mode_loads_as_three_channels_in_unit_range(tmp_path):
    rgb = make_photo(tmp_path / "rgb.png", 1)
    paths = {"rgb": rgb, "grey": make_photo(tmp_path / "grey.jpg", 0, mode="L"),
             "rgba": make_photo(tmp_path / "rgba.png", 1, mode="RGBA"),
             "palette": make_photo(tmp_path / "palette.bmp", 0, mode="P"),
             "tiff": make_photo(tmp_path / "image.TIF", 1)}
    wide = (np.arange(48 * 40).reshape(48, 40) * 20).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / "sixteen.png")
    paths["sixteen"] = str(tmp_path / "sixteen.png")
    ct = np.tile(np.linspace(0, 2000, 40), (48, 1))
    paths["dicom"] = _dicom(tmp_path / "slice.dcm", ct)
    paths["dicom_no_suffix"] = _dicom(tmp_path / "IM0001", ct, window=(40, 400))
    for name, path in paths.items():
        array = read_image_rgb(path)
        assert array.shape == (48, 40, 3) and array.dtype == np.float32, name
        assert 0.0 <= array.min() and array.max() <= 1.0 and array.max() > 0.5, name
    np.testing.assert_allclose(read_image_rgb(rgb), np.asarray(Image.open(rgb), np.float32) / 255)
    grey = read_image_rgb(paths["grey"])
    assert (grey[..., 0] == grey[..., 2]).all()
    assert read_image_rgb(paths["sixteen"])[-1, -1, 0] == pytest.approx(1.0)  # 16-bit scaled by its own range
    windowed = read_image_rgb(paths["dicom_no_suffix"])[0, :, 0]  # HU -1024..976, window 40/400: -160..240 HU
    assert windowed[0] == 0.0 and windowed[-1] == 1.0 and 0.2 < windowed[20] < 0.6
    half = Image.new("RGBA", (40, 48), (255, 255, 255, 255))
    half.paste((255, 255, 255, 0), (0, 0, 20, 48))  # transparent left half: black, as air
    half.save(tmp_path / "alpha.png")
    alpha = read_image_rgb(str(tmp_path / "alpha.png"))
    assert alpha[:, :20].max() == 0.0 and alpha[:, 20:].min() == 1.0
    assert sorted(os.path.basename(p) for p in find_images(str(tmp_path))) == sorted(
        ["rgb.png", "grey.jpg", "rgba.png", "palette.bmp", "image.TIF", "sixteen.png", "slice.dcm", "IM0001",
         "alpha.png"])
    loaded = LoadImage2Dd("image")({"image": rgb, "label": 1})
    assert tuple(loaded["image"].shape) == (3, 48, 40) and loaded["image"].meta["filename_or_obj"] == rgb
    assert loaded["label"] == 1


def test_unreadable_images_fail_naming_the_file(tmp_path):
    good = make_photo(tmp_path / "good.jpg", 0)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(open(good, "rb").read()[:200])
    (tmp_path / "text.png").write_text("not an image")
    frames = [Image.new("L", (8, 8), v) for v in (0, 255)]
    frames[0].save(tmp_path / "stack.tif", save_all=True, append_images=frames[1:])
    for name, reason in (("truncated.jpg", "not a readable image"), ("text.png", "not a readable image"),
                         ("stack.tif", "frames")):
        with pytest.raises(ValueError, match=reason) as error:
            read_image_rgb(str(tmp_path / name))
        assert name in str(error.value)


# ----------------------------------------------------------------------------------------------------------- report
def test_report_writes_metrics_confusion_matrix_and_predictions(tmp_path):
    from monai.data import MetaTensor

    probs = np.stack([1 - np.asarray(BINARY_P1), BINARY_P1], 1)
    output = [{"pred": torch.tensor(p), "label": torch.tensor(t),
               "image": MetaTensor(torch.zeros(3, 4, 4), meta={"filename_or_obj": f"/data/img{i}.png"})}
              for i, (p, t) in enumerate(zip(probs, BINARY_LABELS))]
    report = ClassificationReport(str(tmp_path / "eval"), {"0": "others", "1": "monkeypox"}, "Test")
    engine = SimpleNamespace(state=SimpleNamespace(output=output[:6], metrics={}))
    report.collect(engine)
    engine.state.output = output[6:]
    report.collect(engine)
    report.write(engine)
    with open(tmp_path / "eval" / "metrics.csv") as f:
        metrics = {row["metric"]: row["value"] for row in csv.DictReader(f)}
    assert metrics["accuracy"] == "0.8000" and metrics["auc"] == "0.8750" and metrics["n"] == "10"
    assert metrics["recall_monkeypox"] == "0.8333" and metrics["support_others"] == "4"
    with open(tmp_path / "eval" / "confusion_matrix.csv") as f:
        assert list(csv.reader(f)) == [["true \\ predicted", "others", "monkeypox"], ["others", "3", "1"],
                                       ["monkeypox", "1", "5"]]
    with open(tmp_path / "eval" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image", "label", "prediction", "p_others", "p_monkeypox"]
    assert rows[2]["image"] == "/data/img2.png" and rows[2]["label"] == "others" and rows[2]["prediction"] == "monkeypox"
    picture = Image.open(tmp_path / "eval" / "confusion_matrix.png")
    assert picture.format == "PNG" and picture.width > 200
    assert engine.state.metrics["balanced_accuracy"] == pytest.approx((3 / 4 + 5 / 6) / 2)
    assert not [n for n in os.listdir(tmp_path / "eval") if n.startswith(".tmp_")]


def test_encoder_weights_from_a_grey_segmentation_checkpoint(tmp_path):
    """The encoder of a 1-channel LTMedNeXt segmentation checkpoint initialises a 3-channel classifier: on a grey image
    replicated to RGB the stem answers as the segmentation stem does; the head keeps its own initialisation; a
    checkpoint of another size or network is refused naming the file."""
    from networks import LTMedNeXt, LTMedNeXtClassifier
    from networks.training import with_encoder_weights

    torch.manual_seed(0)
    segmenter = LTMedNeXt(2, 1, 4, "T")
    path = tmp_path / "model.pt"
    torch.save({"model": segmenter.state_dict()}, path)
    classifier = LTMedNeXtClassifier(3, 2, "T")
    head = classifier.fc.weight.clone()
    assert with_encoder_weights(classifier, "") is classifier
    assert with_encoder_weights(classifier, str(path)) is classifier
    grey = torch.rand(1, 1, 64, 64)
    torch.testing.assert_close(classifier.encoder.stem[0](grey.expand(-1, 3, -1, -1)), segmenter.encoder.stem[0](grey))
    own, theirs = classifier.encoder.state_dict(), segmenter.encoder.state_dict()
    assert all(torch.equal(own[k], theirs[k]) for k in own if k != "stem.0.weight")
    assert torch.equal(classifier.fc.weight, head)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*do not fit"):
        with_encoder_weights(LTMedNeXtClassifier(3, 2, "S"), str(path))
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.pt: cannot read"):
        with_encoder_weights(classifier, str(tmp_path / "broken.pt"))
    from networks import LiteNeXt

    torch.save(LiteNeXt(3, 1).state_dict(), tmp_path / "litenext.pt")  # the ISIC bundle's network: no such encoder
    with pytest.raises(ValueError, match="litenext.pt: no encoder"):
        with_encoder_weights(classifier, str(tmp_path / "litenext.pt"))


def test_moved_names_still_resolve_from_networks_classification():
    """Configs written before networks.classification was split by concern name ``networks.classification.X`` as
    ``_target_``: they resolve to the new home with a DeprecationWarning; an unknown name is still an AttributeError."""
    import networks.classification as classification
    from monai.bundle import ConfigParser

    with pytest.warns(DeprecationWarning, match="networks.transforms.LoadImage2Dd"):
        config = ConfigParser({"t": {"_target_": "networks.classification.LoadImage2Dd", "keys": "image"}})
        loader = config.get_parsed_content("t")
    assert isinstance(loader, LoadImage2Dd)
    with pytest.warns(DeprecationWarning):
        assert classification.class_weights is class_weights
    with pytest.raises(AttributeError):
        classification.no_such_name
