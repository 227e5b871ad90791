"""DeepLab-LargeFOV segmenters: the paper's VGG16 one and the released ResNet-101 one.

Both take (N, 3, H, W) images normalised with the ImageNet mean/std and return (N, C, H, W)
logits, C = foreground classes + 1 (index 0 is background). The output size is read from the
input tensor, so an ONNX export keeps H and W dynamic.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet101
from torchvision.ops import FrozenBatchNorm2d

from mcis_cli.models.backbone import scaled, vgg_layers


def deeplab_vgg16_features(width: float = 1.0, batch_norm: bool = False, blocks: int = 5) -> nn.Sequential:
    """The VGG16 body of DeepLab-LargeFOV at output stride 8, torchvision's layer indices.

    The classifier's builder with DeepLab's 3x3/2 pad 1 pool1-3 (321 -> 41 as in Caffe),
    then pool5 (3x3/1 max) and pool5a (3x3/1 average) after conv5_3.
    """
    features = vgg_layers(width, pool3x3=True, batch_norm=batch_norm, blocks=blocks)
    features.append(nn.MaxPool2d(3, stride=1, padding=1))
    features.append(nn.AvgPool2d(3, stride=1, padding=1))
    return features


def upsample_to(logits: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Bilinear upsampling to the input size; align_corners as Caffe's Interp (41 -> 321 exactly)."""
    return F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=True)


class DeepLabLargeFOV(nn.Module):
    """DeepLab-LargeFOV (VGG16): conv body, fc6 3x3 dilation 12, fc7 1x1, 1x1 classifier."""

    NEW_LAYERS = ("classifier",)  # trained with lr_mult_classifier; fc6/fc7 count as the body

    def __init__(self, num_classes: int, width: float = 1.0, dropout: float = 0.5,
                 batch_norm: bool = False, blocks: int = 5):
        super().__init__()
        self.width, self.batch_norm, self.blocks = width, batch_norm, blocks
        fc = scaled(1024, width)
        self.features = deeplab_vgg16_features(width, batch_norm, blocks)
        self.fc6 = nn.Conv2d(scaled(512, width), fc, 3, padding=12, dilation=12)
        self.fc7 = nn.Conv2d(fc, fc, 1)
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Conv2d(fc, num_classes, 1)
        # From-scratch init (ImageNet weights, when loaded, replace all but the classifier): He
        # fan-in keeps activations at scale through 15 plain convs. The prototxt's gaussian 0.01
        # for fc6/fc7 is only a placeholder for vgg16_20M; from scratch it (and torchvision's
        # fan-out) left the toy model predicting background only. The classifier is DeepLab's.
        for conv in [m for m in self.features if isinstance(m, nn.Conv2d)] + [self.fc6, self.fc7]:
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        h = self.drop(F.relu(self.fc6(h), inplace=True))
        h = self.drop(F.relu(self.fc7(h), inplace=True))
        return upsample_to(self.classifier(h), x)

    @torch.no_grad()
    def load_imagenet(self, state: dict[str, torch.Tensor]) -> None:
        """Load torchvision's `vgg16` (or, with batch norm, `vgg16_bn`) ImageNet state dict (width 1 only).

        The conv body loads one to one. fc6/fc7 are decimated from the 4096-wide fully
        connected layers as DeepLab built `vgg16_20M`: every 4th channel, and fc6's 7x7 kernel
        sampled at rows/columns 0, 3, 6. The classifier stays new.
        """
        if self.width != 1.0:
            raise ValueError("ImageNet weights exist for width 1 only")
        body = {k: v for k, v in state.items() if k.startswith("features.")}
        missing = [k for k in self.load_state_dict(body, strict=False).missing_keys if k.startswith("features.")]
        if missing:
            raise ValueError(f"not a torchvision vgg16 state dict: it lacks {missing[0]}")
        fc6 = state["classifier.0.weight"].view(4096, 512, 7, 7)
        self.fc6.weight.copy_(fc6[::4, :, ::3, ::3])
        self.fc6.bias.copy_(state["classifier.0.bias"][::4])
        self.fc7.weight.copy_(state["classifier.3.weight"][::4, ::4, None, None])
        self.fc7.bias.copy_(state["classifier.3.bias"][::4])


