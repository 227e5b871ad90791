"""The MCIS co-attention classifier (docs/method.md §1-§2) and its training
loss (§2.6).

Notation: F = backbone + extra-conv features, G = co-attentive features (built from the other
image), s = plain CAM scores, t = co-attention scores, u = contrastive co-attention scores.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mcis_cli.models.backbone import VGG16D1, conv_relu

VIEW_SCALES = (0.75, 2.0)  # the resized self-pair views of training and test.py; the flip keeps the size


def gap(x: torch.Tensor) -> torch.Tensor:
    """Global average pooling: (B, K, h, w) maps -> (B, K) scores."""
    return x.mean(dim=(2, 3))


class MCISNet(nn.Module):
    def __init__(self, num_classes: int, width: float = 1.0, batch_norm: bool = False, blocks: int = 5,
                 affinity: str = "bilinear", temperature: float = 0.1):
        super().__init__()
        self.num_classes, self.width, self.batch_norm, self.blocks = num_classes, width, batch_norm, blocks
        self.affinity_kind, self.temperature = affinity, temperature
        self.backbone = VGG16D1(width, batch_norm=batch_norm, blocks=blocks)
        c = self.backbone.out_channels
        self.extra_convs = nn.Sequential(*(m for _ in range(3) for m in conv_relu(c, c, 1, batch_norm)))
        self.cam_head = nn.Conv2d(c, num_classes, 1)  # plain CAM classifier, with bias
        self.affinity = nn.Linear(c, c, bias=False) if affinity == "bilinear" else None  # W of S = F1^T W^T F2
        self.coatt_head = nn.Conv2d(c, num_classes, 1, bias=False)  # co-attention + contrastive
        self.gate_head = nn.Conv2d(c, 1, 1, bias=False)  # class-agnostic co-attention gate
        for conv in [*self.extra_convs, self.cam_head]:
            if isinstance(conv, nn.Conv2d):
                k = conv.kernel_size[0]
                nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (k * k * conv.out_channels)))
                nn.init.zeros_(conv.bias)

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any]) -> MCISNet:
        """The model of a classify `checkpoints/model.pt` dict (state_dict + hyper-parameters)."""
        model = cls(int(checkpoint["num_classes"]), float(checkpoint["width"]),
                    bool(checkpoint.get("batch_norm", False)), int(checkpoint.get("blocks", 5)),
                    str(checkpoint.get("affinity", "bilinear")), float(checkpoint.get("temperature", 0.1)))
        model.load_state_dict(checkpoint["state_dict"])
        return model

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, 3, H, W) -> F (B, C, H/8, W/8), the feature the co-attention works on."""
        return self.extra_convs(self.backbone(x))

    def cam(self, f: torch.Tensor) -> torch.Tensor:
        return self.cam_head(f)

    def similarity(self, a: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """S (B, N1, N2) between the locations of two flattened feature maps (B, C, N).

        "bilinear" (official): S = F1^T W^T F2 with a learned W. "cosine": the cosine similarity
        of the features over a fixed temperature, computed on detached features, so the
        co-attention losses can only use the features' resemblance, not reshape it: trained from
        scratch, the bilinear form learns to send every location to the partner's object, which
        raises the co-attention score but spreads the maps over the background.
        """
        if self.affinity is not None:
            return torch.bmm(self.affinity(a.transpose(1, 2)), z)
        a, z = F.normalize(a.detach(), dim=1), F.normalize(z.detach(), dim=1)
        return torch.bmm(a.transpose(1, 2), z) / self.temperature

    def coattend(self, f1: torch.Tensor, f2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Co-attentive features (G1 on image 1's grid from F2, G2 on image 2's grid from F1).

        S (`similarity`) is N1 x N2; G1 uses its row softmax (over image 2), G2 its column
        softmax (over image 1). The two grids may differ in size.
        """
        b, c, h1, w1 = f1.shape
        h2, w2 = f2.shape[2:]
        a, z = f1.flatten(2), f2.flatten(2)  # (B, C, N1), (B, C, N2)
        s = self.similarity(a, z)  # (B, N1, N2)
        g1 = torch.bmm(z, s.softmax(dim=2).transpose(1, 2))  # G1[:, i] = sum_j A1[i, j] F2[:, j]
        g2 = torch.bmm(a, s.softmax(dim=1))  # G2[:, j] = sum_i A2[i, j] F1[:, i]
        return g1.view(b, c, h1, w1), g2.view(b, c, h2, w2)

    def coatt_maps(self, g: torch.Tensor) -> torch.Tensor:
        """Co-attention localization maps Q (B, K, h, w): the maps localize saves."""
        return self.coatt_head(g)

    def gate(self, g: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.gate_head(g))

    def contrast_scores(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """u = GAP(coatt_head(F * (1 - gate(G)))): the classes of what the partner does not share."""
        return gap(self.coatt_head(f * (1 - self.gate(g))))

    def heads(self, f1: torch.Tensor, f2: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every output of a pair from its features (see `forward`)."""
        cam1, cam2 = self.cam(f1), self.cam(f2)
        g1, g2 = self.coattend(f1, f2)
        q1, q2 = self.coatt_maps(g1), self.coatt_maps(g2)
        return {
            "s1": gap(cam1), "s2": gap(cam2), "t1": gap(q1), "t2": gap(q2),
            "u1": self.contrast_scores(f1, g1), "u2": self.contrast_scores(f2, g2),
            "cam1": cam1, "cam2": cam2, "q1": q1, "q2": q2,
        }

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.heads(self.features(x1), self.features(x2))


def build_classifier(classify_cfg, num_classes: int) -> MCISNet:
    """The classifier that `cfg.classify` describes, freshly initialised."""
    c = classify_cfg
    return MCISNet(num_classes, c.width, c.batch_norm, c.blocks, c.affinity, c.affinity_temperature)


def param_groups(model: nn.Module, lr: float, lr_mult: list[float]) -> list[dict[str, Any]]:
    """The official four groups: backbone weights / biases, "extra" weights / biases (1x 2x 10x 20x).

    "extra" is everything outside `model.backbone`: for MCIS the extra convs, CAM head, W,
    co-attention head and gate; for OAA the extra convs and the class conv.
    """
    names = ["backbone.weight", "backbone.bias", "extra.weight", "extra.bias"]
    params: dict[str, list[nn.Parameter]] = {name: [] for name in names}
    for name, p in model.named_parameters():
        part = "backbone" if name.startswith("backbone.") else "extra"
        params[f"{part}.{'bias' if name.endswith('bias') else 'weight'}"].append(p)
    return [
        {"name": name, "params": params[name], "lr": lr * mult, "lr_mult": mult}
        for name, mult in zip(names, lr_mult, strict=True)
    ]


def _ml(scores: list[torch.Tensor], labels: list[torch.Tensor]) -> torch.Tensor:
    """multilabel_soft_margin_loss over the concatenated batch, as the official code stacks pairs."""
    return F.multilabel_soft_margin_loss(torch.cat(scores).float(), torch.cat(labels))


def _any_in_batch(*labels: torch.Tensor) -> list[bool]:
    """Whether each label set is non-empty anywhere in the global batch (all ranks under DDP)."""
    flags = torch.stack([y.any() for y in labels]).float()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [bool(f) for f in flags.tolist()]


def mcis_loss(
    model: MCISNet, batch: dict[str, Any], epoch: int, cfg
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The §2.6 loss of one step: (weighted total, unweighted terms).

    `batch`: x1, y1 (first images, multi-hot labels), x2, y2 (partners), views (flip, 0.75x, 2x
    of x1). `cfg` is cfg.classify; its switches drop terms for the ablation, and method "cam"
    keeps only the plain classifier on the first images. Each image's features are computed
    once and shared by its pairs, which gives the official gradients with fewer forwards.
    """
    x1, y1 = batch["x1"], batch["y1"]
    f1 = model.features(x1)
    s1 = gap(model.cam(f1))
    if cfg.method == "cam":
        parts = {"cls": _ml([s1], [y1])}
    else:
        x2, y2 = batch["x2"], batch["y2"]
        f2 = model.features(x2)
        parts = {"cls": _ml([s1, gap(model.cam(f2))], [y1, y2])}
        if cfg.coattention or cfg.contrastive:
            g1, g2 = model.coattend(f1, f2)
        if cfg.coattention:
            common = y1 * y2
            parts["coatt"] = _ml([gap(model.coatt_maps(g1)), gap(model.coatt_maps(g2))], [common, common])
        if cfg.contrastive:
            parts["contrast"] = x1.new_zeros((), dtype=torch.float32)
            if epoch >= cfg.contrastive_from_epoch:
                only1, only2 = y1 * (1 - y2), y2 * (1 - y1)
                pairs = ((f1, g1, only1), (f2, g2, only2))
                for (f, g, unique), present in zip(pairs, _any_in_batch(only1, only2), strict=True):
                    if present:  # then the whole batch, pairs without unique labels included
                        parts["contrast"] = parts["contrast"] + _ml([model.contrast_scores(f, g)], [unique])
        if cfg.self_pairs:
            parts["self"] = x1.new_zeros((), dtype=torch.float32)
            for view in batch["views"]:
                fv = model.features(view)
                parts["self"] = parts["self"] + _ml([s1, gap(model.cam(fv))], [y1, y1])
                if cfg.coattention:
                    ga, gb = model.coattend(f1, fv)
                    parts["self"] = parts["self"] + _ml(
                        [gap(model.coatt_maps(ga)), gap(model.coatt_maps(gb))], [y1, y1]
                    )
    weights = cfg.loss_weights
    total = sum(getattr(weights, name) * value for name, value in parts.items())
    return total, parts
