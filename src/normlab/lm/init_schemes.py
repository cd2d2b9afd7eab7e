"""How ``LanguageModel``'s weights start: one pass per initialization scheme.

The model builds its layers without drawing a random number; ``initialize_``
then fills every weight from one generator, in a fixed order, by the scheme
its config names:

- ``naive``: every weight and bias plain ``randn`` (makemore part 3's first net);
- ``lecture``: the same tensors with the lecture's hand-tuned scales
  (``LectureScales``), which ``normlab experiment lecture`` varies stage by stage;
- ``kaiming``: hidden weights ``N(0, gain² / fan_in)`` (He et al. 2015), no
  bias before a BatchNorm, and a small output layer so the loss starts near
  ``ln(vocab_size)``;
- ``lsuv``: ``kaiming`` at construction, then :func:`normlab.lsuv.lsuv_` on a
  batch of real contexts when a run starts (``lsuv_init_``).
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from normlab import init
from normlab import nn as nl
from normlab.lm.seeds import stream_generator
from normlab.lsuv import LSUVLayer, lsuv_

LSUV_BATCH = 1024  # training contexts in the one batch LSUV measures on


@dataclass(frozen=True)
class LectureScales:
    """makemore part 3's multipliers on plain ``randn`` tensors.

    The defaults are the lecture's final recipe: the first hidden layer's
    pre-activations small enough that tanh does not saturate, and the output
    layer's logits near zero so the softmax is not confidently wrong. With an
    output BatchNorm, the BatchNorm's gain sets the logits' scale instead.
    """

    hidden_weight: float = 0.2  # the first hidden Linear
    hidden_bias: float = 0.01
    head_weight: float = 0.01  # the output Linear
    head_bias: float = 0.0
    head_bn_gain: float = 0.1  # the output BatchNorm's gain, where there is one


def _linears(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nl.Linear)]


def _output_batchnorm(model: nn.Module) -> nn.Module | None:
    return next((m for m in model.head if isinstance(m, nl.BatchNorm1d)), None)


@torch.no_grad()
def scale_lecture_(model: nn.Module, scales: LectureScales = LectureScales()) -> None:
    """Multiply a ``naive`` model's ``randn`` tensors by the lecture's scales."""
    hidden, (head,) = _linears(model.blocks), _linears(model.head)
    output_bn = _output_batchnorm(model)
    if output_bn is not None:
        output_bn.weight.mul_(scales.head_bn_gain)
    else:
        head.weight.mul_(scales.head_weight)
        head.bias.mul_(scales.head_bias)
    if hidden:
        hidden[0].weight.mul_(scales.hidden_weight)
        if hidden[0].bias is not None:
            hidden[0].bias.mul_(scales.hidden_bias)


def _randn_(model: nn.Module, g: torch.Generator) -> None:
    """Every Linear's weight, then every Linear's bias, from ``N(0, 1)``."""
    linears = _linears(model.blocks) + _linears(model.head)
    for layer in linears:
        layer.weight.normal_(generator=g)
    for layer in linears:
        if layer.bias is not None:
            layer.bias.normal_(generator=g)


def _kaiming_(model: nn.Module, g: torch.Generator) -> None:
    """Hidden weights for their nonlinearity (and ``gain``); a small output layer."""
    c = model.config
    for layer in _linears(model.blocks):
        init.kaiming_normal_(layer.weight, nonlinearity=c.nonlinearity, generator=g)
        if c.gain is not None:
            layer.weight.mul_(c.gain / init.calculate_gain(c.nonlinearity))
    (head,) = _linears(model.head)
    # The output layer's draw follows a discarded one of its size: the generator's sequence
    # fixes every seed's weights, and the checkpoints and results in docs/ were drawn so.
    torch.empty_like(head.weight).normal_(generator=g)
    init.kaiming_normal_(head.weight, nonlinearity="linear", generator=g)
    # logits near zero at step 0: the loss starts near ln(vocab_size), not confidently wrong
    output_bn = _output_batchnorm(model)
    (head.weight if output_bn is None else output_bn.weight).mul_(0.1)
    if c.param == "mup":  # μP's output layer starts at zero, at any width (normlab.lm.mup)
        head.weight.zero_()


@torch.no_grad()
def initialize_(model: nn.Module, generator: torch.Generator) -> None:
    """Fill a ``LanguageModel``'s weights by its config's scheme, drawing from ``generator``.

    The embedding is ``randn`` in every scheme; Linear biases start at zero
    except under ``naive`` and ``lecture``; normalization layers keep their
    own start (gain 1, bias 0) but for an output BatchNorm's gain.
    """
    scheme = model.config.init
    model.embedding.weight.normal_(generator=generator)
    if scheme in ("naive", "lecture"):
        _randn_(model, generator)
        if scheme == "lecture":
            scale_lecture_(model)
    else:  # kaiming, and lsuv until lsuv_init_ runs on data
        _kaiming_(model, generator)


def lsuv_init_(model: nn.Module, X: Tensor, seed: int) -> list[LSUVLayer] | None:
    """``init=lsuv``: LSUV on the hidden Linears with one batch of training contexts ``X``;
    for any other scheme, nothing (None).

    The batch and the orthonormal matrices come from their own generator, so the
    batch order (and every other random draw of a run) is the same as with any
    other scheme. The output layer keeps its small Kaiming start.
    """
    if model.config.init != "lsuv":
        return None
    g = stream_generator(seed, "lsuv")
    ix = torch.randint(0, len(X), (LSUV_BATCH,), generator=g)
    return lsuv_(model, X[ix.to(X.device)], layers=_linears(model.blocks), generator=g)


def describe_lsuv(layers: list[LSUVLayer]) -> str:
    """One line: how many hidden layers LSUV scaled, the variance reached, the iterations."""
    scaled = [r for r in layers if r.target is not None]
    line = f"lsuv: {len(scaled)} of {len(layers)} hidden layers scaled"
    if scaled:
        line += (
            f", variance after {scaled[0].feeds} {min(r.variance for r in scaled):.3f}–"
            f"{max(r.variance for r in scaled):.3f} (target {scaled[0].target:.3f}), "
            f"at most {max(r.iterations for r in scaled)} iterations"
        )
    if len(scaled) < len(layers):
        line += f"; {len(layers) - len(scaled)} skipped: they feed a normalization"
    return line
