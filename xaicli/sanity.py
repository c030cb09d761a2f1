"""The cascading model-parameter randomisation test (Adebayo et al., "Sanity Checks for Saliency
Maps", NeurIPS 2018, arXiv 1810.03292).

The maps of the trained model are compared with the maps of copies whose parameters are
re-initialised from the top (the logits) down, one more block at each step (cumulative). A
method whose maps barely change when the weights are random is not explaining the model.

* **Blocks.** The model's parameterised units in reverse execution order (the logits layer
  first). A unit is a top-level child of the model; plain containers (``nn.Sequential``,
  ``nn.ModuleList``, ``nn.ModuleDict``) are opened into their children, recursively, so a ResNet
  gives ``fc, layer4.2, layer4.1, ..., bn1, conv1`` and EfficientNet ``_fc, _bn1, _conv_head,
  _blocks.15, ..., _conv_stem``. A model that is a single unit is split into its parameterised
  leaf modules. Units that did not run in a dummy forward are left alone (they cannot change a
  map). ``steps=N`` merges the units into N consecutive groups (``steps=1``: one step to full
  randomisation, the cheapest test).
* **Re-initialisation.** On a deep copy of the model, never the model passed in. Every module
  with parameters of its own calls its ``reset_parameters()`` (PyTorch's default init; batch
  norm also resets its running statistics); parameters of modules without one are drawn from
  N(0, sigma^2) with sigma the parameter's own standard deviation (0.02 for a constant one).
  Seeded per block (run seed and block name, so full randomisation does not depend on ``steps``),
  under a forked RNG: the global random state is not touched.
* **Targets.** Every step explains the class the original model explained (its prediction by
  default), as in the paper; the shared forward is re-run on the copy.
* **Similarity** (per image, maps brought to the model input's size, bilinear):
  ``spearman_abs`` - Spearman rank correlation of |map| (ties get average ranks);
  ``spearman`` - the same without the absolute value; ``ssim`` - mean SSIM (Wang et al. 2004:
  11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, data range 1, the border of 5 pixels
  where the window does not fit left out, as scikit-image's ``structural_similarity(...,
  gaussian_weights=True, use_sample_covariance=False)``) of |map| scaled by its maximum.
  A constant map has no ranking: its correlation with a non-constant map is 0, with another
  constant map 1.
* **Verdict.** A method FAILS when its mean ``spearman_abs`` at full randomisation (the last
  step) is above ``max_spearman`` (default 0.5).

Step 0 recomputes the maps on the (not yet randomised) copy: it is 1 for every deterministic
method and shows the copy is exact.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .capture import LogitsOnly, eval_mode
from .config import Config, TargetConfig
from .engine import Explainer
from .errors import ConfigError, InputError, MethodError
from .layers import LayerRef, trace_modules
from .methods.batch import Runner, chunks, stable_seed
from .metrics.similarity import MEASURES, compare

DEFAULT_MAX_SPEARMAN = 0.5
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


# --------------------------------------------------------------------------------------------
# Blocks and re-initialisation


def _inner(model: nn.Module) -> nn.Module:
    return model.inner if isinstance(model, LogitsOnly) else model


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def _units(root: nn.Module) -> list[tuple[str, nn.Module]]:
    out: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if isinstance(child, _CONTAINERS):
                visit(full + ".", child)
            elif _has_params(child):
                out.append((full, child))

    visit("", root)
    return out


def randomization_blocks(model: nn.Module, input_size: tuple[int, int], device: torch.device | str) -> list[str]:
    """Names (relative to the model, or its inner model when wrapped) of the parameterised
    blocks in reverse execution order: the logits layer first."""
    root = _inner(model)
    units = _units(root)
    if len(units) < 2:
        units = [(n, m) for n, m in root.named_modules() if n and any(True for _ in m.parameters(recurse=False))]
    with eval_mode(model):
        seen = trace_modules(root, input_size, device)
    first_call = {n: seen[n].first for n, _ in units if n in seen}
    ran = [n for n, _ in units if n in first_call]
    if not ran:
        raise MethodError(f"{type(root).__name__} has no parameterised module that runs: nothing to randomise")
    return sorted(ran, key=lambda n: -first_call[n])


def group_blocks(blocks: Sequence[str], steps: int | None) -> list[tuple[str, ...]]:
    """One group per block, or ``steps`` consecutive groups of as equal a size as possible."""
    if steps is None or steps >= len(blocks):
        return [(b,) for b in blocks]
    if steps < 1:
        raise ConfigError(f"--steps: must be >= 1, got {steps}")
    n = len(blocks)
    bounds = [round(i * n / steps) for i in range(steps + 1)]
    return [tuple(blocks[bounds[i]:bounds[i + 1]]) for i in range(steps)]


def randomize_(module: nn.Module, seed: int) -> None:
    """Re-initialise every parameter under ``module`` in place, reproducibly (see the module doc)."""
    params = list(module.parameters())
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        for m in module.modules():
            own = list(m.parameters(recurse=False))
            if not own:
                continue
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
                continue
            for p in own:
                std = float(p.float().std()) if p.numel() > 1 else 0.0
                p.normal_(0.0, std if math.isfinite(std) and std > 0 else 0.02)


# --------------------------------------------------------------------------------------------
# The cascade on tensors


@dataclass
class CascadeResult:
    """Per step and method, the per-image similarities with the original maps."""

    steps: list[tuple[str, ...]]  # steps[k]: blocks randomised at step k (cumulative); steps[0] = ()
    methods: list[str]
    targets: Tensor  # (N,) class explained, on the CPU
    scores: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # method -> measure -> (S+1, N)

    def mean(self, method: str, measure: str, step: int = -1) -> float:
        return float(self.scores[method][measure][step].mean())


def _layer_in(model: nn.Module, clone: nn.Module, layer: LayerRef | None) -> LayerRef | None:
    """The layer of ``clone`` at the place ``layer`` has in ``model``."""
    if layer is None:
        return None
    name = next((n for n, m in model.named_modules() if m is layer.module), None)
    if name is None:
        raise MethodError(f"target layer {layer.spec!r} is not a module of the model")
    return LayerRef(layer.name, dict(clone.named_modules())[name], layer.use_input)


@dataclass
class _Probe:
    """The methods' maps of the test images for one network (the model, then its randomised
    copies), chunk by chunk; ``progress`` is told of each chunk."""

    pairs: list[tuple[Any, Any]]
    x: Tensor
    seeds: Tensor
    device: torch.device
    progress: Callable[[int], None] | None = None

    def maps(self, net: nn.Module, layer: LayerRef | None, runner: Runner,
             targets: Tensor | None) -> tuple[Tensor, list[list[Tensor]]]:
        """(the classes explained (N,), per chunk the (b, h, w) raw map of each method)."""
        explainer = Explainer(net, self.pairs, layer, TargetConfig(), runner)
        got, out = [], []
        for sl in chunks(self.x.shape[0], runner.budget):
            want = None if targets is None else targets[sl]
            res = explainer(self.x[sl].to(self.device, non_blocking=True), self.seeds[sl], targets=want)
            got.append(res.targets[:, 0])
            out.append([m.maps[0] for m in res.methods])
            if self.progress:
                self.progress(sl.stop - sl.start)
        return torch.cat(got), out


def cascade(
    model: nn.Module,
    x: Tensor,
    methods: Sequence[Any],
    layer: LayerRef | str | None = None,
    *,
    targets: Tensor | None = None,
    steps: int | None = None,
    seed: int = 0,
    runner: Runner | None = None,
    seeds: Tensor | None = None,
    progress: Callable[[int], None] | None = None,
) -> CascadeResult:
    """Run the cascading randomisation test on the images ``x`` (N, 3, H, W), any device.

    ``methods``: names, MethodSpecs (default knobs) or (spec, params) pairs. ``layer``: the
    target layer (a LayerRef or a dotted name) for methods that need one. ``targets`` (N,): classes
    to explain (default: the original model's prediction). ``runner``: chunking and precision
    (default: fp32, chunks of 16). ``model`` is left exactly as it was; the randomised model is a
    deep copy.
    """
    from .layers import resolve_layer
    from .plan import method_pairs

    pairs = method_pairs(methods)
    device = next((p.device for p in model.parameters()), x.device)
    runner = runner or Runner(model=model, budget=16)
    if isinstance(layer, str):
        layer = resolve_layer(_inner(model), layer)
    seeds = seeds if seeds is not None else torch.arange(x.shape[0], dtype=torch.long) + seed
    probe = _Probe(pairs, x, seeds, device, progress)
    with eval_mode(model):
        fixed, originals = probe.maps(model, layer, runner, targets.to(device) if targets is not None else None)
        clone = copy.deepcopy(model)
    clone.eval()
    clone_runner = Runner(model=clone, budget=runner.budget, autocast=runner.autocast,
                          memory_format=runner.memory_format, precision=runner.precision)
    size = (int(x.shape[-2]), int(x.shape[-1]))
    plan: list[tuple[str, ...]] = [(), *group_blocks(randomization_blocks(clone, size, device), steps)]
    modules = dict(_inner(clone).named_modules())
    clone_layer = _layer_in(model, clone, layer)
    names = [s.name for s, _ in pairs]
    scores: dict[str, dict[str, list[Tensor]]] = {m: {q: [] for q in MEASURES} for m in names}
    for group in plan:
        for b in group:
            randomize_(modules[b], stable_seed(seed, b))  # the same block, the same init, whatever the steps
        _, randomized = probe.maps(clone, clone_layer, clone_runner, fixed)
        for i, name in enumerate(names):
            per_chunk = [compare(o[i], r[i], size) for o, r in zip(originals, randomized, strict=True)]
            for q in MEASURES:
                scores[name][q].append(torch.cat([c[q] for c in per_chunk]))
    out = {m: {q: torch.stack(v).cpu() for q, v in by.items()} for m, by in scores.items()}
    return CascadeResult(steps=plan, methods=names, targets=fixed.cpu(), scores=out)


# --------------------------------------------------------------------------------------------
# The folder run behind `xai sanity`


def verdicts(result: CascadeResult, max_spearman: float) -> dict[str, bool]:
    """method -> passed: mean Spearman of |map| at full randomisation at most ``max_spearman``."""
    return {m: result.mean(m, "spearman_abs") <= max_spearman for m in result.methods}


def _stats(v: Tensor) -> dict[str, float]:
    return {"mean": float(v.mean()), "std": float(v.std()) if v.numel() > 1 else 0.0}


def report(result: CascadeResult, max_spearman: float, paths: list[str] | None = None,
           labels: Callable[[int], str] | None = None) -> dict[str, Any]:
    """The JSON-ready summary: steps, per method per step mean/std of each measure, per-image
    values, the values at full randomisation and the verdict."""
    passed = verdicts(result, max_spearman)
    methods: dict[str, Any] = {}
    for m in result.methods:
        sc = result.scores[m]
        methods[m] = {
            "steps": [{q: _stats(sc[q][k]) for q in MEASURES} for k in range(len(result.steps))],
            "per_image": {q: [[round(float(v), 6) for v in row] for row in sc[q]] for q in MEASURES},
            "full_randomization": {q: float(sc[q][-1].mean()) for q in MEASURES},
            "verdict": "pass" if passed[m] else "fail",
        }
    targets = [int(t) for t in result.targets]
    return {
        "test": "cascading model-parameter randomization (Adebayo et al. 2018)",
        "steps": [{"step": k, "randomized": list(g), "cumulative": [b for s in result.steps[: k + 1] for b in s]}
                  for k, g in enumerate(result.steps)],
        "images": paths,
        "targets": [{"index": t, "label": labels(t) if labels else None} for t in targets],
        "max_spearman": max_spearman,
        "methods": methods,
        "failed_methods": [m for m in result.methods if not passed[m]],
    }


def table(rep: dict[str, Any]) -> Any:
    """A rich table of a :func:`report`: per method, one row per step with the mean similarities."""
    from rich.markup import escape
    from rich.table import Table

    n = len(rep.get("images") or rep["targets"])
    t = Table(title=f"sanity: cascading randomization on {n} images (mean over images; 1 = unchanged)")
    t.add_column("method")
    t.add_column("step", justify="right")
    t.add_column("randomized (cumulative, from the top)", overflow="fold")
    for q in ("rho |map|", "rho", "SSIM"):
        t.add_column(q, justify="right")
    last = len(rep["steps"]) - 1
    for m, r in rep["methods"].items():
        for k, step in enumerate(rep["steps"]):
            label = "none (the copy)" if k == 0 else "+ " + ", ".join(step["randomized"])
            if len(label) > 60:
                label = label[:57] + "..."
            cells = [f"{r['steps'][k][q]['mean']:.3f}" for q in MEASURES]
            if k == last:
                cells = [f"[bold {'green' if r['verdict'] == 'pass' else 'red'}]{c}[/]" for c in cells]
            t.add_row(m if k == 0 else "", str(k), escape(label), *cells, end_section=k == last)
    return t


def verdict_lines(rep: dict[str, Any]) -> list[str]:
    """One plain line per method: PASS / FAIL with the value at full randomisation."""
    out = []
    bound = rep["max_spearman"]
    for m, r in rep["methods"].items():
        v = r["full_randomization"]["spearman_abs"]
        if r["verdict"] == "pass":
            out.append(f"[bold green]PASS[/] {m}: maps change when the weights are random "
                       f"(Spearman |map| at full randomization {v:.3f} <= {bound})")
        else:
            out.append(f"[bold red]FAIL[/] {m}: maps barely change when the weights are random "
                       f"(Spearman |map| at full randomization {v:.3f} > {bound}): it does not explain the model")
    return out


def _own_classes(image_targets: Any, entries: list[Any], ok: list[dict[str, Any]],
                 failed: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], Tensor]:
    """The images that have a per-image class, and those classes (N,); the others join ``failed``."""
    where = {e.rel: e.path for e in entries}
    keep, classes = [], []
    for it in ok:
        t = image_targets.resolve(it["rel"], where[it["rel"]])
        if isinstance(t, int):
            keep.append(it)
            classes.append(t)
        else:
            failed.append({"path": it["rel"], "error": {"type": "target", "message": t}})
    if not keep:
        raise InputError(f"none of the {len(ok)} images has a target", f"first: {failed[-1]['error']['message']}")
    return keep, torch.tensor(classes, dtype=torch.long)


@dataclass
class SanityRun:
    result: CascadeResult
    report: dict[str, Any]
    failed_methods: list[str]


def run_sanity(
    cfg: Config,
    input_path: Path,
    *,
    steps: int | None = None,
    max_images: int | None = 32,
    select: Callable[[str], bool] | None = None,
    max_spearman: float = DEFAULT_MAX_SPEARMAN,
    progress: Any = None,
) -> SanityRun:
    """The test on the images under ``input_path`` (the first ``max_images`` in sorted order that
    ``select`` keeps), for the config's methods, seeded by ``runtime.seed``."""
    from .data import ImageFolder, list_images
    from .engine import setup

    if max_images is not None and max_images < 1:
        raise ConfigError(f"--max-images: must be >= 1, got {max_images}")
    if math.isnan(max_spearman):
        raise ConfigError("--max-spearman: expected a number, got nan", "e.g. --max-spearman 0.5")
    entries = [e for e in list_images(input_path).entries if select is None or select(e.rel)]
    if max_images is not None:
        entries = entries[:max_images]
    if not entries:
        raise InputError(f"no images in {input_path}" + (" match the selection" if select else ""))
    st = setup(cfg)
    for message in st.warnings if hasattr(progress, "warn") else ():
        progress.warn(message)  # random weights, assumed class names or preprocessing
    data = ImageFolder(entries, st.loaded.preprocess)
    items = [data[i] for i in range(len(data))]
    ok = [it for it in items if it["ok"]]
    failed = [{"path": it["rel"], "error": it["error"]} for it in items if not it["ok"]]
    if not ok:
        raise InputError(f"none of the {len(items)} images under {input_path} could be read",
                         f"first error: {failed[0]['error']['message']}")
    targets = None
    if st.target.mode == "index":
        assert st.target.index is not None
        targets = torch.full((len(ok),), st.target.index, dtype=torch.long)
    elif st.image_targets is not None:  # a file or folder: each image's own class (not also the prediction)
        ok, targets = _own_classes(st.image_targets, entries, ok, failed)
    x = torch.stack([it["x"] for it in ok])
    paths = [it["rel"] for it in ok]
    seeds = torch.tensor([stable_seed(cfg.runtime.seed, p) for p in paths], dtype=torch.long)
    n_steps = len(group_blocks(randomization_blocks(st.model, st.loaded.preprocess.input_size, st.device), steps))
    if progress is not None:
        progress.start(len(ok) * (n_steps + 2), f"sanity: {'+'.join(cfg.method)}, {n_steps} steps, {len(ok)} images",
                       unit="image-steps")
    try:
        res = cascade(st.model, x, st.methods, st.layer, targets=targets, steps=steps, seed=cfg.runtime.seed,
                      runner=st.runner, seeds=seeds, progress=progress.advance if progress is not None else None)
    finally:
        if progress is not None:
            progress.finish()
    rep = report(res, max_spearman, paths, st.loaded.label)
    rep.update({
        "model": st.loaded.description,
        "layer": st.layer.spec if st.layer else None,
        "input": str(input_path),
        "seed": cfg.runtime.seed,
        "resolution": list(st.loaded.preprocess.input_size),
        "failed_images": failed,
    })
    return SanityRun(res, rep, rep["failed_methods"])
