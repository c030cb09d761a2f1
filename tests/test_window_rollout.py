"""Attention rollout and the gradient-weighted rollout through Swin's window attention: the windows'
geometry (shift, padding, partition order) against the module's own output, the window rollout
against the dense product written out with plain matrices, against the global rollout where one
window covers the grid, mass conservation, and the model left exactly as found."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.nets import tiny_swin, tiny_timm_swin
from tests.test_attention import explain
from xaicli.errors import MethodError
from xaicli.methods.transformer import _rollout_factor, gradient_rollout, rollout
from xaicli.methods.windows import Frame, WindowTap, roll_windows, window_taps


def _has_timm() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


needs_timm = pytest.mark.skipif(not _has_timm(), reason="timm not installed")


def swins():
    """Builders of a toy Swin for a square input size (torchvision's adapts to any; timm's is built for one)."""
    return [pytest.param(lambda size=32: tiny_swin(), id="torchvision"),
            pytest.param(lambda size=32: tiny_swin(v2=True), id="torchvision-v2"),
            pytest.param(lambda size=32: tiny_timm_swin(image_size=size), id="timm", marks=needs_timm),
            pytest.param(lambda size=32: tiny_timm_swin(image_size=size, v2=True), id="timm-v2", marks=needs_timm)]


def x_of(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def dense(tap: WindowTap, attn: torch.Tensor | None = None) -> torch.Tensor:
    """The call's attention as (B, heads, N, N) over its grid's positions (row: output position),
    built through the Frame from the basis vectors."""
    a = tap.attn.detach() if attn is None else attn
    (h, w), n = tap.frame.grid, tap.frame.grid[0] * tap.frame.grid[1]
    b = a.shape[0] // tap.frame.windows
    eye = torch.eye(n).reshape(1, n, h, w).expand(b, n, h, w)
    win = tap.frame.to_windows(eye)  # (B, nW, N, T)
    rows = [tap.frame.from_windows(win @ tap.per_window(a[:, i])).reshape(b, n, n) for i in range(a.shape[1])]
    return torch.stack(rows, 1)


# --- the frame: where a window's tokens sit ----------------------------------------------------


@pytest.mark.parametrize("frame", [Frame((8, 8), (4, 4), (2, 2), True), Frame((9, 7), (4, 4), (2, 2), True),
                                   Frame((9, 7), (4, 4), (2, 2), False), Frame((5, 5), (7, 7), (0, 0), True)])
def test_to_windows_then_back_is_the_identity_and_pads_with_zeros(frame):
    v = torch.randn(2, 3, *frame.grid)
    w = frame.to_windows(v)
    assert w.shape == (2, frame.windows, 3, frame.window[0] * frame.window[1])
    torch.testing.assert_close(frame.from_windows(w), v)
    padding = frame.padded[0] * frame.padded[1] - frame.grid[0] * frame.grid[1]
    assert int((w == 0).sum()) == 2 * 3 * padding


def _window_outputs(net: nn.Module, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, nn.Module]]:
    """(input, output, qkv/proj owner) of every window-attention call, the input on the grid (B, H, W, C)
    and the output the call's attention branch gives before the residual sum."""
    from torchvision.models.swin_transformer import ShiftedWindowAttention

    seen: list[tuple[torch.Tensor, torch.Tensor, nn.Module]] = []
    handles = []
    for m in net.modules():
        if isinstance(m, ShiftedWindowAttention):
            handles.append(m.register_forward_hook(lambda mod, a, o: seen.append((a[0], o, mod))))
        elif type(m).__name__ == "SwinTransformerV2Block":  # timm's V2 block: norm1(_attn(x)), post-norm
            handles.append(m.register_forward_pre_hook(
                lambda blk, a: seen.append((a[0], blk._attn(a[0]), blk.attn))))
        elif hasattr(m, "_attn") and hasattr(m, "norm1"):  # timm's block: _attn(norm1(x))
            handles.append(m.norm1.register_forward_hook(
                lambda mod, a, o, blk=m: seen.append((o, blk._attn(o), blk.attn))))
    try:
        net(x)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("size", [32, 36])  # 36: a 9x9 grid padded to whole windows, shifted
