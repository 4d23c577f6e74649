"""fuse(): Conv2d -> ReLU and (eval) Conv2d -> BatchNorm2d -> ReLU replaced by FusedConv2dReLU, same outputs."""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import fastmtl
from fastmtl import FusedConv2dReLU
from fastmtl.nn import fuse_report
from fastmtl.testing import rel_err

torchvision = pytest.importorskip("torchvision", reason="fuse() is tested on torchvision's ResNet-18 and VGG-11")


def _fused_modules(model):
    return [m for m in model.modules() if isinstance(m, FusedConv2dReLU)]


def _randomise_batchnorms(model):
    """Non-trivial running statistics and affine parameters, so a wrong fold shows."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


class FunctionalRelus(nn.Module):
    """Every ReLU spelling fuse() must recognise."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.c4 = nn.Conv2d(8, 8, 3, padding=1)
        self.c5 = nn.Conv2d(8, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.relu(self.c1(x))
        x = F.relu(self.c2(x))
        x = torch.relu(self.c3(x))
        x = self.c4(x).relu()
        return F.relu(self.c5(x), inplace=True)


def _check_train_parity(model, fused, x):
    """Forward and every parameter gradient equal (rel err <= 1e-5 in float32)."""
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    y1, y2 = model(x1), fused(x2)
    assert rel_err(y2, y1) <= 1e-5
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    assert rel_err(x2.grad, x1.grad) <= 1e-5
    grads = dict(fused.named_parameters())
    for name, p in model.named_parameters():
        assert rel_err(grads[name].grad, p.grad) <= 1e-5, name


def test_plain_sequential_train_mode_outputs_and_gradients_match():
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(inplace=True),
        nn.MaxPool2d(2), nn.Conv2d(16, 8, 3, padding=1), nn.ReLU(),
    )
    fused = fastmtl.fuse(model)
    assert fused.training
    assert fuse_report(fused).num_fused == 3 and len(_fused_modules(fused)) == 3
    assert fuse_report(fused).method == "fx"
    assert list(fused.state_dict()) == list(model.state_dict())
    _check_train_parity(model, fused, torch.randn(2, 3, 12, 12))


def test_every_relu_spelling_is_fused():
    model = FunctionalRelus()
    fused = fastmtl.fuse(model)
    report = fuse_report(fused)
    assert report.num_fused == 5, str(report)
    assert not report.skipped
    _check_train_parity(model, fused, torch.randn(2, 3, 8, 8))


def test_inplace_false_leaves_model_untouched_and_inplace_true_shares_parameters():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    fused = fastmtl.fuse(model)
    assert isinstance(model[0], nn.Conv2d)
    assert fused.get_submodule("0").weight is not model[0].weight
    shared = fastmtl.fuse(model, inplace=True)
    assert shared.get_submodule("0").weight is model[0].weight


def test_state_dict_round_trip_original_checkpoint_into_fused_train_model():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.ReLU())
    fused = fastmtl.fuse(model)
    other = copy.deepcopy(model)
    for p in other.parameters():
        nn.init.normal_(p)
    fused.load_state_dict(other.state_dict())  # strict: same keys, same shapes
    x = torch.randn(2, 3, 8, 8)
    assert rel_err(fused(x), other(x)) <= 1e-5
    back = copy.deepcopy(model)
    back.load_state_dict(fused.state_dict())
    assert rel_err(back(x), other(x)) <= 1e-5


def test_unused_modules_keep_their_state_dict_keys():
    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.spare = nn.Linear(2, 2)  # never called: fx alone would drop it
            self.register_buffer("scale", torch.ones(1))

        def forward(self, x):
            return torch.relu(self.conv(x))

    model = WithSpare()
    fused = fastmtl.fuse(model)
    assert fuse_report(fused).num_fused == 1
    assert set(fused.state_dict()) == set(model.state_dict())


