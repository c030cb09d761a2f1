"""Check that a refactor keeps `xai explain` outputs byte-identical.

    python tools/same_outputs.py run DIR        # every scenario into DIR (uses the xaicli on sys.path)
    python tools/same_outputs.py compare A B    # exit 0 when A and B hold the same outputs

Scenarios (sample_images, the embedded default model, every method with cheap knobs):
``all`` (every method, every metric, ground-truth boxes, raw maps), ``topk`` (top-2 targets, JPEG),
``shard`` (the ``all`` run as --shard 0/2 then 1/2, merged by the last part) and ``torchrun`` (two
processes). ``compare`` checks scores.jsonl byte for byte, every overlay and map byte for byte, and
run.json with the fields that differ from run to run (times, versions, paths, host) left out; keys
of run.json that only B has (nested ones too, e.g. ``counts.x``) are listed as ADDED and do not
count as differences.
"""

from __future__ import annotations

import json
import os
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
output: {save_maps: true}
runtime: {batch_size: 4, workers: 0}
"""

TOPK = """\
method: [gradcam, saliency, eigencam]
target: top2
output: {format: jpg}
runtime: {batch_size: 4, workers: 0}
"""

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
    cfg.write_text(CONFIG.replace("BOXES", str(dest / "boxes.csv")))
    topk = dest / "topk.yaml"
    topk.write_text(TOPK)
    _xai(["explain", str(IMAGES), "-c", str(cfg), "-o", str(dest / "all"), "-q"])
    _xai(["explain", str(IMAGES), "-c", str(topk), "-o", str(dest / "topk"), "-q"])
    for i in range(2):
        _xai(["explain", str(IMAGES), "-c", str(cfg), "-o", str(dest / "shard"), "--shard", f"{i}/2", "-q"])
    tr = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
          "-m", "xaicli.cli", "explain", str(IMAGES), "-c", str(cfg), "-o", str(dest / "torchrun"), "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(tr, env=env, capture_output=True, text=True)
    if r.returncode not in (0, 1):
        sys.exit(f"torchrun failed ({r.returncode})\n{r.stderr[-3000:]}")


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and p.parts[-2] != "parts" and not p.name.startswith(".")}


def _stable(run: dict) -> dict:
    return {k: v for k, v in run.items() if k not in VOLATILE}


def _run_json_diff(a: object, b: object, path: str = "") -> tuple[list[str], list[str]]:
    """(keys whose values differ, keys only B has) between two run.json values. Keys B adds (new
    fields of a later version) are reported apart: run.json may gain keys, never change one."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return ([path or "."] if a != b else []), []
    differ: list[str] = []
    added = [f"{path}{k}" for k in b if k not in a]
    for k in a:
        if k not in b:
            differ.append(f"{path}{k} (missing in B)")
            continue
        d, ad = _run_json_diff(a[k], b[k], f"{path}{k}.")
        differ += [x.rstrip(".") for x in d]
        added += ad
    return differ, added


def compare(a: Path, b: Path) -> int:
    """Exit 0 when B holds A's outputs. run.json keys that only B has (a change that adds fields)
    are listed as added, not counted as differences; a key B lacks or changes is a difference."""
    problems = []
    added: set[str] = set()
    for scenario in ("all", "topk", "shard", "torchrun"):
        fa, fb = _files(a / scenario), _files(b / scenario)
        if sorted(fa) != sorted(fb):
            problems.append(f"{scenario}: files differ: only in A {sorted(set(fa) - set(fb))[:5]}, "
                            f"only in B {sorted(set(fb) - set(fa))[:5]}")
        same = 0
        for name in sorted(set(fa) & set(fb)):
            if name == "run.json":
                differ, new = _run_json_diff(_stable(json.loads(fa[name])), _stable(json.loads(fb[name])))
                added.update(f"{scenario}/run.json: {k}" for k in new)  # keys B adds: reported, not differences
                if differ:
                    problems.append(f"{scenario}/run.json differs in {sorted(differ)}")
                else:
                    same += 1
            elif fa[name] != fb[name]:
                problems.append(f"{scenario}/{name} differs")
            else:
                same += 1
        print(f"{scenario}: {same} of {len(fa)} files identical")
    for k in sorted(added):
        print("ADDED", k)
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
