"""The character-level MLP language model (Bengio et al. 2003, as in makemore).

embedding table → flattened context → ``n_layer`` hidden blocks
``Linear → norm → nonlinearity`` (optionally with skip connections) → output
``Linear`` (→ optional output BatchNorm, as in the lecture's deep network).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab import nn as nl
from normlab.config import ModelConfig
from normlab.schemes import initialize_


class Block(nn.Sequential):
    """``Linear → norm → nonlinearity [→ dropout]``, with an optional skip ``x + block(x)``."""

    def __init__(self, *layers: nn.Module, residual: bool = False) -> None:
        super().__init__(*layers)
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        return x + out if self.residual else out


class MLPLanguageModel(nn.Module):
    """Predict the next character from the previous ``block_size`` characters.

    ``forward(idx, targets=None)`` takes ``idx`` of shape ``(B, block_size)``
    and returns ``(logits, loss)``: logits ``(B, vocab_size)`` and the mean
    cross-entropy against ``targets`` ``(B,)``, or ``None`` without targets.
    ``generator`` draws the initial weights by the config's scheme (see
    :mod:`normlab.schemes`); ``verbose`` prints the parameter count.

    Example:
        >>> model = MLPLanguageModel(ModelConfig(n_layer=2, n_hidden=32), verbose=False)
        >>> idx, targets = torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, dtype=torch.long)
        >>> logits, loss = model(idx, targets)
        >>> logits.shape, loss.shape
        (torch.Size([4, 27]), torch.Size([]))
    """

    def __init__(
        self, config: ModelConfig, generator: torch.Generator | None = None, verbose: bool = True
    ) -> None:
        super().__init__()
        config.validate()
        self.config = c = config
        # the layers start empty (no random draws); initialize_ fills them by the config's scheme
        self.embedding = nn.Embedding(
            c.vocab_size, c.n_embd, _weight=torch.zeros(c.vocab_size, c.n_embd)
        )
        self.flatten = nl.FlattenContext()
        # whole characters' embeddings vanish at random: the context, not one layer, is noised
        self.embed_dropout = nn.Dropout(c.embed_dropout) if c.embed_dropout > 0 else nn.Identity()
        hidden_bias = c.norm != "batch" if c.bias is None else c.bias
        blocks, fan_in = [], c.block_size * c.n_embd
        for _ in range(c.n_layer):
            linear = nl.Linear(fan_in, c.n_hidden, bias=hidden_bias, init=nn.init.zeros_)
            layers = [linear, self._norm(c.n_hidden), self._activation()]
            if c.dropout > 0:
                layers.append(nn.Dropout(c.dropout))
            blocks.append(Block(*layers, residual=c.residual and fan_in == c.n_hidden))
            fan_in = c.n_hidden
        self.blocks = nn.Sequential(*blocks)
        head = [nl.Linear(fan_in, c.vocab_size, bias=not c.output_bn, init=nn.init.zeros_)]
        if c.output_bn:
            head.append(nl.BatchNorm1d(c.vocab_size, momentum=c.bn_momentum))
        self.head = nn.Sequential(*head)
        initialize_(self, generator if generator is not None else torch.Generator().manual_seed(0))
        if verbose:
            print(f"MLPLanguageModel: {self.num_params():,} parameters")

    def _norm(self, width: int) -> nn.Module:
        norm = self.config.norm
        if norm == "batch":
            return nl.BatchNorm1d(width, momentum=self.config.bn_momentum)
        if norm == "layer":
            return nl.LayerNorm(width)
        if norm == "group":
            return nl.GroupNorm(self.config.n_groups, width)
        return nn.Identity()

    def _activation(self) -> nn.Module:
        return nl.Tanh() if self.config.nonlinearity == "tanh" else nl.ReLU()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        emb = self.embedding(idx)  # (B, T, n_embd)
        x = self.embed_dropout(self.flatten(emb))  # (B, T * n_embd)
        x = self.blocks(x)  # (B, n_hidden)
        logits = self.head(x)  # (B, vocab_size)
        loss = None if targets is None else F.cross_entropy(logits, targets)
        return logits, loss


def uniform_loss(vocab_size: int) -> float:
    """The loss of a uniform prediction, ln(vocab_size): where a well-initialized model starts."""
    return math.log(vocab_size)
