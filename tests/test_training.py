"""The helpers bundle configs call from ``networks.training``."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
import torch

from networks.training import SliceDataset, as_bool, latest_checkpoint, slice_loader, with_weights

from helpers import BUNDLES


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


def _volumes(depths=(5, 3, 7)) -> list[dict]:
    """Volumes whose every voxel of slice s of volume v holds 100 * v + s: a slice says where it came from."""
    return [{"image": torch.zeros(1, 4, 4, d).add_(torch.arange(d).float() + 100 * v), "label": torch.zeros(1, 4, 4, d),
             "case": f"v{v}"} for v, d in enumerate(depths)]


def _slice_ids(batches) -> list[int]:
    return [int(image[0, 0, 0]) for batch in batches for image in batch["image"]]


ALL_SLICES = sorted(100 * v + s for v, d in enumerate((5, 3, 7)) for s in range(d))


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_slice_loader_sees_every_slice_once_per_epoch_with_any_number_of_workers(workers):
    from monai.transforms import RandFlipd

    dataset = SliceDataset(_volumes(), transform=RandFlipd(["image", "label"], prob=0.5, spatial_axis=1))
    assert len(dataset) == 15
    item = dataset[0]
    assert item["image"].shape == (1, 4, 4) and item["case"] == "v0"
    loader = slice_loader(dataset, batch_size=4, num_workers=workers)
    for _ in range(2):  # persistent workers: the second epoch is complete too
        assert sorted(_slice_ids(loader)) == ALL_SLICES
    assert _slice_ids(loader) != _slice_ids(loader)  # shuffled anew each epoch


def test_monai_worker_split_still_drops_slices():
    """Why SliceDataset replaced the GridPatchDataset + ShuffleBuffer stream: MONAI's DataLoader with 2 workers loses
    slices of that stream (Project-MONAI/MONAI#7986). If this fails, MONAI has fixed it."""
    from monai.data import DataLoader, GridPatchDataset, PatchIter, ShuffleBuffer

    data = [np.full((1, 4, 4, 5), v, dtype=np.float32) for v in range(3)]
    stream = ShuffleBuffer(GridPatchDataset(data, PatchIter(patch_size=(None, None, 1)), with_coordinates=False),
                           buffer_size=100, seed=0)
    assert sum(len(b) for b in DataLoader(stream, batch_size=4, num_workers=2)) < 15


RANK_SCRIPT = """
import json, os
import torch.distributed as dist
from test_training import _slice_ids, _volumes
from networks.training import SliceDataset, slice_loader
dist.init_process_group("gloo")
loader = slice_loader(SliceDataset(_volumes()), batch_size=2, num_workers=1)
seen = []
for epoch in range(2):
    loader.sampler.set_epoch(epoch)  # what MONAI's trainer does at each epoch start
    seen.append(_slice_ids(loader))
with open(os.path.join(os.environ["OUT_DIR"], f"rank{dist.get_rank()}.json"), "w") as f:
    json.dump(seen, f)
dist.destroy_process_group()
"""


def test_slice_loader_gives_each_rank_an_equal_share_and_no_slice_twice(tmp_path):
    """torchrun, 2 processes (gloo), one worker each: 15 slices give each rank 7, none on both ranks; one slice, a
    different one each epoch, waits for the next (equal shares keep DDP's all-reduces in step)."""
    import subprocess
    import sys

    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__), "OUT_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "--master_addr=127.0.0.1", "--master_port=29531", str(script)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    left_out = []
    for epoch in (0, 1):
        first, second = ranks[0][epoch], ranks[1][epoch]
        assert len(first) == len(second) == 7 and not set(first) & set(second)
        assert len(set(first)) == 7 and set(first) | set(second) <= set(ALL_SLICES)
        left_out.append(set(ALL_SLICES) - set(first) - set(second))
    assert all(len(s) == 1 for s in left_out) and left_out[0] != left_out[1]


def _tiny_net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1))


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_with_weights_loads_a_model_or_checkpoint_file(tmp_path):
    trained = _tiny_net(1)
    trained[1].running_mean += 3.0  # buffers travel too
    torch.save(trained.state_dict(), tmp_path / "model.pt")
    torch.save({"model": trained.state_dict(), "optimizer": {}}, tmp_path / "checkpoint.pt")
    # a bundle with a weight average keeps the average as model.pt, so its checkpoints give the average too
    torch.save({"model": _tiny_net(3).state_dict(), "ema_model": trained.state_dict()}, tmp_path / "averaged.pt")
    for name in ("model.pt", "checkpoint.pt", "averaged.pt"):
        network = _tiny_net(2)
        assert not _same_weights(network, trained)
        assert with_weights(network, str(tmp_path / name)) is network
        assert _same_weights(network, trained)
    wrapper = torch.nn.Module()  # DistributedDataParallel keeps the network as .module
    wrapper.module = _tiny_net(2)
    with_weights(wrapper, str(tmp_path / "model.pt"))
    assert _same_weights(wrapper.module, trained)
    untouched = _tiny_net(2)
    for empty in ("", None):
        assert _same_weights(with_weights(untouched, empty), _tiny_net(2))


