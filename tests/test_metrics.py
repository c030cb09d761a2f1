"""Metrics with known answers: deletion/insertion, Average Drop / Increase, boxes, pointing game,
energy, box IoU, MaxBoxAcc, run aggregates, `xai compare` and the CLI end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from xaicli.cli import app
from xaicli.methods.batch import Batch, Runner
from xaicli.metrics import all_metrics, get_metric
from xaicli.metrics.context import MetricContext, boxes_to_original
from xaicli.metrics.faithfulness import (
    DeletionParams,
    InsertionParams,
    auc,
    perturbation_curves,
    step_counts,
)
from xaicli.metrics.ground_truth import GroundTruth, build_context, mask_boxes
from xaicli.metrics.localization import box_iou, component_boxes, max_box_acc, threshold_grid
from xaicli.metrics.summary import aggregate
from xaicli.ops import gaussian_blur
from xaicli.preprocess import Preprocess

cli = CliRunner()


def sig(v: float) -> float:
    return 1 / (1 + math.exp(-v))


class FirstRowNet(nn.Module):
    """Two classes: logit 0 = a * mean of channel 0 over the first pixel row, logit 1 = 0.
    So p(class 0) = sigmoid(a * row mean): computable by hand for any perturbation."""

    def __init__(self, a: float = 3.0) -> None:
        super().__init__()
        self.a = a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.a * x[:, 0, 0, :].mean(1)
        return torch.stack([s, torch.zeros_like(s)], 1)


def make_batch(model: nn.Module, x: torch.Tensor, targets: torch.Tensor | None = None, budget: int = 64) -> Batch:
    with torch.no_grad():
        logits = model(x).float()
    t = logits.argmax(1) if targets is None else targets
    return Batch(x=x, targets=t, logits=logits, runner=Runner(model=model, budget=budget))


def plain_context(b: int, h: int, w: int) -> MetricContext:
    """Originals the same size as the input, no crop."""
    return MetricContext([f"i{k}.png" for k in range(b)], np.tile([[h, w]], (b, 1)),
                         np.tile([[0.0, 0.0, float(h), float(w)]], (b, 1)))


# --- deletion / insertion ---------------------------------------------------------------------


def test_auc_of_constant_and_linear_curves():
    assert torch.allclose(auc(torch.full((3, 11), 0.37)), torch.full((3,), 0.37))
    assert auc(torch.linspace(0, 1, 21)[None]).item() == pytest.approx(0.5)
    # (sum - first/2 - last/2) / n, RISE's normalisation
    c = torch.tensor([[0.9, 0.5, 0.2, 0.1]])
    assert auc(c).item() == pytest.approx((0.9 / 2 + 0.5 + 0.2 + 0.1 / 2) / 3)


def test_step_counts():
    assert step_counts(16, 4, None, torch.device("cpu")).tolist() == [0, 4, 8, 12, 16]
    assert step_counts(10, 3, None, torch.device("cpu")).tolist() == [0, 3, 6, 10]
    assert step_counts(10, 99, 4, torch.device("cpu")).tolist() == [0, 4, 8, 10]  # ceil(10/4) steps


def test_constant_map_deletes_in_row_major_order():
    """A constant map: the stable sort keeps index order, so 4 px per step on a 4x4 input
    removes row 0 first: the curve falls to p = 0.5 after one step."""
    a = 3.0
    model, x = FirstRowNet(a), torch.ones(1, 3, 4, 4)
    batch = make_batch(model, x, torch.tensor([0]))
    const = torch.full((1, 4, 4), 0.7)
    ctx = plain_context(1, 4, 4)
    d = get_metric("deletion").fn(batch, const, DeletionParams(steps=4, save_curve=True), ctx)
    expect = [sig(a), 0.5, 0.5, 0.5, 0.5]
    assert d["deletion_curve"][0].tolist() == pytest.approx(expect, abs=1e-6)
    assert d["deletion_auc"].item() == pytest.approx((sig(a) / 2 + 0.5 * 3 + 0.25) / 4, abs=1e-6)
    ins = get_metric("insertion").fn(batch, const, InsertionParams(steps=4, substrate="zero", save_curve=True), ctx)
    assert ins["insertion_curve"][0].tolist() == pytest.approx([0.5, sig(a), sig(a), sig(a), sig(a)], abs=1e-6)
    assert ins["insertion_auc"].item() == pytest.approx((0.25 + 3 * sig(a) + sig(a) / 2) / 4, abs=1e-6)
    # Half a row per step: row 0's mean falls to 0.5 after step 1.
    half = perturbation_curves(batch, const, DeletionParams(pixels_per_step=2), insert=False)[0]
    assert half.tolist() == pytest.approx([sig(a), sig(a / 2)] + [0.5] * 7, abs=1e-6)


def test_map_order_decides_the_curve():
    """Saliency on the last row: row 0 (the only one the model reads) goes last."""
    a = 3.0
    model, x = FirstRowNet(a), torch.ones(1, 3, 4, 4)
    batch = make_batch(model, x, torch.tensor([0]))
    rows = torch.arange(4.0).view(1, 4, 1).expand(1, 4, 4)
    late = perturbation_curves(batch, rows, DeletionParams(steps=4), insert=False)[0]
    assert late.tolist() == pytest.approx([sig(a)] * 4 + [0.5], abs=1e-6)
    early = perturbation_curves(batch, 3 - rows, DeletionParams(steps=4), insert=False)[0]
    assert early.tolist() == pytest.approx([sig(a)] + [0.5] * 4, abs=1e-6)


def test_curves_start_and_end_at_p_x_and_do_not_depend_on_chunking(gap_net):
    torch.manual_seed(0)
    x = torch.randn(3, 3, 16, 16)
    maps = torch.rand(3, 8, 8)  # layer resolution: upsampled to the input inside
    with torch.no_grad():
        p = gap_net(x).softmax(1)
    t = p.argmax(1)
    p_x = p.gather(1, t[:, None])[:, 0]
    big = make_batch(gap_net, x, t, budget=64)
    small = make_batch(gap_net, x, t, budget=2)
    for insert, params in ((False, DeletionParams(steps=6)), (True, InsertionParams(steps=6))):
        c = perturbation_curves(big, maps, params, insert)
        assert c.shape == (3, 7)
        end = c[:, -1] if insert else c[:, 0]
        assert torch.allclose(end, p_x, atol=1e-5)
        assert torch.allclose(c, perturbation_curves(small, maps, params, insert), atol=1e-6)
    with torch.no_grad():
        p_blur = gap_net(gaussian_blur(x, 5.0, radius=5, pad="zero")).softmax(1).gather(1, t[:, None])[:, 0]
    c = perturbation_curves(big, maps, InsertionParams(steps=6), True)
    assert torch.allclose(c[:, 0], p_blur, atol=1e-5)
    d = perturbation_curves(big, maps, DeletionParams(steps=6), False)
    with torch.no_grad():
        p_zero = gap_net(torch.zeros_like(x)).softmax(1).gather(1, t[:, None])[:, 0]
    assert torch.allclose(d[:, -1], p_zero, atol=1e-5)


# --- Average Drop / Increase in Confidence ----------------------------------------------------


def test_drop_increase_known_values(gap_net):
    torch.manual_seed(1)
    x = torch.randn(4, 3, 16, 16)
    batch = make_batch(gap_net, x)
    fn = get_metric("drop_increase").fn
    ones = fn(batch, torch.ones(4, 16, 16), get_metric("drop_increase").params(), plain_context(4, 16, 16))
    assert ones["avg_drop"].tolist() == [0.0] * 4 and ones["increase"].tolist() == [0.0] * 4
    # Hand-computed: halving the image halves class 0's logit on FirstRowNet.
    a = 3.0
    row = FirstRowNet(a)
    xr = torch.ones(2, 3, 4, 4)
    half = torch.full((2, 4, 4), 0.5)
    out = fn(make_batch(row, xr, torch.tensor([0, 1])), half, get_metric("drop_increase").params(), plain_context(2, 4, 4))
    p0, o0 = sig(a), sig(a / 2)
    assert out["avg_drop"][0].item() == pytest.approx((p0 - o0) / p0, abs=1e-6)
    assert out["increase"][0].item() == 0.0
    # class 1's probability rises when class 0's logit falls: no drop, an increase
    assert out["avg_drop"][1].item() == 0.0 and out["increase"][1].item() == 1.0


# --- boxes --------------------------------------------------------------------------------------


def test_box_iou_inclusive_corners():
    assert box_iou(np.array([1, 2, 5, 6.0]), np.array([3, 1, 4, 5.0])) == pytest.approx(8 / 27)
    assert box_iou(np.array([0, 0, 3, 3.0]), np.array([4, 4, 5, 5.0])) == 0.0
    assert box_iou(np.array([2, 2, 2, 2.0]), np.array([2, 2, 2, 2.0])) == 1.0  # one pixel
    assert np.isnan(box_iou(np.full(4, np.nan), np.array([0, 0, 1, 1.0])))


# wsolevaluation's evaluation_test.py score maps. Our boxes are truly inclusive; theirs are
# (x, y, x + w, y + h) clipped to the image, one pixel larger, and their "largest" contour is by
# polygon area (a 1-px-wide line has area 0) where ours is by pixel count.
UNIMODAL = [[0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.4, 0.4, 0.4, 0.6], [0.0, 0.4, 1.0, 0.8, 0.6], [0.0, 0.4, 0.4, 0.4, 0.6]]
MULTIMODAL = [[0.4, 0.0, 0.2, 0.2, 0.2], [0.4, 0.4, 0.0, 0.4, 0.0], [0.0, 0.0, 0.0, 0.4, 0.0], [1.0, 0.6, 0.8, 0.2, 0.2]]


@pytest.mark.parametrize(("scoremap", "expected"), [
    (UNIMODAL, [[1, 1, 4, 3], [1, 1, 4, 3], [2, 1, 4, 3], [2, 2, 3, 2], [2, 2, 2, 2]]),
    (MULTIMODAL, [[0, 0, 4, 3], [0, 1, 3, 3], [0, 3, 2, 3], [0, 3, 0, 3], [0, 3, 0, 3]]),
])
def test_component_boxes_on_wsol_test_maps(scoremap, expected):
    boxes = component_boxes(torch.tensor([scoremap]), [0.0, 0.2, 0.4, 0.6, 0.8])[0, :, 0]
    assert boxes.tolist() == expected


def test_component_boxes_all_components_and_empty_map():
    m = torch.zeros(1, 10, 10)
    m[0, 1:3, 1:3] = 1.0
    m[0, 6:9, 5:9] = 0.5
    every = component_boxes(m, [0.2], largest=False)[0, 0]
    assert sorted(map(tuple, every.tolist())) == [(1, 1, 2, 2), (5, 6, 8, 8)]
    assert component_boxes(m, [0.2])[0, 0, 0].tolist() == [5, 6, 8, 8]  # most pixels, not the peak
    assert np.isnan(component_boxes(torch.zeros(1, 5, 5), [0.2])).all()


@pytest.mark.parametrize(("size", "pre", "expected"), [
    ((64, 64), Preprocess(resize=(32, 32), crop=None, mean=(0.5,) * 3, std=(0.25,) * 3), [20, 8, 41, 19]),
    ((80, 80), Preprocess(resize=40, crop=(32, 32), mean=(0.5,) * 3, std=(0.25,) * 3), [28, 16, 49, 27]),
    ((32, 32), Preprocess(resize=(32, 32), crop=None, mean=(0.5,) * 3, std=(0.25,) * 3), [10, 4, 20, 9]),
])
def test_box_of_a_rectangular_blob_in_original_pixels(size, pre, expected):
    """Input rows 4..9, columns 10..20; scale 2 (and a centre crop offset of 8 px) back to the original."""
    m = torch.zeros(1, 32, 32)
    m[0, 4:10, 10:21] = 1.0
    ctx = build_context(["a.png"], [size], pre, None, torch.device("cpu"))
    spec = get_metric("boxes")
    out = spec.fn(None, m, spec.params(thresholds=(0.2, 0.5)), ctx)["boxes"]
    assert out.shape == (1, 2, 4)
    assert out[0].tolist() == [expected, expected]


def test_boxes_to_original_keeps_every_touched_pixel():
    # 3 input px over 4 original px: input column 1 covers [1.33, 2.67) -> original pixels 1..2
    b = boxes_to_original(np.array([[[1.0, 0, 1, 2]]]), np.array([[0.0, 0, 4, 4]]), np.array([[4, 4]]), (3, 3))
    assert b[0, 0].tolist() == [1, 0, 2, 3]


# --- ground truth: pointing game, energy, box IoU ---------------------------------------------


def write_mask(folder: Path, name: str, mask: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(folder / name)


def gt_context(tmp_path: Path, masks: dict[str, np.ndarray], rels: list[str], sizes: list[tuple[int, int]],
               pre: Preprocess | None = None) -> MetricContext:
    for rel, m in masks.items():
        write_mask(tmp_path / "masks" / Path(rel).parent, Path(rel).with_suffix(".png").name, m)
    pre = pre or Preprocess(resize=(32, 32), crop=None, mean=(0.5,) * 3, std=(0.25,) * 3)
    return build_context(rels, sizes, pre, GroundTruth.from_masks(tmp_path / "masks"), torch.device("cpu"))


def localize(ctx: MetricContext, maps: torch.Tensor, **knobs) -> dict[str, list]:
    out: dict[str, list] = {}
    for name in ("pointing_game", "energy", "box_iou"):
        spec = get_metric(name)
        params = spec.params(**knobs.get(name, {}))
        for k, v in spec.fn(None, maps, params, ctx).items():
            out[k] = v.tolist()
    return out


def test_map_equal_to_mask_scores_perfectly(tmp_path):
    mask = np.zeros((32, 32), bool)
    mask[5:15, 8:20] = True
    ctx = gt_context(tmp_path, {"a.png": mask}, ["a.png"], [(32, 32)])
    r = localize(ctx, torch.from_numpy(mask).float()[None])
    assert r["pointing_hit"] == [1.0] and r["energy"] == [1.0]
    assert r["box_iou"] == [1.0] and r["box_iou_curve"][0] == [1.0] * 100


def test_map_equal_to_mask_on_a_resized_image(tmp_path):
    """Original 48x64 -> input 32x32: the mask sampled into the input frame is the map; the box
    maps back to the original mask's box up to the resampling."""
    mask = np.zeros((48, 64), bool)
    mask[9:30, 12:41] = True
    ctx = gt_context(tmp_path, {"a.png": mask}, ["a.png"], [(48, 64)])
    assert ctx.gt is not None
    r = localize(ctx, ctx.gt.masks.float())
    assert r["pointing_hit"] == [1.0] and r["energy"] == [1.0]
    assert r["box_iou"][0] > 0.9