@pytest.mark.parametrize("build", swins())
def test_the_frames_attention_reproduces_every_calls_output(build, size):
    """out[p] = proj(sum_q D_h[p, q] V_h[q]) with D the tapped attention placed through the Frame:
    the query side, the key side, the shift and the padding all have to be right. The qkv bias is
    zeroed so that padded keys carry no value."""
    net = build(size)
    with torch.no_grad():
        for m in net.modules():
            for bias in ("q_bias", "v_bias"):  # timm's V2 keeps them apart from its bias-free qkv
                if isinstance(getattr(m, bias, None), nn.Parameter):
                    getattr(m, bias).zero_()
            if hasattr(m, "qkv") and m.qkv.bias is not None:
                m.qkv.bias.zero_()
    x = x_of(2, size)
    with torch.no_grad(), window_taps(net) as taps:
        net(x)
    with torch.no_grad():
        calls = _window_outputs(net, x)
        assert len(calls) == len(taps) == 4
        shifted = 0
        for tap, (inp, out, owner) in zip(taps, calls, strict=True):
            b, h, w, c = inp.shape
            heads = tap.attn.shape[1]
            assert tap.frame.grid == (h, w)
            shifted += any(tap.frame.shift)
            v = F.linear(inp, owner.qkv.weight[2 * c:]).reshape(b, h * w, heads, c // heads).transpose(1, 2)
            o = (dense(tap) @ v).transpose(1, 2).reshape(b, h, w, c)
            torch.testing.assert_close(owner.proj(o), out, rtol=1e-4, atol=1e-5)
        assert shifted == (1 if size == 32 else 2)  # at 32 stage 2 is one window: its shift is cleared


def _merge(src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """(N_dst, N_src): a merged token's relevance split evenly over its 2x2 sources."""
    p = torch.zeros(dst[0] * dst[1], src[0] * src[1])
    for i in range(src[0]):
        for j in range(src[1]):
            p[(i // 2) * dst[1] + j // 2, i * src[1] + j] = 0.25
    return p


@pytest.mark.parametrize("size", [32, 36])
@pytest.mark.parametrize("build", swins())
def test_window_rollout_equals_the_dense_product_through_the_merges(build, size):
    net = build(size)
    x = x_of(2, size, seed=1)
    with torch.no_grad(), window_taps(net) as taps:
        net(x)
    factors = [_rollout_factor(t.attn.float(), "mean") for t in taps]
    got = roll_windows(taps, factors)
    grid = taps[-1].frame.grid
    v = torch.full((2, 1, grid[0] * grid[1]), 1.0 / (grid[0] * grid[1]))
    for tap, f in zip(reversed(taps), reversed(factors), strict=True):
        if tap.frame.grid != grid:
            v = v @ _merge(tap.frame.grid, grid)
            grid = tap.frame.grid
        v = v @ dense(tap, f[:, None])[:, 0]
    torch.testing.assert_close(got, v.reshape(2, *grid), rtol=1e-5, atol=1e-7)
    if size == 32:  # no padding: rows stochastic and merges split the mass, so it is kept
        torch.testing.assert_close(got.sum((1, 2)), torch.ones(2))
    else:  # the share attended to padding is dropped
        assert (got.sum((1, 2)) < 1).all()


def test_one_window_over_the_grid_is_the_global_rollout_of_the_mean_row():
    """One stage, an 8x8 window on the 8x8 grid (no shift): the window path must give the mean over
    the rows of the global rollout (:func:`rollout`, :func:`gradient_rollout`) of the same attention."""
    net = tiny_swin(depths=(3,), window=8)
    x = x_of(2, seed=2)
    with torch.no_grad(), window_taps(net) as taps:
        net(x)
    assert [t.frame.windows for t in taps] == [1, 1, 1] and not any(any(t.frame.shift) for t in taps)
    weights = [t.attn for t in taps]
    want = rollout(weights).mean(1).reshape(2, 8, 8)
    torch.testing.assert_close(explain(net, x, "attention_rollout"), want, rtol=1e-5, atol=1e-7)
    want_max = rollout(weights, "max").mean(1).reshape(2, 8, 8)
    torch.testing.assert_close(explain(net, x, "attention_rollout", head_fusion="max"), want_max, rtol=1e-5, atol=1e-7)

    targets = torch.tensor([1, 3])
    with torch.enable_grad(), window_taps(net) as taps:
        xx = x.clone().requires_grad_(True)
        score = net(xx).gather(1, targets[:, None]).sum()
    grads = torch.autograd.grad(score, [t.attn for t in taps])
    want = gradient_rollout([t.attn.detach() for t in taps], list(grads)).mean(1).reshape(2, 8, 8)
    torch.testing.assert_close(explain(net, x, "grad_rollout", targets=targets), want, rtol=1e-5, atol=1e-7)


def test_uniform_attention_gives_a_flat_map_of_known_height():
    """q = k = 0 and no position bias: every window attends uniformly (inside the shift mask's
    regions), a symmetric, doubly stochastic matrix; with merges splitting evenly the pooled query
    stays flat: every one of the 64 patches gets 1/64."""
    net = tiny_swin()
    with torch.no_grad():
        for m in net.modules():
            if hasattr(m, "qkv"):
                c = m.qkv.in_features
                m.qkv.weight[:2 * c].zero_()
                m.qkv.bias[:2 * c].zero_()
                m.relative_position_bias_table.zero_()
    torch.testing.assert_close(explain(net, x_of(3), "attention_rollout"), torch.full((3, 8, 8), 1 / 64))


@pytest.mark.parametrize("build", swins())
def test_outputs_identical_and_the_model_left_as_found_also_after_an_error(build):
    from tests.test_attention import assert_left_as_found

    assert_left_as_found(build(), x_of(3), window_taps, calls=4)


@needs_timm
def test_timms_fused_path_is_off_while_tapped_and_restored():
    net = tiny_timm_swin()
    x = x_of(2)
    fused = [m for m in net.modules() if hasattr(m, "fused_attn")]
    assert len(fused) == 4
    for m in fused:
        m.fused_attn = True  # the experimental fused path has no softmax to read
    ref = net(x)
    with torch.no_grad(), window_taps(net) as taps:
        assert not any(m.fused_attn for m in fused)
        torch.testing.assert_close(net(x), ref)
    assert len(taps) == 4 and all(m.fused_attn for m in fused)
    with pytest.raises(RuntimeError, match="boom"), window_taps(net):
        raise RuntimeError("boom")
    assert all(m.fused_attn for m in fused)


@pytest.mark.parametrize("build", swins())
def test_swin_rollouts_do_not_depend_on_the_batch_and_only_grad_rollout_on_the_class(build):
    from tests.test_attention import assert_batch_independent

    net = build()
    x = x_of(4, seed=3)
    assert_batch_independent(net, x)
    r0, r1 = (explain(net, x[:1], "attention_rollout", targets=torch.tensor([c])) for c in (0, 1))
    torch.testing.assert_close(r0, r1)
    g0, g1 = (explain(net, x[:1], "grad_rollout", targets=torch.tensor([c])) for c in (0, 1))
    assert not torch.allclose(g0, g1)


def test_maxvit_is_refused_with_a_reason():
    from torchvision.models.maxvit import MaxVit

    net = MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[16], block_layers=[1],
                 head_dim=8, stochastic_depth_prob=0.0, num_classes=5).eval()
    with pytest.raises(MethodError, match="window attention") as e:
        explain(net, x_of(1), "attention_rollout")
    assert "Attention" in e.value.message and "MaxViT" in (e.value.hint or "")
