"""SERP (Self-embedding Representation Parallel), the training-time self-learning branch of LiteNeXt.

Reconstructed from the paper's outline (arXiv 2405.15779, Figs. 1 and 3); the authors released no SERP code. What
is known: it is used only in training, it has two projector heads (ProjectorS and ProjectorT) on the network's own
embedding, and it is described as BYOL-inspired. Our reading: a second augmented view of each image goes through the
same network; the pooled bottleneck embeddings of the two views pass through ProjectorS (+ a predictor) and
ProjectorT, and a cosine consistency loss (BYOL form, ``2 - 2 cos``, target side without gradient) is added to the
segmentation loss with weight ``lam``. At inference the wrapper is dropped and only the wrapped network remains.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["SERP", "second_view", "serp_iteration"]


def _mlp(in_features: int, hidden: int, out_features: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_features))


def second_view(images: torch.Tensor, noise_std: float = 0.03, intensity: float = 0.1) -> torch.Tensor:
    """A photometric second view of a batch ``(B, C, H, W)``: per-image contrast/brightness jitter and noise.

    Photometric only, so the segmentation target of both views is the same image grid.
    """
    batch = images.shape[0]
    scale = 1.0 + (torch.rand(batch, 1, 1, 1, device=images.device) * 2 - 1) * intensity
    shift = (torch.rand(batch, 1, 1, 1, device=images.device) * 2 - 1) * intensity
    return images * scale + shift + noise_std * torch.randn_like(images)


class SERP(nn.Module):
    """Training wrapper adding the SERP consistency branch to a network with ``forward_with_embedding``.

    Args:
        network: the segmentation network (e.g. :class:`networks.LiteNeXt`); it stays usable on its own.
        embedding_channels: channels of the network's embedding (8C = 128 for LiteNeXt with C = 16).
        hidden: hidden width of the projector MLPs.
        projection: output width of the projectors.
        lam: weight of the consistency loss.

    ``forward(view_s, view_t)`` returns the logits of ``view_s`` and the consistency loss (a scalar tensor).
    """

    def __init__(self, network: nn.Module, embedding_channels: int = 128, hidden: int = 1024, projection: int = 256,
                 lam: float = 0.1) -> None:
        super().__init__()
        self.network = network
        self.projector_s = _mlp(embedding_channels, hidden, projection)
        self.projector_t = _mlp(embedding_channels, hidden, projection)
        self.predictor = _mlp(projection, hidden, projection)
        self.lam = lam

    @staticmethod
    def _pool(embedding: torch.Tensor) -> torch.Tensor:
        return embedding.mean((2, 3)) + embedding.amax((2, 3))

    def forward(self, view_s: torch.Tensor, view_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, embedding_s = self.network.forward_with_embedding(view_s)
        _, embedding_t = self.network.forward_with_embedding(view_t)
        z_s = self.predictor(self.projector_s(self._pool(embedding_s)))
        z_t = self.projector_t(self._pool(embedding_t)).detach()
        consistency = 2.0 - 2.0 * F.cosine_similarity(z_s, z_t, dim=-1).mean()
        return logits, consistency


def serp_iteration(serp: SERP, view_fn: Callable[[torch.Tensor], torch.Tensor] = second_view) -> Callable:
    """An ``iteration_update`` for MONAI's ``SupervisedTrainer`` that trains with the SERP branch.

    The trainer's ``network`` stays the plain network (what checkpoints and inference use); pass the trainer
    ``optimizer`` the parameters of ``serp`` (network and projectors). The step fires the trainer's iteration events
    as MONAI's own step does, so the output is decollated and post-processed like a plain trainer's: handlers that
    read ``from_engine(['loss'], first=True)`` (StatsHandler, TensorBoard, MLflow) get the total loss as one number.
    The consistency term alone is in each output item as ``serp_consistency``.
    """
    from monai.engines.utils import IterationEvents
    from monai.utils.enums import CommonKeys

    def step(engine, batch: dict) -> dict:
        images, labels = engine.prepare_batch(batch, engine.state.device, engine.non_blocking)[:2]
        engine.state.output = {CommonKeys.IMAGE: images, CommonKeys.LABEL: labels}
        serp.train()
        engine.optimizer.zero_grad(set_to_none=True)
        logits, consistency = serp(images, view_fn(images))
        engine.state.output[CommonKeys.PRED] = logits
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        loss = engine.loss_function(logits, labels).mean() + serp.lam * consistency
        engine.state.output[CommonKeys.LOSS] = loss
        engine.state.output["serp_consistency"] = consistency.detach()
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output

    return step
