"""Can a network overfit one small batch? A cheap diagnostic before a long training run.

Takes ``num_slices`` labelled slices from a datalist (the bundle's preprocessing: per-volume percentile
normalisation, 224x224), trains the network on that one batch for ``steps`` steps (AdamW, Dice + CE, no
augmentation) and prints the loss and the per-class Dice on the batch every ``every`` steps, with seconds per step.

``bn_modes`` segments validation volumes with a training checkpoint twice, with BatchNorm running statistics (eval
mode) and with batch statistics (train mode), and prints the per-class Dice of each: a large difference points at a
train/eval statistics mismatch rather than at learning.

Examples::

    python tools/overfit_check.py overfit data/acdc/datalist.json --network ltmednext --layer_scale_init 1e-6
    python tools/overfit_check.py overfit data/acdc/datalist.json --network unet
    python tools/overfit_check.py bn_modes runs/acdc_ltmednext/models/checkpoints/checkpoint_epoch=8.pt \
        data/acdc/datalist.json
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
    print(f"{network} layer_scale_init={layer_scale_init} full_resolution_skip={full_resolution_skip} lr={lr}: "
          f"{num_slices} slices, classes present "
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


def bn_modes(checkpoint: str, datalist: str, num_cases: int = 4, num_classes: int = 4, roi: int = 224,
             threads: int = 1) -> dict:
    """Per-class Dice of an LTMedNeXt-T training checkpoint on the first ``num_cases`` validation volumes, with
    BatchNorm in eval mode and in train mode (no weights change: inference only)."""
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Resized, ScaleIntensityRangePercentilesd

    from networks.data import load_datalist

    torch.set_num_threads(threads)
    net = make_network("ltmednext", num_classes, 1e-6)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    net.load_state_dict(state.get("model", state))
    load = Compose([LoadImaged(["image", "label"], image_only=True), EnsureChannelFirstd(["image", "label"]),
                    ScaleIntensityRangePercentilesd("image", 0.5, 99.5, 0.0, 1.0, clip=True),
                    Resized(["image", "label"], (roi, roi, -1), mode=("trilinear", "nearest"))])
    results = {}
    for item in load_datalist(datalist, "validation")[:num_cases]:
        data = load(item)
        image = data["image"].as_tensor().permute(3, 0, 1, 2).float()  # slices as a batch
        label = data["label"].as_tensor()[0].permute(2, 0, 1).long()
        case = str(item.get("case", item["image"]))
        results[case] = row = {}
        for mode in ("eval", "train"):
            net.train(mode == "train")
            with torch.no_grad():
                pred = net(image).argmax(1)
            row[mode] = [round(2.0 * float(((pred == c) & (label == c)).sum())
                               / max(1.0, float((pred == c).sum() + (label == c).sum())), 3)
                         for c in range(1, num_classes)]
        print({case: row}, flush=True)
    return results


if __name__ == "__main__":
    fire.Fire({"overfit": main, "bn_modes": bn_modes})
