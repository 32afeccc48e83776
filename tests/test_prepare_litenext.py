"""tools/prepare_litenext.py: each dataset's original layout (synthetic here, real PH2/DSB2018 where present) becomes
images/ + 0/1 masks/ + a seeded datalist; bad pairs are reported by name and skipped."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from helpers import shared_data

from tools.prepare_litenext import Pair, contour_mask, convert, main, prepare


def _disc(shape, center, radius):
    y, x = np.mgrid[: shape[0], : shape[1]]
    return (y - center[0]) ** 2 + (x - center[1]) ** 2 < radius**2


def _save(array, path, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)


def _rgb(shape, seed):
    return np.random.default_rng(seed).integers(0, 255, (*shape, 3), dtype=np.uint8)


def _read(path):
    return np.asarray(Image.open(path))


def _lists(datalist):
    return {k: datalist[k] for k in ("training", "validation", "test")}


def _all_items(datalist):
    return [item for items in _lists(datalist).values() for item in items]


def test_dsb2018_stage1_nucleus_masks_are_merged(tmp_path):
    src = tmp_path / "stage1_train"
    shape = (40, 48)
    expected = {}
    for i in range(5):
        case = f"{i:04x}deadbeef"
        _save(np.dstack([_rgb(shape, i), np.full(shape, 255, np.uint8)]), str(src / case / "images" / f"{case}.png"))
        union = np.zeros(shape, bool)
        for j, (cy, cx) in enumerate([(10, 10), (25, 30), (30, 8)][: 1 + i % 3]):
            nucleus = _disc(shape, (cy, cx), 5)
            union |= nucleus
            _save(nucleus.astype(np.uint8) * 255, str(src / case / "masks" / f"nucleus{j}.png"))
        expected[case] = union
    datalist = prepare("dsb2018", str(src), str(tmp_path / "out"), seed=7)
    items = _all_items(datalist)
    assert sorted(i["case"] for i in items) == sorted(expected)
    for item in items:
        mask = _read(tmp_path / "out" / item["label"])
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
        np.testing.assert_array_equal(mask.astype(bool), expected[item["case"]])
        image = _read(tmp_path / "out" / item["image"])
        assert image.shape == (*shape, 3)  # RGBA -> RGB
    assert datalist["split_seed"] == 7


def test_dsb2018_96px_layout_thresholds_the_resized_masks(tmp_path):
    src = tmp_path / "dsb2018_96"
    mask = np.zeros((96, 96), np.uint8)
    mask[10:20, 10:20] = 255
    mask[20, 10:20] = 100  # an interpolated edge: background at threshold 127
    for i in range(3):
        _save(_rgb((96, 96), i), str(src / "images" / f"c{i}.png"))
        _save(mask, str(src / "masks" / "0" / f"c{i}.png"))
    datalist = prepare("dsb2018", str(src), str(tmp_path / "out"))
    for item in _all_items(datalist):
        out = _read(tmp_path / "out" / item["label"])
        assert out.sum() == 100 and out[20, 15] == 0


def test_dsb2018_real_sample_layout(tmp_path):
    src = shared_data("dsb2018")
    # the shared copy has masks/<id>.png; the converter also finds masks/0/<id>.png (tested above)
    sub = tmp_path / "sub"
    names = sorted(os.listdir(os.path.join(src, "images")))[:6]
    for name in names:
        for kind in ("images", "masks"):
            os.makedirs(sub / kind, exist_ok=True)
            os.symlink(os.path.join(src, kind, name), sub / kind / name)
    datalist = prepare("dsb2018", str(sub), str(tmp_path / "out"))
    items = _all_items(datalist)
    assert len(items) == 6
    mask = _read(tmp_path / "out" / items[0]["label"])
    original = _read(os.path.join(src, "masks", items[0]["case"] + ".png"))
    np.testing.assert_array_equal(mask, (original > 127.5).astype(np.uint8))


def test_glas_instances_become_binary_and_test_sets_stay_test(tmp_path):
    src = tmp_path / "Warwick QU Dataset (Released 2016_07_08)"
    shape = (30, 40)
    anno = np.zeros(shape, np.uint8)
    anno[2:10, 2:10] = 1
    anno[15:25, 20:35] = 7  # instance ids, not 0/255
    for prefix, count in (("train", 6), ("testA", 2), ("testB", 1)):
        for i in range(1, count + 1):
            _save(_rgb(shape, i), str(src / f"{prefix}_{i}.bmp"))
            _save(anno, str(src / f"{prefix}_{i}_anno.bmp"))
    datalist = prepare("glas", str(src), str(tmp_path / "out"))
    assert sorted(i["case"] for i in datalist["test"]) == ["testA_1", "testA_2", "testB_1"]
    assert len(datalist["training"]) + len(datalist["validation"]) == 6 and datalist["validation"]
    mask = _read(tmp_path / "out" / datalist["test"][0]["label"])
    np.testing.assert_array_equal(mask, (anno > 0).astype(np.uint8))


def test_glas_png_copy_with_binary_masks_and_patients_from_grade_csv(tmp_path):
    """The copy found here: images/<name>.png + labels/<name>.png ({0, 255}), Grade.csv naming each image's patient;
    GlaS's split names are kept, test sets stay test, and training/validation never share a patient."""
    src = tmp_path / "glas"
    shape = (30, 40)
    mask = np.zeros(shape, np.uint8)
    mask[5:15, 8:30] = 255
    rows = ["name,patient ID,grade (GlaS), grade (Sirinukunwattana et al. 2015)"]
    for i in range(1, 9):
        _save(_rgb(shape, i), str(src / "images" / f"train_{i}.png"))
        _save(mask, str(src / "labels" / f"train_{i}.png"))
        rows.append(f"train_{i},{(i + 1) // 2}, benign, healthy")
    _save(_rgb(shape, 20), str(src / "images" / "testB_3.png"))
    _save(mask, str(src / "labels" / "testB_3.png"))
    rows.append("testB_3,2, malignant, adenomatous")
    (src / "Grade.csv").write_text("\n".join(rows) + "\n")
    datalist = prepare("glas", str(src), str(tmp_path / "out"))
    assert [(i["case"], i["split"], i["group"]) for i in datalist["test"]] == [("testB_3", "testB", "patient_2")]
    training, validation = datalist["training"], datalist["validation"]
    assert len(training) + len(validation) == 8 and validation
    assert not {i["group"] for i in training} & {i["group"] for i in validation}
    assert {i["split"] for i in training + validation} == {"train"}
    np.testing.assert_array_equal(_read(tmp_path / "out" / training[0]["label"]), (mask > 0).astype(np.uint8))


