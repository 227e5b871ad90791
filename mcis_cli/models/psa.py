"""PSA's VGG16 variant ("vgg16d", jiwoon-ahn/psa network/vgg16d.py), its classifier and AffinityNet.

The conv part is `vgg_layers` with 3x3/2 pools, pool4 3x3/1 and conv5 at dilation 2 (vgg16d.py:25-43);
then fc6, a 3x3 conv to 1024 at a dilation (1 in the classifier, 4 in AffinityNet), ReLU,
Dropout2d(0.5), and fc7, a 1x1 conv to 1024, ReLU (vgg16d.py:45-48, 84-88). `width`, `batch_norm`
and `blocks` shrink it as the toy MCIS classifier is shrunk; with `blocks=4` there is no conv5, so
AffinityNet has no conv5 tap.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mcis_cli import psa
from mcis_cli.models.backbone import VGG16_BLOCKS, load_imagenet, scaled, vgg_layers

FROZEN = 4  # conv1_1 .. conv2_2 never train (vgg16d.py:92-101, vgg16_cls.py:16-17)
TAPS = ((64, 8), (128, 16), (256, 32))  # conv4, conv5, fc7 -> (channels, GroupNorm groups) (vgg16_aff.py:13-18)


class Backbone(nn.Module):
    """Image -> {"conv4", "conv5" (blocks 5), "fc7"} maps at output stride 8."""

    def __init__(self, width: float = 1.0, batch_norm: bool = False, blocks: int = 5,
                 fc6_dilation: int = 1, frozen: bool = True):
        super().__init__()
        layers = list(vgg_layers(width, pool3x3=True, batch_norm=batch_norm, blocks=blocks))
        pool4 = next((i for i, m in enumerate(layers) if isinstance(m, nn.MaxPool2d) and m.stride == 1),
                     len(layers))
        self.features = nn.Sequential(*layers)  # torchvision's indices, so the ImageNet file loads
        self.pool4 = pool4
        self.width, self.batch_norm, self.blocks, self.frozen = width, batch_norm, blocks, frozen
        last = scaled(VGG16_BLOCKS[blocks - 1][0], width)
        wide = scaled(1024, width)
        self.fc6 = nn.Conv2d(last, wide, 3, padding=fc6_dilation, dilation=fc6_dilation)
        self.drop6 = nn.Dropout2d(0.5)
        self.fc7 = nn.Conv2d(wide, wide, 1)
        self.channels = {"conv4": scaled(512, width), "conv5": last, "fc7": wide}
        convs = [m for m in self.features if isinstance(m, nn.Conv2d)]
        self.frozen_params = [p for m in convs[:FROZEN] for p in m.parameters()] if frozen else []

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        conv4 = self.features[: self.pool4](x)
        out = {"conv4": conv4}
        x = self.features[self.pool4 :](conv4)
        if self.blocks == 5:
            out["conv5"] = x
        x = self.drop6(torch.relu(self.fc6(x)))
        out["fc7"] = torch.relu(self.fc7(x))
        return out

    def train(self, mode: bool = True) -> Backbone:
        """conv1-conv2 frozen whenever the network trains, as the official `train()` does."""
        super().train(mode)
        for p in self.frozen_params:
            p.requires_grad = False
        return self

    def load_imagenet(self) -> None:
        """torchvision's ImageNet conv weights (width 1 only; a clear error when the file is missing)."""
        load_imagenet(self, self.batch_norm)


class PSAClassifier(nn.Module):
    """vgg16_cls.py: Dropout2d(0.5), fc8 a 1x1 conv without bias (Xavier), global average pooling."""

    def __init__(self, num_classes: int, width: float = 1.0, batch_norm: bool = False, blocks: int = 5,
                 frozen: bool = True):
        super().__init__()
        self.backbone = Backbone(width, batch_norm, blocks, fc6_dilation=1, frozen=frozen)
        self.drop7 = nn.Dropout2d(0.5)
        self.fc8 = nn.Conv2d(self.backbone.channels["fc7"], num_classes, 1, bias=False)
        nn.init.xavier_uniform_(self.fc8.weight)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc8(self.drop7(self.backbone(x)["fc7"])).mean((2, 3))

    def cam(self, x: torch.Tensor) -> torch.Tensor:
        """sqrt(ReLU(fc8)), the VGG variant's CAM (vgg16_cls.py:32-37)."""
        return torch.sqrt(torch.relu(self.fc8(self.backbone(x)["fc7"])))

    def new_modules(self) -> list[nn.Module]:
        return [self.fc8]


