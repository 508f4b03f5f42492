"""ResNet-18 family built from torchvision's BasicBlock, with the input normalisation inside the model.

One class covers every network the pipeline makes:
  stem="imagenet": 7x7 stride-2 conv + max-pool, the layers of torchvision's stock resnet18 (8x8 maps at layer1 on 32x32)
  stem="cifar":    3x3 stride-1 conv, no max-pool (the CIFAR ResNet-18, 32x32 maps at layer1)
  stem="stride2":  3x3 stride-2 conv, no max-pool (16x16 maps at layer1)
and `widths` sets the channels of the four stages, so a narrower student is the same code. `mids` (one per
block) sets each block's inner width: structured pruning removes inner channels and records the new widths there.
Keeping normalisation inside means an exported ONNX file takes plain RGB floats in [0, 1].
"""
import torch
from torch import nn
from torchvision.models.resnet import conv1x1, conv3x3

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
STEMS = ("imagenet", "cifar", "stride2")

# Named architectures: the constructor arguments each name stands for.
ARCHS = {
    "resnet18_stock": dict(stem="imagenet", widths=(64, 128, 256, 512)),
    "resnet18_cifar": dict(stem="cifar", widths=(64, 128, 256, 512)),
}


def make_stem(stem, width):
    if stem == "imagenet":
        return [nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1)]
    stride = 1 if stem == "cifar" else 2
    return [nn.Conv2d(3, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Identity()]


class Block(nn.Module):
    """torchvision's BasicBlock (same parameter names) with an inner width `mid` of its own:
    conv3x3(inplanes -> mid) BN ReLU, conv3x3(mid -> planes) BN, + shortcut, ReLU."""

    def __init__(self, inplanes, planes, mid, stride=1, downsample=None):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(inplanes, mid, stride), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = conv3x3(mid, planes), nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet(nn.Module):
    """ResNet with BasicBlocks; `blocks` per stage, `widths` channels per stage, `mids` inner width per block
    (None: each block as wide as its stage)."""

    def __init__(self, stem="imagenet", widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), num_classes=10, mids=None):
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        full = [w for w, n in zip(widths, blocks) for _ in range(n)]
        mids = list(mids) if mids is not None else full
        if len(mids) != len(full) or min(mids) < 1:
            raise ValueError(f"mids needs {len(full)} positive inner widths, got {mids}")
        # what a checkpoint needs to rebuild this model (mids only when they differ from the stage widths)
        self.spec = model_spec(stem, widths, num_classes, blocks, None if mids == full else mids)
        self.register_buffer("mean", torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(CIFAR10_STD).view(1, 3, 1, 1))
        self.conv1, self.bn1, self.relu, self.maxpool = make_stem(stem, widths[0])
        inplanes = widths[0]
        stages = []
        for i, (width, n) in enumerate(zip(widths, blocks)):
            stride = 1 if i == 0 else 2
            stages.append(make_stage(inplanes, width, mids[:n], stride))
            inplanes, mids = width, mids[n:]
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x):  # x: (N, 3, H, W) RGB in [0, 1]
        x = (x - self.mean) / self.std
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def make_stage(inplanes, width, mids, stride):
    """len(mids) blocks; the first changes stride and width (with a 1x1 conv shortcut when it must)."""
    downsample = None
    if stride != 1 or inplanes != width:
        downsample = nn.Sequential(conv1x1(inplanes, width, stride), nn.BatchNorm2d(width))
    layers = [Block(inplanes, width, mids[0], stride, downsample)]
    layers += [Block(width, width, mid) for mid in mids[1:]]
    return nn.Sequential(*layers)


def build_model(spec):
    """Rebuild a model from a checkpoint's {"class": "ResNet", "kwargs": {...}} entry."""
    if spec.get("class") != "ResNet":
        raise ValueError(f"unknown model class {spec.get('class')!r}")
    kwargs = dict(spec["kwargs"])
    kwargs["widths"] = tuple(kwargs["widths"])
    kwargs["blocks"] = tuple(kwargs.get("blocks", (2, 2, 2, 2)))
    return ResNet(**kwargs)


def model_spec(stem, widths, num_classes, blocks=(2, 2, 2, 2), mids=None):
    kwargs = {"stem": stem, "widths": list(widths), "blocks": list(blocks), "num_classes": num_classes}
    if mids is not None:
        kwargs["mids"] = [int(m) for m in mids]
    return {"class": "ResNet", "kwargs": kwargs}