def test_map_outside_the_mask_misses(tmp_path):
    mask = np.zeros((32, 32), bool)
    mask[2:8, 2:8] = True
    ctx = gt_context(tmp_path, {"a.png": mask}, ["a.png"], [(32, 32)])
    far = torch.zeros(1, 32, 32)
    far[0, 24:30, 24:30] = 1.0
    r = localize(ctx, far)
    assert r["pointing_hit"] == [0.0] and r["energy"] == [0.0] and r["box_iou"] == [0.0]
    # The 15 px tolerance of the pointing game: a peak 10 px right of the object is a hit,
    # unless the tolerance is smaller.
    near = torch.zeros(1, 32, 32)
    near[0, 4, 17] = 1.0
    assert localize(ctx, near)["pointing_hit"] == [1.0]
    assert localize(ctx, near, pointing_game={"tolerance": 5})["pointing_hit"] == [0.0]
    assert localize(ctx, torch.zeros(1, 32, 32))["pointing_hit"] == [0.0]  # a blank map points nowhere


def test_energy_of_a_uniform_map_is_the_area_share(tmp_path):
    mask = np.zeros((32, 32), bool)
    mask[0:8, 0:16] = True
    ctx = gt_context(tmp_path, {"a.png": mask}, ["a.png"], [(32, 32)])
    assert localize(ctx, torch.full((1, 32, 32), 0.3))["energy"][0] == pytest.approx(128 / 1024)


