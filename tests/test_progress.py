"""Progress of long runs (issue 12, item 4): passes inside a batch counted by the engine's Runner,
the current method, a rate and an ETA from the first seconds, a line that fits 80 columns, and
plain rate-limited lines when stderr is not a terminal."""

from __future__ import annotations

import torch
from torch import nn
from typer.testing import CliRunner

from tests.nets import GapNet, tiny_vit
from xaicli.cli import app
from xaicli.config import TargetConfig
from xaicli.engine import Explainer
from xaicli.layers import resolve_layer
from xaicli.methods import all_methods, get_method
from xaicli.methods.batch import Runner
from xaicli.plan import method_params
from xaicli.progress import LogProgress, ProgressState, log_line, progress_line
from xaicli.run import _passes_per_image


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_every_method_plans_the_passes_the_runner_counts():
    """The plan the display divides by is what the Runner really sends through the model."""
    gap, vit = GapNet().eval(), tiny_vit()  # the attention methods need a transformer
    x = torch.randn(3, 3, 32, 32)
    checked = 0
    for spec in all_methods():
        net, layer = (vit, "encoder.layers.encoder_layer_1.ln_1") if spec.family == "attention" else (gap, "features")
        params = method_params(spec)
        planned, exact = _passes_per_image(spec, params, 16, (32, 32))
        counted = []
        runner = Runner(net, 5, on_pass=counted.append)
        named = []
        Explainer(net, [(spec, params)], resolve_layer(net, layer), TargetConfig(), runner,
                  on_method=named.append)(x, torch.arange(3))
        assert named == [spec.name]
        assert all(0 < n <= 5 for n in counted), (spec.name, counted)  # one call per chunk of the budget
        if exact:
            assert sum(counted) == 3 * planned, spec.name
            checked += 1
        else:  # occlusion quotes its windows at 224x224: an estimate the first batch replaces
            assert spec.name == "occlusion" and planned is not None and planned >= 1 and sum(counted) == 3
    assert checked >= 15


def test_failed_chunks_are_not_counted():
    class SmallMemory(nn.Module):
        def forward(self, x):
            if x.shape[0] > 2:
                raise RuntimeError("CUDA out of memory (simulated)")
            return x.flatten(1)[:, :4]

    counted = []
    runner = Runner(SmallMemory(), 8, on_pass=counted.append)
    runner.logits(torch.randn(7, 1, 2, 2))
    assert sum(counted) == 7 and max(counted) <= 2


def test_fraction_moves_inside_a_batch_and_the_eta_comes_early():
    st = ProgressState()
    st.start(100, "occlusion on 100 images", now=0.0)
    st.plan([("gradcam", 0, True), ("occlusion", 99, True)])
    st.batch(10, now=1.0)
    st.method("gradcam")
    st.method("occlusion")  # gradcam done: weight 10 of 10 + 990
    st.passes(495)
    assert st.done == 0
    assert abs(st.fraction() - 10 * (10 + 495) / 1000 / 100) < 1e-9
    assert st.method_text() == "occlusion 495/990"
    eta = st.eta(now=6.0)  # 5 s of work for 5.05 % of the run
    assert eta is not None and abs(eta - 5.0 * (1 - 0.0505) / 0.0505) < 1e-6
    assert abs(st.rate(now=6.0) - 0.0505 * 100 / 5.0) < 1e-9
    st.advance(10)
    assert st.fraction() == 0.1 and st.batch_size == 0


def test_an_estimated_plan_is_replaced_by_what_the_first_batch_took():
    st = ProgressState()
    st.start(8, "x", now=0.0)
    st.plan([("occlusion", 4000, False)])
    st.batch(4, now=0.0)
    st.method("occlusion")
    st.passes(40)
    assert st.method_text() == "occlusion 40/~16000"
    st.passes(360)
    st.advance(4)
    assert st.per_image["occlusion"] == 100 and "occlusion" not in st.estimated
    st.batch(4, now=1.0)
    st.method("occlusion")
    st.passes(200)
    assert st.method_text() == "occlusion 200/400" and st.fraction() == 0.75