def _caffe_xavier_(weight: torch.Tensor) -> None:
    """Caffe's "xavier" filler: uniform(+-sqrt(3 / fan_in))."""
    bound = math.sqrt(3.0 / weight[0].numel())
    nn.init.uniform_(weight, -bound, bound)


class DeepLabResNet101(nn.Module):
    """The released MCIS segmenter: ResNet-101 (frozen BN, OS 8) + LargeFOV head, no dropout."""

    NEW_LAYERS = ("fc6", "fc7", "classifier")  # all lr x10 in train_resnet_fov.prototxt

    def __init__(self, num_classes: int):
        super().__init__()
        self.width = 1.0
        body = resnet101(
            weights=None, replace_stride_with_dilation=[False, True, True], norm_layer=FrozenBatchNorm2d
        )
        self.backbone = nn.Sequential(
            body.conv1, body.bn1, body.relu, body.maxpool, body.layer1, body.layer2, body.layer3, body.layer4
        )
        self.fc6 = nn.Conv2d(2048, 1024, 3, padding=12, dilation=12, bias=False)
        self.fc7 = nn.Conv2d(1024, 1024, 1, bias=False)
        self.classifier = nn.Conv2d(1024, num_classes, 1)
        _caffe_xavier_(self.fc6.weight)
        _caffe_xavier_(self.fc7.weight)
        nn.init.kaiming_normal_(self.classifier.weight, nonlinearity="relu")  # Caffe "msra"
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.backbone(x)
        h = F.relu(self.fc6(h), inplace=True)
        h = F.relu(self.fc7(h), inplace=True)
        return upsample_to(self.classifier(h), x)

    @torch.no_grad()
    def load_imagenet(self, state: dict[str, torch.Tensor]) -> None:
        """Load torchvision's `resnet101` ImageNet state dict into the backbone (fc dropped)."""
        names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
        index = {name: str(i) for i, name in enumerate(names)}
        mapped = {}
        for key, value in state.items():
            head, _, rest = key.partition(".")
            if head in index:
                mapped[f"{index[head]}.{rest}"] = value
        missing, unexpected = self.backbone.load_state_dict(mapped, strict=False)
        if missing or unexpected:
            raise ValueError(f"not a torchvision resnet101 state dict: {(missing + unexpected)[:3]}")


def build_segmenter(seg_cfg, num_classes: int) -> nn.Module:
    """The segmenter named by `cfg.segment.arch`."""
    if seg_cfg.arch == "resnet101":
        return DeepLabResNet101(num_classes)
    return DeepLabLargeFOV(num_classes, width=seg_cfg.width, dropout=seg_cfg.dropout,
                           batch_norm=seg_cfg.batch_norm, blocks=seg_cfg.blocks)


def param_groups(
    model: nn.Module, weight_decay: float, lr_mult_bias: float = 2.0, lr_mult_classifier: float = 10.0
) -> list[dict]:
    """DeepLab's four groups: weights x1, biases x2, new layers x10, their biases x20.

    Biases take no weight decay (Caffe decay_mult 0). Each group carries `lr_mult`, which the
    poly schedule multiplies by the base rate; frozen parameters are left out.
    """
    groups = {
        (False, False): ([], 1.0, weight_decay),
        (False, True): ([], lr_mult_bias, 0.0),
        (True, False): ([], lr_mult_classifier, weight_decay),
        (True, True): ([], lr_mult_classifier * lr_mult_bias, 0.0),
    }
    for name, param in model.named_parameters():
        if param.requires_grad:
            new = name.split(".")[0] in model.NEW_LAYERS
            groups[(new, name.endswith("bias"))][0].append(param)
    return [
        {"params": params, "lr_mult": mult, "weight_decay": decay}
        for params, mult, decay in groups.values()
        if params
    ]