class AffinityNet(nn.Module):
    """vgg16_aff.py: the backbone at fc6 dilation 4, a 1x1 conv (no bias) + GroupNorm + ELU on each
    tap, concatenated, f9 a 1x1 conv (no bias) + ELU; affinities of the pairs within `radius`."""

    def __init__(self, width: float = 1.0, batch_norm: bool = False, blocks: int = 5, radius: int = 5,
                 fc6_dilation: int = 4, frozen: bool = True):
        super().__init__()
        self.backbone = Backbone(width, batch_norm, blocks, fc6_dilation, frozen)
        names = ["conv4", "conv5", "fc7"] if blocks == 5 else ["conv4", "fc7"]
        self.taps = nn.ModuleDict()
        for name, (channels, groups) in zip(["conv4", "conv5", "fc7"], TAPS, strict=True):
            if name not in names:
                continue
            out = scaled(channels, width)
            conv = nn.Conv2d(self.backbone.channels[name], out, 1, bias=False)
            nn.init.kaiming_normal_(conv.weight)
            self.taps[name] = nn.Sequential(conv, nn.GroupNorm(math.gcd(groups, out), out), nn.ELU())
        total = sum(scaled(c, width) for (c, _), n in zip(TAPS, ["conv4", "conv5", "fc7"], strict=True)
                    if n in names)
        self.f9 = nn.Conv2d(total, total, 1, bias=False)
        nn.init.xavier_uniform_(self.f9.weight, gain=4)
        self.radius = radius
        self.config = {"width": width, "batch_norm": batch_norm, "blocks": blocks, "radius": radius,
                       "fc6_dilation": fc6_dilation}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        taps = self.backbone(x)
        return torch.nn.functional.elu(self.f9(torch.cat([tap(taps[n]) for n, tap in self.taps.items()], 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, offsets, N) affinities of the pairs of the feature grid."""
        f = self.features(x)
        frm, to = (torch.from_numpy(a).to(x.device) for a in psa.pair_indices(self.radius, f.shape[-2:]))
        return psa.affinity(f, frm, to)

    def new_modules(self) -> list[nn.Module]:
        return [*self.taps.values(), self.f9]


def param_groups(model: PSAClassifier | AffinityNet, weight_decay: float,
                 lr_mult: tuple[float, ...] | list[float] = (1, 2, 10, 20)) -> list[dict]:
    """The official four groups (vgg16_cls.py:44-64, vgg16_aff.py:82-102): pretrained weights
    (1x lr, decay), pretrained biases (2x, no decay), new weights (10x, decay), new biases (20x,
    no decay); GroupNorm's weights and biases count as pretrained ones."""
    new = {id(p) for m in model.new_modules() for p in m.parameters()}
    frozen = {id(p) for p in model.backbone.frozen_params}
    groups = [[], [], [], []]
    for name, p in model.named_parameters():
        if id(p) in frozen:
            continue
        is_new = id(p) in new and not _in_group_norm(model, name)
        groups[2 * is_new + name.endswith("bias")].append(p)
    decays = (weight_decay, 0, weight_decay, 0)
    return [{"params": g, "lr_mult": m, "weight_decay": d} for g, m, d in zip(groups, lr_mult, decays, strict=True)
            if g]


def _in_group_norm(model: nn.Module, name: str) -> bool:
    return isinstance(model.get_submodule(name.rsplit(".", 1)[0]), nn.GroupNorm)


def optimizer(groups: list[dict], lr: float, weight_decay: float, momentum_bug: bool) -> torch.optim.SGD:
    """PolyOptimizer (torchutils.py:10-32). The official call SGD(params, lr, weight_decay) puts the
    weight decay in the momentum slot: with `momentum_bug` the momentum is 5e-4 as there (the
    groups keep their own decay); without, the 0.9 the code meant."""
    return torch.optim.SGD(groups, lr=lr, momentum=weight_decay if momentum_bug else 0.9)
