"""In-memory throughput of every xaicli method next to the same method in pytorch-grad-cam, Captum
and TorchCAM, and next to the limits (the model's forward; forward + backward to the target
layer), all in one run on the same device, model, batch and precision. Run by hand:

    python benchmarks/bench_methods.py --device cuda --model resnet50 --batch 64               # fp32
    python benchmarks/bench_methods.py --device cuda --precision bf16 --channels-last
    python benchmarks/bench_methods.py --device cpu --model resnet18 --size 112 --batch 8 --iters 8 --rounds 2

Inputs are random tensors already on the device; the model has random weights (speed does not
depend on them). Each row times calls on the whole batch, after warm-up, each call timed on its
own with the device synchronised; a row's time is the fastest call (``--stat best``, the default:
on a CPU shared with other work the mean mostly measures the neighbours) or the mean
(``--stat mean``); images/s = batch / seconds per call. The limits are timed before and after
the methods and the fastest timing is kept, so a quiet spell during the methods cannot put a
method above its limit; ``--rounds R`` times every row R times (interleaved) and keeps the fastest.

Limits: forward (methods without gradients), forward + backward to the target layer (methods
with a map at the layer, e.g. Grad-CAM) and forward + backward to the input (pixel-space
gradient methods: saliency, guided backprop, ...). Many-pass methods (Score-CAM, IG, ...) are
shown against the one-pass limit; their ``passes`` column says how many passes they make.

What each row returns (the work it does):
* xaicli: the Explainer's shared pass + the method, then per-image normalisation and
  upsampling to the input size on the device (maps ready to render);
* pytorch-grad-cam: its ``__call__`` (maps min-max normalised and resized to the input, NumPy);
* Captum: ``attribute`` on precomputed targets (+ bilinear upsampling for layer methods);
* TorchCAM: forward, then the extractor on the predicted classes (maps at the layer's size).

Methods are taken from xaicli's registry (``all_methods()``), so methods added later are timed
without editing this file; peers are matched by method name. Many-forward methods get the same
knobs on both sides (KNOBS; IG 50 steps, SmoothGrad 25 samples, occlusion 32/16 windows).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# As `xai` does (cli.main): OpenMP threads wait passively, for every row alike. Spinning threads
# make a busy CPU up to 10x slower; set OMP_WAIT_POLICY=ACTIVE to measure without this.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xaicli.config import TargetConfig, build_dataclass  # noqa: E402
from xaicli.engine import Explainer, autocast_factory  # noqa: E402
from xaicli.errors import XaiError  # noqa: E402
from xaicli.layers import auto_layer, resolve_layer  # noqa: E402
from xaicli.methods import MethodSpec, all_methods  # noqa: E402
from xaicli.methods.batch import Runner  # noqa: E402
from xaicli.render import normalize, to_input_size  # noqa: E402

# Knobs of many-forward methods, matched on both sides. Keys are candidate field names of the
# xaicli method's params dataclass (the first that exists is used); the peers read "value".
KNOBS: dict[str, dict[str, Any]] = {
    "steps": {"value": 50, "fields": ("steps", "n_steps")},
    "samples": {"value": 25, "fields": ("samples", "n_samples", "nt_samples")},
    "sigma": {"value": 0.15, "fields": ("sigma", "noise", "stdev")},
    "window": {"value": 32, "fields": ("window", "window_size", "size")},
    "stride": {"value": 16, "fields": ("stride", "strides")},
}
METHOD_KNOBS: dict[str, tuple[str, ...]] = {
    "integrated_gradients": ("steps",),
    "smoothgrad": ("samples", "sigma"),
    "occlusion": ("window", "stride"),
}
# Names a method may be registered under (checked against names and aliases of the registry).
SYNONYMS: dict[str, tuple[str, ...]] = {
    "integrated_gradients": ("integrated_gradients", "ig", "integratedgradients", "intgrad"),
    "smoothgrad": ("smoothgrad", "smooth_grad", "noisetunnel"),
    "occlusion": ("occlusion",),
    "saliency": ("saliency", "vanilla_gradient", "gradient"),
    "guided_backprop": ("guided_backprop", "guidedbackprop", "gbp", "guided_backpropagation"),
    "deconvnet": ("deconvnet", "deconvolution", "deconv"),
    "guided_gradcam": ("guided_gradcam", "guidedgradcam"),
    "scorecam": ("scorecam", "score_cam"),
    "eigengradcam": ("eigengradcam", "eigen_grad_cam"),
}


@dataclass
class Ctx:
    model: nn.Module
    x: Tensor
    targets: Tensor  # (B,) predicted classes, computed once outside the timings
    layer_name: str
    layer: nn.Module
    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager[Any]]
    budget: int
    knobs: dict[str, Any] = field(default_factory=dict)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn: Callable[[], Any], device: torch.device, iters: int, warmup: int, budget_s: float,
          stat: str = "best") -> float:
    """Seconds per call: ``warmup`` untimed calls (at least one, which also sizes the run so a
    slow method stays within ``budget_s``), then up to ``iters`` calls, each timed on its own;
    the fastest (``best``) or the mean (``mean``)."""
    t = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t
    for _ in range(max(0, warmup - 1)):
        fn()
    sync(device)
    n = max(1, min(iters, int(budget_s / max(first, 1e-6))))
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return min(times) if stat == "best" else sum(times) / n


# --------------------------------------------------------------------------------------------
# Limits


def limit_forward(ctx: Ctx) -> Callable[[], Any]:
    def run() -> Tensor:
        with torch.inference_mode(), ctx.autocast():
            return ctx.model(ctx.x)

    return run


def limit_forward_backward(ctx: Ctx) -> Callable[[], Any]:
    """Forward, then the gradient of the summed target logits w.r.t. the layer's output."""
    box: dict[str, Tensor] = {}

    def keep(_m: nn.Module, _i: Any, out: Tensor) -> None:
        box["a"] = out

    def run() -> Tensor:
        handle = ctx.layer.register_forward_hook(keep)
        try:
            with torch.enable_grad(), ctx.autocast():
                out = ctx.model(ctx.x)
            (g,) = torch.autograd.grad(out.float().gather(1, ctx.targets[:, None]).sum(), box.pop("a"))
            return g
        finally:
            handle.remove()

    return run


