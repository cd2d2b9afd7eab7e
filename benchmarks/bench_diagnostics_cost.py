"""What recording diagnostics costs on a model of about 20M parameters: time and memory.

The model is GPT-like, built from torch layers (6 blocks of nn.MultiheadAttention
and a GELU MLP with LayerNorms, width 512, a vocabulary of 1,024, context 64),
trained by AdamW on random tokens, batch 8. In the same run:

- time: plain steps and recorded steps (arm, step, collect), in alternating
  rounds; the overhead of recording every 100 steps is the median extra time of a
  recorded step over 100 plain steps;
- memory: the process's peak resident size after the plain steps, then after
  the recorded ones (their difference is what a recording adds at its peak), and
  its resident size after every ``--more`` further recordings, three times (which
  must not grow: ``Diagnostics`` keeps the first recording and the last 16).

    .venv/bin/python benchmarks/bench_diagnostics_cost.py [--rounds 5] [--threads 2]
"""

import argparse
import resource
import statistics
import time

import torch
from torch import nn

from normlab.diagnostics import Diagnostics

VOCAB, CONTEXT, WIDTH, HEADS, BLOCKS, BATCH = 1024, 64, 512, 8, 6, 8


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.attn = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)
        self.mlp = nn.Sequential(
            nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Linear(4 * WIDTH, WIDTH)
        )

    def forward(self, x, mask):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(VOCAB, WIDTH), nn.Embedding(CONTEXT, WIDTH)
        self.blocks = nn.ModuleList(Block() for _ in range(BLOCKS))
        self.norm, self.head = nn.LayerNorm(WIDTH), nn.Linear(WIDTH, VOCAB, bias=False)
        self.register_buffer("mask", torch.triu(torch.ones(CONTEXT, CONTEXT, dtype=torch.bool), 1))

    def forward(self, idx):
        x = self.tokens(idx) + self.positions(torch.arange(idx.shape[1]))  # (B, T, WIDTH)
        for block in self.blocks:
            x = block(x, self.mask)
        return self.head(self.norm(x))  # (B, T, VOCAB)


def rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


def peak_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--more", type=int, default=20, help="recordings to show memory is flat")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    diagnostics = Diagnostics(model)
    g = torch.Generator().manual_seed(0)

    def step(record: bool) -> float:
        idx = torch.randint(0, VOCAB, (BATCH, CONTEXT + 1), generator=g)
        start = time.perf_counter()
        if record:
            diagnostics.arm()
        logits = model(idx[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), idx[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if record:
            diagnostics.collect(0, loss.item())
        return time.perf_counter() - start

    params = sum(p.numel() for p in model.parameters())
    step(False), step(False)  # warm-up, and AdamW's state
    plain, recorded = [], []
    for _ in range(args.rounds):
        plain.append(step(False))
    peak_plain = peak_kb()
    for _ in range(args.rounds):
        plain.append(step(False))
        recorded.append(step(True))
    peak_recorded = peak_kb()
    resident = []  # after args.rounds, then every args.more more recordings
    for _ in range(3):
        resident.append(rss_kb())
        for _ in range(args.more):
            step(True)
    resident.append(rss_kb())
    layers = len(diagnostics.history[-1].layers)
    t_plain, t_recorded = statistics.median(plain), statistics.median(recorded)
    print(f"GPT-like, {params / 1e6:.1f}M parameters, {layers} layers recorded; batch {BATCH} × "
          f"{CONTEXT}, AdamW, {args.threads} threads, medians of {args.rounds} rounds")  # fmt: skip
    print(f"plain step {t_plain * 1000:.0f} ms, recorded step {t_recorded * 1000:.0f} ms")
    overhead = (t_recorded - t_plain) / (100 * t_plain)
    print(f"overhead of recording every 100 steps: {overhead:.2%} of the training time")
    print(f"peak resident memory: {peak_plain / 1024:.0f} MiB after plain steps, "
          f"{peak_recorded / 1024:.0f} MiB after recorded ones "
          f"(+{(peak_recorded - peak_plain) / 1024:.0f} MiB; the parameters take "
          f"{params * 4 / 2**20:.0f} MiB)")  # fmt: skip
    counts = [args.rounds + i * args.more for i in range(len(resident))]
    print("resident memory after " + ", ".join(
        f"{n} recordings {kb / 1024:.0f} MiB" for n, kb in zip(counts, resident, strict=True)
    ) + f"; history kept: {len(diagnostics.history)} snapshots")  # fmt: skip


if __name__ == "__main__":
    main()
