"""Helpers that training configs call: finding the checkpoint to resume from."""

from __future__ import annotations

import glob
import os
import re

__all__ = ["latest_checkpoint"]


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