def limit_forward_backward_input(ctx: Ctx) -> Callable[[], Any]:
    """Forward, then the gradient of the summed target logits w.r.t. the input (a full backward)."""

    def run() -> Tensor:
        x = ctx.x.detach().requires_grad_(True)
        with torch.enable_grad(), ctx.autocast():
            out = ctx.model(x)
        (g,) = torch.autograd.grad(out.float().gather(1, ctx.targets[:, None]).sum(), x)
        return g

    return run


def limit_key(spec: MethodSpec) -> str:
    """Which limit a method is held to: no gradient -> forward; a pixel-space gradient method ->
    forward + backward to the input; a layer-space one -> forward + backward to the layer."""
    if not spec.needs_grad:
        return "fwd"
    return "fwd_bwd_input" if spec.space == "pixel" else "fwd_bwd_layer"


# --------------------------------------------------------------------------------------------
# xaicli


def xaicli_params(spec: MethodSpec, canonical: str | None) -> tuple[Any, dict[str, Any], list[str]]:
    """The method's params with the matched knobs; (params, knobs used, knobs not found)."""
    fields = {f.name for f in dataclasses.fields(spec.params)}
    used: dict[str, Any] = {}
    missing: list[str] = []
    for knob in METHOD_KNOBS.get(canonical or "", ()):
        k = KNOBS[knob]
        name = next((f for f in k["fields"] if f in fields), None)
        if name is None:
            missing.append(knob)
            continue
        for value in (k["value"], [k["value"], k["value"]]):
            try:
                build_dataclass(spec.params, {**used, name: value}, spec.name)
            except XaiError:
                continue
            used[name] = value
            break
        else:
            missing.append(knob)
    return build_dataclass(spec.params, used, spec.name), used, missing


def xaicli_fn(ctx: Ctx, spec: MethodSpec, params: Any, precision: str, memory_format: torch.memory_format):
    runner = Runner(model=ctx.model, budget=ctx.budget, autocast=ctx.autocast, memory_format=memory_format,
                    precision=precision)
    layer = resolve_layer(ctx.model, ctx.layer_name) if spec.needs_layer else None
    explainer = Explainer(ctx.model, [(spec, params)], layer, TargetConfig(), runner)
    mode, _ = spec.display(params)
    size = tuple(ctx.x.shape[-2:])

    def run() -> Tensor:
        raw = explainer(ctx.x).methods[0].maps[0]
        return to_input_size(normalize(raw, mode), size)  # type: ignore[arg-type]

    return run


# --------------------------------------------------------------------------------------------
# Peers: each builder returns (call, cleanup) or raises ImportError when the library is absent.

Peer = tuple[str, Callable[[Ctx], tuple[Callable[[], Any], Callable[[], None]]]]


