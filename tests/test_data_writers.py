"""networks.data's atomic writers: the file appears whole or not at all, with the umask's permissions."""

import os

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from networks.data import TMP_PREFIX, write_atomic, write_nifti_atomic, write_png_atomic


def test_outputs_are_complete_and_keep_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_atomic(str(tmp_path / "a.csv"), "case,é\n")
        write_png_atomic(np.eye(4, dtype=np.uint8), str(tmp_path / "m.png"))
        write_nifti_atomic(np.ones((2, 3, 4), np.uint8), np.eye(4), str(tmp_path / "sub" / "x.nii.gz"))
    finally:
        os.umask(old)
    assert (tmp_path / "a.csv").read_text(encoding="utf-8") == "case,é\n"
    assert np.array_equal(np.asarray(Image.open(tmp_path / "m.png")), np.eye(4, dtype=np.uint8))
    assert nib.load(str(tmp_path / "sub" / "x.nii.gz")).shape == (2, 3, 4)
    assert (tmp_path / "sub" / "x.nii.gz").read_bytes()[:2] == b"\x1f\x8b"  # gzip, as the name says
    for path in (tmp_path / "a.csv", tmp_path / "m.png", tmp_path / "sub" / "x.nii.gz"):
        assert os.stat(path).st_mode & 0o777 == 0o644
    assert not [p for p in tmp_path.rglob(f"{TMP_PREFIX}*")]


def test_a_failed_write_leaves_neither_the_file_nor_a_temporary_one(tmp_path):
    with pytest.raises(Exception):
        write_png_atomic(np.zeros((2, 2, 2, 2), np.uint8), str(tmp_path / "bad.png"))  # not an image
    assert list(tmp_path.iterdir()) == []