def test_glas_real_copy_converts(tmp_path):
    datalist = prepare("glas", shared_data("glas"), str(tmp_path / "out"))
    assert len(datalist["test"]) == 7 and {i["split"] for i in datalist["test"]} == {"testB"}
    assert len(datalist["training"]) + len(datalist["validation"]) == 24 and not datalist["failed"]
    assert all(i.get("group", "").startswith("patient_") for i in datalist["training"] + datalist["validation"])
    mask = _read(tmp_path / "out" / datalist["test"][0]["label"])
    assert set(np.unique(mask)) == {0, 1} and 0.05 < mask.mean() < 0.95


def test_isic2018_task1_layout(tmp_path):
    src = tmp_path / "isic"
    for i in range(4):
        case = f"ISIC_{i:07d}"
        _save(_rgb((32, 40), i), str(src / "ISIC2018_Task1-2_Training_Input" / f"{case}.jpg"))
        _save(_disc((32, 40), (16, 20), 6 + i).astype(np.uint8) * 255,
              str(src / "ISIC2018_Task1_Training_GroundTruth" / f"{case}_segmentation.png"))
    datalist = prepare("isic2018", str(src), str(tmp_path / "out"), fractions=(0.5, 0.25, 0.25))
    items = _all_items(datalist)
    assert len(items) == 4 and all(len(v) >= 1 for v in _lists(datalist).values())
    for item in items:
        radius = 6 + int(item["case"][-1])
        np.testing.assert_array_equal(_read(tmp_path / "out" / item["label"]),
                                      _disc((32, 40), (16, 20), radius).astype(np.uint8))


