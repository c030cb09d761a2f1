"""The capture step: one shared forward, the target layer recorded once, gradients of explicit
targets, hooks removed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.nets import GapNet
from xaicli.capture import forward
from xaicli.config import TargetConfig
from xaicli.engine import Explainer
from xaicli.errors import LayerError
from xaicli.layers import resolve_layer
from xaicli.methods import get_method
from xaicli.methods.batch import Runner


class Reuse(nn.Module):
    """One ReLU module applied twice in the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv2(self.act(self.conv1(x))))
        return self.fc(h.mean((2, 3)))


def test_a_layer_that_runs_twice_is_an_error() -> None:
    net = Reuse().eval()
    with pytest.raises(LayerError, match="ran 2 times in one forward pass"):
        forward(net, torch.randn(1, 3, 8, 8), resolve_layer(net, "act"), frozenset({"layer"}))
    cap = forward(net, torch.randn(1, 3, 8, 8), resolve_layer(net, "conv2"), frozenset({"layer"}))
    assert cap.activations is not None and cap.activations.shape == (1, 4, 8, 8)


def test_gradients_of_explicit_targets_match_autograd() -> None:
    net = GapNet().eval()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    cap = forward(net, x, resolve_layer(net, "features"), frozenset({"layer", "input"}))
    t = torch.tensor([0, 2, 4])
    grads, input_grad = cap.gradients(t, retain=False)
    xi = x.clone().requires_grad_(True)
    feats = net.features(xi)
    logits = net.fc(net.pool(feats).flatten(1))
    g_feat, g_x = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), [feats, xi])
    torch.testing.assert_close(grads, g_feat)
    torch.testing.assert_close(input_grad, g_x)
    torch.testing.assert_close(cap.logits, logits.detach())


def test_explainer_explains_the_targets_it_is_given() -> None:
    net = GapNet().eval()
    spec = get_method("gradcam")
    ex = Explainer(net, [(spec, spec.params())], resolve_layer(net, "features"), TargetConfig(),
                   Runner(model=net, budget=8))
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    predicted = ex(x)
    fixed = torch.tensor([1, 1, 3, 0])
    given = ex(x, targets=fixed)
    assert given.targets[:, 0].tolist() == fixed.tolist()
    two = ex(x, targets=torch.stack([fixed, predicted.targets[:, 0]], 1))
    torch.testing.assert_close(two.methods[0].maps[0], given.methods[0].maps[0])
    torch.testing.assert_close(two.methods[0].maps[1], predicted.methods[0].maps[0])
