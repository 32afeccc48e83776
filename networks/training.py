"""Helpers that bundle configs call: reading a flag given on the command line, finding the checkpoint to resume from,
starting from another run's weights (whole network or encoder), class-balanced loss weights, the slices of volumes and
their loader."""

from __future__ import annotations

import glob
import os
import pickle
import re
from typing import Sequence

import numpy as np
import torch

__all__ = ["SliceDataset", "as_bool", "class_weights", "handlers_for_rank", "latest_checkpoint", "read_weights",
           "slice_loader", "with_encoder_weights", "with_weights"]

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def as_bool(value: bool | int | str) -> bool:
    """A config flag as a bool, whether it came from JSON or from the command line.

    ``python -m monai.bundle run ... --use_serp false`` passes the *string* ``"false"`` (fire turns only ``False``
    into a bool), which plain Python truth would read as true. Accepted: bools, 0/1, and true/false, yes/no, on/off,
    1/0 in any case; anything else is a ValueError naming the value.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"expected a true/false flag, got {value!r}")


def latest_checkpoint(folder: str, before_epoch: int | None = None) -> str | None:
    """The checkpoint of the latest epoch saved by MONAI's ``CheckpointSaver`` in ``folder``, or None.

    With ``before_epoch`` (the run's ``max_epochs``), only a checkpoint of an unfinished run counts: one saved at
    epoch ``before_epoch`` or later belongs to a run that already finished that many epochs, so a new run starts
    instead of resuming into no epochs at all (MONAI Label asks for a new training run on the same bundle each time).
    """
    paths = glob.glob(os.path.join(folder, "*checkpoint_epoch=*.pt"))
    if not paths:
        return None
    latest = max(paths, key=lambda p: int(re.findall(r"epoch=(\d+)", p)[-1]))
    if before_epoch is not None and int(re.findall(r"epoch=(\d+)", latest)[-1]) >= int(before_epoch):
        return None
    return latest


def read_weights(path: str) -> dict:
    """The network weights stored at ``path``: a state dict (a bundle's ``models/model.pt``), the ``ema_model`` entry
    of a training checkpoint of a bundle that averages its weights (what it keeps as ``model.pt``), else its ``model``
    entry, or the network inside the ``serp`` entry of a LiteNeXt training checkpoint (its SERP wrapper holds the
    network as ``network.``), read with ``weights_only=True``. A ValueError names the file when it cannot be read."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as error:
        raise ValueError(f"{path}: cannot read network weights ({error})") from error
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a state dict or checkpoint (found {type(state).__name__})")
    for entry in ("ema_model", "model"):
        if entry in state:
            return state[entry]
    if "serp" in state:
        return {k[len("network."):]: v for k, v in state["serp"].items() if k.startswith("network.")}
    return state


def with_weights(network: torch.nn.Module, path: str | None) -> torch.nn.Module:
    """``network`` (or the one inside a DistributedDataParallel) with all its weights loaded from ``path``, to fine-tune
    a bundle's shipped ``models/model.pt`` on new data or continue a finished run with a new schedule; unchanged when
    ``path`` is empty or None.

    Only the weights are taken: the optimiser and schedule start afresh. A checkpoint of an unfinished run in
    ``models/checkpoints/`` still wins, because it is loaded when the trainer starts, after this. Weights of another
    network, size or class count are a ValueError naming the file and the first keys that do not fit.
    """
    if not path:
        return network
    target = getattr(network, "module", network)
    state = read_weights(path)
    own = target.state_dict()
    unfit = sorted(set(own) ^ set(state)) + [k for k in own if k in state and own[k].shape != state[k].shape]
    if unfit:
        raise ValueError(f"{path}: the weights do not fit this network (another network, size or number of classes?): "
                         f"{', '.join(unfit[:5])}")
    target.load_state_dict(state)
    return network


class SliceDataset(torch.utils.data.Dataset):
    """The 2D slices of 3D volumes, one item per (volume, slice) pair: how 2D networks train on volumes.

    Each slice is one index, so any sampler and any number of ``DataLoader`` workers see every slice exactly once per
    epoch (a shuffled loader in one process, ``DistributedSampler`` across ranks); random slice transforms run in the
    worker that loads the slice. MONAI's ``GridPatchDataset`` + ``ShuffleBuffer`` stream, used before, loses slices
    with workers (Project-MONAI/MONAI#7986).

    Args:
        data: a sequence of dicts whose ``keys`` hold channel-first volumes ``(C, H, W, D)``, typically a
            ``CacheDataset`` of preprocessed volumes (give it ``copy_cache=False``: a slice is copied, not its volume;
            forked workers share the cache).
        keys: the volume keys to slice along the last axis; other keys are passed through.
        transform: applied to each slice dict, whose ``keys`` then hold ``(C, H, W)`` tensors.
    """

    def __init__(self, data, keys: Sequence[str] = ("image", "label"), transform=None) -> None:
        self.data = data
        self.keys = [keys] if isinstance(keys, str) else list(keys)
        self.transform = transform
        self.index = [(v, s) for v in range(len(data)) for s in range(int(data[v][self.keys[0]].shape[-1]))]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        from monai.transforms import apply_transform

        volume_index, slice_index = self.index[i]
        volume = self.data[volume_index]
        item = {k: (v[..., slice_index].clone() if k in self.keys else v) for k, v in volume.items()}
        return apply_transform(self.transform, item) if self.transform is not None else item


def slice_loader(dataset, batch_size: int, num_workers: int = 0, shuffle: bool = True, seed: int = 0, **kwargs):
    """MONAI's ``DataLoader`` over a :class:`SliceDataset`: shuffled, ``num_workers`` processes (persistent), pinned
    memory on CUDA. Under ``torch.distributed`` a ``DistributedSampler`` gives each rank an equal share of the slices
    (the few that do not divide evenly are left out that epoch, a different few each epoch) and none to two ranks;
    equal shares keep the ranks' iteration counts, and so their gradient all-reduces, in step."""
    from monai.data import DataLoader

    num_workers = int(num_workers)
    sampler = None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        sampler = torch.utils.data.DistributedSampler(dataset, shuffle=bool(shuffle), seed=int(seed), drop_last=True)
        shuffle = False
    kwargs.setdefault("persistent_workers", num_workers > 0)
    kwargs.setdefault("pin_memory", torch.cuda.is_available())
    return DataLoader(dataset, batch_size=int(batch_size), shuffle=bool(shuffle), sampler=sampler,
                      num_workers=num_workers, **kwargs)


def handlers_for_rank(handlers: list | None) -> list:
    """The handlers this process should attach in distributed training: all of them on rank 0 (and without
    ``torch.distributed``), on every other rank only those that write nothing, chosen by type: checkpoint savers,
    loggers (``StatsHandler``, TensorBoard, MLflow, ClearML), progress bars and metric savers stay on rank 0, so one
    process writes each file. Entries that are None (disabled) are dropped."""
    import torch.distributed as dist
    from ignite.handlers import ProgressBar
    from monai.handlers import (CheckpointSaver, ClearMLHandler, MetricsSaver, MLFlowHandler, StatsHandler,
                                TensorBoardHandler)

    handlers = [h for h in (handlers or []) if h is not None]
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        return handlers
    writers = (CheckpointSaver, StatsHandler, TensorBoardHandler, MLFlowHandler, ClearMLHandler, MetricsSaver,
               ProgressBar)
    return [h for h in handlers if not isinstance(h, writers)]


def class_weights(datalist: Sequence[dict], num_classes: int, label_key: str = "label",
                  device: str | torch.device | None = None) -> torch.Tensor:
    """Inverse-frequency class weights (mean 1 over the classes present) for ``torch.nn.CrossEntropyLoss``; a class
    absent from ``datalist`` gets weight 0. On ``device`` when given (a config's ``_target_`` component)."""
    counts = np.bincount([int(item[label_key]) for item in datalist], minlength=num_classes).astype(np.float64)
    if len(counts) > num_classes:
        raise ValueError(f"labels up to {len(counts) - 1} found, but num_classes is {num_classes}.")
    weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / max(int((counts > 0).sum()), 1), 0.0)
    present = weights[counts > 0]
    weights = weights / present.mean() if len(present) else weights
    return torch.as_tensor(weights, dtype=torch.float32, device=device)


def with_encoder_weights(network: torch.nn.Module, path: str | None) -> torch.nn.Module:
    """``network`` (an LTMedNeXtClassifier, or one wrapped in DistributedDataParallel) with its encoder initialised
    from the ``encoder.*`` weights of another LTMedNeXt checkpoint at ``path`` (a segmentation bundle's
    ``models/model.pt``, for example); unchanged when ``path`` is empty or None.

    A stem trained on fewer input channels (1 for CT/MR) is spread evenly over this network's channels, so a grey
    image replicated to RGB gives the stem exactly the response it was trained on. Everything outside the encoder
    (the classification head) keeps its initialisation.
    """
    if not path:
        return network
    target = getattr(network, "module", network)
    state = read_weights(path)
    encoder = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    if not encoder:
        raise ValueError(f"{path}: no encoder.* weights (not an LTMedNeXt checkpoint?)")
    own = target.encoder.state_dict()
    stem = "stem.0.weight"
    if stem in encoder and stem in own and encoder[stem].shape[1] != own[stem].shape[1]:
        mean = encoder[stem].mean(1, keepdim=True)
        encoder[stem] = mean.expand(-1, own[stem].shape[1], -1, -1) * (encoder[stem].shape[1] / own[stem].shape[1])
    mismatched = [k for k in own if k not in encoder or encoder[k].shape != own[k].shape]
    if mismatched:
        raise ValueError(f"{path}: encoder weights do not fit this network (size or width differs): "
                         f"{', '.join(mismatched[:5])}")
    target.encoder.load_state_dict(encoder)
    return network
