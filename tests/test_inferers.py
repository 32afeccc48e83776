import pytest
import torch
from monai.inferers import SimpleInferer, SliceInferer

from networks.inferers import DihedralAverageInferer


class _PositionDependent(torch.nn.Module):
    """A network whose output changes under rotations and flips of its input (adds a fixed ramp), so that only a
    correct mapping back of every symmetry makes the averaged output equivariant."""

    def __init__(self, size: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mix = torch.nn.Conv2d(1, 3, 3, padding=1)
        self.ramp = torch.nn.Parameter(torch.randn(1, 3, size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(x) + self.ramp


def test_average_is_equivariant_under_every_symmetry():
    network = _PositionDependent(8).eval()
    inferer = DihedralAverageInferer(SimpleInferer())
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        out = inferer(x, network)
        plain = SimpleInferer()(x, network).softmax(1)
        assert not torch.allclose(out, plain, atol=1e-3)  # the symmetries were averaged
        torch.testing.assert_close(out.sum(1), torch.ones(2, 8, 8))
        for turns in range(4):
            for flip in (False, True):
                def transform(t: torch.Tensor) -> torch.Tensor:
                    t = torch.rot90(t, turns, (2, 3))
                    return t.flip(2) if flip else t
                torch.testing.assert_close(inferer(transform(x), network), transform(out), atol=1e-6, rtol=1e-5)


def test_sigmoid_averages_probabilities_of_a_binary_network():
    network = _PositionDependent(8).eval()
    x = torch.randn(1, 1, 8, 8)
    views = []
    with torch.no_grad():
        for turns in range(4):
            for flip in (False, True):
                view = torch.rot90(x, turns, (2, 3))
                probabilities = network(view.flip(2) if flip else view).sigmoid()
                views.append(torch.rot90(probabilities.flip(2) if flip else probabilities, -turns, (2, 3)))
        out = DihedralAverageInferer(SimpleInferer(), activation="sigmoid")(x, network)
        off = DihedralAverageInferer(SimpleInferer(), rotations=False, flip=False, activation="sigmoid")(x, network)
    torch.testing.assert_close(out, torch.stack(views).mean(0))  # per-channel probabilities, not a softmax
    torch.testing.assert_close(off, network(x).sigmoid())
    with pytest.raises(ValueError, match="activation must be"):
        DihedralAverageInferer(SimpleInferer(), activation="relu")


def test_classifier_logits_average_over_the_image_and_its_mirror():
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(1 * 4 * 6, 2)).eval()  # not mirror-invariant
    x = torch.randn(3, 1, 4, 6)  # not square: no rotations
    inferer = DihedralAverageInferer(SimpleInferer(), spatial_axes=(3, 2), rotations=False)
    with torch.no_grad():
        out = inferer(x, network)
        expected = (network(x).softmax(1) + network(x.flip(3)).softmax(1)) / 2
        assert out.shape == (3, 2)
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(inferer(x.flip(3), network), out)  # the mirror gets the same probabilities
        assert not torch.allclose(out, network(x).softmax(1), atol=1e-3)


def test_switched_off_is_the_inner_inferer_and_slices_volumes():
    network = _PositionDependent(8).eval()
    volume = torch.randn(1, 1, 8, 8, 5)
    slices = SliceInferer(roi_size=(8, 8), sw_batch_size=2, spatial_dim=2)
    with torch.no_grad():
        plain = slices(volume, network).softmax(1)
        off = DihedralAverageInferer(slices, rotations=False, flip=False)(volume, network)
        off_from_command_line = DihedralAverageInferer(slices, rotations="false", flip="false")(volume, network)
        on = DihedralAverageInferer(slices)(volume, network)
    torch.testing.assert_close(off, plain)
    torch.testing.assert_close(off_from_command_line, plain)  # "false" is not truthy here
    assert on.shape == plain.shape == (1, 3, 8, 8, 5)
    # each slice is averaged on its own: slice 2 of the volume gives what slice 2 alone gives
    with torch.no_grad():
        alone = DihedralAverageInferer(SimpleInferer())(volume[..., 2], network)
    torch.testing.assert_close(on[..., 2], alone, atol=1e-6, rtol=1e-5)


def test_clear_errors():
    with pytest.raises(ValueError, match="maybe"):
        DihedralAverageInferer(SimpleInferer(), rotations="maybe")
    with pytest.raises(ValueError, match="spatial_axes"):
        DihedralAverageInferer(SimpleInferer(), spatial_axes=(2, 2))
    with pytest.raises(ValueError, match="not square"):
        DihedralAverageInferer(SimpleInferer())(torch.randn(1, 1, 8, 6), _PositionDependent(8))
    with pytest.raises(ValueError, match="do not exist"):
        DihedralAverageInferer(SimpleInferer(), spatial_axes=(2, 4))(torch.randn(1, 1, 8, 8), _PositionDependent(8))
    # flips alone need no square plane
    assert DihedralAverageInferer(SimpleInferer(), rotations=False)(torch.randn(1, 1, 8, 6),
                                                                    torch.nn.Conv2d(1, 2, 1)).shape == (1, 2, 8, 6)
