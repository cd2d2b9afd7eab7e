r"""The Maximal Update Parametrization (μP) of normlab's MLP language model (``--param mup``).

Yang et al., "Tensor Programs V" (2022), table 3: with the width multiplier
:math:`m = n_{hidden} / n_{base}` (``--base-width``), each parameter is scaled by how many of
its dimensions grow with the width. With :math:`\eta` the learning rate a schedule gives:

==================================  ======================  ==================  ==================
parameter (its dimensions)          initialization          Adam(W) rate        SGD rate
==================================  ======================  ==================  ==================
embedding (vocab × n_embd: none)    N(0, 1), as standard    η                   η
first hidden Linear (input-like:    N(0, gain²/fan_in)      η                   η·m
fan-out grows)
hidden Linear (matrix-like: both)   N(0, gain²/fan_in)      η/m (decay ×m)      η
norm gains and biases (vector:      1 and 0                 η                   η·m
n_hidden)
output Linear (output-like: fan-in  zero; its logits are    η                   η·m
grows)                              multiplied by 1/m
==================================  ======================  ==================  ==================

At :math:`m = 1` (``n_hidden = base_width``) every rate is the standard one and only the output
layer differs (zero start, multiplier 1). AdamW's decoupled decay is multiplied by ``m`` where
the rate is divided by it, so that their product, what the decay does per step, stays put.

What it covers, and what it chooses:

- BatchNorm, LayerNorm and GroupNorm after a hidden Linear: their gains and biases are
  vector-like (the table's row); the normalization already makes the Linear's output size
  width-independent, and its update is scaled as a hidden Linear's.
- Residual blocks: each hidden Linear keeps its own row; the skip adds nothing to scale
  along the width (scaling along depth is another matter, not this parametrization).
- Not covered, and refused: ``--arch wavenet`` (its blocks' fan-in doubles with the fusing,
  which the table above does not describe), ``--output-bn`` (a BatchNorm on the logits undoes
  the output multiplier) and any ``--init`` but ``kaiming``.
"""

from torch import nn

from normlab import nn as nl
from normlab.lm.config import ModelConfig


def width_multiplier(config: ModelConfig) -> float:
    """``m = n_hidden / base_width`` under μP; 1 under the standard parametrization."""
    if config.param != "mup":
        return 1.0
    return config.n_hidden / (config.base_width or config.n_hidden)


def output_multiplier(config: ModelConfig) -> float:
    """What the logits are multiplied by: 1/m under μP."""
    return 1.0 / width_multiplier(config)


def rate_scales(model: nn.Module, optimizer: str) -> dict[int, tuple[float, float]]:
    """Each parameter's ``(learning-rate scale, weight-decay scale)`` by the table above,
    keyed by ``id(parameter)``, for ``optimizer`` ``"adamw"`` or ``"sgd"``."""
    m = width_multiplier(model.config)
    linears = [layer for block in model.blocks for layer in block if isinstance(layer, nl.Linear)]
    hidden = {id(p) for layer in linears[1:] for p in layer.parameters() if p.dim() >= 2}
    fixed = {id(model.embedding.weight)}
    scales = {}
    for p in model.parameters():
        if id(p) in fixed:
            scales[id(p)] = (1.0, 1.0)
        elif id(p) in hidden:  # matrix-like
            scales[id(p)] = (1 / m, m) if optimizer == "adamw" else (1.0, 1.0)
        else:  # input-like, output-like, gains and biases: one dimension grows
            scales[id(p)] = (1.0, 1.0) if optimizer == "adamw" else (m, 1 / m)
    return scales
