"""ResNet-18/34 (BasicBlock) and ResNet-50 (Bottleneck) in torchvision's layout.

Module names match ``torchvision.models.resnet`` (conv1, bn1, layer1..layer4, fc; blocks
with conv1/bn1/conv2/bn2[/conv3/bn3] and downsample.0/1), stride on the 3x3 conv (v1.5).
``small_input`` swaps the 7x7/2 stem and max-pool for one 3x3/1 conv, for 8x8 or 32x32 images.

Shape legend: B batch, C channels, H height, W width, K num_classes.
"""

from dataclasses import dataclass

import torch
from torch import nn

from baobab.models.common import check_choice, check_positive
from baobab.models.common.init import InitFn, kaiming_normal, linear_default, ones, zeros

_STAGES = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
}


@dataclass(frozen=True)
class ResNetConfig:
    """Shape of a ResNet image classifier."""

    depth: int = 18
    """Number of layers: 18 or 34 (BasicBlock) or 50 (Bottleneck)."""
    num_classes: int = 10
    """Number of output classes."""
    in_channels: int = 3
    """Channels of the input image (3 for RGB, 1 for grey digits)."""
    small_input: bool = False
    """Use a 3x3 stride-1 stem without max-pool, for 8x8 to 32x32 images."""
    width: int = 64
    """Channels of the first stage; later stages use 2x, 4x, 8x (torchvision: 64)."""
    image_size: int = 224
    """Side of the square example input used for FLOP counting."""

    def __post_init__(self) -> None:
        check_choice("ResNetConfig", "depth", self.depth, sorted(_STAGES))
        check_positive(
            "ResNetConfig",
            num_classes=self.num_classes,
            in_channels=self.in_channels,
            width=self.width,
            image_size=self.image_size,
        )


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand by 4, with a residual connection."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = _conv1x1(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Image classifier: forward(x (B, C, H, W)) -> logits (B, K)."""

    def __init__(self, cfg: ResNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        kind, counts = _STAGES[cfg.depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        w = cfg.width
        with torch.device("meta"):
            if cfg.small_input:
                self.conv1 = nn.Conv2d(cfg.in_channels, w, 3, stride=1, padding=1, bias=False)
            else:
                self.conv1 = nn.Conv2d(cfg.in_channels, w, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(w)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.Identity() if cfg.small_input else nn.MaxPool2d(3, 2, padding=1)
            cin = w
            for i, n in enumerate(counts):
                planes, stride = w * 2**i, 1 if i == 0 else 2
                downsample = None
                if stride != 1 or cin != planes * block.expansion:
                    downsample = nn.Sequential(
                        _conv1x1(cin, planes * block.expansion, stride),
                        nn.BatchNorm2d(planes * block.expansion),
                    )
                blocks = [block(cin, planes, stride, downsample)]
                cin = planes * block.expansion
                blocks += [block(cin, planes, 1, None) for _ in range(n - 1)]
                setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(cin, cfg.num_classes)
        # Built on meta; build_model allocates it and fills it by init_rules().

    def init_rules(self) -> dict[str, InitFn]:
        """How every tensor starts, by name (see baobab.models.common.init), as torchvision
        does: convs kaiming-normal (fan_out, relu), BatchNorm at one and zero with fresh
        statistics, the classifier at nn.Linear's default."""
        rules: dict[str, InitFn] = {}
        for name, module in self.named_modules():
            p = f"{name}." if name else ""
            if isinstance(module, nn.Conv2d):
                rules[p + "weight"] = kaiming_normal("fan_out", "relu")
            elif isinstance(module, nn.BatchNorm2d):
                for attr, rule in (("weight", ones), ("bias", zeros), ("running_mean", zeros),
                                   ("running_var", ones), ("num_batches_tracked", zeros)):  # fmt: skip
                    rules[p + attr] = rule
        rules["fc.weight"], rules["fc.bias"] = linear_default(self.fc.in_features)
        return rules

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, w, H', W')
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 8w*expansion, h, w)
        return self.fc(torch.flatten(self.avgpool(x), 1))  # (B, K)