def test_with_weights_names_the_file_that_does_not_fit(tmp_path):
    torch.save(torch.nn.Conv2d(1, 3, 1).state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: the weights do not fit this network.*0.weight"):
        with_weights(_tiny_net(0), str(tmp_path / "other.pt"))
    wider = _tiny_net(0)
    wider[2] = torch.nn.Conv2d(4, 3, 1)  # another number of classes
    torch.save(wider.state_dict(), tmp_path / "wider.pt")
    with pytest.raises(ValueError, match="wider.pt: the weights do not fit this network.*2.weight"):
        with_weights(_tiny_net(0), str(tmp_path / "wider.pt"))
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.pt: cannot read network weights"):
        with_weights(_tiny_net(0), str(tmp_path / "broken.pt"))


@pytest.mark.parametrize("bundle", sorted(glob.glob(os.path.join(BUNDLES, "*_segmentation"))), ids=os.path.basename)
def test_segmentation_training_starts_from_pretrained_weights(bundle, tmp_path):
    """``--pretrained_weights PATH`` (fine-tuning) reaches the network that single- and multi-GPU training optimise."""
    from monai.bundle import ConfigParser

    def parse(**overrides):
        parser = ConfigParser()
        parser.read_config(os.path.join(bundle, "configs", "train.json"))
        parser.update({"device": "$torch.device('cpu')", **overrides})
        return parser

    start = parse().get_parsed_content("network_def")
    for p in start.parameters():
        p.data.uniform_(-1, 1)
    torch.save(start.state_dict(), tmp_path / "model.pt")
    parser = parse(pretrained_weights=str(tmp_path / "model.pt"))
    network = parser.get_parsed_content("network")
    assert network is not start and _same_weights(network, start)
    assert not _same_weights(parse().get_parsed_content("network"), start)  # the default starts from scratch
    with open(os.path.join(bundle, "configs", "multi_gpu_train.json")) as f:
        assert json.load(f)["network"]["module"] == parser.get("network")


def _averaging_bundles() -> list[str]:
    bundles = []
    for bundle in sorted(glob.glob(os.path.join(BUNDLES, "*"))):
        with open(os.path.join(bundle, "configs", "train.json")) as f:
            if "ema" in json.load(f):
                bundles.append(bundle)
    return bundles


@pytest.mark.parametrize("bundle", _averaging_bundles(), ids=os.path.basename)
def test_weight_average_is_validated_kept_and_resumed(bundle):
    """A bundle that averages its weights (ignite's ``EMAHandler`` as ``ema``) validates and keeps the average, resumes
    it, and updates it in single- and multi-GPU training alike."""
    average = "$@ema.ema_model"
    with open(os.path.join(bundle, "configs", "train.json")) as f:
        train = json.load(f)
    with open(os.path.join(bundle, "configs", "multi_gpu_train.json")) as f:
        multi_gpu = json.load(f)
    assert train["ema"]["model"] == "@network"
    assert train["validate"]["evaluator"]["network"] == average
    handlers = train["train"]["handlers"] + train["validate"]["handlers"]
    savers = [h for h in handlers if h["_target_"] == "CheckpointSaver"]
    assert len(savers) == 2 and all(h["save_dict"] == {"model": average} for h in savers)
    loader, saver = train["train"]["resume_handlers"]
    assert loader["load_dict"]["ema_model"] == average == saver["save_dict"]["ema_model"]
    assert train["training"] == "@run"  # one path: `monai.bundle run training` is `run` after `initialize`
    for config in (train, multi_gpu):
        assert [step for step in config["run"] if "@ema.attach(@train#trainer" in step] == [config["run"][-2]]


def test_handlers_for_rank_keeps_writers_on_rank_zero_only(monkeypatch):
    """Chosen by type, not position: on rank 1 checkpoint savers, loggers and progress bars go, the rest stays."""
    import torch.distributed as dist
    from ignite.handlers import ProgressBar
    from monai.handlers import (CheckpointLoader, CheckpointSaver, LrScheduleHandler, StatsHandler,
                                TensorBoardStatsHandler, ValidationHandler)

    from networks.training import handlers_for_rank

    net = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    keep = [LrScheduleHandler(torch.optim.lr_scheduler.StepLR(optimizer, 1)), ValidationHandler(1),
            CheckpointLoader("unused.pt", {"net": net})]
    writers = [CheckpointSaver(".", {"net": net}), StatsHandler(), ProgressBar()]
    handlers = [writers[0], keep[0], None, writers[1], keep[1], writers[2], keep[2]]
    assert handlers_for_rank(handlers) == [h for h in handlers if h is not None]  # not distributed: all
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    assert handlers_for_rank(handlers) == keep
    assert not handlers_for_rank([TensorBoardStatsHandler.__new__(TensorBoardStatsHandler)])
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    assert handlers_for_rank(handlers) == [h for h in handlers if h is not None]
