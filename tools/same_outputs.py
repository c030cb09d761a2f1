"""Check that a refactor keeps `xai explain` outputs byte-identical.

    python tools/same_outputs.py run DIR        # every scenario into DIR (uses the xaicli on sys.path)
    python tools/same_outputs.py compare A B    # exit 0 when A and B hold the same outputs

Scenarios (sample_images, the embedded default model, every method with cheap knobs):
``all`` (every method, every metric, ground-truth boxes, raw maps), ``topk`` (top-2 targets, JPEG),
``shard`` (the ``all`` run as --shard 0/2 then 1/2, merged by the last part), ``torchrun`` (two
processes) and ``pictures`` (captioned overlays of four methods drawn their default ways, top-2
targets, drawn boxes, grid.png and the report's thumbnails and plots; report.html itself holds
times and paths and is not compared; a scenario that A lacks is skipped). ``compare`` checks
scores.jsonl byte for byte, every overlay and map byte for byte, and run.json with the fields that
differ from run to run (times, versions, paths, host) left out.

The first four scenarios draw bare overlays the way xaicli did before captions and per-method
styles (issue 11):
``output.annotate: false`` and every pixel method at ``clip: 100, blend: alpha``. Two changes of
that issue are allowed and reported on their own lines, never as differences: top-k files named
``.topK-<class>`` (compared as ``.topK``), and keys that B's run.json has and A's lacks ("added").
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "sample_images"

CONFIG = """\
method: [cam, gradcam, gradcampp, hirescam, xgradcam, layercam, eigencam, eigengradcam, saliency,
         guided_backprop, deconvnet, guided_gradcam, smoothgrad, integrated_gradients, occlusion,
         scorecam, superpixel]
methods:
  smoothgrad: {samples: 4}
  integrated_gradients: {steps: 8}
  occlusion: {window: 56, stride: 56}
  scorecam: {max_channels: 16}
  superpixel: {samples: 24, segments: 16}
metrics:
  deletion: {steps: 8}
  insertion: {steps: 8}
  drop_increase: {}
  boxes: {draw: true}
  pointing_game: {}
  energy: {}
  box_iou: {curve_interval: 0.1}
ground_truth: {boxes: BOXES}
output: {save_maps: true, annotate: false, style: STYLE}
runtime: {batch_size: 4, workers: 0}
"""

TOPK = """\
method: [gradcam, saliency, eigencam]
target: top2
output: {format: jpg, annotate: false, style: STYLE}
runtime: {batch_size: 4, workers: 0}
"""

# Captioned overlays, each method drawn its default way, the contact sheet and the report (issue 11).
PICTURES = """\
method: [gradcam, saliency, integrated_gradients, occlusion]
methods:
  integrated_gradients: {steps: 8}
  occlusion: {window: 56, stride: 56}
target: top2
metrics:
  boxes: {draw: true}
output: {report: true, grid: true}
runtime: {batch_size: 4, workers: 0}
"""
SCENARIOS = ("all", "topk", "shard", "torchrun", "pictures")
UNCOMPARED = {"report.html"}  # holds the time it was made and the run's paths

# The drawing of every method before issue 11: the maximum at the colour bar's end, a constant alpha.
OLD_STYLE = ("{" + ", ".join(f"{m}: {{clip: 100, blend: alpha}}" for m in (
    "saliency", "guided_backprop", "deconvnet", "guided_gradcam", "smoothgrad", "integrated_gradients", "occlusion",
    "superpixel")) + "}")
TOPK_NAME = re.compile(r"\.top(\d+)-[a-z0-9_]+\.")

BOXES = "path,x0,y0,x1,y1\nchelsea.png,140,20,330,280\nastronaut.jpg,100,20,400,400\n"

# run.json fields that change from run to run.
VOLATILE = {"command", "started", "finished", "timings", "versions", "input", "output", "host", "devices", "parts",
            "config"}


def _xai(args: list[str], env: dict[str, str] | None = None) -> None:
    cmd = [sys.executable, "-c", "from xaicli.cli import main; main()", *args]
    r = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if r.returncode not in (0, 1):
        sys.exit(f"failed ({r.returncode}): {' '.join(args)}\n{r.stderr}")


def run(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "boxes.csv").write_text(BOXES)
    cfg = dest / "all.yaml"
    cfg.write_text(CONFIG.replace("BOXES", str(dest / "boxes.csv")).replace("STYLE", OLD_STYLE))
    topk = dest / "topk.yaml"
    topk.write_text(TOPK.replace("STYLE", OLD_STYLE))
    _xai(["explain", str(IMAGES), "-c", str(cfg), "-o", str(dest / "all"), "-q"])
    _xai(["explain", str(IMAGES), "-c", str(topk), "-o", str(dest / "topk"), "-q"])
    pictures = dest / "pictures.yaml"
    pictures.write_text(PICTURES)
    _xai(["explain", str(IMAGES), "-c", str(pictures), "-o", str(dest / "pictures"), "-q"])
    for i in range(2):
        _xai(["explain", str(IMAGES), "-c", str(cfg), "-o", str(dest / "shard"), "--shard", f"{i}/2", "-q"])
    tr = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
          "-m", "xaicli.cli", "explain", str(IMAGES), "-c", str(cfg), "-o", str(dest / "torchrun"), "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(tr, env=env, capture_output=True, text=True)
    if r.returncode not in (0, 1):
        sys.exit(f"torchrun failed ({r.returncode})\n{r.stderr[-3000:]}")


def _files(d: Path) -> dict[str, bytes]:
    """The run's files by name (top-k names as before issue 11: ``.topK-<class>.`` -> ``.topK.``)."""
    out = {}
    for p in sorted(d.rglob("*")):
        if p.is_file() and p.parts[-2] != "parts" and not p.name.startswith("."):
            name = p.relative_to(d).as_posix()
            data = p.read_bytes()
            if name == "scores.jsonl":
                data = TOPK_NAME.sub(lambda m: f".top{m.group(1)}.", data.decode()).encode()
            out[TOPK_NAME.sub(lambda m: f".top{m.group(1)}.", name)] = data
    return out