def _ph2_case(root, case, seed, mask):
    _save(_rgb(mask.shape, seed), str(root / case / f"{case}_Dermoscopic_Image" / f"{case}.bmp"))
    _save(mask.astype(bool), str(root / case / f"{case}_lesion" / f"{case}_lesion.bmp"), mode=None)


def test_ph2_layout_is_stratified_by_diagnosis(tmp_path):
    src = tmp_path / "PH2 Dataset images"
    mask = _disc((30, 36), (15, 18), 8)
    lines = ["Name\tClinical Diagnosis\tAsymmetry"]
    for i in range(12):
        case = f"IMD{i:03d}"
        _ph2_case(src, case, i, mask)
        lines.append(f"{case}\t{i % 3}\t0")
    (src / "PH2_diagnosis_subset.tsv").write_text("\n".join(lines) + "\n")
    datalist = prepare("ph2", str(src), str(tmp_path / "out"), fractions=(0.5, 0.25, 0.25))
    for items in _lists(datalist).values():
        assert sorted({i["stratum"] for i in items}) == [0, 1, 2]  # every diagnosis on every side
    item = datalist["training"][0]
    np.testing.assert_array_equal(_read(tmp_path / "out" / item["label"]), mask.astype(np.uint8))


def test_ph2_real_cases_and_the_split_seed(tmp_path):
    src = shared_data("ph2")
    sub = tmp_path / "ph2"
    sub.mkdir()
    for case in ("IMD003", "IMD016", "IMD047"):
        os.symlink(os.path.join(src, case), sub / case)
    datalist = prepare("ph2", str(sub), str(tmp_path / "out"), fractions=(1, 0, 0))
    assert sorted(i["case"] for i in datalist["training"]) == ["IMD003", "IMD016", "IMD047"]
    original = np.asarray(Image.open(os.path.join(src, "IMD003", "IMD003_lesion", "IMD003_lesion.bmp")).convert("L"))
    mask = _read(tmp_path / "out" / "masks" / "IMD003.png")
    np.testing.assert_array_equal(mask, (original > 127).astype(np.uint8))
    assert 0.02 < mask.mean() < 0.98


def test_split_is_reproducible_from_its_seed(tmp_path):
    src = tmp_path / "isic"
    for i in range(20):
        _save(_rgb((8, 8), i), str(src / f"ISIC_{i:07d}.jpg"))
        _save(np.full((8, 8), 255, np.uint8), str(src / f"ISIC_{i:07d}_segmentation.png"))
    cases = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        datalist = prepare("isic2018", str(src), str(tmp_path / name), seed=seed)
        cases[name] = [i["case"] for i in datalist["test"]]
    assert cases["a"] == cases["b"] != cases["c"]


def _dicom(path, pixels):
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "MR", "SC-HF-I-01"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pydicom.dcmwrite(str(path), ds, enforce_file_format=True)


def test_sunnybrook_contours_become_masks(tmp_path):
    src = tmp_path / "sunnybrook"
    shape = (64, 64)
    square = [(20.0, 20.0), (40.0, 20.0), (40.0, 40.0), (20.0, 40.0)]
    for patient in ("SC-HF-I-01", "SC-N-02"):
        for n in (20, 40):
            image_name = f"IM-0001-{n:04d}"
            _dicom(src / "images" / patient / "DICOM" / f"{image_name}.dcm",
                   np.random.default_rng(n).integers(0, 4000, shape))
            contours = src / "contours" / patient / "contours-manual" / "IRCCI-expert"
            contours.mkdir(parents=True, exist_ok=True)
            (contours / f"{image_name}-icontour-manual.txt").write_text(
                "\n".join(f"{x:.2f} {y:.2f}" for x, y in square) + "\n")
            (contours / f"{image_name}-ocontour-manual.txt").write_text(
                "\n".join(f"{x:.2f} {y:.2f}" for x, y in [(10, 10), (50, 10), (50, 50), (10, 50)]) + "\n")
    inner = prepare("sunnybrook", str(src), str(tmp_path / "i"), fractions=(0.5, 0.5, 0))
    outer = prepare("sunnybrook", str(src), str(tmp_path / "o"), fractions=(0.5, 0.5, 0), contour="o")
    items = _all_items(inner)
    assert sorted(i["case"] for i in items) == ["SC-HF-I-01_IM-0001-0020", "SC-HF-I-01_IM-0001-0040",
                                                 "SC-N-02_IM-0001-0020", "SC-N-02_IM-0001-0040"]
    for datalist in (inner, outer):  # a patient's images stay together
        assert len({i["group"] for i in datalist["training"]} & {i["group"] for i in datalist["validation"]}) == 0
    mask = _read(tmp_path / "i" / "masks" / "SC-N-02_IM-0001-0020.png")
    assert mask.shape == shape and mask[30, 30] == 1 and mask[5, 5] == 0 and 400 <= mask.sum() <= 450
    assert _read(tmp_path / "o" / "masks" / "SC-N-02_IM-0001-0020.png").sum() > 1600
    image = _read(tmp_path / "i" / "images" / "SC-N-02_IM-0001-0020.png")
    assert image.shape == (*shape, 3) and np.array_equal(image[..., 0], image[..., 2])  # grey replicated


