"""LRP / Deep Taylor through Zennit: conservation on bias-free nets, Zennit's own attributor on the
same model and composite, the model left exactly as found, clear errors."""

from __future__ import annotations

import sys
from types import ModuleType

import pytest
import torch
from torch import nn

from tests.nets import small_resnet
from tests.test_methods_attribution import BiasFreeNet
from tests.test_methods_gradient import PlainNet, batch_of, close, inputs
from xaicli.api import explain_tensor
from xaicli.errors import ConfigError, MethodError
from xaicli.methods.gradient_lrp import COMPOSITES, LrpParams, batchnorm_pairs, lrp_context


@pytest.fixture
def zennit() -> ModuleType:
    """zennit; the test is skipped without it."""
    return pytest.importorskip("zennit")


class ConvBnNet(nn.Module):
    """conv-BN-ReLU twice in a Sequential, then GAP and a linear head, batch norms with non-trivial statistics."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                      nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
        for bn in (self.features[1], self.features[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.2, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def snapshot(model: nn.Module) -> tuple:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())
    forwards = [n for n, m in model.named_modules() if "forward" in m.__dict__]
    return state, hooks, forwards, [type(m) for m in model.modules()], [n for n, _ in model.named_parameters()]


def assert_as_found(model: nn.Module, before: tuple) -> None:
    after = snapshot(model)
    assert after[0].keys() == before[0].keys()
    assert all(torch.equal(after[0][k], before[0][k]) for k in before[0])
    assert after[1:] == before[1:]


@pytest.mark.usefixtures("zennit")
@pytest.mark.parametrize("composite", COMPOSITES)
def test_relevance_is_conserved_on_a_bias_free_net(composite: str) -> None:
    """No biases, ReLU, max and average pooling: every composite conserves the logit. Tolerance:
    1e-5 of |logit| (the stabilisers, 1e-6, are the only leak)."""
    model, x = BiasFreeNet().eval(), inputs()
    batch, m, extras = batch_of(model, x, "lrp", {"composite": composite})
    logits = batch.target_scores()
    close(m.sum((1, 2)), logits, 1e-5)
    assert (extras["conservation_gap"].abs() <= 1e-5 * logits.abs()).all()
    assert (m > 0).any()


@pytest.mark.usefixtures("zennit")
def test_epsilon_rule_leaks_exactly_the_bias_share_with_biases() -> None:
    """With biases the epsilon rule loses what the biases take: a one-layer check, R = x w / z * z = x w."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5)).eval()
    x = torch.randn(3, 3, 4, 4)
    batch, m, extras = batch_of(model, x, "lrp", {"composite": "epsilon"})
    w = model[1].weight[batch.targets].view(3, 3, 4, 4)
    close(m, (x * w).sum(1), 1e-4)
    close(extras["conservation_gap"], -model[1].bias[batch.targets].detach(), 1e-4)


@pytest.mark.parametrize(("net", "composite"), [
    ("plain", "epsilon_plus_flat"), ("plain", "epsilon_alpha2_beta1"), ("convbn", "epsilon_gamma_box"),
    ("resnet18", "epsilon_plus_flat"), ("resnet18", "epsilon_gamma_box"),
])
def test_matches_zennits_own_attributor(net: str, composite: str, zennit: ModuleType) -> None:
    from zennit.attribution import Gradient
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import COMPOSITES as ZC
    from zennit.torchvision import ResNetCanonizer

    torch.manual_seed(0)
    model = {"plain": PlainNet, "convbn": ConvBnNet,
             "resnet18": small_resnet}[net]().eval()
    x = inputs(3)
    batch, m, _ = batch_of(model, x, "lrp", {"composite": composite})
    canonizers = [ResNetCanonizer()] if net == "resnet18" else [SequentialMergeBatchNorm()]
    kwargs = {"low": batch.pixels.to_model(torch.zeros_like(x[:1])),
              "high": batch.pixels.to_model(torch.ones_like(x[:1]))} if composite == "epsilon_gamma_box" else {}
    comp = ZC[composite](canonizers=canonizers, **kwargs)
    with Gradient(model, comp) as attributor:
        _out, rel = attributor(x.clone(), lambda o: torch.eye(5)[batch.targets] * o)
    close(m, rel.sum(1), 1e-5)
    if net == "convbn":  # the traced pairs are what Zennit's Sequential canonizer merges
        assert batchnorm_pairs(model, x[:1]) == [(["features.0"], "features.1"), (["features.3"], "features.4")]


