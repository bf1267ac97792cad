"""Models: raw uint8 pixels in, logits out, with preprocessing inside so that it exports to ONNX.

``Classifier = Preprocess -> net``; ``net`` is a ``ConvNet`` (MNIST / MedMNIST 2D and 3D) or a
``TransferNet`` (a pretrained feature extractor with a new head). An ``Ensemble`` averages classifiers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tv_models
from torchvision.transforms.v2 import functional as TF

from training.config import BACKBONES, CHECKPOINT_BACKBONE, TORCHVISION_INPUT_SIZE, TrainConfig
from training.data import DatasetSpec

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Preprocess(nn.Module):
    """uint8 (N,H,W) / (N,H,W,3) / (N,D,H,W) -> normalised float (N,C,H,W) or (N,C,D,H,W).

    Optionally converts channels (grey <-> RGB) and resizes, for backbones trained on other inputs, and
    subtracts a Gaussian-blurred copy of the image (``highpass``: the blur's sigma in output pixels). That
    is B. Graham's local-average colour subtraction for fundus photographs (Kaggle Diabetic Retinopathy
    2015): it removes the lighting and camera tint that differ between images and keeps the lesions.
    """

    def __init__(
        self,
        layout: str,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        out_channels: int | None = None,
        out_size: int | None = None,
        highpass: float | None = None,
    ) -> None:
        super().__init__()
        if highpass is not None and layout == "NDHW":
            raise ValueError("highpass is for 2D images; 3D volumes have no such option")
        self.layout, self.out_channels, self.out_size, self.highpass = layout, out_channels, out_size, highpass
        shape = (1, -1, 1, 1, 1) if layout == "NDHW" else (1, -1, 1, 1)
        self.register_buffer("mean", torch.tensor(mean).reshape(shape), persistent=False)
        self.register_buffer("std", torch.tensor(std).reshape(shape), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0
        x = x.permute(0, 3, 1, 2) if self.layout == "NHWC" else x.unsqueeze(1)
        if self.out_channels is not None and self.out_channels != x.shape[1]:
            x = x.expand(-1, self.out_channels, *x.shape[2:]) if x.shape[1] == 1 else x.mean(1, keepdim=True)
        if self.out_size is not None and self.out_size != x.shape[-1]:
            mode = "trilinear" if x.dim() == 5 else "bilinear"
            x = F.interpolate(x, size=(self.out_size,) * (x.dim() - 2), mode=mode, align_corners=False)
        x = (x - self.mean) / self.std
        if self.highpass:
            kernel = 2 * math.ceil(3 * self.highpass) + 1
            x = x - TF.gaussian_blur(x, [kernel, kernel], [self.highpass, self.highpass])
        return x


def conv_block(dims: int, c_in: int, c_out: int) -> nn.Sequential:
    conv, bn = (nn.Conv3d, nn.BatchNorm3d) if dims == 3 else (nn.Conv2d, nn.BatchNorm2d)
    return nn.Sequential(conv(c_in, c_out, 3, padding=1, bias=False), bn(c_out), nn.ReLU(inplace=True))


class ConvNet(nn.Module):
    """A small VGG-style CNN: per stage two 3x3 conv-BN-ReLU and a 2x max-pool, then global pooling."""

    def __init__(self, in_channels: int, num_outputs: int, widths: tuple[int, ...] = (32, 64, 128), dims: int = 2,
                 dropout: float = 0.3) -> None:
        super().__init__()
        pool, gap = (nn.MaxPool3d, nn.AdaptiveAvgPool3d) if dims == 3 else (nn.MaxPool2d, nn.AdaptiveAvgPool2d)
        layers: list[nn.Module] = []
        c = in_channels
        for i, w in enumerate(widths):
            layers += [conv_block(dims, c, w), conv_block(dims, w, w)]
            if i < len(widths) - 1:
                layers.append(pool(2))
            c = w
        layers += [gap(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.feature_dim = c
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(c, num_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class TransferNet(nn.Module):
    """A reused feature extractor (``features``: image -> flat vector) and a new linear head."""

    def __init__(self, features: nn.Module, feature_dim: int, num_outputs: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.features = features
        self.feature_dim = feature_dim
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, num_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def set_backbone_trainable(self, trainable: bool) -> None:
        for p in self.features.parameters():
            p.requires_grad_(trainable)


class Classifier(nn.Module):
    """Raw uint8 images -> logits. ``augment`` (training only) acts on the normalised float batch."""

    def __init__(self, preprocess: Preprocess, net: nn.Module) -> None:
        super().__init__()
        self.preprocess, self.net = preprocess, net

    def forward(self, images: torch.Tensor,
                augment: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        x = self.preprocess(images)
        if augment is not None:
            x = augment(x)
        return self.net(x)


class Ensemble(nn.Module):
    """Trained classifiers as one model: the mean of their probabilities (softmax, or sigmoid for
    multi-label), returned as logits that give back that mean (log-probabilities, or its logit)."""

    def __init__(self, members: list[Classifier], multi_label: bool) -> None:
        super().__init__()
        self.members, self.multi_label = nn.ModuleList(members), multi_label

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = torch.stack([m(images).float() for m in self.members])
        if self.multi_label:
            p = torch.sigmoid(logits).mean(0).clamp(1e-7, 1 - 1e-7)
            return torch.log(p) - torch.log1p(-p)
        return torch.logsumexp(torch.log_softmax(logits, dim=2), dim=0) - math.log(len(self.members))


@dataclass(frozen=True)
class Backbone:
    """A torchvision ImageNet backbone: how to build it and cut off its classifier."""

    build: Callable[..., nn.Module]
    weights: str
    feature_dim: int
    strip: Callable[[nn.Module], nn.Module]


def _resnet_features(m: nn.Module) -> nn.Module:
    m.fc = nn.Identity()
    return m


def _pooled_features(m: nn.Module) -> nn.Module:
    return nn.Sequential(m.features, m.avgpool, nn.Flatten())


def imagenet_weights(backbone: str, download: bool) -> None:
    """Make sure ``backbone``'s ImageNet weights are in torchvision's cache (TORCH_HOME), fetching them when
    ``download`` allows, or raise a ``ValueError`` that says where the file goes and what to train from instead:
    offline, torchvision's own fetch failed deep in a 40-frame traceback, and ``--no-download`` did not stop it."""
    weights = tv_models.get_weight(TORCHVISION_BACKBONES[backbone].weights)
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    path = cache / Path(urlparse(weights.url).path).name
    if path.exists():
        return
    instead = (f"put {weights.url} at {path} (the cache under TORCH_HOME), or train from a local file "
               "(--backbone-checkpoint PATH) or without ImageNet weights (--set pretrained=false)")
    if not download:
        raise ValueError(f"the {backbone} ImageNet weights are not cached and downloads are off (--no-download, "
                         f"CNNSERVE_DOWNLOAD=0): {instead}")
    try:
        torch.hub.load_state_dict_from_url(weights.url, model_dir=str(cache), progress=True, check_hash=True)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; a hash mismatch a RuntimeError
        raise ValueError(f"could not download the {backbone} ImageNet weights ({exc}): {instead}") from None


