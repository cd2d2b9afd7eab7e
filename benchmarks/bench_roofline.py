"""The compiled step against the machine's own matrix-multiply rate, and against its peers.

In one run, on this machine:

- the GEMM rate: ``torch.mm`` at 1024² and at the step's own shapes (each Linear's forward
  product, and the two of its backward: the input's gradient and the weight's), on one thread
  and on two;
- for ``lecture-deep`` (SGD) and ``default`` (AdamW, weight decay 0.1), at batch 32, 256 and
  4,096: the steps per second of normlab's compiled step (``TrainStep(compile=True)``, what
  ``normlab train`` runs), of the same network in plain torch.nn with torch.optim (eager), and
  of that torch.nn network under ``torch.compile`` with its optimizer step compiled too
  (the learning rate a tensor, so that it never recompiles);
- the compiled step's arithmetic rate: its matrix products' FLOPs (2·B·fan_in·fan_out a Linear
  forward, twice that backward) times its steps per second, as a fraction of the GEMM rate at
  its own shapes on the same number of threads.

    .venv/bin/python benchmarks/bench_roofline.py [--rounds 3] [--threads 1]
"""

import platform
import statistics
import time

import torch
import torch.nn.functional as F
from bench_train import rounds_and_threads
from torch import nn

from normlab import nn as nl
from normlab.lm.config import ModelConfig, TrainConfig
from normlab.lm.data import load_dataset
from normlab.lm.model import LanguageModel
from normlab.lm.optim import make_optimizer
from normlab.lm.presets import PRESETS
from normlab.lm.step import TrainStep

PRESET_NAMES = ("lecture-deep", "default")
CASES = ((32, 1000), (256, 300), (4096, 20))  # batch size, steps per round


def processor() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), or what platform knows of it."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def preset_configs(name: str, vocab_size: int) -> tuple[ModelConfig, TrainConfig]:
    preset = PRESETS[name]
    model = ModelConfig(**preset.get("model", {}), vocab_size=vocab_size)
    return model, TrainConfig(**preset.get("train", {}))


def new_model(config: ModelConfig) -> LanguageModel:
    return LanguageModel(config, torch.Generator().manual_seed(0), verbose=False)


def torch_nn_copy(model: LanguageModel) -> nn.Sequential:
    """``model`` in torch.nn layers with its weights: its leaf layers in order."""
    layers = []
    for module in model.modules():
        if list(module.children()):
            continue
        if isinstance(module, nl.Linear):
            copy = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        elif isinstance(module, nl.BatchNorm1d):
            copy = nn.BatchNorm1d(module.num_features, momentum=module.momentum)
        elif isinstance(module, nn.Embedding):
            copy = nn.Embedding(module.num_embeddings, module.embedding_dim)
        elif isinstance(module, nl.FlattenContext):
            copy = nn.Flatten()
        elif isinstance(module, nl.Tanh | nn.Tanh):
            copy = nn.Tanh()
        elif isinstance(module, nn.Identity):
            continue
        else:
            raise TypeError(f"no torch.nn copy of {type(module).__name__}")
        copy.load_state_dict(module.state_dict(), strict=False)
        layers.append(copy)
    return nn.Sequential(*layers)


def torch_optimizer(params, train: TrainConfig, lr):
    if train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr, weight_decay=train.weight_decay)


def eager_peer(model: LanguageModel, train: TrainConfig):
    net = torch_nn_copy(model)
    opt = torch_optimizer(net.parameters(), train, train.lr)

    def run(x, y):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return run


def compiled_peer(model: LanguageModel, train: TrainConfig):
    """torch.compile's recipe: the model compiled, and the optimizer's step compiled with the
    learning rate as a tensor."""
    net = torch.compile(torch_nn_copy(model), dynamic=False)
    opt = torch_optimizer(net.parameters(), train, torch.tensor(train.lr))

    @torch.compile(dynamic=False)
    def update():
        opt.step()

    def run(x, y):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        update()

    return run


def normlab_step(model: LanguageModel, train: TrainConfig, batch_size: int):
    step = TrainStep(model, make_optimizer(model, train), batch_size, compile=True)
    return lambda x, y: step(x, y, train.lr)