def test_sunnybrook_repackaged_layout(tmp_path):
    """link.csv + dicoms/<patient_id>/<frame>.dcm + contourfiles/<original_id>/{i,o}-contours/: contour NNNN goes
    with frame int(NNNN); the patient is the original id; i-contours by default, o-contours with contour='o'."""
    src = tmp_path / "final_data"
    shape = (64, 64)
    square = [(20.0, 20.0), (40.0, 20.0), (40.0, 40.0), (20.0, 40.0)]
    links = {"SCD0000101": "SC-HF-I-1", "SCD0000301": "SC-HF-I-4"}
    (src).mkdir(parents=True)
    (src / "link.csv").write_text("patient_id,original_id\n" + "".join(f"{k},{v}\n" for k, v in links.items()))
    for patient, original in links.items():
        for frame in (7, 48):
            image = np.zeros(shape, np.int64)
            (image[21:40, 21:40] if frame == 48 else image[2:12, 2:12])[...] = 3000  # which frame is which
            _dicom(src / "dicoms" / patient / f"{frame}.dcm", image)
            for kind, points in (("i", square), ("o", [(10, 10), (50, 10), (50, 50), (10, 50)])):
                folder = src / "contourfiles" / original / f"{kind}-contours"
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"IM-0001-{frame:04d}-{kind}contour-manual.txt").write_text(
                    "\n".join(f"{x:.2f} {y:.2f}" for x, y in points) + "\n")
    (src / "dicoms" / "SCD0000301" / "48.dcm").unlink()  # a contour without its frame is reported and skipped
    inner = prepare("sunnybrook", str(src), str(tmp_path / "i"), fractions=(0.5, 0.5, 0))
    outer = prepare("sunnybrook", str(src), str(tmp_path / "o"), fractions=(0.5, 0.5, 0), contour="o")
    items = _all_items(inner)
    assert [i["case"] for i in _all_items(outer)] == [i["case"] for i in items]
    assert sorted(i["case"] for i in items) == ["SC-HF-I-1_IM-0001-0007", "SC-HF-I-1_IM-0001-0048",
                                                 "SC-HF-I-4_IM-0001-0007"]
    assert {i["group"] for i in items} == {"SC-HF-I-1", "SC-HF-I-4"}
    assert not {i["group"] for i in inner["training"]} & {i["group"] for i in inner["validation"]}
    image = _read(tmp_path / "i" / "images" / "SC-HF-I-1_IM-0001-0048.png")
    assert image[30, 30, 0] == 255 and _read(tmp_path / "i" / "images" / "SC-HF-I-1_IM-0001-0007.png")[30, 30, 0] == 0
    mask = _read(tmp_path / "i" / "masks" / "SC-HF-I-1_IM-0001-0048.png")
    assert mask[30, 30] == 1 and mask[5, 5] == 0 and 400 <= mask.sum() <= 450
    assert _read(tmp_path / "o" / "masks" / "SC-HF-I-1_IM-0001-0048.png").sum() > 1600


