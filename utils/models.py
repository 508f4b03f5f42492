"""ResNet-18 family built from torchvision's BasicBlock, with the input normalisation inside the model.

One class covers every network the pipeline makes:
  stem="imagenet": 7x7 stride-2 conv + max-pool, the layers of torchvision's stock resnet18 (8x8 maps at layer1 on 32x32)
  stem="cifar":    3x3 stride-1 conv, no max-pool (the CIFAR ResNet-18 and ResNet-20, 32x32 maps at layer1)
  stem="stride2":  3x3 stride-2 conv, no max-pool (16x16 maps at layer1)
  stem="pool":     3x3 stride-1 conv + 2x2 max-pool (16x16 maps at layer1; the stem itself at 32x32)
`widths` and `blocks` set the channels and depth of each stage (four stages: ResNet-18; three stages of three
blocks at 16-32-64: the CIFAR ResNet-20), so a student is the same code. `mids` (one per block) sets each block's
inner width: structured pruning removes inner channels and records the new widths there. A mid of 0 leaves the
block out (the stage's stream passes it unchanged); the first block of a stage always stays. The other blocks
keep their names (layer1.0, layer1.2), so a block's weights have one name whatever was removed around it.
Keeping normalisation inside means an exported ONNX file takes plain RGB floats in [0, 1].
"""
from collections import OrderedDict

import torch
from torch import nn


def conv3x3(inplanes, planes, stride=1):  # torchvision's (not imported: importing torchvision.models takes seconds)
    return nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(inplanes, planes, stride=1):
    return nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False)


CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
STEMS = ("imagenet", "cifar", "stride2", "pool")
LARGE_IMAGES = 96  # px from which ARCH=auto and STUDENTS=auto take the ImageNet stem (7x7 stride-2 conv, max-pool)

# Named architectures: the constructor arguments each name stands for.
ARCHS = {
    "resnet18_stock": dict(stem="imagenet", widths=(64, 128, 256, 512)),
    "resnet18_cifar": dict(stem="cifar", widths=(64, 128, 256, 512)),
    "resnet18_s2": dict(stem="stride2", widths=(64, 128, 256, 512)),
    "resnet18_pool": dict(stem="pool", widths=(64, 128, 256, 512)),
    "resnet20": dict(stem="cifar", widths=(16, 32, 64), blocks=(3, 3, 3)),
    "resnet20_w32": dict(stem="cifar", widths=(32, 64, 128), blocks=(3, 3, 3)),
    "resnet_s2_w32": dict(stem="stride2", widths=(32, 64, 128, 256)),
    "resnet18_cifar_w32": dict(stem="cifar", widths=(32, 64, 128, 256)),
}


def parse_arch(text):
    """A name of ARCHS, or "stem:w1-w2-...:blocks" (e.g. "cifar:16-32-64:3", ResNet-20): the ResNet arguments."""
    if text in ARCHS:
        return dict(ARCHS[text])
    try:
        stem, widths, per_stage = text.split(":")
        widths = tuple(int(w) for w in widths.split("-"))
        if stem in STEMS and min(widths) > 0 and int(per_stage) > 0:
            return dict(stem=stem, widths=widths, blocks=(int(per_stage),) * len(widths))
    except ValueError:
        pass
    raise ValueError(f"{text!r} is neither one of {', '.join(ARCHS)} nor stem:widths:blocks with a stem of "
                     f"{'|'.join(STEMS)} (e.g. cifar:16-32-64:3)")


def arch_slug(name):
    """An architecture name (parse_arch) as it appears in file names and candidate names."""
    return name.replace(":", "_")


