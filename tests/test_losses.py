import pytest
import torch

from networks import SERP, LiteNeXt, MarginalWeightLoss, marginal_weight_map
from networks.serp import second_view


def test_weight_map_regions():
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    weights = marginal_weight_map(mask, kernel_size=7, w_object=3, w_background=5, w_margin=2)[0, 0]
    assert weights[16, 16] == 3  # deep inside the object
    assert weights[0, 0] == 5  # far background
    assert weights[8, 8] == 2 and weights[6, 16] == 2 and weights[10, 16] == 2  # band of 3 px each side
    assert weights[4, 16] == 5 and weights[12, 16] == 3


def test_weight_map_multiclass_uses_every_class_boundary():
    onehot = torch.zeros(1, 2, 32, 32)
    onehot[0, 0, 2:12, 2:12] = 1
    onehot[0, 1, 18:30, 18:30] = 1
    weights = marginal_weight_map(onehot)[0, 0]
    assert weights[2, 6] == 2 and weights[18, 24] == 2 and weights[24, 24] == 3 and weights[0, 31] == 5


def test_binary_loss_decreases_for_better_prediction():
    loss = MarginalWeightLoss()
    target = torch.zeros(2, 1, 32, 32)
    target[..., 8:24, 8:24] = 1
    good = (target * 2 - 1) * 5
    assert loss(good, target) < loss(torch.zeros_like(target), target) < loss(-good, target)


def test_multiclass_loss_and_gradient():
    loss = MarginalWeightLoss(to_onehot_y=True, softmax=True)
    target = torch.zeros(2, 1, 32, 32)
    target[..., 4:12, 4:12] = 1
    target[..., 16:28, 16:28] = 2
    logits = torch.zeros(2, 3, 32, 32, requires_grad=True)
    value = loss(logits, target)
    value.backward()
    assert value > 0 and logits.grad.abs().sum() > 0
    perfect = torch.nn.functional.one_hot(target[:, 0].long(), 3).permute(0, 3, 1, 2).float() * 20
    assert loss(perfect, target) < 0.05


def test_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match="binary mode"):
        MarginalWeightLoss()(torch.zeros(1, 3, 8, 8), torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="4D"):
        MarginalWeightLoss()(torch.zeros(1, 8, 8), torch.zeros(1, 8, 8))


def test_serp_trains_network_and_projectors_and_leaves_network_standalone():
    torch.manual_seed(0)
    net = LiteNeXt(base_channels=8)
    serp = SERP(net, embedding_channels=64, hidden=32, projection=16).train()
    images = torch.rand(4, 3, 32, 32)
    logits, consistency = serp(images, second_view(images))
    assert logits.shape == (4, 1, 32, 32) and 0 <= consistency.item() <= 4
    (logits.mean() + consistency).backward()
    assert serp.projector_s[0].weight.grad is not None and serp.predictor[0].weight.grad is not None
    assert serp.projector_t[0].weight.grad is None  # target side carries no gradient
    assert all(p.grad is not None for p in net.parameters())
    # inference uses the plain network: projectors are not part of its state
    assert not any(k.startswith("projector") for k in net.state_dict())


def test_batch_dice_does_not_punish_a_class_absent_from_one_image():
    # class 2 lies in image 0 only; a faint class-2 blob in image 1 is a small error that per-image Dice scores as
    # a whole lost class (loss ~1 for that image and class), while Dice over the batch weighs it by its size
    target = torch.zeros(2, 1, 32, 32)
    target[:, :, 4:12, 4:12] = 1
    target[0, :, 16:28, 16:28] = 2
    # confident logits: the probability left on an absent class (~1e-13 a pixel) is below Dice's smoothing term
    clean = torch.nn.functional.one_hot(target[:, 0].long(), 3).permute(0, 3, 1, 2).float() * 30
    spurious = clean.clone()
    spurious[1, 2, 20:22, 20:22] = 30.0  # 4 of 1024 pixels of image 1 lean to class 2
    per_image = MarginalWeightLoss(to_onehot_y=True, softmax=True)
    over_batch = MarginalWeightLoss(to_onehot_y=True, softmax=True, batch=True)
    per_image_cost = per_image(spurious, target) - per_image(clean, target)
    over_batch_cost = over_batch(spurious, target) - over_batch(clean, target)
    assert per_image_cost > 0.1
    assert 0 < over_batch_cost < per_image_cost / 10
