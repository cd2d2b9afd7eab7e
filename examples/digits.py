"""A deep ReLU conv net on scikit-learn's bundled digits, four ways, judged by normlab.

    python examples/digits.py

The data is scikit-learn's 1,797 handwritten digits (8×8 pixels, bundled with
the package: nothing is downloaded), split 80/20. The same 10-layer conv net
(16 channels, 3×3, ReLU) is trained four ways: naive (``randn`` weights, std 1
whatever the fan-in), Kaiming, Kaiming with BatchNorm, and Kaiming with
BatchNorm and residual connections. For each it prints the verdicts of
``normlab.audit`` at initialization, the test accuracy after training (or the
step at which the loss stopped being finite), and the verdicts of the last
recording during training. Then it calibrates the BatchNorm model's statistics over the training
set and folds every BatchNorm into its convolution, and checks that the folded
model classifies the test set as the unfolded one does.
"""

import time

import torch
from sklearn.datasets import load_digits
from torch import nn

import normlab
from normlab.calibrate import calibrate_batchnorm
from normlab.diagnostics import Diagnostics, judge_recording
from normlab.fold import fold_batchnorm

DEPTH, WIDTH, STEPS, BATCH = 10, 16, 300, 64


class Block(nn.Module):
    """conv 3×3 → [BatchNorm] → ReLU, with an optional skip connection."""

    def __init__(self, batchnorm: bool, residual: bool):
        super().__init__()
        self.conv = nn.Conv2d(WIDTH, WIDTH, 3, padding=1, bias=not batchnorm)
        self.norm = nn.BatchNorm2d(WIDTH) if batchnorm else nn.Identity()
        self.relu = nn.ReLU()  # a module, so that the diagnostics record it
        self.residual = residual

    def forward(self, x):
        out = self.relu(self.norm(self.conv(x)))
        return x + out if self.residual else out


def conv_net(way: str) -> nn.Module:
    batchnorm, residual = way in ("kaiming + batchnorm", "residual"), way == "residual"
    model = nn.Sequential(
        nn.Conv2d(1, WIDTH, 3, padding=1),
        nn.ReLU(),
        *[Block(batchnorm, residual) for _ in range(DEPTH - 1)],
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(WIDTH, 10),
    )
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                if way == "naive":
                    m.weight.normal_()  # std 1, whatever the fan-in
                else:
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    m.bias.zero_()
    return model


def accuracy(model: nn.Module, X, y) -> float:
    with normlab.nn.set_mode(model, training=False), torch.no_grad():
        return (model(X).argmax(1) == y).float().mean().item()


def train(model: nn.Module, X, y) -> tuple[Diagnostics, int | None]:
    """SGD with momentum; a recording every 50 steps. Returns the diagnostics and the step at
    which the loss stopped being finite, if it did."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    diagnostics = Diagnostics(model)
    g = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        ix = torch.randint(0, len(X), (BATCH,), generator=g)
        if step % 50 == 0:
            diagnostics.arm()
        loss = nn.functional.cross_entropy(model(X[ix]), y[ix])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if diagnostics.armed:
            diagnostics.collect(step, loss.item())
        if not torch.isfinite(loss):
            return diagnostics, step
    return diagnostics, None


def verdicts(report) -> str:
    return "".join(f"\n    {v.kind} at {v.layer}: {v.message}" for v in report.verdicts) or " none"


def split_digits():
    """scikit-learn's digits as (N, 1, 8, 8) images in [0, 1], split 80/20 at random (seed 0):
    ``Xtr, ytr, Xte, yte``."""
    digits = load_digits()
    X = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16  # (N, 1, 8, 8)
    y = torch.tensor(digits.target)
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    train_ix, test_ix = order[: int(0.8 * len(X))], order[int(0.8 * len(X)) :]
    return X[train_ix], y[train_ix], X[test_ix], y[test_ix]


def main() -> None:
    start = time.perf_counter()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    Xtr, ytr, Xte, yte = split_digits()
    print(f"digits: {len(Xtr)} training and {len(Xte)} test images; a {DEPTH}-layer ReLU conv net")
    models = {}
    for way in ("naive", "kaiming", "kaiming + batchnorm", "residual"):
        torch.manual_seed(0)
        model = conv_net(way)
        loss_fn = lambda out, _: nn.functional.cross_entropy(out, ytr[:256])  # noqa: E731
        at_init = normlab.audit(model, (Xtr[:256],), loss_fn, num_classes=10)
        diagnostics, diverged = train(model, Xtr, ytr)
        last = judge_recording(diagnostics, num_classes=10)
        print(f"\n{way}")
        print(f"  verdicts at initialization:{verdicts(at_init.report)}")
        if diverged is not None:
            print(f"  the loss stopped being finite at step {diverged}")
        else:
            print(f"  test accuracy after {STEPS} steps: {accuracy(model, Xte, yte):.1%}")
            print(f"  verdicts at step {last.snapshot.step}:{verdicts(last)}")
        models[way] = model

    print("\nthe BatchNorm model, calibrated over the training set and folded for deployment:")
    model = models["kaiming + batchnorm"]
    calibrate_batchnorm(model, Xtr)
    folded = fold_batchnorm(model, Xte[:8], log=lambda line: print("  " + line))
    with torch.no_grad():
        same = torch.equal(model.eval()(Xte).argmax(1), folded(Xte).argmax(1))
        gap = (model(Xte) - folded(Xte)).abs().max().item()
    calibrated, after = accuracy(model, Xte, yte), accuracy(folded, Xte, yte)
    print(f"  test accuracy: calibrated {calibrated:.1%}, folded {after:.1%}")
    print(f"  the folded model gives the same classes: {same} (largest logit difference {gap:.1e})")
    print(f"\n{time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
