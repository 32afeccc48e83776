"""The helpers bundle configs call from ``networks.training``."""

from __future__ import annotations

import numpy as np
import pytest

from networks.training import as_bool, latest_checkpoint, slice_loader


def test_latest_checkpoint_only_resumes_unfinished_runs(tmp_path):
    assert latest_checkpoint(str(tmp_path)) is None
    for epoch in (1, 3):
        (tmp_path / f"checkpoint_epoch={epoch}.pt").write_bytes(b"")
    assert latest_checkpoint(str(tmp_path)).endswith("checkpoint_epoch=3.pt")
    assert latest_checkpoint(str(tmp_path), before_epoch=5).endswith("checkpoint_epoch=3.pt")
    assert latest_checkpoint(str(tmp_path), before_epoch=3) is None  # that run finished its 3 epochs
    assert latest_checkpoint(str(tmp_path), before_epoch=1) is None


def test_as_bool_reads_command_line_flags():
    assert [as_bool(v) for v in (True, False, 1, 0, "true", "False", " YES ", "off", "1", "0")] == [
        True, False, True, False, True, False, True, False, True, False]
    for bad in ("maybe", 2, None, ""):
        with pytest.raises(ValueError, match="true/false"):
            as_bool(bad)


def _slice_stream(volumes: int = 3, depth: int = 5):
    from monai.data import GridPatchDataset, PatchIter, ShuffleBuffer

    data = [np.full((1, 4, 4, depth), v, dtype=np.float32) for v in range(volumes)]
    return ShuffleBuffer(GridPatchDataset(data, PatchIter(patch_size=(None, None, 1)), with_coordinates=False),
                         buffer_size=100, seed=0)


def test_slice_loader_yields_every_slice_and_refuses_workers():
    batches = list(slice_loader(_slice_stream(), batch_size=4))
    assert sum(len(b) for b in batches) == 15
    for workers in (2, "1"):
        with pytest.raises(ValueError, match="num_workers must be 0.*7986"):
            slice_loader(_slice_stream(), batch_size=4, num_workers=workers)


def test_monai_worker_split_still_drops_slices():
    """Why slice_loader refuses workers: MONAI's own DataLoader with 2 workers loses slices of the same stream. If this
    fails, MONAI has fixed Project-MONAI/MONAI#7986 and the guard can go."""
    from monai.data import DataLoader

    seen = sum(len(b) for b in DataLoader(_slice_stream(), batch_size=4, num_workers=2))
    assert seen < 15