def _quiet(fn: Callable[[], Any]) -> Callable[[], Any]:
    """pytorch-grad-cam's Score-CAM prints a tqdm bar per image; keep the table readable."""

    def run() -> Any:
        with contextlib.redirect_stderr(io.StringIO()):
            return fn()

    return run


def pgc(cls: str, batch_attr: bool = False) -> Peer:
    def build(ctx: Ctx):
        import pytorch_grad_cam

        cam = getattr(pytorch_grad_cam, cls)(model=ctx.model, target_layers=[ctx.layer])
        if batch_attr:
            cam.batch_size = ctx.budget

        def run() -> Any:
            with ctx.autocast():
                return cam(input_tensor=ctx.x, targets=None)

        return _quiet(run), cam.activations_and_grads.release

    return f"pytorch-grad-cam {cls}", build


def pgc_guided_backprop() -> Peer:
    def build(ctx: Ctx):
        from pytorch_grad_cam import GuidedBackpropReLUModel

        gb = GuidedBackpropReLUModel(ctx.model, ctx.device)

        def run() -> Any:  # one image per call in pytorch-grad-cam: a loop over the batch
            return [gb(ctx.x[i : i + 1], target_category=int(ctx.targets[i])) for i in range(ctx.x.shape[0])]

        return run, lambda: None

    return "pytorch-grad-cam GuidedBackpropReLUModel (per image)", build


