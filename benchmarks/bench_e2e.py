"""End to end, files on disk to overlays on disk: `xai explain` next to the pytorch-grad-cam script a
user would write today (benchmarks/pgc_script.py), on the same generated images, same model, same
device, in the same run. Run by hand (not collected by pytest):

    python benchmarks/bench_e2e.py --n 2000 --device cuda --batch 64            # an H100
    python benchmarks/bench_e2e.py --n 48 --device cpu --batch 16 --workers 2   # a small CPU
    python benchmarks/bench_e2e.py --n 96 --device cpu --also /tmp/main-before   # a refactor vs the code before it

Both run as subprocesses, so "wall" includes Python start-up, imports and model load; "loop" is
each tool's own timing of the images (xai: run.json timings.run_s; the script: its loop).
xai writes overlays at each image's own size plus scores.jsonl and run.json; the script writes
224x224 overlays only (what show_cam_on_image gives on the resized input).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# Both tools run with OpenMP threads waiting passively (xai's default, cli.main), unless the caller
# sets OMP_WAIT_POLICY: the comparison is then between the tools, not their OpenMP settings.
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
# (height, width) and weight: mostly ImageNet-like ~500x375, some phone-sized and small ones.
SIZES = [((375, 500), 4), ((500, 375), 2), ((333, 500), 2), ((480, 640), 2), ((640, 480), 1),
         ((768, 1024), 1), ((1080, 1440), 1), ((224, 300), 1), ((600, 600), 1)]


def photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A photo-like BGR uint8 image: smooth colour field, soft shapes, grain (JPEG-typical content)."""
    import cv2

    small = rng.uniform(0, 255, (max(2, h // 48), max(2, w // 48), 3)).astype(np.float32)
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    for _ in range(int(rng.integers(2, 7))):
        center = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        axes = (int(rng.integers(w // 16, w // 3)), int(rng.integers(h // 16, h // 3)))
        color = tuple(float(c) for c in rng.uniform(0, 255, 3))
        cv2.ellipse(img, center, axes, float(rng.uniform(0, 180)), 0, 360, color, -1)
    img = cv2.GaussianBlur(img, (0, 0), max(h, w) / 300)
    img += rng.normal(0, 5, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_images(folder: Path, n: int, seed: int = 0) -> Path:
    """N JPEGs (quality 90) of mixed sizes in subfolders of 100; reused when already there."""
    import cv2

    marker = folder / f".generated-{n}-{seed}"
    if marker.exists():
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    rng = np.random.default_rng(seed)
    sizes, weights = zip(*SIZES, strict=True)
    p = np.array(weights, dtype=float) / sum(weights)
    for i in range(n):
        h, w = sizes[rng.choice(len(sizes), p=p)]
        sub = folder / f"set{i // 100:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(sub / f"img{i:05d}.jpg"), photo(rng, h, w), [cv2.IMWRITE_JPEG_QUALITY, 90])
    marker.touch()
    return folder


def xai_config(path: Path, model: str) -> Path | None:
    if model == "embedded":
        return None
    path.write_text(
        f"model: {{source: torchvision, name: {model}}}\n"
        "preprocess: {resize: [224, 224], mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}\n"
        "target_layer: layer4\n"
        "method: gradcam\n"
    )
    return path


def run_xai(images: Path, out: Path, cfg: Path | None, a: argparse.Namespace, source: Path = ROOT) -> dict:
    cmd = [sys.executable, "-m", "xaicli.cli", "explain", str(images), "-o", str(out), "-q", "--overwrite",
           "--format", "jpg", "-b", str(a.batch), "--workers", str(a.workers), "--device", a.device,
           "--precision", a.precision, "--method", "gradcam"]
    if cfg is not None:
        cmd += ["-c", str(cfg)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=source, env={**ENV, "PYTHONPATH": str(source)}, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"xai failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    run = json.loads((out / "run.json").read_text())
    return {"wall_s": wall, "loop_s": run["timings"]["run_s"], "load_s": run["timings"]["load_s"],
            "files": sum(1 for _ in (out / "overlays").rglob("*.jpg")), "peak_gpu_mb": run.get("peak_gpu_memory_mb")}


def run_script(images: Path, out: Path, a: argparse.Namespace) -> dict:
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "pgc_script.py"), str(images), str(out),
           "--model", a.model, "--batch", str(a.batch), "--device", "cuda" if a.device == "cuda" else "cpu"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"pytorch-grad-cam script failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    own = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"wall_s": wall, "loop_s": own["run_s"], "load_s": own["load_s"],
            "files": sum(1 for _ in out.glob("*.jpg")), "peak_gpu_mb": None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="images to generate (default 2000)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/xai-bench-e2e"), help="work folder")
    ap.add_argument("--model", default="resnet50", help="torchvision name (random weights) or 'embedded'")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 2), help="xai loader workers")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="xai only (the script is fp32)")
    ap.add_argument("--repeat", type=int, default=1, help="alternate the two tools this many times; best kept")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--also", type=Path, action="append", default=[],
                    help="another xaicli source tree (a checkout) timed in the same run, alternating; repeatable")
    a = ap.parse_args()
    import torch

    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    dev_name = torch.cuda.get_device_name() if a.device == "cuda" else (platform.processor() or platform.machine())
    t0 = time.perf_counter()
    images = make_images(a.dir / "images", a.n)
    print(f"{a.n} JPEGs in {images} ({time.perf_counter() - t0:.1f} s to generate or find)")
    cfg = xai_config(a.dir / "xai.yaml", a.model)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    results: dict[str, list[dict]] = {"xai": [], "script": [], **{f"xai ({p})": [] for p in a.also}}
    for _ in range(a.repeat):
        results["xai"].append(run_xai(images, a.dir / "out-xai", cfg, a))
        for p in a.also:
            results[f"xai ({p})"].append(run_xai(images, a.dir / "out-xai-also", cfg, a, source=p.resolve()))
        results["script"].append(run_script(images, a.dir / "out-pgc", a))
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    best = {k: min(v, key=lambda r: r["loop_s"]) for k, v in results.items()}
    for name, r in best.items():
        if r["files"] != a.n:
            raise SystemExit(f"{name} wrote {r['files']} overlays for {a.n} images")

    print(f"\ndevice {a.device} ({dev_name}), {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"OMP_WAIT_POLICY={ENV['OMP_WAIT_POLICY']}, model {a.model}, "
          f"batch {a.batch}, xai workers {a.workers}, xai precision {a.precision}, {a.n} images, best of {a.repeat}")
    if load_before is not None:
        print(f"load average {load_before:.1f} before, {load_after:.1f} after (other processes share the CPU)")
    print(f"\n{'':34}{'wall s':>9}{'img/s':>9}{'loop s':>9}{'img/s':>9}")
    rows = {"xai explain (gradcam, jpg overlays)": best["xai"], "pytorch-grad-cam script": best["script"],
            **{f"xai explain, {p.name or p}": best[f"xai ({p})"] for p in a.also}}
    for label, r in rows.items():
        print(f"{label:34}{r['wall_s']:9.1f}{a.n / r['wall_s']:9.1f}{r['loop_s']:9.1f}{a.n / r['loop_s']:9.1f}")
    wall_ratio = best["script"]["wall_s"] / best["xai"]["wall_s"]
    loop_ratio = best["script"]["loop_s"] / best["xai"]["loop_s"]
    print(f"{'ratio xai / script':34}{'':9}{wall_ratio:9.2f}{'':9}{loop_ratio:9.2f}")
    for p in a.also:
        other = best[f"xai ({p})"]
        print(f"{'ratio xai / ' + (p.name or str(p)):34}{'':9}{other['wall_s'] / best['xai']['wall_s']:9.2f}{'':9}"
              f"{other['loop_s'] / best['xai']['loop_s']:9.2f}")
    if best["xai"]["peak_gpu_mb"] is not None:
        print(f"xai peak GPU memory {best['xai']['peak_gpu_mb']:.0f} MiB")
    if a.json:
        a.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "device_name": dev_name,
                                      "load_before": load_before, "load_after": load_after,
                                      "results": results, "ratio_wall": wall_ratio, "ratio_loop": loop_ratio},
                                     indent=2))


if __name__ == "__main__":
    main()