def _renamed(d: Path) -> int:
    return sum(1 for p in d.rglob("*") if p.is_file() and TOPK_NAME.search(p.name))


def _stable(run: dict) -> dict:
    return {k: v for k, v in run.items() if k not in VOLATILE}


def added_keys(a: object, b: object, path: str = "") -> tuple[list[str], object]:
    """Keys of dicts in ``b`` missing at the same place in ``a`` (recursively, lists item by item),
    and ``b`` with them removed."""
    if isinstance(a, dict) and isinstance(b, dict):
        added = [f"{path}{k}" for k in b if k not in a]
        kept = {}
        for k, v in b.items():
            if k in a:
                more, kept[k] = added_keys(a[k], v, f"{path}{k}.")
                added += more
        return added, kept
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        added, kept_list = [], []
        for x, y in zip(a, b, strict=True):
            more, k = added_keys(x, y, f"{path}[].")
            added += more
            kept_list.append(k)
        return added, kept_list
    return [], b


def _compare_run_json(ra: dict, rb: dict) -> tuple[list[str], list[str]]:
    """(added keys, differing top-level keys) of two run.json objects; the config is compared only
    for keys added (it holds paths that change from run to run)."""
    added, rb_kept = added_keys(ra, rb)
    config_added, _ = added_keys(ra.get("config") or {}, rb.get("config") or {}, "config.")
    sa, sb = _stable(ra), _stable(rb_kept)
    differ = sorted(k for k in set(sa) | set(sb) if sa.get(k) != sb.get(k))
    return sorted(set(added + config_added)), differ


def compare(a: Path, b: Path) -> int:
    """Exit 0 when B holds A's outputs. run.json keys that only B has (a change that adds fields;
    nested ones too, e.g. ``methods.[].style``) are listed as added, not counted as differences; a
    key B lacks or changes is a difference."""
    problems = []
    notes = set()
    for scenario in SCENARIOS:
        if not (a / scenario).is_dir():
            print(f"{scenario}: only in B (a scenario newer than A), not compared")
            continue
        fa, fb = _files(a / scenario), _files(b / scenario)
        if _renamed(b / scenario) and not _renamed(a / scenario):
            notes.add(f"top-k files named .topK-<class> in B ({scenario}: {_renamed(b / scenario)} files)")
        if sorted(fa) != sorted(fb):
            problems.append(f"{scenario}: files differ: only in A {sorted(set(fa) - set(fb))[:5]}, "
                            f"only in B {sorted(set(fb) - set(fa))[:5]}")
        same = 0
        for name in sorted(set(fa) & set(fb)):
            if name == "run.json":
                added, differ = _compare_run_json(json.loads(fa[name]), json.loads(fb[name]))
                if added:
                    notes.add("run.json keys added in B: " + ", ".join(added))
                if differ:
                    problems.append(f"{scenario}/run.json differs in {differ}")
                else:
                    same += 1
            elif name in UNCOMPARED:
                same += 1
            elif fa[name] != fb[name]:
                problems.append(f"{scenario}/{name} differs")
            else:
                same += 1
        print(f"{scenario}: {same} of {len(fa)} files identical")
    for n in sorted(notes):
        print("ADDED", n)
    for p in problems[:40]:
        print("DIFF", p)
    print("identical" if not problems else f"{len(problems)} differences")
    return 1 if problems else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "run":
        run(Path(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(Path(sys.argv[2]), Path(sys.argv[3])))
    else:
        sys.exit(__doc__)
