"""Helpers that bundle configs call: reading a flag given on the command line, finding the checkpoint to resume from,
starting from another run's weights (whole network or encoder), class-balanced loss weights, building the loader of
a stream of slices."""

from __future__ import annotations

import glob
import os
import pickle
import re
from typing import Sequence

import numpy as np
import torch

__all__ = ["as_bool", "class_weights", "handlers_for_rank", "latest_checkpoint", "read_weights", "slice_loader",
           "with_encoder_weights", "with_weights"]

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
    """The network weights stored at ``path``: a state dict (a bundle's ``models/model.pt``) or the ``model`` entry of
    a training checkpoint, read with ``weights_only=True``. A ValueError names the file when it cannot be read."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as error:
        raise ValueError(f"{path}: cannot read network weights ({error})") from error
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a state dict or checkpoint (found {type(state).__name__})")
    return state.get("model", state)


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


def slice_loader(dataset, batch_size: int, num_workers: int = 0, **kwargs):
    """MONAI's ``DataLoader`` over a stream of slices (``ShuffleBuffer`` of a ``GridPatchDataset``), in the main process.

    With worker processes MONAI 1.6 splits that stream twice, once in the patch dataset and once in the shuffle
    buffer, so each of ``n`` workers keeps a ``1/n^2`` share and an epoch silently loses ``1 - 1/n`` of the slices
    (Project-MONAI/MONAI#7986; ``tests/test_training.py`` measures it). Asking for workers is therefore an error
    rather than a quietly smaller training set.
    """
    from monai.data import DataLoader

    if int(num_workers) != 0:
        raise ValueError(f"num_workers must be 0 for a stream of slices (ShuffleBuffer over GridPatchDataset), got "
                         f"{num_workers}: MONAI's worker split drops slices (Project-MONAI/MONAI#7986).")
    return DataLoader(dataset, batch_size=batch_size, num_workers=0, **kwargs)


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