def _resnet18():
    torch.manual_seed(0)
    return _randomise_batchnorms(torchvision.models.resnet18(weights=None)).eval()


def test_resnet18_eval_all_nine_sites_fused_same_outputs(caplog):
    model = _resnet18()
    with caplog.at_level(logging.INFO, logger="fastmtl.nn.fuse"):
        fused = fastmtl.fuse(model)
    report = fuse_report(fused)
    assert report.num_fused == 9 and report.num_folded == 9, str(report)
    fused_names = {name for name, _ in report.fused}
    assert fused_names == {"conv1"} | {f"layer{i}.{j}.conv1" for i in range(1, 5) for j in range(2)}
    assert len(report.skipped) == 11  # conv2 of each block and 3 downsample convs: BN output goes to the add
    assert all("add" in why for _, why in report.skipped)
    assert "fused 9 convolution(s)" in caplog.text
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(fused(x), model(x)) <= 1e-4
    folded_bns = {"bn1"} | {f"layer{i}.{j}.bn1" for i in range(1, 5) for j in range(2)}
    dropped = set(model.state_dict()) - set(fused.state_dict())
    assert {k.rpartition(".")[0] for k in dropped} == folded_bns


def test_resnet18_folded_model_refuses_train():
    fused = fastmtl.fuse(_resnet18())
    with pytest.raises(RuntimeError, match="inference only"):
        fused.train()
    fused.eval()  # eval stays allowed


def test_resnet18_train_mode_folds_nothing_and_says_why():
    model = _resnet18().train()
    fused = fastmtl.fuse(model)
    report = fuse_report(fused)
    assert report.num_fused == 0
    assert len(report.skipped) == 20  # every convolution feeds a training-mode BatchNorm
    assert all("training mode" in why for _, why in report.skipped)
    fused.train()  # nothing folded: training allowed
    assert set(fused.state_dict()) == set(model.state_dict())


def _vgg11_features(batch_norm=False):
    """torchvision's VGG-11 convolutional part (configuration "A"), without building the 100M-parameter head."""
    return torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["A"], batch_norm=batch_norm)


def test_vgg11_eval_same_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(_vgg11_features(batch_norm=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10))
    model = _randomise_batchnorms(model).eval()
    fused = fastmtl.fuse(model)
    assert fuse_report(fused).num_fused == 8 and fuse_report(fused).num_folded == 8
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(fused(x), model(x)) <= 1e-4


def test_vgg11_plain_train_mode_fuses_all_eight_and_keeps_keys():
    torch.manual_seed(0)
    features = _vgg11_features()
    fused = fastmtl.fuse(features)
    assert fuse_report(fused).num_fused == 8
    assert list(fused.state_dict()) == list(features.state_dict())
    _check_train_parity(features, fused, torch.randn(1, 3, 32, 32))


def test_conv_output_with_two_consumers_is_left_alone():
    class TwoConsumers(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Conv2d(3, 4, 3, padding=1)
            self.other = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            z = self.shared(x)
            return torch.relu(z) + z, torch.relu(self.other(z))

    model = TwoConsumers()
    fused = fastmtl.fuse(model)
    report = fuse_report(fused)
    assert [name for name, _ in report.fused] == ["other"]
    assert report.skipped[0][0] == "shared" and "3 users" in report.skipped[0][1]
    assert isinstance(fused.get_submodule("shared"), nn.Conv2d)
    x = torch.randn(1, 3, 6, 6)
    for a, b in zip(fused(x), model(x)):
        assert rel_err(a, b) <= 1e-5


def test_batchnorm_with_other_users_and_non_relu_followers_left_alone():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.conv2 = nn.Conv2d(4, 4, 3)

        def forward(self, x):
            z = self.bn(self.conv(x))
            return torch.relu(z) * z, torch.sigmoid(self.conv2(z))

    fused = fastmtl.fuse(_randomise_batchnorms(Branchy()).eval())
    report = fuse_report(fused)
    assert report.num_fused == 0
    reasons = dict(report.skipped)
    assert "BatchNorm2d output has 3 users" in reasons["conv"]
    assert "sigmoid" in reasons["conv2"]


def test_shared_conv_module_called_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return torch.relu(self.conv(torch.relu(self.conv(x))))

    model = Twice()
    fused = fastmtl.fuse(model)
    assert fuse_report(fused).num_fused == 1
    x = torch.randn(1, 4, 5, 5)
    assert rel_err(fused(x), model(x)) <= 1e-5


def test_padding_mode_reflect_left_alone_with_reason():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU())
    fused = fastmtl.fuse(model)
    report = fuse_report(fused)
    assert report.num_fused == 0 and "padding_mode='reflect'" in report.skipped[0][1]
    x = torch.randn(1, 3, 6, 6)
    assert rel_err(fused(x), model(x)) <= 1e-6


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True)), nn.Conv2d(8, 4, 1))

    def forward(self, x):
        y = self.a(x)
        if y.sum() > 0:
            y = y * 2
        return self.b(y)


