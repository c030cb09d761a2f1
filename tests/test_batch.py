"""What a method receives: Batch.spatial's checks of the target layer's tensors."""

from __future__ import annotations

import pytest
import torch

from tests.nets import GapNet
from xaicli.errors import MethodError
from xaicli.methods.batch import Batch, Runner


def batch(**tensors: torch.Tensor | None) -> Batch:
    net = GapNet().eval()
    x = torch.zeros(2, 3, 8, 8)
    return Batch(x=x, targets=torch.zeros(2, dtype=torch.long), logits=torch.zeros(2, 5), runner=Runner(net, 4),
                 **tensors)


def test_spatial_returns_the_layer_tensors() -> None:
    a, g = torch.rand(2, 4, 3, 3), torch.rand(2, 4, 3, 3)
    got_a, got_g = batch(activations=a, gradients=g).spatial()
    assert got_a is a and got_g is g
    got_a, got_g = batch(activations=a).spatial(grads=False)  # a gradient-free method
    assert got_a is a and got_g is None


def test_spatial_refuses_missing_or_flat_tensors() -> None:
    with pytest.raises(MethodError, match="needs the target layer's activations and gradients"):
        batch(activations=torch.rand(2, 4, 3, 3)).spatial()
    with pytest.raises(MethodError, match="needs the target layer's activations"):
        batch().spatial(grads=False)
    with pytest.raises(MethodError, match=r"gives shape \(2, 4\), not a spatial map") as e:
        batch(activations=torch.rand(2, 4), gradients=torch.rand(2, 4)).spatial()
    assert "xai layers" in (e.value.hint or "")
