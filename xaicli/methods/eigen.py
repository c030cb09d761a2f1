"""Eigen-CAM: the projection of the layer's activations on their first principal component (or the
N-th, ``component: N``), computed for the whole batch on the device from the small Gram matrix (no
per-image SVD)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..config import positive
from ..errors import MethodError
from . import register
from .batch import Batch


@dataclass(frozen=True)
class EigenParams:
    relu: bool = True
    sign_correction: bool = True  # flip a map whose |min| > |max| (the SVD sign is arbitrary)
    # Which principal component: 1 the first (Eigen-CAM), 2 the second (discussed in the paper), ...
    component: int = field(default=1, metadata={"check": positive})


def principal_component(x: Tensor, n: int = 1) -> Tensor:
    """For X (B, N, C), centred over N, return X v_n (B, N): the projection on the n-th right
    singular vector, i.e. sigma_n u_n. Uses the Gram matrix of the smaller side, in float64."""
    x = x.double()
    x = x - x.mean(1, keepdim=True)
    rows, c = x.shape[1], x.shape[2]
    if n > min(rows, c):
        raise MethodError(
            f"component {n} asked for, but the activations have only {min(rows, c)} "
            f"({rows} locations x {c} channels)",
            f"use a component between 1 and {min(rows, c)}",
        )
    if rows <= c:
        evals, evecs = torch.linalg.eigh(x @ x.transpose(1, 2))  # (B, N, N), ascending
        proj = evecs[..., -n] * evals[..., -n].clamp_min(0).sqrt()[:, None]
    else:
        _, evecs = torch.linalg.eigh(x.transpose(1, 2) @ x)  # (B, C, C)
        proj = (x @ evecs[..., -n:][..., :1]).squeeze(-1)
    return proj.float()


def first_component(x: Tensor) -> Tensor:
    """X v_1 (B, N) of X (B, N, C) centred over N: see ``principal_component``."""
    return principal_component(x, 1)


def project(matrix: Tensor, p: EigenParams) -> Tensor:
    """(B, C, h, w) -> (B, h, w) map of the ``p.component``-th principal component over the h*w
    locations."""
    b, _c, h, w = matrix.shape
    proj = principal_component(matrix.nan_to_num().flatten(2).transpose(1, 2), p.component).reshape(b, h, w)
    if p.sign_correction:
        flat = proj.flatten(1)
        flip = flat.min(1).values.abs() > flat.max(1).values.abs()
        proj = torch.where(flip[:, None, None], -proj, proj)
    return proj.clamp_min(0) if p.relu else proj


@register(
    "eigencam",
    family="cam",
    summary="Eigen-CAM: first (or N-th) principal component of the activations (class-agnostic)",
    paper="Muhammad & Yeasin 2020, Eigen-CAM",
    space="layer",
    params=EigenParams,
    aliases=("eigen_cam",),
)
def eigencam(batch: Batch, p: EigenParams) -> Tensor:
    """Activations reshaped to (h*w, C), columns centred, projected on v1 (as pytorch-grad-cam), or
    on v_N with ``component: N`` (the paper discusses the second component); sign fixed by the
    |min| > |max| rule (Seg-Eigen-CAM, Eq. 13). Same map for every class."""
    a, _ = batch.spatial(grads=False)
    return project(a, p)


@register(
    "eigengradcam",
    family="cam",
    summary="Eigen-Grad-CAM: first principal component of gradient x activation (class-specific)",
    paper="pytorch-grad-cam's EigenGradCAM (Eigen-CAM of Muhammad & Yeasin 2020 on G*A)",
    space="layer",
    grad_of="layer",
    params=EigenParams,
    aliases=("eigen_grad_cam",),
)
def eigengradcam(batch: Batch, p: EigenParams) -> Tensor:
    """The Eigen-CAM projection (see ``project``) of the element-wise product G * A, G the gradient of
    the target logit: the first principal component of the class-weighted features. Departure from
    pytorch-grad-cam: the SVD sign is fixed by the |min| > |max| rule (``sign_correction``)."""
    a, g = batch.spatial()
    return project(g * a, p)