def test_untraceable_model_falls_back_to_sequentials():
    model = _randomise_batchnorms(Untraceable()).eval()
    fused = fastmtl.fuse(model)
    report = fuse_report(fused)
    assert report.method == "sequential" and report.trace_error
    assert isinstance(fused, Untraceable)
    assert report.num_fused == 2 and report.num_folded == 1
    assert ("b.1", "last module of its nn.Sequential (no ReLU after it)") in report.skipped
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert rel_err(fused(x), model(x)) <= 1e-4
    with pytest.raises(RuntimeError, match="inference only"):
        fused.train()


def test_untraceable_model_train_mode_fallback_keeps_keys_and_gradients():
    model = Untraceable().train()
    fused = fastmtl.fuse(model)
    report = fuse_report(fused)
    assert report.method == "sequential" and report.num_fused == 1
    assert "training mode" in dict(report.skipped)["a.0"]
    assert list(fused.state_dict()) == list(model.state_dict())
    _check_train_parity(model, fused, torch.randn(2, 3, 8, 8))


def test_fusing_twice_is_harmless():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    once = fastmtl.fuse(model)
    twice = fastmtl.fuse(once)
    assert fuse_report(twice).num_fused == 0
    x = torch.randn(1, 3, 6, 6)
    assert rel_err(twice(x), model(x)) <= 1e-5


def test_fused_graph_module_compiles():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1), nn.ReLU())
    fused = fastmtl.fuse(model)
    assert isinstance(fused, fx.GraphModule)
    compiled = torch.compile(fused, fullgraph=True)
    x = torch.randn(2, 3, 8, 8)
    assert rel_err(compiled(x), model(x)) <= 1e-5


def test_rejects_non_module():
    with pytest.raises(TypeError, match="nn.Module"):
        fastmtl.fuse(lambda x: x)


@pytest.mark.cuda
def test_cuda_resnet18_eval_fused_same_outputs():
    model = _resnet18().cuda()
    fused = fastmtl.fuse(model)
    assert fuse_report(fused).num_fused == 9
    x = torch.randn(2, 3, 64, 64, device="cuda")
    with torch.no_grad():
        assert rel_err(fused(x), model(x)) <= 1e-4  # conftest turns tf32 off
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = fused(x)
        assert rel_err(low, model(x)) <= 5e-2  # bf16 through a 20-layer network


def test_eval_flags_carried_to_every_submodule():
    model = _resnet18()
    fused = fastmtl.fuse(model)
    assert not any(m.training for m in fused.modules())


