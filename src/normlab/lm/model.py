"""The character-level MLP language model (Bengio et al. 2003, as in makemore).

``arch mlp``: embedding table → flattened context → ``n_layer`` hidden blocks
``Linear → norm → nonlinearity`` (optionally with skip connections) → output
``Linear`` (→ optional output BatchNorm, as in the lecture's deep network).

``arch wavenet`` (makemore part 5, after van den Oord et al. 2016): the same
blocks, each starting by fusing pairs of consecutive positions, so a context of
``2 ** n_layer`` characters is merged level by level, ``(B, 8, C) → (B, 4, H)
→ (B, 2, H) → (B, H)``, and each BatchNorm normalizes over the batch and the
positions.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab import nn as nl
from normlab.lm.config import ModelConfig
from normlab.lm.init_schemes import initialize_
from normlab.lm.mup import output_multiplier


class Block(nn.Sequential):
    r"""``Linear → norm → nonlinearity [→ dropout]``, with an optional skip
    :math:`x + \alpha \cdot \text{block}(x)`.

    ``branch_scale`` :math:`\alpha` is 1, or :math:`1/\sqrt{2 L}` for ``L`` blocks
    (``--residual-scale depth``, as GPT-2 scales its residual projections): with roughly
    independent branches of variance :math:`v`, the sum's variance is :math:`v (1 + (L - 1)/(2L))
    < 1.5 v` at any depth, against :math:`L v` unscaled.
    """

    def __init__(self, *layers: nn.Module, residual: bool = False, branch_scale: float = 1.0):
        super().__init__(*layers)
        self.residual = residual
        self.branch_scale = branch_scale

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        if not self.residual:
            return out
        return x + out if self.branch_scale == 1.0 else x + self.branch_scale * out

    def extra_repr(self) -> str:
        scaled = f", branch_scale={self.branch_scale:.4g}" if self.branch_scale != 1.0 else ""
        return f"residual=True{scaled}" if self.residual else ""


class Readout(nl.Linear):
    """μP's output layer (``--param mup``): a Linear whose input is multiplied by
    ``multiplier`` (1/m, ``normlab.lm.mup``), so that the bias is not (mup's ``MuReadout``)."""

    def __init__(self, fan_in: int, fan_out: int, multiplier: float, **kwargs) -> None:
        super().__init__(fan_in, fan_out, **kwargs)
        self.multiplier = multiplier

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x * self.multiplier)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", multiplier={self.multiplier:g}"


def next_char_loss(logits: Tensor, targets: Tensor, over: int | None = None) -> Tensor:
    r"""The cross-entropy of the next character: :math:`-\sum_i \log p(y_i \mid x_i)` over the
    rows, divided by ``over`` (a step on one process's rows: the global batch; 1: the sum),
    or their mean.

    ``logits`` (B, vocab_size), ``targets`` (B,).
    """
    if over is None:
        return F.cross_entropy(logits, targets)
    return F.cross_entropy(logits, targets, reduction="sum") / over


def batch_mean_loss(model: "LanguageModel", batch: tuple[Tensor, Tensor]) -> Tensor:
    """The mean loss of a batch ``(x, y)``: what the instruments of ``normlab.curvature``,
    ``normlab.noise``, ``normlab.find_lr`` and ``normlab.coord_check`` take as
    ``loss_fn(model, batch)``."""
    _, loss = model(*batch)
    return loss


class LanguageModel(nn.Module):
    """Predict the next character from the previous ``block_size`` characters.

    ``forward(idx, targets=None)`` takes ``idx`` of shape ``(B, block_size)``
    and returns ``(logits, loss)``: logits ``(B, vocab_size)`` and the mean
    cross-entropy against ``targets`` ``(B,)``, or ``None`` without targets.
    ``generator`` draws the initial weights by the config's scheme (see
    :mod:`normlab.lm.init_schemes`); ``verbose`` prints the parameter count.

    Example:
        >>> model = LanguageModel(ModelConfig(block_size=3, n_layer=2, n_hidden=32), verbose=False)
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
        hierarchical = c.arch == "wavenet"
        # wavenet's blocks flatten the context pair by pair; mlp flattens it all at once
        self.flatten = nn.Identity() if hierarchical else nl.FlattenContext()
        # whole characters' embeddings vanish at random: the context, not one layer, is noised
        self.embed_dropout = nn.Dropout(c.embed_dropout) if c.embed_dropout > 0 else nn.Identity()
        hidden_bias = c.norm != "batch" if c.bias is None else c.bias
        blocks, positions = [], c.block_size
        branch_scale = 1 / math.sqrt(2 * c.n_layer) if c.residual_scale == "depth" else 1.0
        fan_in = c.n_embd if hierarchical else c.block_size * c.n_embd
        for _ in range(c.n_layer):
            layers = []
            if hierarchical:
                layers.append(nl.FlattenConsecutive(2))
                positions, fan_in = positions // 2, fan_in * 2
            linear = nl.Linear(fan_in, c.n_hidden, bias=hidden_bias, init=nn.init.zeros_)
            layers += [linear, self._norm(c.n_hidden, positions), self._activation()]
            if c.dropout > 0:
                layers.append(nn.Dropout(c.dropout))
            residual = c.residual and fan_in == c.n_hidden
            blocks.append(Block(*layers, residual=residual, branch_scale=branch_scale))
            fan_in = c.n_hidden
        self.blocks = nn.Sequential(*blocks)
        readout = dict(bias=not c.output_bn, init=nn.init.zeros_)
        if c.param == "mup":
            head = [Readout(fan_in, c.vocab_size, output_multiplier(c), **readout)]
        else:
            head = [nl.Linear(fan_in, c.vocab_size, **readout)]
        if c.output_bn:
            head.append(nl.BatchNorm1d(c.vocab_size, momentum=c.bn_momentum))
        self.head = nn.Sequential(*head)
        initialize_(self, generator if generator is not None else torch.Generator().manual_seed(0))
        if verbose:
            print(f"LanguageModel: {self.num_params():,} parameters")

    def _norm(self, width: int, positions: int) -> nn.Module:
        """The norm of a block whose output is ``(B, width)``, or ``(B, positions, width)``
        under arch wavenet while more than one position is left."""
        c = self.config
        if c.norm == "batch" and c.arch == "wavenet" and positions > 1:
            if not c.bn_over_positions:  # a statistic (and a gain) per position and channel
                return nn.Sequential(
                    nn.Flatten(1),  # (B, positions * width)
                    nl.BatchNorm1d(positions * width, momentum=c.bn_momentum),
                    nn.Unflatten(1, (positions, width)),
                )
            return nl.BatchNorm1d(width, momentum=c.bn_momentum, channels_last=True)
        if c.norm == "batch":
            return nl.BatchNorm1d(width, momentum=c.bn_momentum)
        if c.norm == "layer":
            return nl.LayerNorm(width)
        if c.norm == "group":
            return nl.GroupNorm(c.n_groups, width)
        return nn.Identity()

    def _activation(self) -> nn.Module:
        return nl.Tanh() if self.config.nonlinearity == "tanh" else nl.ReLU()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        emb = self.embedding(idx)  # (B, T, n_embd)
        x = self.embed_dropout(self.flatten(emb))  # (B, T * n_embd); wavenet: (B, T, n_embd)
        x = self.blocks(x)  # (B, n_hidden)
        logits = self.head(x)  # (B, vocab_size)
        loss = None if targets is None else next_char_loss(logits, targets)
        return logits, loss
