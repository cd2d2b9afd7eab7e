"""The library on every model of the zoo (tests/zoo.py): a pass table, and each tool's cost.

For each torchvision, timm and transformers model the zoo builds (random weights,
small inputs), in one run:

- audit: every recorded output's mean and std against a copy of the output taken at its
  hook (exact to float32 rounding: rel 1e-4 on the std);
- fold: how many BatchNorms fold, one log line each, and the folded float64 model's
  outputs against the unfolded one's (rounding alone: rel 1e-9);
- LSUV: how many layers it rescaled, and how many it left and why (feeds a normalization,
  not called, does not follow its weight);
- calibrate: the BatchNorms it calibrates, from the one batch in one pass;
- to_html: the audit's page, in seconds, with the number of layers recorded;

and the cost of audit, fold, LSUV and calibrate as a multiple of one plain forward,
backward and SGD step measured in the same run. The step and the audit (which takes the
same SGD step) are the medians of ``--rounds`` each (or as many as ``--min-seconds`` of
audits take), interleaved, after a warm-up; the audit's exactness is checked on a separate
call, as the checking hooks' copies are not the audit's cost. Each model starts from a
collected heap.

    .venv/bin/python benchmarks/bench_zoo.py [--rounds 3] [--min-seconds 1] [--threads 1]
        [--only resnet18]
"""

import argparse
import copy
import gc
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from zoo import ZOO, declare_torchvision_operators

declare_torchvision_operators()  # before anything imports torchvision: see tests/zoo.py

from normlab import audit  # noqa: E402
from normlab.auditor import Audit  # noqa: E402
from normlab.calibrate import calibrate_batchnorm  # noqa: E402
from normlab.dataflow import call_model, first_tensor  # noqa: E402
from normlab.fold import fold_batchnorm  # noqa: E402
from normlab.lsuv import lsuv_  # noqa: E402
from normlab.nn import is_batchnorm  # noqa: E402


def _timed(fn, rounds: int) -> float:
    fn()  # warm-up: the first call allocates and picks kernels
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _as(batch, dtype):
    if isinstance(batch, dict):
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
    return batch.to(dtype)


def _plain_step(model, batch):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step():
        loss = first_tensor(call_model(model, batch)).float().square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _audit_exact(model, batch) -> tuple[bool, Audit]:
    """An audit, and whether each recorded std equals that of a copy taken at the hook."""
    copies = {}

    def keep(name):
        def hook(module, _inputs, out):
            out = first_tensor(out)
            if out is not None and module.training and name not in copies:
                copies[name] = out.detach().double().clone()

        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in model.named_modules()]
    result = audit(model, batch, optimizer=torch.optim.SGD(model.parameters(), lr=1e-4))
    for h in handles:
        h.remove()
    layers = result.report.snapshot.layers
    ok = all(
        abs(layer.std - copies[layer.name].std().item()) <= 1e-4 * copies[layer.name].std().item()
        for layer in layers
    )
    return ok and bool(layers), result


def _step_and_audit_seconds(model, batch, rounds: int, min_seconds: float) -> tuple[float, float]:
    """The median plain step, and the median audit with an SGD step, as the plain step takes
    one (no checking hooks), their rounds interleaved: a slow stretch of a shared machine
    slows both. At least ``rounds``, and enough for ``min_seconds`` of audits: a model of a
    millisecond's step gets hundreds of rounds, whose median a few slow ones do not move."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    runs = (_plain_step(model, batch), lambda: audit(model, batch, optimizer=optimizer))
    times = ([], [])
    for run in runs:
        run()  # warm-up: the first call allocates and picks kernels
    start = time.perf_counter()
    runs[1]()
    rounds = max(rounds, math.ceil(min_seconds / (time.perf_counter() - start)))
    for _ in range(rounds):
        for run, seconds in zip(runs, times, strict=True):
            start = time.perf_counter()
            run()
            seconds.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def _html_seconds(result: Audit) -> float:
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        result.to_html(Path(folder) / "audit.html")
        return time.perf_counter() - start


def _fold(model, batch):
    model = copy.deepcopy(model).double().eval()
    batch = _as(batch, torch.float64)
    lines = []
    start = time.perf_counter()
    folded = fold_batchnorm(model, batch, log=lines.append)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        a, b = first_tensor(call_model(model, batch)), first_tensor(call_model(folded, batch))
    exact = torch.allclose(a, b, rtol=1e-9, atol=1e-9 * a.abs().max().item())
    n = sum(is_batchnorm(m) for m in model.modules())
    done = sum(line.startswith("folded ") for line in lines)
    return f"{done}/{n}" + ("" if exact and len(lines) == n else " WRONG"), seconds


def _lsuv(model, batch):
    model = copy.deepcopy(model)
    start = time.perf_counter()
    report = lsuv_(model, batch)
    seconds = time.perf_counter() - start
    skipped = {}
    for r in report:
        if r.skipped is not None:
            why = r.skipped.split(" (")[0]  # the reason without its example
            skipped[why] = skipped.get(why, 0) + 1
    rescaled = sum(r.skipped is None for r in report)
    return "; ".join([f"{rescaled} set", *(f"{n}: {why}" for why, n in skipped.items())]), seconds


def _calibrate(model, batch):
    model = copy.deepcopy(model)
    if not any(is_batchnorm(m) and hasattr(m, "track_running_stats") for m in model.modules()):
        return "-", None
    start = time.perf_counter()
    layers = calibrate_batchnorm(model, [batch], progress=False)
    return f"{len(layers)} layers", time.perf_counter() - start


def _times(seconds: float | None, step: float, digits: int = 1) -> str:
    return "-" if seconds is None else f"{seconds / step:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of the plain step")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--only", default=None, help="models whose name contains this")
    parser.add_argument(
        "--min-seconds", type=float, default=1.0, help="of audits timed per model, at least"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    header = "| model | audit exact | fold (folded/BatchNorms) | LSUV | calibrate | step ms |"
    print(header + " audit × | fold × | LSUV × | calibrate × | to_html s (layers) |")
    print("|" + " --- |" * 11)
    for z in ZOO:
        if args.only and args.only not in z.name:
            continue
        gc.collect()  # the models before this one: their garbage is not this one's cost
        torch.manual_seed(0)
        try:
            model, batch = z.build(), z.batch()
        except Exception as e:  # a library the machine lacks
            print(f"| {z.library}/{z.name} | not built: {type(e).__name__} |")
            continue
        model.train()
        exact, result = _audit_exact(model, batch)
        trained = copy.deepcopy(model.state_dict())  # the timed steps' SGD moves the weights:
        step, audit_s = _step_and_audit_seconds(model, batch, args.rounds, args.min_seconds)
        model.load_state_dict(trained)  # fold, LSUV and calibrate run on the model as it was
        html_s, n_layers = _html_seconds(result), len(result.report.snapshot.layers)
        fold, fold_s = _fold(model, batch)
        lsuv, lsuv_s = _lsuv(model, batch)
        calibrate, calibrate_s = _calibrate(model, batch)

        print(
            f"| {z.library}/{z.name} | {'yes' if exact else 'NO'} | {fold} | {lsuv} | "
            f"{calibrate} | {step * 1e3:.0f} | {_times(audit_s, step, 2)} | "
            f"{_times(fold_s, step)} | {_times(lsuv_s, step)} | {_times(calibrate_s, step)} | "
            f"{html_s:.2f} ({n_layers}) |",
            flush=True,
        )


if __name__ == "__main__":
    main()