class DropoutByFlag(nn.Module):
    """A forward that branches on self.training (functional dropout): fx would freeze the traced mode."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(F.dropout(self.body(x), 0.5, training=self.training))


@pytest.mark.parametrize("fuse_mode", ["train", "eval"])
def test_mode_dependent_forward_falls_back_and_follows_later_mode_changes(fuse_mode):
    model = DropoutByFlag().train(fuse_mode == "train")
    fused = fastmtl.fuse(model)
    report = fuse_report(fused)
    assert report.method == "sequential" and "train and eval mode" in report.trace_error
    assert report.fused == [("body.0", "conv+relu")]
    x = torch.randn(2, 3, 6, 6)
    model.eval()
    fused.eval()
    assert torch.equal(fused(x), fused(x))  # no dropout left on
    assert rel_err(fused(x), model(x)) <= 1e-5
    fused.train()
    torch.manual_seed(0)
    y = fused(x)
    torch.manual_seed(0)
    assert rel_err(y, model.train()(x)) <= 1e-5  # dropout back on, the same mask from the same seed


def test_mode_independent_forward_still_traced_and_mode_flags_restored():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Dropout(0.5)).train()
    model[2].eval()  # a mixed state must come back as it was
    fused = fastmtl.fuse(model, inplace=True)
    assert fuse_report(fused).method == "fx"
    assert [m.training for m in model.modules()] == [True, True, True, False]


class SequentialWithOwnForward(nn.Sequential):
    """Uses its children out of nn.Sequential's order: returns the conv output as well as the ReLU's."""

    def forward(self, x):
        pre = self[0](x)
        return self[1](pre) + pre


class UntraceableWithCustomSequential(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = SequentialWithOwnForward(nn.Conv2d(3, 4, 3), nn.ReLU())

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: fx cannot trace it
            x = x * 2
        return self.block(x)


def test_fallback_leaves_sequential_subclasses_with_their_own_forward():
    model = UntraceableWithCustomSequential()
    fused = fastmtl.fuse(model)
    report = fuse_report(fused)
    assert report.method == "sequential" and report.num_fused == 0
    assert "overrides nn.Sequential.forward" in dict(report.skipped)["block.0"]
    x = torch.randn(2, 3, 6, 6).abs()
    assert rel_err(fused(x), model(x)) <= 1e-6


class StandardisedConv(nn.Conv2d):
    """Weight standardisation: overrides only _conv_forward."""

    def _conv_forward(self, x, weight, bias):
        w = (weight - weight.mean(dim=(1, 2, 3), keepdim=True)) / (weight.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return super()._conv_forward(x, w, bias)


class UntraceableStandardised(Untraceable):
    def __init__(self):
        super().__init__()
        self.b = nn.Sequential(StandardisedConv(8, 4, 3), nn.ReLU())


@pytest.mark.parametrize("traceable", [True, False])
def test_conv_subclass_overriding_conv_forward_is_not_fused(traceable):
    model = nn.Sequential(StandardisedConv(3, 8, 3), nn.ReLU()) if traceable else UntraceableStandardised()
    fused = fastmtl.fuse(model)
    assert fuse_report(fused).num_fused == 0  # (Untraceable's a.0 is followed by a training-mode BatchNorm)
    if not traceable:  # fx traces through the subclass (its conv2d call is not a module): only the fallback sees it
        assert "overrides nn.Conv2d._conv_forward" in dict(fuse_report(fused).skipped)["b.0"]
    with pytest.raises(ValueError, match="_conv_forward"):
        FusedConv2dReLU.from_conv(StandardisedConv(3, 4, 3))
    x = torch.randn(2, 3, 6, 6)
    assert rel_err(fused(x), model(x)) <= 1e-6


@pytest.mark.parametrize("where", ["relu", "conv_backward", "conv_forward"])
@pytest.mark.parametrize("traceable", [True, False])
def test_modules_with_hooks_are_not_fused_and_their_hooks_still_run(where, traceable):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()) if traceable else Untraceable()
    seq = model if traceable else model.b[0]
    seq[1] = nn.ReLU()  # not in place: PyTorch forbids an in-place op on a backward-hooked module's output
    calls = []
    if where == "relu":
        seq[1].register_forward_hook(lambda *args: calls.append(1))
    elif where == "conv_backward":
        seq[0].register_full_backward_hook(lambda *args: calls.append(1))
    else:
        seq[0].register_forward_hook(lambda *args: calls.append(1))
    fused = fastmtl.fuse(model, inplace=True)
    report = fuse_report(fused)
    assert report.method == ("fx" if traceable else "sequential")
    name = "0" if traceable else "b.0.0"
    assert "hooks" in dict(report.skipped)[name]
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    fused(x).sum().backward()
    assert calls == [1]


def test_relu_given_its_input_as_a_keyword_is_fused():
    class KeywordRelu(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.relu = nn.ReLU()
            self.conv2 = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return torch.relu(input=self.conv2(self.relu(input=self.conv(x))))

    model = KeywordRelu()
    fused = fastmtl.fuse(model)
    assert fuse_report(fused).num_fused == 2
    x = torch.randn(2, 3, 6, 6)
    assert rel_err(fused(x), model(x)) <= 1e-5


class AuxHeadByFlag(nn.Module):
    """GoogLeNet's pattern: an auxiliary head called only in training (a branch on the root's self.training)."""

    def __init__(self, head_dropout: bool = False):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.aux = DropoutHead() if head_dropout else nn.Conv2d(8, 2, 1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        features = self.body(x)
        if self.training:
            return self.head(features), self.aux(features)
        return self.head(features)


class DropoutHead(nn.Module):
    """A head whose own forward branches on its flag; it holds no BatchNorm, so its train() stays allowed."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.conv(F.dropout(x, 0.5, training=self.training))


