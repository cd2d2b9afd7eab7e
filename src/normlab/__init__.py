"""normlab: deep character-level MLP language models whose activations and gradients behave.

Kaiming initialization, hand-written BatchNorm with running statistics and
calibration, the alternatives (LayerNorm, GroupNorm, residuals, AdamW), and a
CLI to train, sample and evaluate. Submodules, lowest first: ``init``, ``nn``,
``calibrate``, ``data``, ``model``, ``sample``, ``train``, ``cli``.
"""

__version__ = "0.1.0"
