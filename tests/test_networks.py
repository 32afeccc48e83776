"""Network tests in MONAI's style: shapes, parameter counts, gradients, export and argument checks."""

import os
import tempfile
import warnings

import numpy as np
import pytest
import torch

from networks import LiteNeXt, LTMedNeXt, LTMedNeXtClassifier
from networks.ltmednext import LTMedNeXtBlock


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial weights (default inits leave layer scales at 1e-6, which would hide errors)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return model.eval()


@pytest.mark.parametrize("kwargs,expected", [({}, 711_201), ({"far_kernel_size": 3}, 701_601)])
def test_litenext_parameter_count(kwargs, expected):
    assert _count(LiteNeXt(in_channels=3, out_channels=1, **kwargs)) == expected


def test_litenext_macs_paper_configuration():
    from ptflops import get_model_complexity_info

    macs, params = get_model_complexity_info(LiteNeXt(fused_decoder=False), (3, 256, 256), backend="aten",
                                             as_strings=False, print_per_layer_stat=False, verbose=False)
    assert params == 711_201
    assert 0.4170e9 < macs < 0.4180e9


@pytest.mark.parametrize("size,seg,cls", [("T", 3_386_521, 2_981_379), ("S", 8_319_969, 7_451_907),
                                          ("B", 16_199_977, 14_695_427)])
def test_ltmednext_parameter_counts(size, seg, cls):
    assert _count(LTMedNeXt(2, 1, 9, size)) == seg
    assert _count(LTMedNeXtClassifier(3, 3, size)) == cls


@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (1, 3, 50, 70), (1, 3, 17, 33), (1, 3, 256, 256)])
@pytest.mark.parametrize("out_channels", [1, 4])
def test_litenext_shapes(shape, out_channels):
    net = LiteNeXt(in_channels=3, out_channels=out_channels).eval()
    with torch.no_grad():
        assert net(torch.randn(*shape)).shape == (shape[0], out_channels, *shape[2:])


@pytest.mark.parametrize("shape", [(2, 1, 64, 64), (1, 1, 50, 70), (1, 1, 224, 224)])
def test_ltmednext_shapes(shape):
    net = LTMedNeXt(2, 1, 9, "T").eval()
    with torch.no_grad():
        assert net(torch.randn(*shape)).shape == (shape[0], 9, *shape[2:])
        assert LTMedNeXtClassifier(1, 3, "T").eval()(torch.randn(*shape)).shape == (shape[0], 3)


def test_litenext_fused_decoder_equals_published_order():
    fused = _randomise(LiteNeXt(out_channels=3))
    published = LiteNeXt(out_channels=3, fused_decoder=False).eval()
    published.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        a, b = fused(x), published(x)
    assert a.abs().max() > 1e-2  # not a trivially small output
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_ltmednext_merged_spatial_encoding_equals_three_branches():
    block = LTMedNeXtBlock(16).eval()
    for branch in block.sem_branches:
        torch.nn.init.normal_(branch.weight)
        torch.nn.init.normal_(branch.bias)
    x = torch.randn(2, 16, 20, 24)
    with torch.no_grad():
        three_branches = sum(branch(x) for branch in block.sem_branches)
        torch.testing.assert_close(block._spatial_encoding(x), three_branches, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("in_channels", [1, 3])
def test_ltmednext_channels_last_same_values(in_channels, monkeypatch):
    """The encoder switches to channels-last memory (also for one input channel, where ``contiguous`` would not);
    the values equal the NCHW computation."""
    import networks.ltmednext as ltmednext

    model = _randomise(LTMedNeXt(2, in_channels, 4, "T"))
    x = torch.randn(2, in_channels, 64, 64)
    with torch.no_grad():
        features = model.encoder(x)
        out = model(x)
        assert all(f.is_contiguous(memory_format=torch.channels_last) and not f.is_contiguous() for f in features)
        monkeypatch.setattr(ltmednext, "to_channels_last", lambda t: t)
        assert model.encoder(x)[0].is_contiguous()
        torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("net,shape", [(lambda: LiteNeXt(base_channels=8), (2, 3, 32, 32)),
                                       (lambda: LTMedNeXt(2, 1, 3, "T"), (2, 1, 64, 64)),
                                       (lambda: LTMedNeXtClassifier(3, 2, "T"), (2, 3, 64, 64))])
def test_gradients_reach_every_parameter(net, shape):
    model = net().train()
    out = model(torch.randn(*shape))
    out.square().mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing


def test_deterministic_under_seed():
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        net = LiteNeXt(base_channels=8).eval()
        with torch.no_grad():
            outs.append(net(torch.ones(1, 3, 32, 32)))
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)


@pytest.mark.parametrize("net,shape", [(lambda: LiteNeXt(), (1, 3, 64, 48)), (lambda: LTMedNeXt(2, 1, 9, "T"), (1, 1, 64, 64)),
                                       (lambda: LTMedNeXtClassifier(3, 2, "T"), (1, 3, 64, 64))])
def test_torchscript_and_onnx_parity(net, shape):
    import onnxruntime

    model = _randomise(net())
    x = torch.randn(*shape)
    with torch.no_grad():
        expected = model(x)
        scripted = torch.jit.script(model)
        torch.testing.assert_close(scripted(x), expected, atol=1e-5, rtol=1e-5)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), path, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "batch"}}, dynamo=False)
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        x2 = torch.randn(2, *shape[1:])
        got = session.run(None, {"x": x2.numpy()})[0]
    with torch.no_grad():
        want = model(x2).numpy()
    assert np.abs(got - want).max() < 1e-4


@pytest.mark.parametrize("factory,message", [
    (lambda: LiteNeXt(in_channels=0), "in_channels"),
    (lambda: LiteNeXt(far_kernel_size=4), "far_kernel_size"),
    (lambda: LiteNeXt(depths=(1, 1)), "depths"),
    (lambda: LTMedNeXt(3, 1, 9), "spatial_dims"),
    (lambda: LTMedNeXt(2, 1, 9, "XL"), "size"),
    (lambda: LTMedNeXt(2, 1, 9, "T", norm="group"), "norm"),
    (lambda: LTMedNeXtClassifier(3, 0), "num_classes|outputs"),
])
def test_bad_constructor_arguments(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


@pytest.mark.parametrize("model,shape", [(LiteNeXt(base_channels=8), (3, 32, 32)), (LiteNeXt(base_channels=8), (1, 1, 3, 32, 32)),
                                         (LTMedNeXt(2, 1, 2, "T"), (1, 32, 32)), (LTMedNeXtClassifier(3, 2, "T"), (3, 64, 64))])
def test_wrong_input_rank(model, shape):
    with pytest.raises(ValueError, match="4D input"):
        model(torch.randn(*shape))


def test_classifier_rejects_tiny_images():
    with pytest.raises(ValueError, match="at least 32x32"):
        LTMedNeXtClassifier(3, 2, "T")(torch.randn(1, 3, 16, 16))


def test_classifier_layer_scale_init():
    default, larger = LTMedNeXtClassifier(3, 2, "T"), LTMedNeXtClassifier(3, 2, "T", layer_scale_init=0.1)
    scales = {n: p for n, p in larger.named_parameters() if "gamma" in n}
    assert len(scales) == 20 and all(torch.all(p == 0.1) for p in scales.values())
    assert all(torch.all(p == 1e-6) for n, p in default.named_parameters() if "gamma" in n)
    larger.load_state_dict(default.state_dict())  # same parameters: checkpoints load either way
