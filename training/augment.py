"""Per-sample random augmentation applied to a whole batch at once (on the batch's device)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from training.config import Augment


class BatchAugment:
    """Random shift / rotation / zoom / horizontal flip and brightness / contrast, drawn per sample, for
    2D and 3D batches.

    One ``affine_grid`` + ``grid_sample`` call per batch: no per-image Python work.
    """

    def __init__(self, cfg: Augment) -> None:
        self.cfg = cfg

    @property
    def active(self) -> bool:
        c = self.cfg
        return self._geometric or bool(c.brightness or c.contrast)

    @property
    def _geometric(self) -> bool:
        c = self.cfg
        return bool(c.translate or c.rotate or c.scale or c.hflip)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._geometric:
            x = self._affine(x)
        c = self.cfg
        if c.brightness or c.contrast:
            per_sample = (x.shape[0],) + (1,) * (x.dim() - 1)
            mean = x.mean(dim=tuple(range(1, x.dim())), keepdim=True)
            gain = 1 + (torch.rand(per_sample, device=x.device, dtype=x.dtype) * 2 - 1) * c.contrast
            shift = (torch.rand(per_sample, device=x.device, dtype=x.dtype) * 2 - 1) * c.brightness
            x = (x - mean) * gain + mean + shift * (x.amax() - x.amin())
        return x

    def _affine(self, x: torch.Tensor) -> torch.Tensor:
        n, dims = x.shape[0], x.dim() - 2
        c = self.cfg
        opts = {"device": x.device, "dtype": x.dtype}
        theta = torch.zeros(n, dims, dims + 1, **opts)
        scale = 1 + (torch.rand(n, **opts) * 2 - 1) * c.scale
        linear = torch.eye(dims, **opts).expand(n, dims, dims) / scale.view(n, 1, 1)
        if dims == 2 and c.rotate:
            angle = (torch.rand(n, **opts) * 2 - 1) * math.radians(c.rotate)
            cos, sin = torch.cos(angle), torch.sin(angle)
            rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
            linear = rot @ linear
        if c.hflip:
            flip = torch.where(torch.rand(n, **opts) < 0.5, -1.0, 1.0)
            linear = linear.clone()
            linear[:, :, 0] *= flip.view(n, 1)
        theta[:, :, :dims] = linear
        theta[:, :, dims] = (torch.rand(n, dims, **opts) * 2 - 1) * 2 * c.translate
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        # zeros padding in normalised space would be grey; pad with the batch minimum (the background)
        background = x.amin(dim=tuple(range(1, x.dim())), keepdim=True)
        shifted = F.grid_sample(x - background, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return shifted + background
