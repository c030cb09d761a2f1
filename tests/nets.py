"""Small networks for tests, importable as factories (``tests.nets:gap_net``) from configs."""

from __future__ import annotations

import torch
from torch import nn


class GapNet(nn.Module):
    """conv-relu-conv-relu ("features") -> global average pool -> linear: a CAM-ready network."""

    def __init__(self, num_classes: int = 5, width: int = 16, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(8, width, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


class HiddenHeadNet(GapNet):
    """Like GapNet but with a hidden layer in the head: no CAM possible."""

    def __init__(self, num_classes: int = 5, width: int = 16, seed: int = 0) -> None:
        super().__init__(num_classes, width, seed)
        self.hidden = nn.Linear(width, width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.hidden(self.pool(self.features(x)).flatten(1))))


class NinNet(nn.Module):
    """Network-in-Network head: conv-relu ("features") -> 1x1 conv to one channel per class
    ("classifier") -> global average pool, no linear layer."""

    def __init__(self, num_classes: int = 5, width: int = 12, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Conv2d(width, num_classes, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.classifier(self.features(x))).flatten(1)


def gap_net(num_classes: int = 5, width: int = 16, seed: int = 0) -> nn.Module:
    return GapNet(num_classes, width, seed)


def hidden_head_net(num_classes: int = 5) -> nn.Module:
    return HiddenHeadNet(num_classes)


class SmallCnn(nn.Module):
    """Four conv-BN-ReLU layers (two max-pools: features at a quarter of the input size) ->
    global average pool -> linear: a backbone small enough to train in seconds on the CPU."""

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(3, width // 2), nn.MaxPool2d(2), *block(width // 2, width), nn.MaxPool2d(2),
            *block(width, width), *block(width, width),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def small_cnn(num_classes: int = 10, width: int = 32) -> nn.Module:
    return SmallCnn(num_classes, width)


def _randomise(net: nn.Module, seed: int, scale: float = 0.5) -> nn.Module:
    """Every parameter drawn from N(0, scale^2): torchvision's ViT starts with a zero head, whose
    maps would all be zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return net.eval()


def tiny_vit(num_classes: int = 5, image_size: int = 32, patch_size: int = 8, seed: int = 0) -> nn.Module:
    """torchvision's VisionTransformer at toy size: a 4x4 patch grid + class token, 2 blocks."""
    from torchvision.models.vision_transformer import VisionTransformer

    net = VisionTransformer(image_size=image_size, patch_size=patch_size, num_layers=2, num_heads=2, hidden_dim=16,
                            mlp_dim=32, num_classes=num_classes)
    return _randomise(net, seed)


def tiny_timm_vit(num_classes: int = 5, seed: int = 0, distilled: bool = False, reg_tokens: int = 0) -> nn.Module:
    """timm's VisionTransformer (or the distilled DeiT) at toy size: 32x32 input, 4x4 patch grid."""
    import timm

    name = "deit_tiny_distilled_patch16_224" if distilled else "vit_tiny_patch16_224"
    kwargs = {"reg_tokens": reg_tokens} if reg_tokens else {}
    net = timm.create_model(name, pretrained=False, img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2,
                            num_classes=num_classes, **kwargs)
    return _randomise(net, seed, 0.3)


def tiny_swin(num_classes: int = 5, seed: int = 0, depths: tuple[int, ...] = (2, 2), window: int = 4,
              v2: bool = False) -> nn.Module:
    """torchvision's Swin (or Swin V2) at toy size: 32x32 input, 2 stages, window 4 (channels-last blocks)."""
    from torchvision.models import swin_transformer as tv

    kwargs = {"block": tv.SwinTransformerBlockV2, "downsample_layer": tv.PatchMergingV2} if v2 else {}
    net = tv.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=list(depths), num_heads=[2] * len(depths),
                             window_size=[window, window], num_classes=num_classes, **kwargs)
    return _randomise(net, seed, 0.3)


def tiny_timm_swin(num_classes: int = 5, seed: int = 0, image_size: int = 32, v2: bool = False) -> nn.Module:
    """timm's Swin (or Swin V2) at toy size: 2 stages, window 4 (it shifts before it pads, torchvision after)."""
    import timm

    name = "swinv2_tiny_window8_256" if v2 else "swin_tiny_patch4_window7_224"
    net = timm.create_model(name, pretrained=False, img_size=image_size, embed_dim=16,
                            depths=(2, 2), num_heads=(2, 2), window_size=4, num_classes=num_classes)
    return _randomise(net, seed, 0.3)


def small_resnet(num_classes: int = 5) -> nn.Module:
    """A torchvision ResNet with one BasicBlock per stage (batch norms, shared in-place ReLUs, skip
    sums, overlapping max pooling): ResNet's structure at a fraction of resnet18's cost."""
    from torchvision.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes)


class SlowNet(GapNet):
    """GapNet whose forward sleeps ``delay`` s and, while the file ``hold`` exists, waits (after
    creating ``hold.reached``): a run that another process meets at a moment the test chooses."""

    def __init__(self, num_classes: int = 5, delay: float = 0.0, hold: str | None = None) -> None:
        super().__init__(num_classes)
        self.delay = delay
        self.hold = hold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import time
        from pathlib import Path

        if x.abs().sum() > 0:  # not the blank passes of setup
            if self.hold is not None and Path(self.hold).exists():
                Path(self.hold + ".reached").touch()
                deadline = time.monotonic() + 120
                while Path(self.hold).exists() and time.monotonic() < deadline:
                    time.sleep(0.05)
            time.sleep(self.delay)
        return super().forward(x)


def slow_net(num_classes: int = 5, delay: float = 0.0, hold: str | None = None) -> nn.Module:
    return SlowNet(num_classes, delay, hold)