def test_images_without_ground_truth_get_nan(tmp_path):
    mask = np.zeros((32, 32), bool)
    mask[5:15, 8:20] = True
    ctx = gt_context(tmp_path, {"sub/a.png": mask}, ["sub/a.jpg", "b.png"], [(32, 32), (32, 32)])
    r = localize(ctx, torch.from_numpy(np.stack([mask, mask])).float())
    assert r["pointing_hit"][0] == 1.0 and r["energy"][0] == 1.0 and r["box_iou"][0] == 1.0
    assert all(math.isnan(r[k][1]) for k in ("pointing_hit", "energy", "box_iou"))
    assert all(math.isnan(v) for v in r["box_iou_curve"][1])


def test_boxes_file_csv_and_json(tmp_path):
    csv = tmp_path / "gt.csv"
    csv.write_text("path,x0,y0,x1,y1,label\ncats/a.jpg,8,5,19,14,cat\ncats/a.jpg,25,25,28,28,cat\nb,0,0,3,3\n")
    js = tmp_path / "gt.json"
    js.write_text(json.dumps({"cats/a.jpg": [[8, 5, 19, 14], [25, 25, 28, 28]], "b.png": [0, 0, 3, 3]}))
    pre = Preprocess(resize=(32, 32), crop=None, mean=(0.5,) * 3, std=(0.25,) * 3)
    for f in (csv, js):
        gt = GroundTruth.from_boxes(f)
        ctx = build_context(["cats/a.jpg", "b.png", "c.png"], [(32, 32)] * 3, pre, gt, torch.device("cpu"))
        assert ctx.gt is not None
        assert ctx.gt.present.tolist() == [True, True, False]
        assert int(ctx.gt.masks[0].sum()) == 12 * 10 + 16 and int(ctx.gt.masks[1].sum()) == 16
        m = torch.zeros(3, 32, 32)
        m[0, 5:15, 8:20] = 1.0
        r = localize(ctx, m)
        assert r["box_iou"][0] == 1.0  # the best of the two ground-truth boxes
        assert r["energy"][0] == 1.0


