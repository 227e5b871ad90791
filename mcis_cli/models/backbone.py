"""VGG16-D1: VGG16 conv1-conv5 at output stride 8, for the MCIS classifier and DeepLab-LargeFOV.

Layer indices follow torchvision's `vgg16().features`, so the ImageNet file loads by name.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mcis_cli.checkpoints import load_checkpoint
from mcis_cli.errors import McisError

IMAGENET_WEIGHTS = "vgg16-397923af.pth"  # torchvision's VGG16 (ImageNet) file name
IMAGENET_WEIGHTS_BN = "vgg16_bn-6c64b313.pth"  # and its batch-norm variant's
VGG16_BLOCKS = [(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)]  # (channels, convs) per block


def scaled(channels: int, width: float) -> int:
    """Channels of a layer at a width multiplier (at least 8)."""
    return max(8, round(channels * width))


def conv_relu(c_in: int, c_out: int, dilation: int = 1, batch_norm: bool = False) -> list[nn.Module]:
    """A 3x3 conv (padding = dilation, so the size is kept), optional BatchNorm, ReLU."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=dilation, dilation=dilation)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(c_out))
    return [*layers, nn.ReLU(inplace=True)]


def vgg_layers(width: float = 1.0, pool3x3: bool = False, batch_norm: bool = False,
               blocks: int = 5) -> nn.Sequential:
    """conv1_1 .. conv5_3 with ReLU, indexed as torchvision's `vgg16().features` (with
    `batch_norm`, as `vgg16_bn().features`: conv, BatchNorm, ReLU).

    pool1-3 halve the size: VGG's 2x2/2, or with `pool3x3` DeepLab-LargeFOV's 3x3/2 pad 1.
    pool4 is 3x3/1 pad 1 and conv5 uses dilation 2, so the output stride is 8; no pool5.
    `blocks=4` stops after conv4_3 (still stride 8): the receptive field shrinks from 252 to 92
    px, which small images trained from scratch need (see configs/toy.yaml).
    """
    if blocks not in (4, 5):
        raise ValueError(f"blocks must be 4 or 5 (output stride 8), got {blocks}")
    layers: list[nn.Module] = []
    c_in = 3
    for block, (channels, convs) in enumerate(VGG16_BLOCKS[:blocks]):
        for _ in range(convs):
            c_out = scaled(channels, width)
            layers += conv_relu(c_in, c_out, 2 if block == 4 else 1, batch_norm)
            c_in = c_out
        if block < 3:
            layers.append(nn.MaxPool2d(3, 2, 1) if pool3x3 else nn.MaxPool2d(2, 2))
        elif block == 3 and blocks == 5:
            layers.append(nn.MaxPool2d(3, 1, 1))
    for module in layers:  # torchvision's VGG init, which trains from scratch without BN
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
    return nn.Sequential(*layers)


class VGG16D1(nn.Module):
    """The MCIS backbone (the official code's config `D1`): image -> (B, C, H/8, W/8)."""

    def __init__(self, width: float = 1.0, pool3x3: bool = False, batch_norm: bool = False,
                 blocks: int = 5):
        super().__init__()
        self.features = vgg_layers(width, pool3x3, batch_norm, blocks)
        self.out_channels = scaled(VGG16_BLOCKS[blocks - 1][0], width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def hub_checkpoint(name: str) -> Path:
    """Where torchvision keeps a weights file: <torch hub dir>/checkpoints/<name>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def imagenet_path(batch_norm: bool = False) -> Path:
    """torchvision's ImageNet VGG16 file, vgg16[_bn]-*.pth, in the hub cache."""
    return hub_checkpoint(IMAGENET_WEIGHTS_BN if batch_norm else IMAGENET_WEIGHTS)


def imagenet_state_dict(batch_norm: bool = False) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet VGG16 state dict (features.* and classifier.*); never downloads."""
    path = imagenet_path(batch_norm)
    if not path.is_file():
        raise McisError(
            f"ImageNet VGG16 weights not found: put torchvision's {path.name} in {path.parent} "
            f"(this machine downloads nothing), or set classify.pretrained=false"
        )
    return load_checkpoint(path)


def load_imagenet(model: nn.Module, batch_norm: bool = False) -> None:
    """Copy the ImageNet conv (and BN) weights into `model.features` (a width-1 `vgg_layers`);
    fc layers are ignored."""
    state = {k: v for k, v in imagenet_state_dict(batch_norm).items() if k.startswith("features.")}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k.startswith("features.")]
    if missing:
        raise McisError(f"{imagenet_path(batch_norm)} is not torchvision's VGG16 file: it lacks {missing[0]}")
