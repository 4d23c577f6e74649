"""FusedTrunk: shapes, return_features, channels_last, autocast, torch.compile, from_module."""

import pytest
import torch
from torch import nn

from fastmtl import FusedConv2dReLU, FusedTrunk
from fastmtl.testing import TOLERANCES, rel_err


def _unfused_twin(trunk: FusedTrunk) -> nn.Module:
    """The same trunk built from nn.Conv2d + nn.ReLU, with the same weights."""
    stages = []
    for stage in trunk.stages:
        layers = []
        for m in stage:
            if isinstance(m, FusedConv2dReLU):
                conv = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, padding=m.padding)
                conv.load_state_dict(m.state_dict())
                layers += [conv, nn.ReLU()]
            else:
                layers.append(m)
        stages.append(nn.Sequential(*layers))
    return nn.Sequential(*stages)


def test_shapes_and_attributes():
    trunk = FusedTrunk(3, [(8, 2), (16, 1), (32, 2)])
    y = trunk(torch.randn(2, 3, 32, 24))
    assert y.shape == (2, 32, 4, 3)
    assert trunk.feature_channels == [8, 16, 32] and trunk.feature_strides == [2, 4, 8]
    assert trunk.out_channels == 32
    assert sum(isinstance(m, FusedConv2dReLU) for m in trunk.modules()) == 5


def test_widths_with_depths_and_no_pooling():
    trunk = FusedTrunk(1, [4, 8], depths=[1, 3], pool=None, return_features=True)
    feats = trunk(torch.randn(1, 1, 10, 10))
    assert [f.shape for f in feats] == [(1, 4, 10, 10), (1, 8, 10, 10)]
    assert sum(isinstance(m, FusedConv2dReLU) for m in trunk.modules()) == 4
    assert len(FusedTrunk(3, [4, 8, 16]).stages[2]) == 3  # default depth 2, then the pool


def test_return_features_lists_every_stage_output():
    trunk = FusedTrunk(3, [(8, 1), (16, 1), (32, 1)], pool="avg", return_features=True)
    x = torch.randn(2, 3, 16, 16)
    feats = trunk(x)
    assert [tuple(f.shape) for f in feats] == [(2, 8, 8, 8), (2, 16, 4, 4), (2, 32, 2, 2)]
    trunk.return_features = False
    assert torch.equal(trunk(x), feats[-1])


def test_matches_unfused_twin_forward_and_backward():
    trunk = FusedTrunk(3, [(8, 2), (16, 2)])
    twin = _unfused_twin(trunk)
    x = torch.randn(2, 3, 16, 16)
    y, ref = trunk(x), twin(x)
    assert rel_err(y, ref) <= 1e-5
    g = torch.randn_like(ref)
    y.backward(g)
    ref.backward(g)
    for p, q in zip(trunk.parameters(), twin.parameters()):
        assert rel_err(p.grad, q.grad) <= 1e-5


def test_activations_keep_their_scale():
    trunk = FusedTrunk(3, [(32, 3), (64, 3), (64, 3)], pool=None)
    y = trunk(torch.randn(4, 3, 16, 16))
    assert 0.1 < y.pow(2).mean().sqrt().item() < 10  # Kaiming init: no vanishing through 9 blocks


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(in_channels=3, stages=[]), "stages"),
        (dict(in_channels=3, stages=[(8, 0)]), "width >= 1, depth >= 1"),
        (dict(in_channels=3, stages=[8, 16], depths=[1]), "depths"),
        (dict(in_channels=3, stages=[(8, 1)], depths=2), "depths must not be given"),
        (dict(in_channels=3, stages=[8], pool="lp"), "pool"),
        (dict(in_channels=3, stages=[8], kernel_size=2), "kernel_size"),
        (dict(in_channels=0, stages=[8]), "in_channels"),
    ],
)
def test_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FusedTrunk(**kwargs)


def test_channels_last():
    trunk = FusedTrunk(3, [(8, 2), (16, 2)], return_features=True)
    x = torch.randn(2, 3, 16, 16)
    ref = trunk(x)
    trunk = trunk.to(memory_format=torch.channels_last)
    feats = trunk(x.contiguous(memory_format=torch.channels_last))
    for f, r in zip(feats, ref):
        assert f.is_contiguous(memory_format=torch.channels_last)
        assert rel_err(f, r) <= 1e-5


