"""Prototype for the performance issue: a whole training step, by hand, compiled as one graph.

Not used by normlab yet. It measures whether the approach can reach the issue's
throughput targets before it is built into ``normlab train``: ``lecture-deep``
(embedding → 5 × (Linear → BatchNorm → tanh) → Linear → BatchNorm, cross-entropy,
plain SGD) written as one function with the forward pass, BatchNorm's
closed-form backward, the rest of the backward by hand, the SGD update and the
running-statistics update, then ``torch.compile``d. Against it, in the same
run, the plain ``torch.nn`` + ``torch.optim.SGD`` baseline the issue names,
from the same initial weights on the same batches.

It first checks that all three (baseline, hand-derived eager, hand-derived
compiled) give the same losses over 100 steps (float32 tolerance), then times
them in alternating rounds on 1 thread and prints steps/s and the ratios to
the baseline, and the compile time separately.

    .venv/bin/python benchmarks/prototype_fused_step.py [--rounds 3] [--threads 1]
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab.data import load_dataset

V, E, T, H, L = 27, 10, 3, 100, 5  # vocabulary, n_embd, block_size, n_hidden, n_layer
EPS, MOMENTUM, LR = 1e-5, 0.1, 0.1


def baseline_model(seed: int) -> nn.Sequential:
    """lecture-deep in plain torch.nn, Kaiming-initialized as normlab does."""
    g = torch.Generator().manual_seed(seed)
    layers, fan_in = [nn.Embedding(V, E), nn.Flatten()], T * E
    for _ in range(L):
        layers += [nn.Linear(fan_in, H, bias=False), nn.BatchNorm1d(H), nn.Tanh()]
        fan_in = H
    layers += [nn.Linear(H, V, bias=False), nn.BatchNorm1d(V)]
    model = nn.Sequential(*layers)
    with torch.no_grad():
        model[0].weight.normal_(generator=g)
        for m in model:
            if isinstance(m, nn.Linear):
                gain = 5 / 3 if m.out_features == H else 1.0
                m.weight.normal_(generator=g).mul_(gain / m.in_features**0.5)
        model[-1].weight.fill_(0.1)  # the output BatchNorm's gain: logits near zero at step 0
    return model


def _bn_forward(z: Tensor, gain: Tensor, bias: Tensor):
    mean = z.mean(0)  # (C,)
    centered = z - mean  # (B, C)
    var = (centered * centered).mean(0)  # (C,), biased
    invstd = torch.rsqrt(var + EPS)
    xhat = centered * invstd  # (B, C)
    return gain * xhat + bias, xhat, invstd, mean, var


def _bn_backward(dy: Tensor, xhat: Tensor, invstd: Tensor, gain: Tensor):
    n = dy.shape[0]
    dbias, dgain = dy.sum(0), (dy * xhat).sum(0)  # (C,)
    dz = (gain * invstd / n) * (n * dy - dbias - xhat * dgain)  # (B, C)
    return dz, dgain, dbias


def train_step(params: list[Tensor], buffers: list[Tensor], x: Tensor, y: Tensor) -> Tensor:
    """Forward, backward by hand, SGD and running statistics, in place; returns the loss.

    ``params``: embedding, then (weight, gain, bias) per hidden block, then the
    output's (weight, gain, bias). ``buffers``: (running_mean, running_var) per BatchNorm.
    """
    B = x.shape[0]
    emb = params[0]
    h = emb[x].view(B, T * E)  # (B, T·E)
    saved, stats = [], []
    for i in range(L + 1):
        W, gain, bias = params[1 + 3 * i : 4 + 3 * i]
        out, xhat, invstd, mean, var = _bn_forward(h @ W.t(), gain, bias)
        stats += [mean, var]
        a = torch.tanh(out) if i < L else out  # (B, H) or the logits (B, V)
        saved.append((h, xhat, invstd, a))
        h = a
    logp = torch.log_softmax(h, 1)  # (B, V)
    loss = -logp.gather(1, y[:, None]).mean()

    grads = [None] * len(params)
    d = logp.exp()
    d[torch.arange(B), y] -= 1
    d = d / B  # dloss/dlogits
    for i in reversed(range(L + 1)):
        W, gain = params[1 + 3 * i], params[2 + 3 * i]
        h_in, xhat, invstd, a = saved[i]
        if i < L:
            d = d * (1 - a * a)  # through tanh
        dz, dgain, dbias = _bn_backward(d, xhat, invstd, gain)
        grads[1 + 3 * i : 4 + 3 * i] = [dz.t() @ h_in, dgain, dbias]
        d = dz @ W  # (B, fan_in)
    grads[0] = torch.zeros_like(emb).index_add_(0, x.reshape(-1), d.reshape(B * T, E))

    with torch.no_grad():
        for p, grad in zip(params, grads, strict=True):
            p.sub_(LR * grad)
        for buf, stat, i in zip(buffers, stats, range(len(stats)), strict=True):
            buf.lerp_(stat * (B / (B - 1)) if i % 2 else stat, MOMENTUM)  # unbiased variance
    return loss


def hand_state(model: nn.Sequential) -> tuple[list[Tensor], list[Tensor]]:
    """Copies of the baseline's parameters and buffers, in train_step's order."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    norms = [m for m in model if isinstance(m, nn.BatchNorm1d)]
    params = [model[0].weight.detach().clone()]
    for lin, bn in zip(linears, norms, strict=True):
        params += [
            lin.weight.detach().clone(),
            bn.weight.detach().clone(),
            bn.bias.detach().clone(),
        ]
    buffers = [b.clone() for bn in norms for b in (bn.running_mean, bn.running_var)]
    return params, buffers


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    X, Y = load_dataset(None, T).splits["train"]

    def batches(batch_size, n, seed=0):
        g = torch.Generator().manual_seed(seed)
        for _ in range(n):
            ix = torch.randint(0, len(X), (batch_size,), generator=g)
            yield X[ix], Y[ix]

    def baseline_runner(model):
        opt = torch.optim.SGD(model.parameters(), lr=LR)

        def run(x, y):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss

        return run

    compiled_step = torch.compile(train_step, dynamic=False)  # one graph per batch size
    start = time.perf_counter()
    p, b = hand_state(baseline_model(0))
    for x, y in batches(32, 2):
        compiled_step(p, b, x, y)
    print(f"compile time (batch 32, first two calls): {time.perf_counter() - start:.1f} s")

    # the same numbers: 100 steps from the same weights on the same batches
    model = baseline_model(0)
    base = baseline_runner(model)
    p1, b1 = hand_state(model)
    p2, b2 = hand_state(model)
    worst = 0.0
    for x, y in batches(32, 100, seed=1):
        losses = [base(x, y).item(), train_step(p1, b1, x, y).item()]
        losses.append(compiled_step(p2, b2, x, y).item())
        worst = max(worst, max(losses) - min(losses))
    print(f"largest loss difference over 100 steps (baseline, hand, compiled): {worst:.2e}")
    assert worst < 1e-3, "the three steps disagree"

    for batch_size, steps in ((32, 2000), (256, 800), (4096, 60)):
        model = baseline_model(0)
        p, b = hand_state(model)
        runners = {
            "torch.nn baseline": baseline_runner(model),
            "hand-derived, eager": lambda x, y, p=p, b=b: train_step(p, b, x, y),
            "hand-derived, compiled": lambda x, y, p=p, b=b: compiled_step(p, b, x, y),
        }
        for run in runners.values():  # warm-up (and a compile for this batch size)
            for x, y in batches(batch_size, 3):
                run(x, y)
        rates = {name: [] for name in runners}
        for _ in range(args.rounds):
            for name, run in runners.items():
                data = list(batches(batch_size, steps))
                start = time.perf_counter()
                for x, y in data:
                    run(x, y)
                rates[name].append(steps / (time.perf_counter() - start))
        base_rate = statistics.median(rates["torch.nn baseline"])
        line = ", ".join(
            f"{name} {statistics.median(r):,.0f} steps/s ({statistics.median(r) / base_rate:.2f}×)"
            for name, r in rates.items()
        )
        print(f"batch {batch_size}, {args.threads} thread(s): {line}", flush=True)


if __name__ == "__main__":
    main()
