"""What the second-order instruments cost, in forward-backward passes and in training time.

For the ``lecture-deep`` preset's model (SGD, batch 32), the ``default`` preset's (AdamW, batch
256) and torchvision's ResNet-18 (11.2M parameters, random weights, SGD with momentum, batch 32
of 3×32×32 images), on 1 thread:

- a forward-backward pass and a whole training step (the baseline, measured in the same run);
- each instrument alone, in forward-backward equivalents: building the Hessian (the loss and
  its gradient with their graph), one Hessian-vector product, the sharpness (Lanczos,
  at most 20 products), the Hessian trace (10 probes), the gradient noise scale (micro-batches
  of an eighth), and ``measure_second_order``, all of them together as training runs them;
- the overhead at ``normlab train``'s default cadence (``--second-order-every 5000``): one
  measurement against 5,000 of these eager training steps (``lecture-deep`` trains compiled,
  about three times faster: its runs' own share is ``normlab train``'s summary,
  ``second_order_share``);
- the overhead if every instrument ran every step, beside Cockpit's published figures for its
  economy, business and full configurations (1.5×, 2× and 21× a training step; Schneider et
  al., NeurIPS 2021, figure 6), which track different sets of quantities.

    .venv/bin/python benchmarks/bench_second_order.py [--rounds 3] [--threads 1]

Each time is the median of ``--rounds`` repetitions.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from zoo import declare_torchvision_operators

declare_torchvision_operators()  # before anything imports torchvision: see tests/zoo.py

from normlab.curvature import Hessian, hessian_trace, top_eigenvalue  # noqa: E402
from normlab.lm.config import preset_configs  # noqa: E402
from normlab.lm.model import LanguageModel, batch_mean_loss  # noqa: E402
from normlab.lm.optim import make_optimizer  # noqa: E402
from normlab.noise import gradient_noise  # noqa: E402
from normlab.second_order import default_micro_batch, measure_second_order  # noqa: E402

CADENCE = 5000  # normlab train's --second-order-every
COCKPIT = {"economy": 1.5, "business": 2.0, "full": 21.0}


def preset(name: str):
    """A preset's model, with its optimizer, on a random batch of its batch size."""
    model_config, train_config = preset_configs(name)
    model_config.vocab_size = 27
    torch.manual_seed(0)
    model = LanguageModel(model_config, verbose=False)
    x = torch.randint(0, 27, (train_config.batch_size, model_config.block_size))
    y = torch.randint(0, 27, (train_config.batch_size,))
    optimizer = make_optimizer(model, train_config)
    return f"{name} preset", model, (x, y), batch_mean_loss, optimizer


def resnet18():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return "ResNet-18", model, (x, y), lambda m, b: F.cross_entropy(m(b[0]), b[1]), optimizer


def median_time(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(setup, rounds: int) -> None:
    name, model, batch, loss_fn, optimizer = setup
    model.train()

    def forward_backward():
        model.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()

    def step():
        forward_backward()
        optimizer.step()

    step()  # the optimizer's state, and warm caches
    fb = median_time(forward_backward, rounds)
    train_step = median_time(step, rounds)
    hessian = Hessian(model, lambda m: loss_fn(m, batch))
    vector = [torch.randn_like(p) for p in hessian.params]
    costs = {
        "Hessian (loss and gradient with their graph)": median_time(
            lambda: Hessian(model, lambda m: loss_fn(m, batch)), rounds
        ),
        "one Hessian-vector product": median_time(lambda: hessian @ vector, rounds),
        "sharpness (Lanczos, ≤ 20 products)": median_time(
            lambda: top_eigenvalue(hessian, 20, generator=torch.Generator().manual_seed(0)), rounds
        ),
        "Hessian trace (10 probes)": median_time(
            lambda: hessian_trace(hessian, 10, generator=torch.Generator().manual_seed(0)), rounds
        ),
        "gradient noise scale": median_time(
            lambda: gradient_noise(model, loss_fn, batch, default_micro_batch(len(batch[0]))),
            rounds,
        ),
    }
    whole = median_time(lambda: measure_second_order(model, loss_fn, batch, optimizer), rounds)
    costs["all of them (measure_second_order)"] = whole
    params = sum(p.numel() for p in model.parameters())
    threads = torch.get_num_threads()
    print(f"\n{name}: {params:,} parameters, batch {len(batch[0])}, {threads} thread(s)")
    print(f"  forward-backward {fb * 1e3:.1f} ms; training step {train_step * 1e3:.1f} ms")
    for what, seconds in costs.items():
        print(f"  {what:<46} {seconds * 1e3:9.1f} ms = {seconds / fb:6.1f} forward-backward")
    overhead = whole / (CADENCE * train_step)
    print(f"  at the default cadence (every {CADENCE:,} steps): {overhead:.2%} of training time")
    every = (train_step + whole) / train_step
    cockpit = ", ".join(f"{k} {v}×" for k, v in COCKPIT.items())
    print(f"  every instrument every step: {every:.1f}× a training step (Cockpit: {cockpit})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for setup in (lambda: preset("lecture-deep"), lambda: preset("default"), resnet18):
        measure(setup(), args.rounds)


if __name__ == "__main__":
    main()
