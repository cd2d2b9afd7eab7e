"""The character-level MLP language model (Bengio et al. 2003, as in makemore) and its config.

embedding table → flattened context → ``n_layer`` hidden blocks
``Linear → norm → nonlinearity`` (optionally with skip connections) → output
``Linear`` (→ optional output BatchNorm, as in the lecture's deep network).
"""

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab import init as nl_init
from normlab import nn as nl
from normlab.errors import NormlabError
from normlab.lsuv import LSUVLayer, lsuv_

NORMS = ("batch", "layer", "group", "none")
NONLINEARITIES = ("tanh", "relu")
INITS = ("naive", "lecture", "kaiming", "lsuv")


class ConfigError(NormlabError):
    """A model or training configuration that cannot work."""


def check_choices(config, choices: dict[str, tuple[str, ...]]) -> None:
    """Raise ConfigError for a field of ``config`` outside its valid choices, naming them."""
    for name, valid in choices.items():
        value = getattr(config, name)
        if value not in valid:
            raise ConfigError(f"unknown {name} {value!r}; valid choices: {', '.join(valid)}")


@dataclass
class ModelConfig:
    vocab_size: int = 27  # filled in from the data: characters + the boundary token
    block_size: int = 3  # context length: how many characters predict the next one
    n_embd: int = 10  # embedding dimensions per character
    n_hidden: int = 100  # width of each hidden layer
    n_layer: int = 5  # hidden blocks Linear → norm → nonlinearity
    norm: str = "batch"  # batch | layer | group | none
    nonlinearity: str = "tanh"  # tanh | relu
    residual: bool = False  # skip connections around hidden blocks of equal width
    init: str = "kaiming"  # naive (plain randn) | lecture (hand-tuned scales) | kaiming | lsuv
    gain: float | None = None  # init=kaiming: hidden weights' gain; None: the nonlinearity's
    output_bn: bool = False  # BatchNorm after the output Linear (the lecture's deep net)
    bias: bool | None = None  # hidden Linear biases; None: wherever no BatchNorm follows
    n_groups: int = 4  # groups for norm=group; must divide n_hidden
    bn_momentum: float = 0.1  # running-statistics momentum of every BatchNorm
    dropout: float = 0.0  # dropout after each hidden block's nonlinearity (training only)
    embed_dropout: float = 0.0  # dropout on the flattened context embeddings (training only)

    def validate(self) -> None:
        """Raise ConfigError for a field that cannot work, naming the valid choices."""
        check_choices(self, {"norm": NORMS, "nonlinearity": NONLINEARITIES, "init": INITS})
        for name in ("vocab_size", "block_size", "n_embd", "n_hidden"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.n_layer < 0:
            raise ConfigError(f"n_layer must be at least 0, got {self.n_layer}")
        if self.norm == "batch" and self.bias:
            raise ConfigError(
                "a Linear that feeds a BatchNorm needs no bias: the BatchNorm subtracts the batch "
                "mean, which cancels it (the BatchNorm's own bias takes its place); drop --bias"
            )
        if self.gain is not None and (self.init != "kaiming" or not self.gain > 0):
            raise ConfigError(f"gain must be a positive number with init kaiming, got {self.gain}")
        if self.n_groups < 1:
            raise ConfigError(f"n_groups must be at least 1, got {self.n_groups}")
        if self.norm == "group" and self.n_hidden % self.n_groups != 0:
            raise ConfigError(
                f"n_hidden ({self.n_hidden}) must be divisible by n_groups ({self.n_groups})"
            )
        if not 0.0 <= self.bn_momentum <= 1.0:
            raise ConfigError(f"bn_momentum must be in [0, 1], got {self.bn_momentum}")
        for name in ("dropout", "embed_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


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
    ``generator`` draws the initial weights; ``verbose`` prints the parameter count.
    """

    def __init__(
        self, config: ModelConfig, generator: torch.Generator | None = None, verbose: bool = True
    ) -> None:
        super().__init__()
        config.validate()
        self.config = c = config
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        randn_init = lambda w: w.normal_(generator=g)  # noqa: E731
        self.embedding = nn.Embedding(
            c.vocab_size, c.n_embd, _weight=torch.randn(c.vocab_size, c.n_embd, generator=g)
        )
        self.flatten = nl.FlattenContext()
        # whole characters' embeddings vanish at random: the context, not one layer, is noised
        self.embed_dropout = nn.Dropout(c.embed_dropout) if c.embed_dropout > 0 else nn.Identity()
        hidden_bias = c.norm != "batch" if c.bias is None else c.bias
        blocks, fan_in = [], c.block_size * c.n_embd
        for _ in range(c.n_layer):
            linear = nl.Linear(
                fan_in,
                c.n_hidden,
                bias=hidden_bias,
                nonlinearity=c.nonlinearity,
                init=randn_init if c.init in ("naive", "lecture") else None,
                generator=g,
            )
            layers = [linear, self._norm(c.n_hidden), self._activation()]
            if c.dropout > 0:
                layers.append(nn.Dropout(c.dropout))
            blocks.append(Block(*layers, residual=c.residual and fan_in == c.n_hidden))
            fan_in = c.n_hidden
        self.blocks = nn.Sequential(*blocks)
        head = [
            nl.Linear(
                fan_in,
                c.vocab_size,
                bias=not c.output_bn,
                generator=g,
                init=randn_init if c.init in ("naive", "lecture") else None,
            )
        ]
        if c.output_bn:
            head.append(nl.BatchNorm1d(c.vocab_size, momentum=c.bn_momentum))
        self.head = nn.Sequential(*head)
        self._scale_initial_weights(g)
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

    @torch.no_grad()
    def _scale_initial_weights(self, g: torch.Generator) -> None:
        """The per-scheme fixes on top of the layers' own initialization."""
        linears = [b[0] for b in self.blocks] + [self.head[0]]
        if self.config.init in ("naive", "lecture"):
            for layer in linears:
                if layer.bias is not None:
                    layer.bias.normal_(generator=g)  # the lecture's b = torch.randn(...)
        if self.config.init == "lecture":
            # fix the confidently wrong softmax: near-zero logits at step 0
            if self.config.output_bn:
                self.head[1].weight.mul_(0.1)  # the BatchNorm sets the logits' scale
            else:
                self.head[0].weight.mul_(0.01)
                self.head[0].bias.zero_()
            if len(linears) > 1:  # fix the saturated tanh of the first hidden layer
                linears[0].weight.mul_(0.2)
                if linears[0].bias is not None:
                    linears[0].bias.mul_(0.01)
        if self.config.gain is not None:  # the layers drew with the nonlinearity's gain
            rescale = self.config.gain / nl_init.calculate_gain(self.config.nonlinearity)
            for layer in linears[:-1]:
                layer.weight.mul_(rescale)
        if self.config.init in ("kaiming", "lsuv"):  # lsuv_() later replaces the hidden weights
            # The output starts "less confident": its logits near zero, so the loss at
            # step 0 is near ln(vocab_size) rather than confidently wrong.
            nl_init.kaiming_normal_(self.head[0].weight, nonlinearity="linear", generator=g)
            if self.config.output_bn:
                self.head[1].weight.mul_(0.1)
            else:
                self.head[0].weight.mul_(0.1)

    def lsuv_(self, idx: Tensor, generator: torch.Generator | None = None) -> list[LSUVLayer]:
        """``init=lsuv``: :func:`normlab.lsuv.lsuv_` on the hidden Linears with a real batch.

        Until it runs, an ``init=lsuv`` model holds the ``init=kaiming``
        weights. The output layer keeps its small Kaiming start (logits near
        zero), so the two inits differ only in the hidden layers.
        """
        return lsuv_(self, idx, layers=[block[0] for block in self.blocks], generator=generator)

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
