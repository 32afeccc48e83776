"""Helpers that training configs call: finding the checkpoint to resume from."""

from __future__ import annotations

import glob
import os
import re

__all__ = ["latest_checkpoint"]


def latest_checkpoint(folder: str) -> str | None:
    """The checkpoint of the latest epoch saved by MONAI's ``CheckpointSaver`` in ``folder``, or None."""
    paths = glob.glob(os.path.join(folder, "*checkpoint_epoch=*.pt"))
    if not paths:
        return None
    return max(paths, key=lambda p: int(re.findall(r"epoch=(\d+)", p)[-1]))