def captum(name: str) -> Peer:
    def build(ctx: Ctx):
        import captum.attr as ca

        size = tuple(ctx.x.shape[-2:])
        k = ctx.knobs
        t = ctx.targets
        batch = ctx.x.shape[0]
        per_eval = max(1, ctx.budget // batch)
        if name == "LayerGradCam":
            algo = ca.LayerGradCam(ctx.model, ctx.layer)
            call = lambda: ca.LayerAttribution.interpolate(  # noqa: E731
                algo.attribute(ctx.x, target=t, relu_attributions=True), size, "bilinear")
        elif name == "GuidedGradCam":
            algo = ca.GuidedGradCam(ctx.model, ctx.layer)
            call = lambda: algo.attribute(ctx.x, target=t)  # noqa: E731
        elif name == "IntegratedGradients":
            algo = ca.IntegratedGradients(ctx.model)
            call = lambda: algo.attribute(ctx.x, target=t, n_steps=k["steps"],  # noqa: E731
                                          internal_batch_size=ctx.budget)
        elif name == "NoiseTunnel":
            algo = ca.NoiseTunnel(ca.Saliency(ctx.model))
            stdev = float(k["sigma"]) * float(ctx.x.max() - ctx.x.min())
            call = lambda: algo.attribute(ctx.x, target=t, nt_type="smoothgrad", nt_samples=k["samples"],  # noqa: E731
                                          nt_samples_batch_size=per_eval, stdevs=stdev)
        elif name == "Occlusion":
            algo = ca.Occlusion(ctx.model)
            w, s = k["window"], k["stride"]
            call = lambda: algo.attribute(ctx.x, target=t, sliding_window_shapes=(3, w, w),  # noqa: E731
                                          strides=(3, s, s), perturbations_per_eval=per_eval)
        else:  # Saliency, GuidedBackprop, Deconvolution
            algo = getattr(ca, name)(ctx.model)
            call = lambda: algo.attribute(ctx.x, target=t)  # noqa: E731

        def run() -> Any:
            with ctx.autocast():
                return call()

        return run, lambda: None

    return f"captum {name}", build


def torchcam(cls: str, **kw: Any) -> Peer:
    def build(ctx: Ctx):
        import torchcam.methods as tm  # not a dependency: ImportError -> the row says so

        extractor = getattr(tm, cls)(ctx.model, target_layer=ctx.layer_name,
                                     input_shape=tuple(ctx.x.shape[1:]), **kw)

        def run() -> Any:
            with ctx.autocast():
                out = ctx.model(ctx.x)
                return extractor(class_idx=out.argmax(1).tolist(), scores=out)

        return run, extractor.remove_hooks

    return f"torchcam {cls}", build


PEERS: dict[str, list[Peer]] = {
    "cam": [torchcam("CAM")],
    "gradcam": [pgc("GradCAM"), captum("LayerGradCam"), torchcam("GradCAM")],
    "gradcampp": [pgc("GradCAMPlusPlus"), torchcam("GradCAMpp")],
    "hirescam": [pgc("HiResCAM")],
    "xgradcam": [pgc("XGradCAM"), torchcam("XGradCAM")],
    "layercam": [pgc("LayerCAM"), torchcam("LayerCAM")],
    "eigencam": [pgc("EigenCAM")],
    "eigengradcam": [pgc("EigenGradCAM")],
    "scorecam": [pgc("ScoreCAM", batch_attr=True), torchcam("ScoreCAM")],
    "saliency": [captum("Saliency")],
    "guided_backprop": [captum("GuidedBackprop"), pgc_guided_backprop()],
    "deconvnet": [captum("Deconvolution")],
    "guided_gradcam": [captum("GuidedGradCam")],
    "integrated_gradients": [captum("IntegratedGradients")],
    "smoothgrad": [captum("NoiseTunnel")],
    "occlusion": [captum("Occlusion")],
}


def canonical(spec: MethodSpec) -> str | None:
    names = {spec.name, *spec.aliases}
    if spec.name in PEERS:
        return spec.name
    for key, syn in SYNONYMS.items():
        if names & set(syn):
            return key
    return None


# --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", default="resnet50", help="torchvision model name (random weights)")
    ap.add_argument("--layer", default=None, help="target layer (default: layer4 if present, else automatic)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--budget", type=int, default=None, help="images per forward for many-forward methods "
                    "(xaicli's runner budget, Captum's internal batch); default: --batch")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--methods", default=None, help="comma-separated xaicli methods (default: all registered)")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=30.0, help="timed seconds per row at most (>= 1 call)")
    ap.add_argument("--rounds", type=int, default=1, help="time every row this many times, keep the fastest")
    ap.add_argument("--stat", default="best", choices=["best", "mean"],
                    help="seconds per call: the fastest timed call (default) or the mean")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    a = ap.parse_args()
    # Captum warns on every call that it sets requires_grad / hooks ReLUs: noise in the table.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"captum\.")

    import torchvision

    if a.threads:
        torch.set_num_threads(a.threads)

    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    memory_format = torch.channels_last if a.channels_last else torch.contiguous_format
    model = torchvision.models.get_model(a.model, weights=None).eval().to(device)
    model = model.to(memory_format=memory_format)  # type: ignore[call-overload]
    x = torch.randn(a.batch, 3, a.size, a.size, generator=torch.Generator().manual_seed(0)).to(device)
    x = x.contiguous(memory_format=memory_format)
    layer_name = a.layer or ("layer4" if hasattr(model, "layer4") else auto_layer(model, (a.size, a.size), device).spec)
    layer = resolve_layer(model, layer_name).module
    autocast = autocast_factory(device, a.precision)
    box: list[Tensor] = []
    hook = layer.register_forward_hook(lambda _m, _i, out: box.append(out))
    with torch.no_grad(), autocast():  # not inference_mode: peers save the targets for backward
        targets = model(x).float().argmax(1)
    hook.remove()
    channels = int(box[0].shape[1]) if box and box[0].dim() >= 2 else None  # for the passes column
    knobs = {k: v["value"] for k, v in KNOBS.items()}
    ctx = Ctx(model, x, targets, layer_name, layer, device, autocast, a.budget or a.batch, knobs)

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"device {device} ({dev_name}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; {a.model} (random weights) at {a.size}x{a.size}, batch {a.batch}, "
          f"{a.precision}{', channels_last' if a.channels_last else ''}, layer {layer_name}; knobs {knobs}")
    if hasattr(os, "getloadavg"):
        print(f"load average {os.getloadavg()[0]:.1f} at start")
    rows: list[dict[str, Any]] = []  # every timing, in order
    best: dict[tuple[str, str], dict[str, Any]] = {}  # (method, impl) -> the fastest timing

    def timed(method: str, impl: str, fn: Callable[[], Any], note: str = "") -> dict[str, Any]:
        try:
            s = bench(fn, device, a.iters, a.warmup, a.budget_s, a.stat)
            row = {"method": method, "impl": impl, "ms": s * 1000, "img_s": a.batch / s, "note": note}
        except Exception as e:  # a peer that cannot run this configuration (e.g. bf16 through NumPy)
            row = {"method": method, "impl": impl, "ms": None, "img_s": None,
                   "note": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:90] if str(e) else ''}"}
        rows.append(row)
        old = best.get((method, impl))
        if old is None or (row["img_s"] or 0) > (old["img_s"] or 0):
            best[(method, impl)] = row
        print(f"  {method:22} {impl:52} " + (f"{row['img_s']:10.2f} img/s" if row["img_s"] else row["note"]),
              flush=True)
        return row

    limit_fns = {"fwd": ("forward", limit_forward(ctx)),
                 "fwd_bwd_layer": (f"forward + backward to {layer_name}", limit_forward_backward(ctx)),
                 "fwd_bwd_input": ("forward + backward to the input", limit_forward_backward_input(ctx))}

    def time_limits() -> None:
        for label, fn in limit_fns.values():
            timed("limit", label, fn)

    wanted = [m.strip() for m in a.methods.split(",")] if a.methods else None
    specs = [s for s in all_methods() if wanted is None or s.name in wanted or set(s.aliases) & set(wanted)]
    registered = {c for s in all_methods() if (c := canonical(s))}
    ratios: list[dict[str, Any]] = []
    for spec in specs:
        params, used, missing = xaicli_params(spec, canonical(spec))
        note = ", ".join(f"{k}={v}" for k, v in used.items())
        if missing:
            note += f" (knobs not matched: {', '.join(missing)}; xaicli defaults)"
        try:
            passes = spec.cost_text(params, channels if spec.needs_layer else None)
        except Exception:
            passes = "?"
        ratios.append({"method": spec.name, "params": params, "note": note, "limit_key": limit_key(spec),
                       "passes": passes, "peers": {}})

    # Rounds: the limits, then every method and its peers; the limits once more at the end. Each
    # row keeps its fastest round, so a busy spell of the neighbours costs one round, not a row.
    for rnd in range(a.rounds):
        if a.rounds > 1:
            print(f"round {rnd + 1}/{a.rounds}", flush=True)
        time_limits()
        for spec, e in zip(specs, ratios, strict=True):
            timed(spec.name, "xaicli", xaicli_fn(ctx, spec, e["params"], a.precision, memory_format), e["note"])
            if a.no_peers:
                continue
            for label, build in PEERS.get(canonical(spec) or "", []):
                try:
                    fn, cleanup = build(ctx)
                except ImportError as err:
                    if rnd == 0:
                        rows.append({"method": spec.name, "impl": label, "ms": None, "img_s": None,
                                     "note": f"not installed ({err.name}): skipped"})
                        print(f"  {spec.name:22} {label:52} not installed ({err.name}): skipped")
                    continue
                try:
                    timed(spec.name, label, fn)
                finally:
                    cleanup()
    time_limits()
    for canon in sorted(set(PEERS) - registered):
        print(f"  {canon:22} not registered in xaicli yet: peers not timed")

    limits = {k: best[("limit", label)] for k, (label, _) in limit_fns.items()}
    for spec, e in zip(specs, ratios, strict=True):
        del e["params"], e["note"]
        mine = best[(spec.name, "xaicli")]["img_s"]
        e["xaicli_img_s"] = mine
        for (method, impl), row in best.items():
            if method == spec.name and impl != "xaicli" and row["img_s"] and mine:
                e["peers"][impl] = mine / row["img_s"]
    short = {"fwd": "fwd", "fwd_bwd_layer": "f+b layer", "fwd_bwd_input": "f+b input"}
    for e in ratios:
        lim = limits[e["limit_key"]]["img_s"]
        e["limit"] = limit_fns[e["limit_key"]][0]
        e["vs_limit"] = e["xaicli_img_s"] / lim if e["xaicli_img_s"] and lim else None
    if a.rounds > 1:
        print(f"(each row: the fastest of {a.rounds} rounds)")

    print(f"\n{'method':22} {'passes':>22} {'xaicli img/s':>13} {'/ limit':>8} {'limit':>10}  ratios xaicli / peer")
    for e in ratios:
        lim = f"{e['vs_limit']:.2f}" if e["vs_limit"] else "-"
        img = f"{e['xaicli_img_s']:.2f}" if e["xaicli_img_s"] else "failed"
        peers = ", ".join(f"{k.split(' ', 1)[0]} {k.split(' ', 1)[1].split(' ')[0]} {v:.2f}x"
                          for k, v in e["peers"].items())
        print(f"{e['method']:22} {e['passes']:>22} {img:>13} {lim:>8} {short[e['limit_key']]:>10}  {peers}")
    print("limits (the fastest of the timings before and after the methods): "
          + ", ".join(f"{limit_fns[k][0]} {v['img_s'] or 0:.2f} img/s" for k, v in limits.items()))
    if a.json:
        a.json.write_text(json.dumps({"args": vars(a) | {"json": str(a.json)}, "device": str(device),
                                      "device_name": dev_name, "rows": rows, "best": list(best.values()), "ratios": ratios,
                                      "limits": {k: v["img_s"] for k, v in limits.items()}}, indent=2,
                                     default=str))


if __name__ == "__main__":
    main()
