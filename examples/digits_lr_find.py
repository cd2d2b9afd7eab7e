"""normlab.find_lr on a model normlab did not build: the digits conv net, against a grid.

    python examples/digits_lr_find.py

The 10-layer ReLU conv net of ``examples/digits.py`` with BatchNorm, trained as there (SGD
with momentum 0.9, batches of 64, 300 steps), with the rate decaying from its peak on a cosine
(the range test suggests a peak rate, as the presets' schedules use one), at each peak rate of
a grid of seven half-decades and at the rate ``normlab.find_lr`` suggests (100 batches, 1e-7
to 10), each from the same initial weights. It prints each one's test loss and whether the
suggestion's is within 0.02 of the grid's best.
"""

import torch
from digits import BATCH, STEPS, conv_net, split_digits
from torch import nn

import normlab

GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
WITHIN = 0.02


def batches(X, y, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        ix = torch.randint(0, len(X), (BATCH,), generator=g)
        yield X[ix], y[ix]


def loss_fn(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def test_loss(lr: float, initial: dict, X, y, Xte, yte) -> float:
    model = conv_net("kaiming + batchnorm")
    model.load_state_dict(initial)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    # the suggestion is a peak rate: decay from it, as the presets' schedules do
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, STEPS)
    for batch in batches(X, y, STEPS, seed=1):
        loss = loss_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    with normlab.nn.set_mode(model, training=False), torch.no_grad():
        return nn.functional.cross_entropy(model(Xte), yte).item()


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    Xtr, ytr, Xte, yte = split_digits()
    model = conv_net("kaiming + batchnorm")
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sweep = normlab.find_lr(model, batches(Xtr, ytr, 100, seed=2), optimizer, loss_fn)
    print(
        f"digits conv net (SGD, momentum 0.9, cosine decay, {STEPS} steps): find_lr suggests "
        f"{sweep.suggestion:.3g} (sweep stopped: {sweep.stopped})"
    )
    losses = {}
    for lr in (*GRID, sweep.suggestion):
        losses[lr] = test_loss(lr, initial, Xtr, ytr, Xte, yte)
        mark = "  (suggested)" if lr == sweep.suggestion else ""
        print(f"  lr {lr:>8.3g}: test loss {losses[lr]:.4f}{mark}")
    best = min(GRID, key=losses.get)
    gap = losses[sweep.suggestion] - losses[best]
    verdict = "within" if gap <= WITHIN else "NOT within"
    print(
        f"best of the grid: lr {best:.3g}, test loss {losses[best]:.4f}; the suggestion is "
        f"{gap:+.4f} from it ({verdict} {WITHIN})"
    )


if __name__ == "__main__":
    main()
