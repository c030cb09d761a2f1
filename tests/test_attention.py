"""Attention rollout and the gradient-weighted rollout: the attention read beside the model is the
module's own (torchvision's weights returned with need_weights=True, timm's explicit path), its
gradient equals autograd's on an explicit attention, the rollout algebra on hand-set patterns,
known answers through a real toy ViT, and the model left exactly as found (also on error)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.nets import tiny_timm_vit, tiny_vit
from xaicli.config import TargetConfig
from xaicli.engine import Explainer
from xaicli.methods import get_method
from xaicli.methods.batch import Runner
from xaicli.methods.transformer import attention_taps, gradient_rollout, rollout


def explain(net: nn.Module, x: torch.Tensor, name: str, targets: torch.Tensor | None = None, **knobs) -> torch.Tensor:
    spec = get_method(name)
    ex = Explainer(net, [(spec, spec.params(**knobs))], None, TargetConfig(), Runner(model=net, budget=8))
    return ex(x, targets=targets).methods[0].maps[0]


def x_of(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def builders():
    out = [pytest.param(tiny_vit, id="torchvision")]
    out.append(pytest.param(tiny_timm_vit, id="timm", marks=pytest.mark.skipif(
        not _has_timm(), reason="timm not installed")))
    return out


def _has_timm() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


# --- the rollout algebra on hand-set attention ------------------------------------------------


def test_identity_attention_rolls_out_to_the_identity():
    eye = torch.eye(5).expand(2, 3, 5, 5)
    torch.testing.assert_close(rollout([eye, eye, eye]), torch.eye(5).expand(2, 5, 5))
    torch.testing.assert_close(gradient_rollout([eye, eye], [torch.ones(2, 3, 5, 5)] * 2),
                               torch.eye(5).expand(2, 5, 5) * 4)  # (I + I)(I + I)


def test_hand_set_pattern_gives_the_product_in_block_order():
    """Block 1: the class token attends only to token 2; block 2: token 2 attends only to token 4.
    The class row is then 0.5 e0 + 0.5 e2 (block 2's class row is e0); the wrong order would give
    0.5 e0 + 0.25 e2 + 0.25 e4."""
    a1, a2 = torch.eye(5), torch.eye(5)
    a1[0] = torch.tensor([0.0, 0, 1, 0, 0])
    a2[2] = torch.tensor([0.0, 0, 0, 0, 1])
    r = rollout([a1[None, None], a2[None, None]])
    torch.testing.assert_close(r[0, 0], torch.tensor([0.5, 0, 0.5, 0, 0]))
    torch.testing.assert_close(r[0, 2], torch.tensor([0, 0, 0.5, 0, 0.5]))
    # heads fused by mean, max or min before the residual
    heads = torch.stack([a1, torch.eye(5)])[None]  # head 0: the pattern, head 1: identity
    torch.testing.assert_close(rollout([heads], "mean")[0, 0], torch.tensor([0.75, 0, 0.25, 0, 0]))
    mx = rollout([heads], "max")[0, 0]
    torch.testing.assert_close(mx, torch.tensor([1.0, 0, 0.5, 0, 0]) / 1.5)


def test_gradient_rollout_one_block_is_identity_plus_positive_grad_times_attention():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 6, 6, generator=g).softmax(-1)
    da = torch.randn(2, 3, 6, 6, generator=g)
    expected = torch.eye(6) + (a * da).clamp_min(0).mean(1)
    torch.testing.assert_close(gradient_rollout([a], [da]), expected)
    a2, da2 = a.flip(-1), da.flip(-2)
    expected2 = expected + (a2 * da2).clamp_min(0).mean(1) @ expected
    torch.testing.assert_close(gradient_rollout([a, a2], [da, da2]), expected2)


# --- the attention read through the model's own modules ----------------------------------------


def test_torchvision_attention_is_the_modules_own_weights_and_its_gradient_exact():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(3, 5, 8)
    with attention_taps(mha) as taps:
        out, ref_w = mha(x, x, x, need_weights=True, average_attn_weights=False)
    (tap,) = taps
    torch.testing.assert_close(tap.weights(), ref_w, rtol=1e-5, atol=1e-6)
    # dA against autograd through an explicit attention: O = concat_h(A_h V_h) W_out^T + b
    upstream = torch.randn(3, 5, 8)
    a = tap.weights().clone().requires_grad_(True)
    o = (a @ tap.v).transpose(1, 2).reshape(3, 5, 8) @ mha.out_proj.weight.T + mha.out_proj.bias
    (ref_da,) = torch.autograd.grad((o * upstream).sum(), a)
    torch.testing.assert_close(tap.weight_grads(upstream), ref_da, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, o.detach(), rtol=1e-5, atol=1e-5)


def test_timm_attention_and_its_gradient_match_the_explicit_path():
    pytest.importorskip("timm")
    net = tiny_timm_vit()
    explicit = copy.deepcopy(net)
    kept: list[torch.Tensor] = []
    for blk in explicit.blocks:
        blk.attn.fused_attn = False  # timm's own non-fused path computes and uses A
        blk.attn.attn_drop.register_forward_hook(lambda m, args, out: kept.append(out))
    x, t = x_of(2), torch.tensor([1, 4])
    score = explicit(x).gather(1, t[:, None]).sum()
    ref_da = torch.autograd.grad(score, kept)
    with attention_taps(net) as taps, torch.enable_grad():
        xi = x.clone().requires_grad_(True)
        score = net(xi).gather(1, t[:, None]).sum()
    found = torch.autograd.grad(score, [tap.live for tap in taps])
    assert len(taps) == 2
    for tap, a, g, da in zip(taps, kept, found, ref_da, strict=True):
        torch.testing.assert_close(tap.weights(), a.detach(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(tap.weight_grads(g), da, rtol=1e-4, atol=1e-6)


def _state(net: nn.Module):
    return [(n, m.training, dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks),
             getattr(m, "fused_attn", None)) for n, m in net.named_modules()]


def assert_left_as_found(net: nn.Module, x: torch.Tensor, tapping, calls: int) -> None:
    """The tapped forward gives the model's outputs bit for bit, ``calls`` attention calls are read,
    and hooks, modes and flags are as before, also after an error inside and after both rollouts."""
    before, ref = _state(net), net(x)
    with tapping(net) as taps:
        out = net(x)
    assert torch.equal(out, ref) and len(taps) == calls
    assert _state(net) == before
    with pytest.raises(RuntimeError, match="boom"), tapping(net):
        net(x)
        raise RuntimeError("boom")
    assert _state(net) == before
    for name in ("attention_rollout", "grad_rollout"):
        explain(net, x, name)
        assert _state(net) == before
    assert torch.equal(net(x), ref)
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("build", builders())
def test_outputs_identical_and_the_model_left_as_found_also_after_an_error(build):
    assert_left_as_found(build(), x_of(), attention_taps, calls=2)


# --- known answers through a real toy ViT -----------------------------------------------------


def test_uniform_attention_gives_a_flat_rollout_of_known_height():
    """q = k = 0 in every block: each attention is uniform (1/T), so each rollout factor is
    0.5 U + 0.5 I and two blocks give 0.75 U + 0.25 I: every patch gets 0.75 / 17."""
    net = tiny_vit()
    with torch.no_grad():
        for blk in net.encoder.layers:
            blk.self_attention.in_proj_weight[:32].zero_()
            blk.self_attention.in_proj_bias[:32].zero_()
    m = explain(net, x_of(), "attention_rollout")
    assert m.shape == (3, 4, 4)
    torch.testing.assert_close(m, torch.full((3, 4, 4), 0.75 / 17))


def assert_batch_independent(net: nn.Module, x: torch.Tensor) -> None:
    """Both rollouts of a batch equal those of its images one by one (each with its own target)."""
    n = x.shape[0]
    for name in ("attention_rollout", "grad_rollout"):
        together = explain(net, x, name, targets=torch.arange(n))
        alone = torch.cat([explain(net, x[i:i + 1], name, targets=torch.tensor([i])) for i in range(n)])
        torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("build", builders())
def test_rollout_and_grad_rollout_do_not_depend_on_the_batch(build):
    assert_batch_independent(build(), x_of(4, seed=3))


def test_grad_rollout_is_class_specific_and_rollout_is_not():
    net = tiny_vit()
    x = x_of(1)
    r0, r1 = (explain(net, x, "attention_rollout", targets=torch.tensor([c])) for c in (0, 1))
    torch.testing.assert_close(r0, r1)
    g0, g1 = (explain(net, x, "grad_rollout", targets=torch.tensor([c])) for c in (0, 1))
    assert not torch.allclose(g0, g1)


def test_grad_rollout_with_frozen_parameters_and_register_tokens():
    pytest.importorskip("timm")
    net = tiny_timm_vit(reg_tokens=4)  # class + 4 register tokens before the 4x4 grid
    for p in net.parameters():
        p.requires_grad_(False)
    m = explain(net, x_of(2), "grad_rollout")
    assert m.shape == (2, 4, 4) and m.abs().sum() > 0
