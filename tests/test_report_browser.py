"""The report in a real browser: headless Chromium (Debian's ``chromium``) driven by Playwright.
Every image row is there, filtering by class and sorting by a score change what is shown, the
failed images are listed with their reasons, a run of 10,000 images opens and pages quickly, and
no request leaves the page (any request that is not a file fails the test). Screenshots are saved
(also to $XAI_REPORT_SCREENSHOTS when set). Skipped, with the reason, only when no browser is
installed: `apt-get install chromium chromium-driver` and `pip install playwright`."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BROKEN, TINY_CONFIG, write_images
from tests.test_report import EXTRA, scores
from xaicli.report import REPORT_HTML, write_report
from xaicli.run import run_explain

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None


def no_browser(reason: str) -> None:
    """Skip (a developer's machine) or fail (CI: .ci/run sets XAI_REQUIRE_BROWSER and installs one)."""
    if os.environ.get("XAI_REQUIRE_BROWSER"):
        pytest.fail(f"{reason} (XAI_REQUIRE_BROWSER is set)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    try:
        from playwright import sync_api
    except ImportError:
        no_browser("no browser driver installed: pip install playwright")
    exe = chromium_path()
    if exe is None:
        no_browser("no browser installed: apt-get install chromium chromium-driver")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=ARGS)
        yield b
        b.close()


class Page:
    """A page of a report, with every request it makes recorded; anything but a file is refused."""

    def __init__(self, browser: object, path: Path) -> None:
        self.context = browser.new_context(viewport={"width": 1400, "height": 900})  # type: ignore[attr-defined]
        self.requests: list[str] = []
        self.outside: list[str] = []
        self.errors: list[str] = []
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        t0 = time.perf_counter()
        self.page.goto(path.resolve().as_uri())
        self.page.wait_for_selector("body[data-ready='1']", state="attached", timeout=60_000)
        self.load_s = time.perf_counter() - t0

    def _route(self, route: object) -> None:
        url = route.request.url  # type: ignore[attr-defined]
        self.requests.append(url)
        if url.startswith("file://"):
            route.continue_()  # type: ignore[attr-defined]
        else:
            self.outside.append(url)
            route.abort()  # type: ignore[attr-defined]

    def paths(self) -> list[str]:
        return self.page.eval_on_selector_all("tr.row", "rows => rows.map(r => r.dataset.path)")

    def close(self) -> None:
        assert self.outside == [], f"requests left the page: {self.outside[:5]}"
        assert self.errors == [], self.errors
        self.context.close()


def screenshot(page: Page, tmp_path: Path, name: str) -> Path:
    shot = tmp_path / name
    page.page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    target = os.environ.get("XAI_REPORT_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(target) / name)
    return shot


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("browser-run")
    images = tmp / "images"
    write_images(images, n=9)
    shutil.copy(BROKEN / "truncated.png", images / "broken.png")
    (images / "empty.jpg").write_bytes(b"")
    cfg = tmp / "tiny.yaml"
    cfg.write_text(TINY_CONFIG.format(method="gradcam,saliency") + EXTRA)
    from xaicli.config import load_config

    out = tmp / "run"
    res = run_explain(load_config(cfg), images, out)
    assert res.failed == 2
    write_report(out)
    return out


def test_every_row_failures_and_no_request_leaves(browser, run_dir: Path, tmp_path: Path) -> None:
    page = Page(browser, run_dir / REPORT_HTML)
    recs = scores(run_dir)
    assert page.paths() == [r["path"] for r in recs]  # every image, in path order, on one page
    assert page.page.inner_text("#count").startswith(f"1–{len(recs)} of {len(recs)} images")
    failures = page.page.inner_text("#failures-0")
    for r in recs:
        if r["status"] != "ok":
            assert r["path"] in failures and r["error"]["message"] in failures
    # Failed images in the grid, with their reason, filtered by status.
    page.page.select_option("#status-filter", "error")
    assert page.paths() == [r["path"] for r in recs if r["status"] != "ok"]
    assert "failed: decode" in page.page.inner_text("tr.row")
    page.page.select_option("#status-filter", "")
    # The pictures are files next to the report, and they load (lazily: scrolled into view).
    for _ in range(20):
        page.page.mouse.wheel(0, 600)
        page.page.wait_for_timeout(50)
    page.page.wait_for_load_state("networkidle")
    loaded = page.page.eval_on_selector_all("tr.row img", "imgs => imgs.filter(i => i.complete && i.naturalWidth > 0).length")
    assert loaded == 3 * sum(r["status"] == "ok" for r in recs)
    assert all(u.startswith("file://") for u in page.requests)
    screenshot(page, tmp_path, "report.png")
    page.close()


def test_filter_by_class_sort_by_score_and_search(browser, run_dir: Path) -> None:
    page = Page(browser, run_dir / REPORT_HTML)
    ok = [r for r in scores(run_dir) if r["status"] == "ok"]
    # Filter by predicted class: only that class's images remain.
    classes = {r["topk"][0]["label"] for r in ok}
    cls = sorted(classes, key=lambda c: sum(r["topk"][0]["label"] == c for r in ok))[0]
    page.page.select_option("#class-filter", cls)
    assert page.paths() == [r["path"] for r in ok if r["topk"][0]["label"] == cls]
    page.page.select_option("#class-filter", "")
    # Sort by a score (the lowest deletion AUC of Grad-CAM first): the rows follow scores.jsonl's values.
    page.page.select_option("#sort", "c:0:deletion_auc")
    by_score = sorted(ok, key=lambda r: (r["explanations"][0]["metrics"]["deletion_auc"], r["path"]))
    shown = page.paths()
    assert shown[: len(ok)] == [r["path"] for r in by_score]  # images without the value (failed) last
    page.page.select_option("#order", "desc")
    assert page.paths()[: len(ok)] == [r["path"] for r in sorted(
        ok, key=lambda r: (-r["explanations"][0]["metrics"]["deletion_auc"], r["path"]))]
    # One method's column only; a search on the path.
    page.page.select_option("#method-filter", "saliency")
    assert page.page.eval_on_selector_all("#images-table thead th[data-method]", "t => t.map(x => x.dataset.method)") == [
        "saliency"]
    page.page.fill("#search", "img03")
    assert page.paths() == ["img03.jpg"]
    page.close()


def write_big_run(out: Path, n: int) -> None:
    """A run folder of ``n`` images (records only, no pictures): what the report of a large run reads."""
    import random

    rng = random.Random(0)
    out.mkdir(parents=True)
    labels = [f"class {i}" for i in range(40)]
    lines = []
    for i in range(n):
        path = f"part{i // 1000:02d}/img{i:05d}.jpg"
        if i % 997 == 0:
            lines.append({"path": path, "status": "error", "error": {"type": "decode", "message": "truncated file"}})
            continue
        top = [{"index": k, "label": labels[k], "prob": round(rng.random() / (j + 1), 4)}
               for j, k in enumerate(rng.sample(range(40), 5))]
        ex = [{"method": m, "layer": "features", "target": {**top[0], "rank": 1},
               "map": {"shape": [7, 7], "min": 0.0, "max": 1.0, "mean": 0.3, "peak": [1, 2]},
               "files": {"overlay": f"overlays/{path[:-4]}.{m}.png", "map": None},
               "metrics": {"deletion_auc": round(rng.random(), 4), "energy": round(rng.random(), 4)}}
              for m in ("gradcam", "saliency")]
        lines.append({"path": path, "status": "ok", "error": None, "width": 500, "height": 375, "topk": top,
                      "explanations": ex})
    (out / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    run = {"schema_version": 1, "model": "synthetic", "layer": "features", "target": "predicted",
           "input": str(out / "missing-input"), "config": {"output": {"colormap": "jet", "alpha": 0.5}},
           "methods": [{"name": "gradcam", "params": {}, "passes": "1 fwd + 1 bwd"},
                       {"name": "saliency", "params": {"render": "magnitude"}, "passes": "1 fwd + 1 bwd",
                        "style": {"clip": 99.0, "blend": "heat"}}],
           "metrics": [{"name": "deletion", "params": {}}, {"name": "energy", "params": {}}],
           "counts": {"processed": n}, "timings": {"run_s": 100.0, "images_per_s": n / 100.0},
           "device": {"type": "cuda", "name": "test"}, "precision": "fp32"}
    (out / "run.json").write_text(json.dumps(run))


def test_ten_thousand_images_open_and_page_quickly(browser, tmp_path: Path) -> None:
    out = tmp_path / "big"
    write_big_run(out, 10_000)
    t0 = time.perf_counter()
    write_report(out)
    build_s = time.perf_counter() - t0
    page = Page(browser, out / REPORT_HTML)
    assert page.load_s < 20, f"the report took {page.load_s:.1f} s to open"
    assert page.page.locator("tr.row").count() == 50  # one page in the document, not 10,000 rows
    assert "of 10000 images" in page.page.inner_text("#count")
    t0 = time.perf_counter()
    page.page.select_option("#sort", "c:1:energy")
    page.page.select_option("#order", "desc")
    page.page.click("#next")
    sort_s = time.perf_counter() - t0
    assert page.page.inner_text("#page").startswith("2 / ")
    assert sort_s < 5, f"sorting 10,000 rows took {sort_s:.1f} s"
    energies = page.page.eval_on_selector_all(
        "tr.row td:nth-child(4) .vals", "v => v.map(x => parseFloat(x.textContent.split('energy ')[1]))")
    assert energies == sorted(energies, reverse=True) and len(energies) == 50
    for _ in range(10):
        page.page.mouse.wheel(0, 2000)
    page.page.fill("#search", "img00999.")
    assert page.paths() == ["part00/img00999.jpg"]
    print(f"10,000 images: report built in {build_s:.1f} s, opened in {page.load_s:.2f} s, sorted + paged in {sort_s:.2f} s")
    page.close()


def test_compare_report_shows_disagreements(browser, run_dir: Path, tmp_path: Path) -> None:
    from xaicli.config import load_config
    from xaicli.report import write_compare_report

    images = Path(json.loads((run_dir / "run.json").read_text())["input"])
    cfg = tmp_path / "other.yaml"
    cfg.write_text(TINY_CONFIG.format(method="gradcam").replace("{num_classes: 5}", "{num_classes: 5, seed: 3}"))
    other = tmp_path / "other"
    run_explain(load_config(cfg), images, other)
    out = tmp_path / "cmp"
    write_compare_report([run_dir, other], out)
    page = Page(browser, out / REPORT_HTML)
    a = {r["path"]: r for r in scores(run_dir) if r["status"] == "ok"}
    b = {r["path"]: r for r in scores(other) if r["status"] == "ok"}
    differ = sorted(p for p in a if a[p]["topk"][0]["index"] != b[p]["topk"][0]["index"])
    page.page.select_option("#agree-filter", "differ")
    assert page.paths() == differ
    assert page.page.eval_on_selector_all("#images-table thead th[data-method]", "t => t.length") == 3
    screenshot(page, tmp_path, "compare.png")
    page.close()