def test_top_k_ranks_are_part_of_the_plan():
    st = ProgressState()
    st.start(4, "x", now=0.0)
    st.plan([("smoothgrad", 10, True)], ranks=2)
    st.batch(4, now=0.0)
    st.method("smoothgrad")
    st.passes(40)  # the first of two target ranks
    assert st.fraction() == 0.5


def _busy_state() -> ProgressState:
    st = ProgressState()
    st.start(1234, "gradcam+gradcampp+scorecam+occlusion+integrated_gradients+smoothgrad on 1234 images", now=0.0)
    st.plan([("gradcam", 0, True), ("integrated_gradients", 51, True)])
    st.done = 56
    st.batch(16, now=2.0)
    st.method("integrated_gradients")
    st.passes(412)
    return st


def test_the_line_fits_80_columns_with_method_rate_and_eta():
    st = _busy_state()
    for width in (200, 100, 80, 60, 40, 24):
        line = progress_line(st, width, now=32.0)
        assert len(line) <= width - 1, (width, line)
        assert "56/1234" in line and "eta " in line
        assert "gradcampp" not in line  # never the joined list of methods
    line80 = progress_line(st, 80, now=32.0)
    assert "integrated_gradients 412/816" in line80 and "2.1 img/s" in line80
    assert "━" in progress_line(st, 120, now=32.0)  # a bar when there is room
    assert "━" not in progress_line(st, 60, now=32.0)


def test_log_lines_are_plain_and_rate_limited():
    clock = Clock()
    lines = []
    p = LogProgress(lines.append, interval=10.0, clock=clock)
    p.start(20, "smoothgrad on 20 images")
    p.plan([("smoothgrad", 50, True)])
    p.batch(4)
    p.method("smoothgrad")
    for _ in range(100):  # many events within 5 s: no line
        clock.t += 0.05
        p.passes(2)
    assert lines == ["started: smoothgrad on 20 images"]
    clock.t += 6
    p.passes(2)
    assert len(lines) == 2 and lines[1].startswith("progress: 0/20 images (")
    assert "smoothgrad 202/200 passes" not in lines[1] and "smoothgrad 200/200 passes" in lines[1]
    assert "eta " in lines[1] and "\x1b" not in lines[1]
    p.advance(4)
    p.finish()
    assert lines[-1].startswith("finished: 4/20 images in 0:")
    quiet = []
    q = LogProgress(quiet.append, quiet=True, clock=clock)
    q.start(3, "x")
    q.advance(3)
    q.finish()
    assert quiet == []


def test_log_line_of_a_cheap_method():
    st = ProgressState()
    st.start(4, "gradcam on 4 images", now=0.0)
    st.plan([("gradcam", 0, True)])
    st.batch(4, now=0.0)
    st.method("gradcam")
    assert log_line(st, now=0.1).startswith("progress: 0/4 images (")
    assert "gradcam," in log_line(st, now=0.1) and "passes" not in log_line(st, now=0.1)


def test_explain_logs_progress_inside_a_batch(tmp_path, image_dir, tiny_config, monkeypatch):
    monkeypatch.setenv("XAI_PROGRESS_INTERVAL", "0")
    cfg = tiny_config("smoothgrad", "methods:\n  smoothgrad: {samples: 8}\n")
    r = CliRunner().invoke(app, ["explain", str(image_dir), "-c", str(cfg), "-o", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].startswith("warning: the model has no class names")
    assert lines[1] == "started: smoothgrad on 5 images"
    inside = [ln for ln in lines if ln.startswith("progress: 0/5 images") and "smoothgrad " in ln]
    assert inside and "smoothgrad 32/32 passes" in " ".join(inside)  # 4 images x 8 samples
    assert any(ln.startswith("finished: 5/5 images") for ln in lines)
    assert get_method("smoothgrad").name == "smoothgrad"