def test_mask_boxes_are_components():
    m = np.zeros((10, 10), bool)
    m[1:3, 1:4] = True
    m[6:9, 6:7] = True
    assert sorted(map(tuple, mask_boxes(m).tolist())) == [(1, 1, 3, 2), (6, 6, 6, 8)]


# --- MaxBoxAcc ------------------------------------------------------------------------------------


CURVES = [[0.2, 0.6, 0.8, 0.4], [0.5, 0.5, 0.2, 0.1], [0.1, 0.3, 0.6, 0.7]]


def test_max_box_acc_hand_built():
    grid = np.array([0.0, 0.25, 0.5, 0.75])
    assert max_box_acc(np.array(CURVES), grid, 0.5) == (pytest.approx(2 / 3), 0.25)
    assert max_box_acc(np.array(CURVES), grid, 0.3)[0] == 1.0
    assert max_box_acc(np.array(CURVES), grid, 0.7)[0] == pytest.approx(1 / 3)
    records = [{"path": f"{i}.png", "status": "ok", "explanations": [
        {"method": "cam", "target": {"prob": 0.5}, "metrics": {"box_iou": c[0], "box_iou_curve": c}}]}
        for i, c in enumerate(CURVES)]
    records.append({"path": "x.png", "status": "ok", "explanations": [
        {"method": "cam", "target": {"prob": 0.5}, "metrics": {"box_iou": None, "box_iou_curve": None}}]})
    agg = aggregate(records, [{"name": "box_iou", "params": {"curve_interval": 0.25, "delta": 0.5,
                                                              "deltas": [0.3, 0.5, 0.7]}}])["cam"]
    assert agg["max_box_acc"] == {"value": pytest.approx(2 / 3), "n": 3, "delta": 0.5, "threshold": 0.25}
    assert agg["max_box_acc_v2"]["value"] == pytest.approx((1 + 2 / 3 + 1 / 3) / 3)
    assert agg["box_iou"]["n"] == 3 and agg["box_iou"]["mean"] == pytest.approx((0.2 + 0.5 + 0.1) / 3)


