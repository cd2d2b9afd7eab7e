"""Models of the shapes users bring, built from torch's layers (and some of ours), for the tests.

No download: a ResNet-like net and a sequence model of the same structure as the
Hugging Face ones, from torch layers and random weights.
"""

import torch
from torch import nn

from normlab import nn as nl


def conv_net(dtype=torch.float64) -> nn.Module:
    """A small ReLU conv net of torch's layers and ours, with BatchNorm2d and BatchNorm1d."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, groups=2),
        nl.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 3 * 3, 10),
        nn.BatchNorm1d(10),
    ).to(dtype)


class SequenceModel(nn.Module):
    """Embeddings → Linear → BatchNorm over (B, T) → tanh → Linear, called with ``idx=``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(27, 6)
        self.linear = nn.Linear(6, 16, bias=False)
        self.norm = nl.BatchNorm1d(16, channels_last=True)
        self.head = nn.Linear(16, 27)

    def forward(self, idx):
        x = self.embedding(idx)  # (B, T, 6)
        return self.head(torch.tanh(self.norm(self.linear(x))))  # (B, T, 27)


def deep_bn_net(dtype=torch.float32, torch_layers=False):
    Linear = nn.Linear if torch_layers else nl.Linear
    BN = nn.BatchNorm1d if torch_layers else nl.BatchNorm1d
    layers = []
    for fan_in in (12, 16, 16):
        layers += [Linear(fan_in, 16, bias=False), BN(16), nn.Tanh()]
    layers += [Linear(16, 5), BN(5)]
    net = nn.Sequential(*layers).to(dtype)
    for _ in range(5):  # give the running statistics something to be off from
        net(torch.randn(32, 12, dtype=dtype) * 2 + 0.5)
    return net


class BasicBlock(nn.Module):
    """ResNet's block: two 3×3 convs with BatchNorm, and a 1×1 conv + BatchNorm shortcut where
    the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetLike(nn.Module):
    """A stem, two stages of BasicBlocks (the second downsamples), pooling and a classifier:
    6 BatchNorms, each after a conv."""

    def __init__(self, classes: int = 10):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.layer1 = BasicBlock(8, 8)
        self.layer2 = BasicBlock(8, 16, stride=2)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def trained_statistics(model: nn.Module, shape, steps: int = 5) -> nn.Module:
    """``model`` after a few training-mode passes, so its running statistics are not the
    defaults (and folding them is a real test); returned in eval mode."""
    with torch.no_grad():
        for _ in range(steps):
            model.train()(torch.randn(*shape, dtype=next(model.parameters()).dtype) * 2 + 1)
    return model.eval()


class OnceDifferentiableSquare(torch.autograd.Function):
    """x², whose backward has no derivative of its own (``once_differentiable``): what the
    second-order instruments must name, not differentiate through."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.square()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class SquareOnce(nn.Module):
    """A layer of ``OnceDifferentiableSquare``."""

    def forward(self, x):
        return OnceDifferentiableSquare.apply(x)


class CdistLoss(nn.Module):
    """A loss through ``torch.cdist``, whose backward ATen cannot differentiate again (on at
    most 25 rows: more take a path of matrix products, which it can)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.centres = nn.Parameter(torch.randn(5, 3))

    def forward(self, x):
        return torch.cdist(self.linear(x), self.centres).mean()
