"""Scale-out and robustness of the folder run: shards and their merge (in one process, and as two
torchrun processes over gloo), --resume after a kill, out-of-memory splitting, and no hook or
autograd graph surviving a batch."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import ROOT, write_images
from tests.nets import GapNet
from xaicli import engine, shards
from xaicli import run as folder_run
from xaicli.cli import app
from xaicli.config import TargetConfig, load_config
from xaicli.engine import Explainer
from xaicli.errors import ConfigError, OutputError
from xaicli.layers import resolve_layer
from xaicli.methods import get_method
from xaicli.methods.batch import Runner
from xaicli.outputs import SCORES, ScoresFile, drop_torn_tail, read_scores
from xaicli.run import run_explain

N_IMAGES = 9


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "images"
    write_images(d, n=N_IMAGES)
    return d


@pytest.fixture
def cfg(tiny_config):
    return load_config(tiny_config("gradcam", "output: {save_maps: true}\n"))


def lines(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def assert_same_records(a: list[dict], b: list[dict]) -> None:
    """Same paths, predictions, targets, files and map statistics (floats to 1e-5)."""
    assert [r["path"] for r in a] == [r["path"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert x["status"] == y["status"] == "ok"
        assert [t["index"] for t in x["topk"]] == [t["index"] for t in y["topk"]]
        np.testing.assert_allclose([t["prob"] for t in x["topk"]], [t["prob"] for t in y["topk"]], atol=1e-5)
        for ex, ey in zip(x["explanations"], y["explanations"], strict=True):
            assert ex["target"]["index"] == ey["target"]["index"]
            assert ex["files"] == ey["files"]
            assert ex["map"]["shape"] == ey["map"]["shape"]
            assert ex["map"]["peak"] == ey["map"]["peak"]
            for k in ("min", "max", "mean"):
                assert ex["map"][k] == pytest.approx(ey["map"][k], rel=1e-5, abs=1e-6)


def assert_same_maps(a: Path, b: Path) -> None:
    fa = sorted(p.relative_to(a) for p in (a / "maps").rglob("*.npy"))
    fb = sorted(p.relative_to(b) for p in (b / "maps").rglob("*.npy"))
    assert fa == fb and len(fa) == N_IMAGES
    for rel in fa:
        np.testing.assert_allclose(np.load(a / rel).astype(np.float32), np.load(b / rel).astype(np.float32),
                                   rtol=1e-3, atol=1e-4)


@pytest.fixture
def reference(cfg, folder: Path, tmp_path: Path) -> Path:
    """A plain single-process run to compare against."""
    out = tmp_path / "single"
    res = run_explain(cfg, folder, out)
    assert res.exit_code == 0 and res.ok == N_IMAGES
    return out


# --------------------------------------------------------------------------------------------
# Splitting


def test_part_for_is_the_nested_slice() -> None:
    items = list(range(23))
    for n in (1, 2, 3):
        for w in (1, 2, 4):
            for i in range(n):
                for r in range(w):
                    part = shards.part_for((i, n) if n > 1 else None,
                                           shards.DistEnv(r, w, r) if w > 1 else None)
                    got = items if part is None else items[part.index :: part.count]
                    assert got == items[i::n][r::w]
    # Every image in exactly one part.
    parts = [shards.part_for((i, 3), shards.DistEnv(r, 2, r)) for i in range(3) for r in range(2)]
    assert sorted(x for p in parts for x in items[p.index :: p.count]) == items


def test_dist_env_from_torchrun_variables() -> None:
    assert shards.dist_env({}) is None
    assert shards.dist_env({"WORLD_SIZE": "1", "RANK": "0"}) is None
    assert shards.dist_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == shards.DistEnv(3, 4, 1)
    with pytest.raises(ConfigError):
        shards.dist_env({"WORLD_SIZE": "2"})
    with pytest.raises(ConfigError):
        shards.dist_env({"WORLD_SIZE": "2", "RANK": "2"})


# --------------------------------------------------------------------------------------------
# Shards in one process and the merge


def test_shards_merge_into_the_single_run(cfg, folder: Path, tmp_path: Path, reference: Path) -> None:
    out = tmp_path / "sharded"
    first = run_explain(cfg, folder, out, shard=(0, 2))
    assert first.pending == ["1/2"] and first.merged is None
    assert not (out / SCORES).exists()
    assert len(lines(out / "parts" / "scores.0-of-2.jsonl")) == 5  # images 0, 2, 4, 6, 8
    second = run_explain(cfg, folder, out, shard=(1, 2))
    assert second.pending == [] and second.merged is not None and second.exit_code == 0
    assert not (out / "parts").exists()  # merged parts are removed

    merged = lines(out / SCORES)
    assert len({r["path"] for r in merged}) == len(merged) == N_IMAGES
    assert_same_records(merged, lines(reference / SCORES))
    assert_same_maps(out, reference)
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["processed"] == N_IMAGES and run["counts"]["ok"] == N_IMAGES
    assert [p["part"] for p in run["parts"]] == ["0/2", "1/2"]
    assert [p["counts"]["processed"] for p in run["parts"]] == [5, 4]
    assert len(run["devices"]) == 2 and run["failures"] == [] and run["exit_code"] == 0
    assert run["timings"]["run_s"] == max(p["timings"]["run_s"] for p in run["parts"])


def test_merge_counts_failures_from_every_part(cfg, folder: Path, tmp_path: Path) -> None:
    (folder / "img01.jpg").write_bytes(b"")  # a broken file in part 1/2
    (folder / "img02.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0")  # and one in part 0/2
    out = tmp_path / "out"
    assert run_explain(cfg, folder, out, shard=(0, 2)).exit_code == 1
    res = run_explain(cfg, folder, out, shard=(1, 2))
    assert res.exit_code == 1 and res.merged is not None
    run = json.loads((out / "run.json").read_text())
    assert [f["path"] for f in run["failures"]] == ["img01.jpg", "img02.png"]
    assert run["counts"]["failed"] == 2 and run["counts"]["ok"] == N_IMAGES - 2 and run["exit_code"] == 1
    assert len(lines(out / SCORES)) == N_IMAGES


def test_xai_merge_refuses_missing_parts_unless_partial(cfg, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = run_explain(cfg, folder, out, shard=(0, 3))
    assert res.pending == ["1/3", "2/3"]
    cli = CliRunner()
    r = cli.invoke(app, ["merge", str(out)])
    assert r.exit_code == 2 and "1/3, 2/3 not finished" in r.output
    assert not (out / SCORES).exists()
    r = cli.invoke(app, ["merge", str(out), "--partial"])
    assert r.exit_code == 0, r.output
    assert [x["path"] for x in lines(out / SCORES)] == ["img00.png", "img03.jpg", "img06.png"]
    r = cli.invoke(app, ["merge", str(out)])
    assert r.exit_code == 2 and "no parts to merge" in r.output


def test_shard_guards(cfg, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="--overwrite with --shard"):
        run_explain(cfg, folder, out, shard=(0, 2), overwrite=True)
    run_explain(cfg, folder, out, shard=(0, 2))
    with pytest.raises(OutputError, match="already holds a run"):
        run_explain(cfg, folder, out, shard=(0, 2))  # its own part exists: needs --resume
    # Another shard of a fresh folder does not see the first one's part as an earlier run.
    assert run_explain(cfg, folder, out, shard=(1, 2)).merged is not None


# --------------------------------------------------------------------------------------------
# Two processes under torchrun (gloo)


def test_torchrun_two_ranks_merge_equals_single_run(tiny_config, folder: Path, tmp_path: Path,
                                                    reference: Path) -> None:
    out = tmp_path / "torchrun"
    config = tiny_config("gradcam", "output: {save_maps: true}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "xaicli.cli", "explain", str(folder), "-c", str(config), "-o", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "merged parts 0/2, 1/2" in proc.stderr
    assert not (out / "parts").exists()
    merged = lines(out / SCORES)
    assert_same_records(merged, lines(reference / SCORES))
    assert_same_maps(out, reference)
    run = json.loads((out / "run.json").read_text())
    assert [(p["rank"], p["counts"]["processed"]) for p in run["parts"]] == [(0, 5), (1, 4)]
    assert run["counts"]["ok"] == N_IMAGES and run["exit_code"] == 0


# --------------------------------------------------------------------------------------------
# Resume


def test_scores_file_cuts_a_torn_last_line(tmp_path: Path) -> None:
    p = tmp_path / "s.jsonl"
    p.write_text('{"path": "a"}\n{"path": "b"}\n{"path": "c", "sta')
    assert drop_torn_tail(p) == len('{"path": "c", "sta')
    f = ScoresFile(p)
    f.append({"path": "d"})
    f.close()
    assert [r["path"] for r in read_scores(p)] == ["a", "b", "d"]
    assert drop_torn_tail(p) == 0  # ends with a newline: untouched
    p.write_text('{"path": "only half')
    assert drop_torn_tail(p) == len('{"path": "only half') and p.read_bytes() == b""
    assert drop_torn_tail(tmp_path / "missing.jsonl") == 0


def _count_images(monkeypatch) -> list[int]:
    seen: list[int] = []
    original = Explainer.__call__
    monkeypatch.setattr(engine, "_dry_run", lambda st: None)  # count the run's images only

    def counting(self, x, seeds=None):
        seen.append(int(x.shape[0]))
        return original(self, x, seeds)

    monkeypatch.setattr(Explainer, "__call__", counting)
    return seen


def test_resume_recomputes_only_the_torn_and_the_incomplete(cfg, folder: Path, tmp_path: Path,
                                                            monkeypatch) -> None:
    out = tmp_path / "out"
    run_explain(cfg, folder, out)
    before = lines(out / SCORES)
    untouched = out / before[0]["explanations"][0]["files"]["overlay"]
    mtime = untouched.stat().st_mtime_ns
    seen = _count_images(monkeypatch)

    # Killed mid-write: the last line is torn. Its image is redone, and its new line must not be
    # glued to the fragment (it would be lost, and the image missing from scores.jsonl).
    text = (out / SCORES).read_text()
    (out / SCORES).write_text(text[: len(text) - len(text.splitlines()[-1]) // 2 - 1])
    res = run_explain(cfg, folder, out, resume=True)
    assert sum(seen) == 1 and res.skipped == N_IMAGES - 1 and res.ok == N_IMAGES
    assert_same_records(lines(out / SCORES), before)

    # An image whose overlay vanished is redone; a second resume then has nothing left to do.
    lost = before[2]
    (out / lost["explanations"][0]["files"]["overlay"]).unlink()
    res = run_explain(cfg, folder, out, resume=True)
    assert sum(seen) == 2 and res.run["counts"]["processed"] == 1 and res.exit_code == 0
    assert (out / lost["explanations"][0]["files"]["overlay"]).is_file()
    res = run_explain(cfg, folder, out, resume=True)
    assert sum(seen) == 2 and res.skipped == N_IMAGES

    after = lines(out / SCORES)
    assert len(after) == N_IMAGES and len({r["path"] for r in after}) == N_IMAGES
    assert_same_records(after, before)
    assert untouched.stat().st_mtime_ns == mtime  # done images are not rewritten


def _interrupt_after(monkeypatch, batches: int) -> None:
    original = folder_run._explain_batch
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > batches:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(folder_run, "_explain_batch", flaky)


def test_resume_after_an_interrupted_run(cfg, folder: Path, tmp_path: Path, reference: Path,
                                         monkeypatch) -> None:
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _interrupt_after(m, 1)
        with pytest.raises(KeyboardInterrupt):
            run_explain(cfg, folder, out)
    assert len(lines(out / SCORES)) == 4  # the first batch (batch_size 4) is kept
    seen = _count_images(monkeypatch)
    res = run_explain(cfg, folder, out, resume=True)
    assert sum(seen) == N_IMAGES - 4 and res.skipped == 4
    assert_same_records(lines(out / SCORES), lines(reference / SCORES))
    assert_same_maps(out, reference)


def test_resume_an_interrupted_shard(cfg, folder: Path, tmp_path: Path, reference: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _interrupt_after(m, 1)
        with pytest.raises(KeyboardInterrupt):
            run_explain(cfg, folder, out, shard=(0, 2))
    assert run_explain(cfg, folder, out, shard=(1, 2)).pending == ["0/2"]
    with pytest.raises(OutputError):
        run_explain(cfg, folder, out, shard=(0, 2))  # its part is there: --resume is needed
    seen = _count_images(monkeypatch)
    res = run_explain(cfg, folder, out, shard=(0, 2), resume=True)
    assert sum(seen) == 1 and res.skipped == 4 and res.merged is not None
    merged = lines(out / SCORES)
    assert len(merged) == N_IMAGES
    assert_same_records(merged, lines(reference / SCORES))


def test_unsharded_resume_absorbs_left_over_parts(cfg, folder: Path, tmp_path: Path, reference: Path) -> None:
    out = tmp_path / "out"
    run_explain(cfg, folder, out, shard=(0, 2))  # part 1/2 never ran
    res = run_explain(cfg, folder, out, resume=True)  # finish in one piece
    assert res.skipped == 5 and res.run["counts"]["processed"] == 4
    assert not (out / "parts").exists()
    assert_same_records(lines(out / SCORES), lines(reference / SCORES))


# --------------------------------------------------------------------------------------------
# Out of memory


def test_cuda_oom_splits_the_batch_and_the_run_goes_on(cfg, folder: Path, tmp_path: Path, reference: Path,
                                                       monkeypatch) -> None:
    original = Explainer.__call__
    sizes: list[int] = []
    monkeypatch.setattr(engine, "_dry_run", lambda st: None)  # the run's batches only

    def small_memory(self, x, seeds=None):
        sizes.append(int(x.shape[0]))
        if x.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return original(self, x, seeds)

    monkeypatch.setattr(Explainer, "__call__", small_memory)
    out = tmp_path / "oom"
    res = run_explain(cfg, folder, out)
    assert res.exit_code == 0 and res.ok == N_IMAGES and res.run["failures"] == []
    assert sizes[:3] == [4, 2, 1]  # halved twice, then one image at a time for the rest of the run
    assert sum(s for s in sizes if s == 1) == N_IMAGES
    assert_same_records(lines(out / SCORES), lines(reference / SCORES))
    assert_same_maps(out, reference)


def test_runner_halves_chunks_on_oom() -> None:
    net = GapNet().eval()

    class Limited(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.sizes: list[int] = []

        def forward(self, x):
            self.sizes.append(x.shape[0])
            if x.shape[0] > 3:
                raise RuntimeError("CUDA error: out of memory")
            return self.net(x)

    x = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = Limited()
    got = Runner(model=model, budget=8).logits(x)
    assert model.sizes[:3] == [8, 4, 2] and sum(model.sizes[2:]) == 10
    torch.testing.assert_close(got, net(x), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Nothing kept from batch to batch


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(m._backward_pre_hooks) for m in model.modules())


def _live_tensors() -> tuple[int, int]:
    """(tensors alive, of which part of an autograd graph) after a full collection."""
    gc.collect()
    tensors = [o for o in gc.get_objects() if issubclass(type(o), torch.Tensor)]
    return len(tensors), sum(1 for t in tensors if t.grad_fn is not None)


def test_explainer_keeps_no_hooks_or_graphs_between_batches() -> None:
    net = GapNet().eval()
    methods = [(get_method(n), get_method(n).params()) for n in ("gradcam", "gradcampp", "eigencam", "cam")]
    explainer = Explainer(net, methods, resolve_layer(net, "features"), TargetConfig(mode="topk", k=2),
                          Runner(model=net, budget=8), keep_batches=True)
    gen = torch.Generator().manual_seed(0)
    _, graphs = _live_tensors()
    counts = []
    for _ in range(4):
        res = explainer(torch.randn(6, 3, 32, 32, generator=gen))
        assert _hooks(net) == 0
        kept = [res.logits, res.targets, *(m for r in res.methods for m in r.maps)]
        kept += [t for b in res.batches for t in (b.x, b.logits, b.activations, b.gradients) if t is not None]
        assert len(kept) == 2 + 4 * 2 + 2 * 4  # top-2 maps of 4 methods; x, logits, acts, grads per target rank
        assert all(t.grad_fn is None and not t.requires_grad for t in kept)
        del res, kept
        n_tensors, n_graph = _live_tensors()
        assert n_graph == graphs  # no autograd graph survives the batch
        counts.append(n_tensors)
    assert len(set(counts)) == 1, counts  # no tensor piles up from batch to batch
    assert all(p.grad is None for p in net.parameters())


def test_explainer_releases_hooks_on_error() -> None:
    net = GapNet().eval()
    spec = get_method("gradcam")
    explainer = Explainer(net, [(spec, spec.params())], resolve_layer(net, "features"), TargetConfig(),
                          Runner(model=net, budget=8))
    baseline = _live_tensors()[1]
    with pytest.raises(RuntimeError) as info:
        explainer(torch.randn(2, 4, 32, 32))  # wrong channel count: the forward fails
    del info
    assert _hooks(net) == 0 and _live_tensors()[1] == baseline


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_memory_flat_over_batches() -> None:
    import torchvision

    net = torchvision.models.resnet18(weights=None).cuda().eval()
    spec = get_method("gradcam")
    explainer = Explainer(net, [(spec, spec.params())], resolve_layer(net, "layer4"), TargetConfig(),
                          Runner(model=net, budget=32))
    x = torch.randn(32, 3, 224, 224, device="cuda")
    used = []
    for _ in range(6):
        res = explainer(x)
        del res
        torch.cuda.synchronize()
        used.append(torch.cuda.memory_allocated())
    assert used[1:] == used[:1] * 5, used


# --------------------------------------------------------------------------------------------
# The overlay's lookup table gives exactly the float blend


def test_overlay_equals_the_float_blend() -> None:
    from xaicli.render import colormap, overlay

    def blend(image, heat, lut, alpha, signed=False, mask=None):
        v = (heat + 1) * 0.5 if signed else heat
        colors = lut[(v.clamp(0, 1) * 255).round().long()].float()
        a = torch.full_like(heat, alpha) if mask is None else mask.float() * alpha
        out = image.permute(1, 2, 0).float() * (1 - a[..., None]) + colors * a[..., None]
        return out.round().clamp(0, 255).to(torch.uint8)

    # Every (pixel value, colour index) pair, for every channel.
    pixel = torch.arange(256, dtype=torch.uint8).repeat_interleave(256).view(1, 256, 256).repeat(3, 1, 1)
    heat = torch.arange(256).repeat(256).view(256, 256).float() / 255
    mask = torch.rand(256, 256, generator=torch.Generator().manual_seed(0)) > 0.3
    for name, signed in (("jet", False), ("bwr", True)):
        lut = colormap(name, torch.device("cpu"))
        h = heat * 2 - 1 if signed else heat
        for alpha in (0.5, 0.3, 0.123, 1.0):
            got = overlay(pixel, h, lut, alpha, signed=signed)
            assert got.shape == (256, 256, 3) and got.is_contiguous()
            assert torch.equal(got, blend(pixel, h, lut, alpha, signed))
            assert torch.equal(overlay(pixel, h, lut, alpha, signed, mask), blend(pixel, h, lut, alpha, signed, mask))


def test_cli_makes_openmp_wait_passively_unless_told(monkeypatch) -> None:
    from xaicli.cli import main

    monkeypatch.setattr(sys, "argv", ["xai", "--version"])
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    with pytest.raises(SystemExit):
        main()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    with pytest.raises(SystemExit):
        main()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
