"""Can a network overfit one small batch? A cheap diagnostic before a long training run.

Takes ``num_slices`` labelled slices from a datalist (the bundle's preprocessing: per-volume percentile
normalisation, 224x224), trains the network on that one batch for ``steps`` steps (AdamW, Dice + CE, no
augmentation) and prints the loss and the per-class Dice on the batch every ``every`` steps, with seconds per step.

Examples::

    python tools/overfit_check.py data/acdc/datalist.json --network ltmednext --layer_scale_init 1e-6
    python tools/overfit_check.py data/acdc/datalist.json --network unet
"""

from __future__ import annotations

import time

import fire
import numpy as np
import torch


def load_batch(datalist: str, num_slices: int = 8, roi: int = 224, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Resized, ScaleIntensityRangePercentilesd

    from networks.data import load_datalist

    items = load_datalist(datalist, "training")
    rng = np.random.default_rng(seed)
    load = Compose([LoadImaged(["image", "label"], image_only=True), EnsureChannelFirstd(["image", "label"]),
                    ScaleIntensityRangePercentilesd("image", 0.5, 99.5, 0.0, 1.0, clip=True),
                    Resized(["image", "label"], (roi, roi, -1), mode=("trilinear", "nearest"))])
    images, labels = [], []
    for index in rng.choice(len(items), size=num_slices, replace=len(items) < num_slices):
        data = load(items[int(index)])
        depth = data["label"].shape[-1]
        z = int(rng.integers(depth // 4, max(depth // 4 + 1, 3 * depth // 4)))  # a mid-ventricular slice
        images.append(data["image"][..., z].as_tensor())
        labels.append(data["label"][..., z].as_tensor())
    return torch.stack(images).float(), torch.stack(labels).long()


def make_network(network: str, num_classes: int, layer_scale_init: float, size: str = "T",
                 full_resolution_skip: bool = False) -> torch.nn.Module:
    if network == "ltmednext":
        from networks import LTMedNeXt

        return LTMedNeXt(2, 1, num_classes, size=size, layer_scale_init=layer_scale_init,
                         full_resolution_skip=full_resolution_skip)
    if network == "unet":
        from monai.networks.nets import UNet

        return UNet(2, 1, num_classes, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2,
                    norm="batch")
    raise ValueError(f"network must be 'ltmednext' or 'unet', got {network!r}.")


def main(datalist: str, network: str = "ltmednext", steps: int = 60, every: int = 10, lr: float = 2e-3,
         layer_scale_init: float = 1e-6, num_slices: int = 8, num_classes: int = 4, threads: int = 1,
         seed: int = 0, full_resolution_skip: bool = False) -> list[dict]:
    from monai.losses import DiceCELoss

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    image, label = load_batch(datalist, num_slices, seed=seed)
    model = make_network(network, num_classes, layer_scale_init, full_resolution_skip=full_resolution_skip)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.5, lambda_ce=0.5)
    history, start = [], time.time()
    print(f"{network} layer_scale_init={layer_scale_init} full_resolution_skip={full_resolution_skip} lr={lr}: {num_slices} slices, classes present "
          f"{sorted(torch.unique(label).tolist())}", flush=True)
    for step in range(1, steps + 1):
        model.train()
        optimizer.zero_grad()
        loss = loss_fn(model(image), label)
        loss.backward()
        optimizer.step()
        if step % every == 0 or step == steps:
            model.eval()
            with torch.no_grad():
                pred = model(image).argmax(1)
            dice = []
            for c in range(1, num_classes):
                p, g = pred == c, label[:, 0] == c
                total = int(p.sum() + g.sum())
                dice.append(2.0 * float((p & g).sum()) / total if total else 1.0)
            row = {"step": step, "loss": float(loss), "dice": [round(d, 3) for d in dice],
                   "mean_dice": round(float(np.mean(dice)), 3), "s_per_step": round((time.time() - start) / step, 2)}
            history.append(row)
            print(row, flush=True)
    return history


if __name__ == "__main__":
    fire.Fire(main)