def test_sunnybrook_real_repackaging_converts(tmp_path):
    datalist = prepare("sunnybrook", shared_data("sunnybrook"), str(tmp_path / "out"))
    items = _all_items(datalist)
    assert len(items) == 78 and not datalist["failed"]
    assert {i["group"] for i in items} == {"SC-HF-I-1", "SC-HF-I-4", "SC-HF-I-5", "SC-HF-I-6"}
    sides = [{i["group"] for i in datalist[k]} for k in ("training", "validation", "test")]
    assert not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])
    item = items[0]
    mask, image = _read(tmp_path / "out" / item["label"]), _read(tmp_path / "out" / item["image"]).mean(-1)
    assert image[mask > 0].mean() > 1.5 * image.mean()  # the LV cavity is the bright blood pool


def test_contour_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "IM-0001-0001-icontour-manual.txt"
    bad.write_text("1 2\n")
    with pytest.raises(ValueError, match="IM-0001-0001-icontour-manual.txt"):
        contour_mask(str(bad), (8, 8))


def test_lung_xray_left_and_right_masks_are_joined(tmp_path):
    src = tmp_path / "lung"
    shape = (40, 50)
    left, right = _disc(shape, (20, 14), 8), _disc(shape, (20, 36), 8)
    for i in range(4):  # Montgomery
        name = f"MCUCXR_{i:04d}_{i % 2}.png"
        image = np.random.default_rng(i).integers(0, 255, shape, dtype=np.uint8)
        _save(image, str(src / "MontgomerySet" / "CXR_png" / name))
        _save(left.astype(np.uint8) * 255, str(src / "MontgomerySet" / "ManualMask" / "leftMask" / name))
        _save(right.astype(np.uint8) * 255, str(src / "MontgomerySet" / "ManualMask" / "rightMask" / name))
    for i in range(4):  # Shenzhen
        name = f"CHNCXR_{i:04d}_{i % 2}"
        image = np.random.default_rng(10 + i).integers(0, 255, shape, dtype=np.uint8)
        _save(image, str(src / "ChinaSet" / "CXR_png" / f"{name}.png"))
        _save((left | right).astype(np.uint8) * 255, str(src / "ChinaSet" / "mask" / f"{name}_mask.png"))
    datalist = prepare("lungxray", str(src), str(tmp_path / "out"), fractions=(0.5, 0.25, 0.25))
    items = _all_items(datalist)
    assert len(items) == 8 and {i["stratum"] for i in items} == {0, 1}
    for item in items:
        np.testing.assert_array_equal(_read(tmp_path / "out" / item["label"]), (left | right).astype(np.uint8))


def test_bad_pairs_are_reported_and_skipped(tmp_path, capsys):
    src = tmp_path / "isic"
    for i in range(4):
        _save(_rgb((16, 16), i), str(src / f"ISIC_{i:07d}.jpg"))
        if i != 3:
            _save(np.full((16, 16), 255, np.uint8), str(src / f"ISIC_{i:07d}_segmentation.png"))
    (src / "ISIC_0000001.jpg").write_bytes(b"not a jpeg")
    (src / "ISIC_0000002_segmentation.png").write_bytes(b"not a png")
    datalist = prepare("isic2018", str(src), str(tmp_path / "out"), fractions=(1, 0, 0))
    assert [i["case"] for i in datalist["training"]] == ["ISIC_0000000"]
    failed = {f["case"]: f["message"] for f in datalist["failed"]}
    assert "ISIC_0000001.jpg: not a readable image" in failed["ISIC_0000001"]
    assert "ISIC_0000002_segmentation.png: not a readable mask" in failed["ISIC_0000002"]
    assert "no mask file" in failed["ISIC_0000003"]
    assert not [n for n in os.listdir(tmp_path / "out" / "images") if n.startswith(".tmp_")]
    with pytest.raises(SystemExit) as exit_info:  # the command line exits 1 when a pair was skipped
        main("isic2018", str(src), str(tmp_path / "cli"), fractions="1,0,0")
    assert exit_info.value.code == 1
    with open(tmp_path / "cli" / "datalist.json") as f:
        assert len(json.load(f)["failed"]) == 3