@pytest.mark.usefixtures("zennit")
@pytest.mark.parametrize("net", ["convbn", "resnet18"])
def test_the_model_is_left_exactly_as_found_also_on_error(net: str) -> None:
    torch.manual_seed(0)
    model = ConvBnNet().eval() if net == "convbn" else small_resnet().eval()
    x = inputs(2)
    before = snapshot(model)
    ref_out = model(x)
    explain_tensor(model, x, "lrp", params={"composite": "epsilon_gamma_box"})
    assert_as_found(model, before)
    batch, _, _ = batch_of(model, x, "saliency")
    with pytest.raises(RuntimeError, match="boom"), lrp_context(batch, LrpParams()):
        assert snapshot(model)[1] > before[1]  # hooks are in place inside
        raise RuntimeError("boom")
    assert_as_found(model, before)
    torch.testing.assert_close(model(x), ref_out, rtol=0, atol=0)


def _bias_free_default_model() -> nn.Module:
    """The embedded EfficientNet-Lite0 with every bias zero (batch norms' shift and mean too): a
    bias-free net with 9 MBConv skip connections written as ``x + inputs`` in its blocks' forward."""
    from xaicli.config import Config
    from xaicli.models import build_model

    cfg = Config()
    model = build_model(cfg.model, cfg.preprocess).module.eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.bias.zero_()
                m.running_mean.zero_()
            elif isinstance(m, nn.Conv2d | nn.Linear) and m.bias is not None:
                m.bias.zero_()
    return model


@pytest.mark.usefixtures("zennit")
@pytest.mark.parametrize("composite", ["epsilon_plus_flat", "epsilon"])
def test_efficientnet_skips_share_the_relevance_instead_of_doubling_it(composite: str) -> None:
    """Without the MBConv canonizer each of the 9 skip sums hands the whole relevance to both of its
    terms, so the bias-free default model's relevance came out about 2^9 times its logit (epsilon:
    1e17). With it the relevance is the logit to 3% (ReLU6 and the stabilisers). The blocks are
    restored afterwards."""
    from xaicli.methods.gradient_lrp import _is_mbconv

    model = _bias_free_default_model()
    blocks = [m for m in model.modules() if _is_mbconv(m)]
    assert len(blocks) == 16
    before = snapshot(model)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    batch, m, extras = batch_of(model, x, "lrp", {"composite": composite})
    logits = batch.target_scores()
    ratio = extras["relevance_sum"] / logits
    assert ((ratio - 1).abs() < 0.03).all(), ratio
    close(m.sum((1, 2)), extras["relevance_sum"], 1e-4)  # the map is the relevance summed over channels
    assert_as_found(model, before)
    assert all(b.id_skip for b in blocks)


def test_unknown_composite_lists_the_choices() -> None:
    with pytest.raises(ConfigError) as e:
        explain_tensor(PlainNet().eval(), inputs(1), "lrp", params={"composite": "epsilon_plus_flatt"})
    text = e.value.message + " " + (e.value.hint or "")
    assert "epsilon_plus_flat" in text and "epsilon_gamma_box" in text


def test_missing_zennit_says_how_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "zennit", None)
    with pytest.raises(MethodError) as e:
        explain_tensor(PlainNet().eval(), inputs(1), "lrp")
    assert "pip install zennit" in e.value.hint