TORCHVISION_BACKBONES = {
    "resnet18": Backbone(tv_models.resnet18, "ResNet18_Weights.IMAGENET1K_V1", 512, _resnet_features),
    "mobilenet_v3_small": Backbone(tv_models.mobilenet_v3_small, "MobileNet_V3_Small_Weights.IMAGENET1K_V1", 576,
                                   _pooled_features),
    "efficientnet_b0": Backbone(tv_models.efficientnet_b0, "EfficientNet_B0_Weights.IMAGENET1K_V1", 1280,
                                _pooled_features),
}


def dataset_stats(spec: DatasetSpec) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Fixed normalisation: mid-grey centring works well for these 8-bit datasets and needs no data pass."""
    c = 3 if spec.n_channels == 3 and not spec.is_3d else 1
    return (0.5,) * c, (0.25,) * c


def load_state_dict(model: nn.Module, state: Any, source: str, arch: str) -> None:
    """``model.load_state_dict(state)``, or a ``ValueError`` that says how ``state`` differs from ``arch``'s."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{source} is not a state dict (a mapping of parameter names to tensors)")
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        def some(keys: list[str]) -> str:
            return f"{len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
        raise ValueError(f"{source} is not a {arch} state dict: missing {some(missing)}, unexpected "
                         f"{some(unexpected)}, other shapes {some(wrong)}")
    model.load_state_dict(state)


def build_model(spec: DatasetSpec, cfg: TrainConfig, backbone_source: Classifier | None = None) -> Classifier:
    """Build an untrained model. ``backbone_source``: the trained model whose features a
    ``backbone: checkpoint`` transfer model reuses (see ``training.checkpoint.load_model``)."""
    if cfg.arch == "cnn":
        mean, std = dataset_stats(spec)
        pre = Preprocess(spec.layout, mean, std, out_size=cfg.input_size, highpass=cfg.highpass)
        dims = 3 if spec.is_3d else 2
        return Classifier(pre, ConvNet(len(mean), spec.num_outputs, tuple(cfg.widths), dims, cfg.dropout))
    if cfg.arch != "transfer":
        raise ValueError(f"unknown arch {cfg.arch!r}; use 'cnn' or 'transfer'")
    if spec.is_3d:
        raise ValueError("transfer backbones are 2D; use arch 'cnn' for 3D datasets")
    if cfg.backbone == CHECKPOINT_BACKBONE:
        if backbone_source is None:
            raise ValueError("backbone 'checkpoint' needs --backbone-checkpoint: a cnnserve checkpoint file")
        if not isinstance(backbone_source, Classifier):
            raise ValueError("an ensemble checkpoint cannot be a backbone: use one of its members' checkpoints")
        if backbone_source.preprocess.layout == "NDHW":
            raise ValueError("the backbone checkpoint is a 3D model; transfer backbones are 2D")
        src = backbone_source.preprocess
        mean, std = tuple(src.mean.flatten().tolist()), tuple(src.std.flatten().tolist())
        pre = Preprocess(spec.layout, mean, std, out_channels=len(mean), out_size=cfg.input_size,
                         highpass=cfg.highpass)
        net = TransferNet(backbone_source.net.features, backbone_source.net.feature_dim, spec.num_outputs, cfg.dropout)
        return Classifier(pre, net)
    if cfg.backbone not in TORCHVISION_BACKBONES:
        raise ValueError(f"unknown backbone {cfg.backbone!r}; choose from {BACKBONES}")
    bb = TORCHVISION_BACKBONES[cfg.backbone]
    if cfg.backbone_checkpoint:  # a local torchvision state dict: no download
        from training.checkpoint import read_file  # (that module imports this one)

        model = bb.build(weights=None)
        load_state_dict(model, read_file(Path(cfg.backbone_checkpoint)), cfg.backbone_checkpoint, cfg.backbone)
    else:  # ImageNet weights through torchvision's weights API, cached in TORCH_HOME
        model = bb.build(weights=bb.weights if cfg.pretrained else None)
    pre = Preprocess(spec.layout, IMAGENET_MEAN, IMAGENET_STD, out_channels=3,
                     out_size=cfg.input_size or TORCHVISION_INPUT_SIZE, highpass=cfg.highpass)
    return Classifier(pre, TransferNet(bb.strip(model), bb.feature_dim, spec.num_outputs, cfg.dropout))
