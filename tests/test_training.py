"""The helpers bundle configs call from ``networks.training``."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
import torch

from networks.training import as_bool, latest_checkpoint, slice_loader, with_weights

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
    for name in ("model.pt", "checkpoint.pt"):
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
