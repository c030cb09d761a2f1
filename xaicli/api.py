"""A small Python API over the engine's in-memory core, for notebooks, tests and benchmarks."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .capture import eval_mode
from .config import TargetConfig, parse_target
from .engine import Explainer, autocast_factory
from .layers import auto_layer, resolve_layer
from .methods import get_method
from .methods.batch import PixelSpace, Runner
from .plan import method_params


def explain_tensor(
    model: nn.Module,
    x: Tensor,
    method: str = "gradcam",
    layer: str | None = None,
    target: int | str | TargetConfig | None = None,
    params: dict[str, Any] | None = None,
    batch_size: int = 64,
    precision: str = "fp32",
    seeds: Tensor | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
) -> Tensor:
    """Raw maps (B, h, w) of one method for a batch already on the model's device.

    ``target``: None (the predicted class), a class index, or a TargetConfig. For top-k targets
    use :class:`xaicli.engine.Explainer` directly (it returns one map per rank).
    ``mean`` / ``std``: the normalisation ``x`` went through (default: ``x`` is pixels in [0, 1]);
    baselines and noise ranges of the gradient methods (a black image, uniform noise) use it.
    """
    spec = get_method(method)
    p = method_params(spec, params)
    tgt = target if isinstance(target, TargetConfig) else parse_target(target)
    ref = None
    if spec.needs_layer:
        ref = resolve_layer(model, layer) if layer else auto_layer(model, tuple(x.shape[-2:]), x.device)
    runner = Runner(model=model, budget=batch_size, autocast=autocast_factory(x.device, precision), precision=precision)
    with eval_mode(model):
        pixels = PixelSpace(tuple(mean or (0.0, 0.0, 0.0)), tuple(std or (1.0, 1.0, 1.0)))
        res = Explainer(model, [(spec, p)], ref, tgt, runner, pixels=pixels)(x, seeds)
    return res.methods[0].maps[0]


__all__ = ["explain_tensor"]
