"""The OAA network and the rules of OAA and OAA+ that are plain tensor math (docs/method.md
"OAA and OAA+"): the attention normalisation, the top-k quality filter, the IAM loss.

One network serves both: OAA-PyTorch models/vgg.py (the classifier, GAP over the class maps) and
models/vgg1.py (the integral attention model, the class maps themselves) differ only in the head.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mcis_cli.models.backbone import VGG16D1, conv_relu
from mcis_cli.models.mcis import gap

NORM_EPS = 1e-8  # the guard of the official max normalisation (vgg.py:80, test_iam.py)


class OAANet(nn.Module):
    """VGG16-D1 (output stride 8), three 3x3 convs 512->512 + ReLU, a 1x1 conv to the classes with
    bias: image (B, 3, H, W) -> class maps (B, K, H/8, W/8); `scores` averages them (GAP)."""

    def __init__(self, num_classes: int, width: float = 1.0, batch_norm: bool = False, blocks: int = 5):
        super().__init__()
        self.num_classes, self.width, self.batch_norm, self.blocks = num_classes, width, batch_norm, blocks
        self.backbone = VGG16D1(width, batch_norm=batch_norm, blocks=blocks)
        c = self.backbone.out_channels
        self.extra_convs = nn.Sequential(*(m for _ in range(3) for m in conv_relu(c, c, 1, batch_norm)),
                                         nn.Conv2d(c, num_classes, 1))
        for conv in self.extra_convs:  # N(0, 0.01), bias 0 (vgg.py:109-116), not MCIS's He init
            if isinstance(conv, nn.Conv2d):
                nn.init.normal_(conv.weight, 0.0, 0.01)
                nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.extra_convs(self.backbone(x))

    def hyper(self) -> dict[str, Any]:
        """What rebuilds the network from a checkpoint (`OAANet(**hyper)`)."""
        return {"num_classes": self.num_classes, "width": self.width, "batch_norm": self.batch_norm,
                "blocks": self.blocks}


def scores(maps: torch.Tensor) -> torch.Tensor:
    """The classifier's logits (B, K): GAP of its class maps (vgg.py:59-60)."""
    return gap(maps)


def normalise_attention(maps: torch.Tensor) -> torch.Tensor:
    """(..., h, w) class maps -> [0, 1]: ReLU, then each map divided by its max + 1e-8 (vgg.py:68-80,
    test_iam.py). A map with no positive value stays all 0 (never NaN)."""
    relu = maps.clamp(min=0)
    return relu / (relu.amax(dim=(-2, -1), keepdim=True) + NORM_EPS)


def top_k_classes(logits: torch.Tensor, k: int) -> list[int]:
    """The quality filter's accepted classes (vgg.py:63-65, 88-89): the k highest by float32
    sigmoid of the logits (K,). Sigmoid saturates at 1.0 above a logit of about 17; the official
    argsort leaves such ties unordered, here the lower class id wins (a stable sort)."""
    probs = torch.sigmoid(logits.detach().float()).cpu()
    order = torch.sort(-probs, stable=True).indices
    return order[:k].tolist()


def iam_loss(logits: torch.Tensor, targets: torch.Tensor, positive_above: float = 0.001) -> torch.Tensor:
    """OAA+'s loss (train_iam.py:53-66): over all logits x and targets q of the batch, P = {q >
    positive_above}, N = the rest;

        L = mean_P(-q log sigmoid(x)) + mean_N(-log(1 - sigmoid(x) + 1e-8)),

    each term dropped when its set is empty. P pixels have no (1 - q) term; as the official code
    the P term takes the log of the sigmoid, with no epsilon (a logit below about -88 on a positive
    pixel gives an infinite loss, which the training skeleton stops at)."""
    if logits.shape != targets.shape:
        raise ValueError(f"IAM logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ in size")
    x, q = logits.float(), targets.float()
    positive = q > positive_above
    loss = x.new_zeros(())
    if positive.any():
        loss = loss + (-q[positive] * torch.log(torch.sigmoid(x[positive]))).mean()
    if (~positive).any():
        loss = loss - torch.log(1 - torch.sigmoid(x[~positive]) + NORM_EPS).mean()
    return loss