def make_stem(stem, width):
    if stem == "imagenet":
        return [nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1)]
    if stem == "pool":
        return [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                nn.MaxPool2d(2)]
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
    (None: each block as wide as its stage); image_size: the size of the square images it is made for (any size
    runs through it; the ONNX export and the MAC count take this one)."""

    def __init__(self, stem="imagenet", widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), num_classes=10, mids=None,
                 image_size=32):
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        full = [w for w, n in zip(widths, blocks) for _ in range(n)]
        mids = list(mids) if mids is not None else full
        if len(widths) != len(blocks) or not widths:
            raise ValueError(f"one width per stage: widths {widths}, blocks {blocks}")
        firsts = [sum(blocks[:i]) for i in range(len(blocks))]
        if len(mids) != len(full) or min(mids) < 0 or min(mids[i] for i in firsts) < 1:
            raise ValueError(f"mids needs {len(full)} inner widths, >= 0, the first block's of each stage >= 1; "
                             f"got {mids}")
        # what a checkpoint needs to rebuild this model (mids only when they differ from the stage widths)
        self.spec = model_spec(stem, widths, num_classes, blocks, None if mids == full else mids, image_size)
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(CIFAR10_STD).view(1, 3, 1, 1))
        self.conv1, self.bn1, self.relu, self.maxpool = make_stem(stem, widths[0])
        inplanes = widths[0]
        self.stages = [f"layer{i + 1}" for i in range(len(widths))]  # torchvision's names: layer1, layer2, ...
        for i, (name, width, n) in enumerate(zip(self.stages, widths, blocks)):
            setattr(self, name, make_stage(inplanes, width, mids[:n], stride=1 if i == 0 else 2))
            inplanes, mids = width, mids[n:]
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x):  # x: (N, 3, H, W) RGB in [0, 1]
        x = (x - self.mean) / self.std
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self.stages:
            x = getattr(self, name)(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def zero_init_residual(model):
    """Set the last BN scale of every block to zero, so that each block starts as the identity (Goyal et al.):
    faster early training of the baseline. Returns the model."""
    for module in model.modules():
        if isinstance(module, Block):
            nn.init.zeros_(module.bn2.weight)
    return model


@torch.no_grad()
def whiten_stem(model, images, eps=5e-4):
    """Set the stem conv's first filters to the whitening of its input patches (each principal component of the
    patches over its standard deviation, then the same negated; largest first) and freeze the whole conv
    (airbench's whitening initialisation). images: uint8 (N, 3, H, W) training images. Returns the model."""
    conv = model.conv1
    x = (images.float().div(255) - model.mean.cpu()) / model.std.cpu()
    patches = nn.functional.unfold(x, conv.kernel_size, padding=conv.padding, stride=conv.stride)  # (N, C*k*k, L)
    eigvals, eigvecs = torch.linalg.eigh(torch.cov(patches.transpose(0, 1).flatten(1).double()))
    pcs = (eigvecs.T / (eigvals.clamp(min=0) + eps).sqrt()[:, None]).flip(0)
    filters = torch.cat([pcs, -pcs])[:conv.out_channels]
    weight = conv.weight.detach().cpu().clone()
    weight[:len(filters)] = filters.view(-1, *weight.shape[1:]).to(weight.dtype)
    conv.weight.copy_(weight)
    conv.weight.requires_grad_(False)
    return model


def make_stage(inplanes, width, mids, stride):
    """One block per mid, named by its place ("0", "1", ...); the first changes stride and width (with a 1x1 conv
    shortcut when it must); a block whose mid is 0 is left out."""
    downsample = None
    if stride != 1 or inplanes != width:
        downsample = nn.Sequential(conv1x1(inplanes, width, stride), nn.BatchNorm2d(width))
    layers = {"0": Block(inplanes, width, mids[0], stride, downsample)}
    layers.update({str(i): Block(width, width, mid) for i, mid in enumerate(mids) if i > 0 and mid > 0})
    return nn.Sequential(OrderedDict(layers))


def build_model(spec):
    """Rebuild a model from a checkpoint's {"class": "ResNet", "kwargs": {...}} entry."""
    if spec.get("class") != "ResNet":
        raise ValueError(f"unknown model class {spec.get('class')!r}")
    kwargs = dict(spec["kwargs"])
    kwargs["widths"] = tuple(kwargs["widths"])
    kwargs["blocks"] = tuple(kwargs.get("blocks", (2, 2, 2, 2)))
    return ResNet(**kwargs)


def model_spec(stem, widths, num_classes, blocks=(2, 2, 2, 2), mids=None, image_size=32):
    kwargs = {"stem": stem, "widths": list(widths), "blocks": list(blocks), "num_classes": num_classes}
    if mids is not None:
        kwargs["mids"] = [int(m) for m in mids]
    if image_size != 32:  # only then: a 32 px model's spec (and every file keyed by it) is what it always was
        kwargs["image_size"] = int(image_size)
    return {"class": "ResNet", "kwargs": kwargs}


def count_macs(model):
    """Multiply-accumulates of one image's forward pass through the convolutions and the classifier (dense: zeros
    count, as ONNX Runtime's dense kernels run them), counted from the shapes, not timed. `model` is not changed:
    the count runs on a CPU copy built from its spec."""
    counted = build_model(model.spec).eval()
    total = []

    def hook(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            k = module.weight[0].numel()  # in_channels / groups * kh * kw
            total.append(output.numel() * k)
        else:
            total.append(module.in_features * module.out_features)
    handles = [m.register_forward_hook(hook) for m in counted.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        counted(torch.zeros(1, 3, counted.image_size, counted.image_size))
    for h in handles:
        h.remove()
    return int(sum(total))