def test_max_box_acc_from_maps(tmp_path):
    """Three images, object at rows 8..15, columns 8..15: an exact map (IoU 1 at every threshold),
    a map twice as wide whose right half is weaker (exact only above its level) and a map elsewhere."""
    mask = np.zeros((32, 32), bool)
    mask[8:16, 8:16] = True
    ctx = gt_context(tmp_path, {f"{k}.png": mask for k in "abc"}, ["a.png", "b.png", "c.png"], [(32, 32)] * 3)
    m = torch.zeros(3, 32, 32)
    m[0, 8:16, 8:16] = 1.0
    m[1, 8:16, 8:16] = 1.0
    m[1, 8:16, 16:24] = 0.4
    m[2, 20:28, 20:28] = 1.0
    spec = get_metric("box_iou")
    out = spec.fn(None, m, spec.params(curve_interval=0.1), ctx)
    curves = out["box_iou_curve"].numpy()
    grid = threshold_grid(0.1)
    assert curves[0].tolist() == [1.0] * 10
    assert curves[1].tolist() == pytest.approx([0.5] * 4 + [1.0] * 6)  # 0.4 > t only for t < 0.4
    assert curves[2].tolist() == [0.0] * 10
    assert max_box_acc(curves, grid, 0.5) == (pytest.approx(2 / 3), 0.0)
    assert max_box_acc(curves, grid, 0.7) == (pytest.approx(2 / 3), 0.4)