def matmul_shapes(config: ModelConfig, batch: int) -> list[tuple[int, int, int]]:
    """(m, k, n) of every matrix product of one step: each Linear's forward x·Wᵀ, and backward
    the input's gradient and the weight's."""
    shapes, fan_in = [], config.block_size * config.n_embd
    for fan_out in [config.n_hidden] * config.n_layer + [config.vocab_size]:
        shapes += [(batch, fan_in, fan_out), (batch, fan_out, fan_in), (fan_out, batch, fan_in)]
        fan_in = fan_out
    return shapes


def gemm_rate(shapes: list[tuple[int, int, int]], threads: int, repeats: int) -> float:
    """GFLOP/s of torch.mm over these products, on ``threads`` threads (median of rounds)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    pairs = [(torch.randn(m, k), torch.randn(k, n)) for m, k, n in shapes]
    flops = sum(2 * m * k * n for m, k, n in shapes)
    for a, b in pairs:
        torch.mm(a, b)
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            for a, b in pairs:
                torch.mm(a, b)
        rounds.append(flops * repeats / (time.perf_counter() - start) / 1e9)
    torch.set_num_threads(before)
    return statistics.median(rounds)


def steps_per_second(runs: dict, batches, rounds: int) -> dict[str, float]:
    """Steps per second of each run over ``batches`` (median of rounds), the runs' rounds
    interleaved so that a slower minute of the machine slows each of them alike."""
    for run in runs.values():
        for x, y in batches[:3]:  # warm-up: the compiles, the allocator
            run(x, y)
    rates: dict[str, list[float]] = {kind: [] for kind in runs}
    for _ in range(rounds):
        for kind, run in runs.items():
            start = time.perf_counter()
            for x, y in batches:
                run(x, y)
            rates[kind].append(len(batches) / (time.perf_counter() - start))
    return {kind: statistics.median(values) for kind, values in rates.items()}


def main():
    args = rounds_and_threads(__doc__)
    threads = args.threads
    print(f"{processor()}; torch {torch.__version__}; {threads} thread(s)")
    square = [(1024, 1024, 1024)]
    print(
        f"torch.mm 1024²: {gemm_rate(square, 1, 5):.1f} GFLOP/s on 1 thread, "
        f"{gemm_rate(square, 2, 5):.1f} on 2",
        flush=True,
    )
    print(
        "| preset | batch | GEMM rate at its shapes, GFLOP/s (1 / 2 threads) | normlab "
        "steps/s | GFLOP/s | of GEMM rate | × eager torch.nn | × torch.compile'd torch.nn |"
    )
    print("|" + " --- |" * 8)
    data = load_dataset(None, PRESETS["default"]["model"].get("block_size", 8))
    for name in PRESET_NAMES:
        model_config, train = preset_configs(name, data.vocab.size)
        data = load_dataset(None, model_config.block_size)
        X, Y = data.splits["train"]
        for batch, n in CASES:
            g = torch.Generator().manual_seed(0)
            batches = [(X[ix], Y[ix]) for ix in torch.randint(0, len(X), (n, batch), generator=g)]
            shapes = matmul_shapes(model_config, batch)
            flops = sum(2 * m * k * n_ for m, k, n_ in shapes)
            repeats = max(1, 20_000_000 // flops)
            own = gemm_rate(shapes, threads, repeats)
            other = gemm_rate(shapes, 2 if threads == 1 else 1, repeats)
            runs = {
                "normlab": normlab_step(new_model(model_config), train, batch),
                "eager": eager_peer(new_model(model_config), train),
                "compiled": compiled_peer(new_model(model_config), train),
            }
            rates = steps_per_second(runs, batches, args.rounds)
            achieved = flops * rates["normlab"] / 1e9
            one, two = (own, other) if threads == 1 else (other, own)
            eager, peer = (rates["normlab"] / rates[kind] for kind in ("eager", "compiled"))
            print(
                f"| {name} | {batch:,} | {one:.1f} / {two:.1f} | {rates['normlab']:,.0f} | "
                f"{achieved:.1f} | {achieved / own:.0%} | {eager:.2f} | {peer:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