def test_eval_model_branching_on_training_is_traced_in_eval_when_a_batchnorm_is_folded():
    model = _randomise_batchnorms(AuxHeadByFlag()).eval()
    fused = fastmtl.fuse(model)
    report = fuse_report(fused)
    assert (report.method, report.frozen_mode, report.fused) == ("fx", "eval", [("body.0", "conv+bn+relu")])
    assert "keeps its eval branch" in str(report)
    x = torch.randn(2, 3, 6, 6)
    assert rel_err(fused(x), model(x)) <= 1e-5
    with pytest.raises(RuntimeError, match="inference"):
        fused.train()


class DropoutHeadAfterBatchNorm(AuxHeadByFlag):
    """A folded BatchNorm, then a head with its own branch on its flag (traced inline, since it is not a leaf)."""

    def __init__(self):
        super().__init__(head_dropout=True)

    def forward(self, x):
        return self.aux(self.body(x))


def test_eval_graph_not_frozen_when_a_module_that_may_still_train_branches_on_its_flag():
    model = _randomise_batchnorms(DropoutHeadAfterBatchNorm()).eval()
    fused = fastmtl.fuse(model)
    report = fuse_report(fused)
    assert report.method == "sequential" and report.frozen_mode is None
    assert report.fused == [("body.0", "conv+bn+relu")]
    fused.aux.train()  # allowed, and the head's dropout must follow it
    x = torch.randn(2, 3, 6, 6)
    assert not torch.equal(fused(x), fused(x))


@pytest.mark.parametrize("name", ["googlenet", "inception_v3"])
def test_torchvision_models_with_auxiliary_heads_fuse_in_eval(name):
    model = getattr(torchvision.models, name)(weights=None, aux_logits=True, init_weights=True).eval()
    fused = fastmtl.fuse(model)
    report = fuse_report(fused)
    assert report.method == "fx" and report.frozen_mode == "eval"
    assert report.num_folded == report.num_fused == {"googlenet": 57, "inception_v3": 94}[name]
    x = torch.randn(1, 3, 75 if name == "inception_v3" else 64, 75 if name == "inception_v3" else 64)
    with torch.no_grad():
        assert rel_err(fused(x).double(), model(x).double()) <= 1e-4