def test_isic2017_layout_masks_at_another_size_are_resized_nearest(tmp_path):
    """ISIC 2017 Part 1 as found here: images downsized, masks at the original size (twice as large in this copy)."""
    src = tmp_path / "isic2017"
    for i in range(3):
        case = f"ISIC_{i:07d}"
        _save(_rgb((32, 40), i), str(src / "ISIC-2017_Training_Data" / f"{case}.jpg"))
        _save(_rgb((32, 40), 9), str(src / "ISIC-2017_Training_Data" / f"{case}_superpixels.png"))
        small = _disc((32, 40), (16, 20), 6 + i).astype(np.uint8)
        large = np.kron(small, np.ones((2, 2), np.uint8)) * 255  # each pixel a 2x2 block: nearest gives `small` back
        _save(large, str(src / "ISIC-2017_Training_Part1_GroundTruth" / f"{case}_segmentation.png"))
    datalist = prepare("isic2018", str(src), str(tmp_path / "out"), fractions=(1, 0, 0))
    assert [i["case"] for i in datalist["training"]] == [f"ISIC_{i:07d}" for i in range(3)] and not datalist["failed"]
    for i, item in enumerate(datalist["training"]):
        mask = _read(tmp_path / "out" / item["label"])
        np.testing.assert_array_equal(mask, _disc((32, 40), (16, 20), 6 + i).astype(np.uint8))
        assert _read(tmp_path / "out" / item["image"]).shape == (32, 40, 3)
    # other datasets still refuse a mask of another size, naming both files
    pair = Pair(case="c", image=str(src / "ISIC-2017_Training_Data" / "ISIC_0000000.jpg"),
                masks=[str(src / "ISIC-2017_Training_Part1_GroundTruth" / "ISIC_0000000_segmentation.png")])
    datalist = convert([pair], str(tmp_path / "strict"), "ph2", fractions=(1, 0, 0))
    message = datalist["failed"][0]["message"]
    assert "differs from image" in message and "ISIC_0000000.jpg" in message


def test_isic2017_real_pairs_convert(tmp_path):
    """Five real ISIC 2017 pairs (256x256 JPEG, masks at the original size) become 256x256 image/mask pairs."""
    src = os.path.join(shared_data("isic2017"), "ISIC-2017_Training_Part1_GroundTruth")
    layout = tmp_path / "isic2017"
    for name in sorted(os.listdir(src))[:5]:
        case = name[: -len("_segmentation.png")]
        for folder, file in (("ISIC-2017_Training_Part1_GroundTruth", name),
                             ("ISIC-2017_Training_Data", f"{case}.jpg")):
            os.makedirs(layout / folder, exist_ok=True)
            os.symlink(os.path.join(os.path.dirname(src), folder, file), layout / folder / file)
    datalist = prepare("isic2018", str(layout), str(tmp_path / "out"), fractions=(1, 0, 0))
    assert len(datalist["training"]) == 5 and not datalist["failed"]
    for item in datalist["training"]:
        mask = _read(tmp_path / "out" / item["label"])
        assert mask.shape == (256, 256) and set(np.unique(mask)) == {0, 1} and 0.01 < mask.mean() < 0.99


def test_isic2018_layout_with_real_dermoscopy_images(tmp_path):
    """PH2 images stand in for ISIC 2018 (none is available here): saved as ISIC_XXXXXXX.jpg + _segmentation.png."""
    src = shared_data("ph2")
    layout = tmp_path / "ISIC2018"
    for i, case in enumerate(("IMD003", "IMD047")):
        image = Image.open(os.path.join(src, case, f"{case}_Dermoscopic_Image", f"{case}.bmp")).convert("RGB")
        mask = Image.open(os.path.join(src, case, f"{case}_lesion", f"{case}_lesion.bmp")).convert("L")
        _save(np.asarray(image), str(layout / "ISIC2018_Task1-2_Training_Input" / f"ISIC_{i:07d}.jpg"))
        _save(np.asarray(mask), str(layout / "ISIC2018_Task1_Training_GroundTruth" / f"ISIC_{i:07d}_segmentation.png"))
    datalist = prepare("isic2018", str(layout), str(tmp_path / "out"), fractions=(1, 0, 0))
    assert [i["case"] for i in datalist["training"]] == ["ISIC_0000000", "ISIC_0000001"]
    for item, case in zip(datalist["training"], ("IMD003", "IMD047")):
        original = np.asarray(Image.open(os.path.join(src, case, f"{case}_lesion", f"{case}_lesion.bmp")).convert("L"))
        np.testing.assert_array_equal(_read(tmp_path / "out" / item["label"]), (original > 127).astype(np.uint8))
        assert _read(tmp_path / "out" / item["image"]).shape == (*original.shape, 3)