# --- CLI end to end -------------------------------------------------------------------------------


METRICS_YAML = """
metrics:
  deletion: {steps: 4, save_curve: true}
  insertion: {steps: 4, save_curve: true}
  drop_increase: {}
  boxes: {thresholds: [0.2, 0.5], draw: true}
  pointing_game: {}
  energy: {}
  box_iou: {curve_interval: 0.1}
"""


def test_cli_metrics_end_to_end_and_compare(tmp_path, image_dir, tiny_config):
    masks = tmp_path / "masks"
    sizes = {}
    for p in sorted(image_dir.iterdir())[:4]:  # the fifth image has no ground truth
        w, h = Image.open(p).size
        sizes[p.name] = (h, w)
        m = np.zeros((h, w), bool)
        m[h // 4 : h // 2, w // 4 : 3 * w // 4] = True
        write_mask(masks, p.with_suffix(".png").name, m)
    runs = []
    for method in ("gradcam,cam", "layercam"):
        out = tmp_path / f"out_{method.replace(',', '_')}"
        r = cli.invoke(app, ["explain", str(image_dir), "-c", str(tiny_config(method, METRICS_YAML)), "-o", str(out),
                             "--ground-truth", str(masks)])
        assert r.exit_code == 0, r.output
        runs.append(out)
    out = runs[0]
    assert "methods compared on 5 image(s)" in r.output  # the table at the end of a run with metrics
    recs = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(recs) == 5
    for rec in recs:
        has_gt = rec["path"] in sizes
        for e in rec["explanations"]:
            m = e["metrics"]
            # Every key written is declared by its metric (what `xai check` rules may name).
            assert set(m) == {k for spec in all_metrics() for k in spec.outputs}
            assert 0 <= m["deletion_auc"] <= 1 and 0 <= m["insertion_auc"] <= 1
            assert len(m["deletion_curve"]) == 5
            assert m["deletion_curve"][0] == pytest.approx(e["target"]["prob"], abs=1e-5)
            assert m["avg_drop"] >= 0 and m["increase"] in (0, 1)
            assert len(m["boxes"]) == 2
            for x0, y0, x1, y1 in m["boxes"]:
                assert 0 <= x0 <= x1 < rec["width"] and 0 <= y0 <= y1 < rec["height"]
            if has_gt:
                assert m["pointing_hit"] in (0, 1) and 0 <= m["energy"] <= 1 and 0 <= m["box_iou"] <= 1
                assert len(m["box_iou_curve"]) == 10
            else:
                assert m["pointing_hit"] is None and m["energy"] is None and m["box_iou"] is None
                assert m["box_iou_curve"] is None
            # The first box is drawn in white on the overlay (its top-left corner pixel).
            ov = np.asarray(Image.open(out / e["files"]["overlay"]))
            x0, y0 = (int(v) for v in m["boxes"][0][:2])
            assert ov[y0, x0].tolist() == [255, 255, 255]
    run = json.loads((out / "run.json").read_text())
    agg = run["aggregates"]
    assert set(agg) == {"gradcam", "cam"}
    for method in agg:
        assert agg[method]["deletion_auc"]["n"] == 5 and agg[method]["energy"]["n"] == 4
        vals = [e["metrics"]["insertion_auc"] for rec in recs for e in rec["explanations"] if e["method"] == method]
        assert agg[method]["insertion_auc"]["mean"] == pytest.approx(np.mean(vals))
        assert agg[method]["max_box_acc"]["n"] == 4 and 0 <= agg[method]["max_box_acc"]["value"] <= 1
    r = cli.invoke(app, ["compare", *map(str, runs)])
    assert r.exit_code == 0, r.output
    assert "deletion_auc" in r.output and "layercam" in r.output and "max_box_acc" in r.output
    r = cli.invoke(app, ["compare", *map(str, runs), "--json"])
    assert r.exit_code == 0, r.output
    cmp = json.loads(r.output)
    assert [(row["method"], row["images"]) for row in cmp["rows"]] == [("gradcam", 5), ("cam", 5), ("layercam", 5)]
    assert cmp["rows"][2]["values"]["deletion_auc"] == json.loads((runs[1] / "run.json").read_text())[
        "aggregates"]["layercam"]["deletion_auc"]
    assert "max_box_acc" in cmp["columns"]


def test_cli_ground_truth_metric_without_ground_truth_is_a_usage_error(tmp_path, image_dir, tiny_config):
    r = cli.invoke(app, ["explain", str(image_dir), "-c", str(tiny_config()), "-o", str(tmp_path / "o"),
                         "--metrics", "energy"])
    assert r.exit_code == 2 and "need ground truth" in r.output
    r = cli.invoke(app, ["explain", str(image_dir), "-c", str(tiny_config()), "-o", str(tmp_path / "o"),
                         "--metrics", "delet"])
    assert r.exit_code == 2 and "deletion" in r.output
    r = cli.invoke(app, ["compare", str(tmp_path)])
    assert r.exit_code == 2 and "not a run folder" in r.output
