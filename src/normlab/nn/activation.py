"""Elementwise nonlinearities, as modules the tools recognize by kind."""

import torch
from torch import Tensor, nn


class Tanh(nn.Module):
    """Elementwise ``tanh``; saturated units (``|t|`` near 1) pass almost no gradient."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x)


class ReLU(nn.Module):
    """Elementwise ``max(x, 0)``; a unit that is never positive passes no gradient (dead)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x)