def test_autocast_bf16_on_cpu():
    trunk = FusedTrunk(3, [(8, 2), (16, 2)])
    x = torch.randn(2, 3, 16, 16)
    ref = trunk(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = trunk(x)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, ref) <= 4 * TOLERANCES["conv"][torch.bfloat16]  # four bf16 layers in a row
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trunk.parameters())


def test_torch_compile_fullgraph_forward_and_backward():
    trunk = FusedTrunk(3, [(8, 1), (16, 1)], return_features=True)
    compiled = torch.compile(trunk, fullgraph=True)
    x = torch.randn(2, 3, 8, 8)
    feats = compiled(x)
    ref = trunk(x)
    for f, r in zip(feats, ref):
        assert rel_err(f, r) <= 1e-5
    feats[-1].sum().backward()
    assert all(p.grad is not None for p in trunk.parameters())


def test_torch_compile_under_autocast():
    trunk = FusedTrunk(3, [(8, 1), (16, 1)])
    compiled = torch.compile(trunk, fullgraph=True)
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = compiled(x)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, trunk(x)) <= 4 * TOLERANCES["conv"][torch.bfloat16]


def _torchvision():
    return pytest.importorskip("torchvision", reason="these cases wrap torchvision's VGG / ResNet trunks")


def test_from_module_fuses_a_copy():
    torchvision = _torchvision()
    torch.manual_seed(0)
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["A"])
    trunk = FusedTrunk.from_module(features)
    assert trunk.fuse_report.num_fused == 8
    assert all(isinstance(m, nn.Conv2d) for m in features if not isinstance(m, (nn.ReLU, nn.MaxPool2d)))
    x = torch.randn(1, 3, 32, 32)
    assert rel_err(trunk(x), features(x)) <= 1e-5
    trunk.body.load_state_dict(features.state_dict())  # original checkpoints load into the body
    assert trunk.training


def test_from_module_return_features_gives_pool_outputs():
    torchvision = _torchvision()
    torch.manual_seed(0)
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["A"])
    trunk = FusedTrunk.from_module(features, return_features=True)
    x = torch.randn(1, 3, 32, 32)
    feats = trunk(x)
    assert [f.shape[1:] for f in feats] == [(64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2), (512, 1, 1)]
    ref = x
    expected = []
    for m in features:
        ref = m(ref)
        if isinstance(m, nn.MaxPool2d):
            expected.append(ref)
    for f, e in zip(feats, expected):
        assert rel_err(f, e) <= 1e-5


def test_from_module_without_pooling_appends_nothing_and_resnet_trunk():
    torchvision = _torchvision()
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None).eval()
    body = nn.Sequential(*list(resnet.children())[:-2])
    trunk = FusedTrunk.from_module(body, return_features=True)
    x = torch.randn(1, 3, 64, 64)
    feats = trunk(x)
    assert [f.shape[1:] for f in feats] == [(64, 16, 16), (512, 2, 2)]  # after the stem max-pool, and the end
    with torch.no_grad():
        assert rel_err(feats[-1], body(x)) <= 1e-4
    assert trunk.fuse_report.num_fused == 9
    with pytest.raises(RuntimeError, match="inference only"):
        trunk.train()
    with pytest.raises(ValueError, match="no pooling module"):
        FusedTrunk.from_module(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), return_features=True)


@pytest.mark.cuda
def test_cuda_trunk_train_step_matches_unfused_twin_under_bf16_autocast():
    trunk = FusedTrunk(3, [(16, 2), (32, 2)]).cuda().to(memory_format=torch.channels_last)
    twin = _unfused_twin(trunk).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, ref = trunk(x), twin(x)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, ref) <= 4 * TOLERANCES["conv"][torch.bfloat16]
    y.float().square().mean().backward()
    ref.float().square().mean().backward()
    for p, q in zip(trunk.parameters(), twin.parameters()):
        assert p.grad.dtype == torch.float32
        assert rel_err(p.grad, q.grad) <= 8 * TOLERANCES["conv"][torch.bfloat16]
