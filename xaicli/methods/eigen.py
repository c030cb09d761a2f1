"""Eigen-CAM: the projection of the layer's activations on their first principal component,
computed for the whole batch on the device from the small Gram matrix (no per-image SVD)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import register
from .batch import Batch


@dataclass(frozen=True)
class EigenParams:
    relu: bool = True
    sign_correction: bool = True  # flip a map whose |min| > |max| (the SVD sign is arbitrary)


def first_component(x: Tensor) -> Tensor:
    """For X (B, N, C), centred over N, return X v1 (B, N): the projection on the first right
    singular vector, i.e. sigma_1 u_1. Uses the Gram matrix of the smaller side, in float64."""
    x = x.double()
    x = x - x.mean(1, keepdim=True)
    n, c = x.shape[1], x.shape[2]
    if n <= c:
        evals, evecs = torch.linalg.eigh(x @ x.transpose(1, 2))  # (B, N, N), ascending
        proj = evecs[..., -1] * evals[..., -1].clamp_min(0).sqrt()[:, None]
    else:
        _, evecs = torch.linalg.eigh(x.transpose(1, 2) @ x)  # (B, C, C)
        proj = (x @ evecs[..., -1:]).squeeze(-1)
    return proj.float()


def project(matrix: Tensor, p: EigenParams) -> Tensor:
    """(B, C, h, w) -> (B, h, w) map of the first principal component over the h*w locations."""
    b, _c, h, w = matrix.shape
    proj = first_component(matrix.nan_to_num().flatten(2).transpose(1, 2)).reshape(b, h, w)
    if p.sign_correction:
        flat = proj.flatten(1)
        flip = flat.min(1).values.abs() > flat.max(1).values.abs()
        proj = torch.where(flip[:, None, None], -proj, proj)
    return proj.clamp_min(0) if p.relu else proj


@register(
    "eigencam",
    family="cam",
    summary="Eigen-CAM: first principal component of the activations (class-agnostic)",
    paper="Muhammad & Yeasin 2020, Eigen-CAM",
    space="layer",
    params=EigenParams,
    aliases=("eigen_cam",),
)
def eigencam(batch: Batch, p: EigenParams) -> Tensor:
    """Activations reshaped to (h*w, C), columns centred, projected on v1 (as pytorch-grad-cam);
    sign fixed by the |min| > |max| rule (Seg-Eigen-CAM, Eq. 13). Same map for every class."""
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