def _acdc_prepared(root, volumes):
    """A folder as tools/prepare_acdc.py writes it: NIfTI volumes (x, y, slice) and datalist.json."""
    import nibabel as nib

    items = []
    for case, (image, label) in volumes.items():
        for kind, array in (("imagesTr", image), ("labelsTr", label)):
            os.makedirs(root / kind, exist_ok=True)
            nib.save(nib.Nifti1Image(array, np.eye(4)), str(root / kind / f"{case}.nii.gz"))
        items.append({"image": f"imagesTr/{case}.nii.gz", "label": f"labelsTr/{case}.nii.gz", "case": case,
                      "patient": int(case[7:10])})
    (root / "datalist.json").write_text(json.dumps({"training": items[:-1], "validation": items[-1:], "test": []}))


def test_acdc_lv_slices_with_the_cavity_in_display_orientation(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 900, (12, 10, 3)).astype(np.float32)  # x, y, slice: raw MRI intensities
    label = np.zeros((12, 10, 3), np.uint8)
    label[2:6, 3:5, 0] = 3  # LV cavity on slices 0 and 2; slice 1 shows only the RV
    label[1:4, 1:3, 1] = 1
    label[5:9, 2:8, 2] = 3
    label[0:2, 0:2, 2] = 2
    src = tmp_path / "acdc"
    _acdc_prepared(src, {"patient001_ED": (image, label), "patient007_ES": (image[::-1].copy(), label[::-1].copy())})
    datalist = prepare("acdc_lv", str(src), str(tmp_path / "out"), fractions=(1, 0, 0))
    items = {item["case"]: item for item in datalist["training"]}
    assert sorted(items) == ["patient001_ED_s00", "patient001_ED_s02", "patient007_ES_s00", "patient007_ES_s02"]
    assert items["patient007_ES_s02"]["group"] == "patient007"
    for case, index in (("patient001_ED_s00", 0), ("patient001_ED_s02", 2)):
        mask, rgb = (_read(tmp_path / "out" / items[case][key]) for key in ("label", "image"))
        np.testing.assert_array_equal(mask, (label[:, :, index] == 3).T)  # rows are y: DICOM display orientation
        plane = image[:, :, index].T
        expected = np.round((plane - plane.min()) / (plane.max() - plane.min()) * 255)
        assert rgb.shape == (10, 12, 3) and np.abs(rgb[..., 1].astype(float) - expected).max() <= 1


def test_acdc_lv_reports_a_missing_datalist_and_skips_corrupt_volumes(tmp_path):
    with pytest.raises(FileNotFoundError, match="datalist.json"):
        prepare("acdc_lv", str(tmp_path), str(tmp_path / "out"))
    label = np.zeros((8, 8, 2), np.uint8)
    label[2:5, 2:5, :] = 3
    src = tmp_path / "acdc"
    _acdc_prepared(src, {"patient001_ED": (np.ones((8, 8, 2), np.float32), label),
                         "patient002_ED": (np.arange(128, dtype=np.float32).reshape(8, 8, 2), label),
                         "patient003_ES": (np.ones((8, 8, 2), np.float32), label)})
    (src / "imagesTr" / "patient001_ED.nii.gz").write_bytes(b"\x1f\x8b not a volume")
    (src / "labelsTr" / "patient003_ES.nii.gz").write_bytes(b"not a label volume")
    datalist = prepare("acdc_lv", str(src), str(tmp_path / "out"), fractions=(1, 0, 0))
    assert [item["case"] for item in datalist["training"]] == ["patient002_ED_s00", "patient002_ED_s01"]
    failed = {f["case"]: f["message"] for f in datalist["failed"]}
    assert sorted(failed) == ["patient001_ED_s00", "patient001_ED_s01", "patient003_ES"]
    assert "patient001_ED.nii.gz" in failed["patient001_ED_s00"] and "patient003_ES.nii.gz" in failed["patient003_ES"]
