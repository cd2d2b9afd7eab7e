"""The coord check: its slopes are least squares of log size on log width, it flags the standard
parametrization's drift under Adam and passes μP, and it runs on models of torch layers."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.coordcheck import _slope, coord_check

WIDTHS = [64, 128, 256, 512]


def _batches(n=3, features=16, classes=10):
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(64, features, generator=g), torch.randint(0, classes, (64,), generator=g))
        for _ in range(n)
    ]


def _ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


class Readout(nn.Linear):
    """μP's output layer, as mup's ``MuReadout``: its input multiplied by 1/m."""

    def __init__(self, width: int, classes: int, multiplier: float):
        super().__init__(width, classes)
        self.multiplier = multiplier
        nn.init.zeros_(self.weight)  # zero logits at any width
        nn.init.zeros_(self.bias)

    def forward(self, x):
        return super().forward(x * self.multiplier)


class MLP(nn.Module):
    """Two hidden ReLU layers; with ``base``, μP's readout (multiplier 1/m, zero start)."""

    def __init__(self, width: int, base: int | None = None):
        super().__init__()
        self.inp, self.hidden = nn.Linear(16, width), nn.Linear(width, width)
        self.act1, self.act2 = nn.ReLU(), nn.ReLU()
        self.multiplier = 1.0 if base is None else base / width
        self.out = nn.Linear(width, 10) if base is None else Readout(width, 10, self.multiplier)

    def forward(self, x):
        return self.out(self.act2(self.hidden(self.act1(self.inp(x)))))


def _mup_adam(model: MLP, lr=1e-2):
    """μP's Adam: the hidden (matrix-like) weight's rate divided by the width multiplier."""
    m = 1 / model.multiplier
    hidden = [model.hidden.weight]
    rest = [p for p in model.parameters() if p is not model.hidden.weight]
    return torch.optim.Adam([{"params": hidden, "lr": lr / m}, {"params": rest, "lr": lr}])


def test_the_slope_is_the_least_squares_fit_of_log_size_on_log_width():
    sizes = [0.3, 0.7, 1.1, 2.9]
    expected = np.polyfit(np.log(WIDTHS), np.log(sizes), 1)[0]
    assert _slope(WIDTHS, sizes) == pytest.approx(expected, rel=1e-12)
    assert _slope(WIDTHS, [w**0.5 for w in WIDTHS]) == pytest.approx(0.5, rel=1e-12)


def test_under_the_standard_parametrization_adam_makes_layers_grow_with_width():
    check = coord_check(
        MLP,
        WIDTHS,
        _batches(),
        steps=3,
        loss_fn=_ce,
        optimizer=lambda m: torch.optim.Adam(m.parameters(), lr=1e-2),
    )
    slopes = check.slopes
    assert all(abs(s[0]) < 0.1 for s in slopes.values())  # flat at initialization
    assert {"hidden", "out"} <= set(check.flagged)  # then the updates grow with the width
    assert slopes["out"][2] > 0.5
    assert "grows with width" in check.table()


def test_under_mup_every_layer_stays_flat():
    base = WIDTHS[0]
    check = coord_check(
        lambda w: MLP(w, base), WIDTHS, _batches(), steps=3, loss_fn=_ce, optimizer=_mup_adam
    )
    assert check.flagged == {}, check.table()


def test_it_runs_on_a_conv_net_and_a_gpt_like_model_and_draws_one_panel_per_step(tmp_path):
    def conv(width):
        return nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(width, 10),
        )

    g = torch.Generator().manual_seed(0)
    images = [(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g))]
    check = coord_check(conv, [8, 16, 32], images * 2, steps=2, loss_fn=_ce, seeds=[0])
    assert {"0", "1", "3", "4", "8"} <= set(check.slopes)
    assert check.plot(tmp_path / "conv.png").stat().st_size > 0

    class GPT(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.embed = nn.Embedding(32, width)
            layer = nn.TransformerEncoderLayer(width, 2, 2 * width, dropout=0.0, batch_first=True)
            self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(width, 32)

        def forward(self, idx):
            mask = nn.Transformer.generate_square_subsequent_mask(idx.size(1))
            return self.head(self.blocks(self.embed(idx), mask=mask, is_causal=True))

    tokens = [torch.randint(0, 32, (8, 12), generator=g) for _ in range(2)]

    def lm_loss(model, idx):
        return F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())

    check = coord_check(GPT, [16, 32, 64], tokens, steps=2, loss_fn=lm_loss, seeds=[0])
    assert "head" in check.slopes and "blocks.layers.0.linear1" in check.slopes
    assert all(len(s) == 2 and all(math.isfinite(v) for v in s) for s in check.slopes.values())


def test_a_factory_without_a_width_or_with_one_size_is_one_line():
    with pytest.raises(ValueError, match="the factory must take a width") as raised:
        coord_check(lambda: nn.Linear(2, 2), WIDTHS, _batches(), steps=2, loss_fn=_ce)
    assert "\n" not in str(raised.value)
    with pytest.raises(ValueError, match="at widths 64 and 128: the width changes nothing"):
        coord_check(lambda w: MLP(32), WIDTHS, _batches(), steps=2, loss_fn=_ce)
    with pytest.raises(ValueError, match="4 steps need 4 batches; data gave 3"):
        coord_check(MLP, WIDTHS, _batches(3), steps=4, loss_fn=_ce)


def test_along_depth_it_compares_the_layers_every_depth_has():
    def deep(depth):  # a plain tanh MLP of `depth` hidden layers: layers 0..2·depth+1
        layers = [nn.Linear(16, 32), nn.Tanh()]
        for _ in range(depth - 1):
            layers += [nn.Linear(32, 32), nn.Tanh()]
        return nn.Sequential(*layers, nn.Linear(32, 10))

    check = coord_check(deep, [2, 4, 8], _batches(), steps=2, loss_fn=_ce, along="depth")
    # the shallowest net has layers 0..4; its readout "4" is a hidden layer of the deeper ones,
    # so it is compared too, while the deeper nets' own layers 5.. are left out
    assert sorted(check.slopes) == ["0", "1", "2", "3", "4"]
    assert "against log depth" in check.table()
    with pytest.raises(ValueError, match="the factory must take a depth"):
        coord_check(lambda: deep(2), [2, 4], _batches(), steps=1, loss_fn=_ce, along="depth")
