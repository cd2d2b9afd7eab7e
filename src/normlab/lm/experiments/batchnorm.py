"""``normlab experiment batchnorm``: the seed's claims about BatchNorm, measured.

The base network: n_embd 10, block 3, 3 × (Linear without bias → BatchNorm1d
→ tanh) of width 100, BatchNorm momentum 0.1, SGD batch 32, lr 0.1 → 0.01 at
half the steps. Five measurements:

1. running vs calibrated statistics: per layer the largest difference of the
   running mean/variance from the exact training-set statistics, the val loss
   with each, and whether calibrated eval equals one full-batch training pass;
2. momentum: running statistics for momentum 0.1, 0.01, 0.001 and cumulative
   (None), all tracked in the same run (momentum does not change training, so
   one run gives all four), and their distance from the calibrated ones;
3. the regularizing jitter: train–val gap of a larger network (n_embd 24,
   block 8, 2 × 256, AdamW) with and without BatchNorm, at several batch sizes;
4. bias before BatchNorm: the base run again with a random bias on every
   hidden Linear; the losses step by step, and the bias's gradient;
5. single-example inference: eval outputs of each val example alone against
   the batched eval outputs.
"""

import copy
from dataclasses import replace

import torch
from torch import Tensor, nn

from normlab.calibrate import batchnorm_layers, calibrate_batchnorm
from normlab.lm.config import ModelConfig
from normlab.lm.data import load_dataset
from normlab.lm.evaluate import evaluate
from normlab.lm.experiments.common import Context, Table, fit, lecture_sgd, new_model, train_config
from normlab.lm.seeds import stream_generator
from normlab.nn import set_mode

MOMENTA = (0.1, 0.01, 0.001, None)
BASE_STEPS, QUICK_BASE_STEPS = 40_000, 300
GAP_STEPS, QUICK_GAP_STEPS = 4_000, 60
GAP_BATCHES, QUICK_GAP_BATCHES = (32, 128, 512), (32, 128)
SINGLE_EXAMPLES, QUICK_SINGLE_EXAMPLES = 22_655, 200  # the full run: every val example


def base_config() -> ModelConfig:
    return ModelConfig(block_size=3, n_embd=10, n_hidden=100, n_layer=3, norm="batch")


def gap_config(norm: str) -> ModelConfig:
    return ModelConfig(block_size=8, n_embd=24, n_hidden=256, n_layer=2, norm=norm)


class MomentumTracker:
    """Running statistics of every BatchNorm's training-mode input for several momenta at once.

    The same update as ``BatchNorm1d``: ``running ← (1 − m)·running + m·batch``
    with the unbiased batch variance; ``None`` is the cumulative average.
    """

    def __init__(self, layers: list[nn.Module], momenta=MOMENTA) -> None:
        self.momenta = momenta
        self.stats = {
            m: [(torch.zeros(bn.num_features), torch.ones(bn.num_features)) for bn in layers]
            for m in momenta
        }
        self.batches = 0
        self._handles = [bn.register_forward_pre_hook(self._hook(i)) for i, bn in enumerate(layers)]

    def _hook(self, i: int):
        def hook(module, inputs):
            if not module.training:
                return
            x = inputs[0].detach()  # (B, C)
            if i == 0:
                self.batches += 1
            var, mean = torch.var_mean(x, dim=0)  # unbiased, as torch's running_var
            for m in self.momenta:
                factor = 1.0 / self.batches if m is None else m
                running_mean, running_var = self.stats[m][i]
                running_mean.lerp_(mean.cpu(), factor)
                running_var.lerp_(var.cpu(), factor)

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _batchnorms(model: nn.Module) -> list[nn.Module]:
    """The model's BatchNorms in forward order."""
    example = torch.zeros(2, model.config.block_size, dtype=torch.long)
    return batchnorm_layers(model, example.to(next(model.parameters()).device))


def _with_stats(model: nn.Module, stats: list[tuple[Tensor, Tensor]]) -> nn.Module:
    """A copy of ``model`` whose BatchNorms (in forward order) hold ``stats``."""
    copied = copy.deepcopy(model)
    for bn, (mean, var) in zip(_batchnorms(copied), stats, strict=True):
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
    return copied


def _stats(model: nn.Module) -> list[tuple[Tensor, Tensor]]:
    return [
        (bn.running_mean.cpu().clone(), bn.running_var.cpu().clone()) for bn in _batchnorms(model)
    ]


def distance(stats, reference) -> list[dict]:
    """Per layer: the largest |Δmean| and |Δvar|, and both relative to the reference's std/var."""
    rows = []
    for (mean, var), (ref_mean, ref_var) in zip(stats, reference, strict=True):
        rows.append(
            {
                "max_abs_mean_diff": (mean - ref_mean).abs().max().item(),
                "max_abs_var_diff": (var - ref_var).abs().max().item(),
                "max_mean_diff_in_stds": ((mean - ref_mean).abs() / ref_var.sqrt()).max().item(),
                "max_rel_var_diff": ((var - ref_var).abs() / ref_var).max().item(),
            }
        )
    return rows


def by_momentum(model, tracker: MomentumTracker, calibrated, Xva: Tensor, Yva: Tensor) -> list:
    """Measurement 2: each momentum's running statistics against the calibrated ones."""
    table = Table(
        "2. running statistics by momentum at batch 32, against the calibrated ones",
        [("momentum", 8), ("mean Δ in stds", 14), ("rel. var Δ", 10), ("val loss", 8)],
    )
    momentum_rows = []
    for m in MOMENTA:
        rows = distance(tracker.stats[m], calibrated)
        row = {
            "momentum": m,
            "layers": rows,
            "max_mean_diff_in_stds": max(r["max_mean_diff_in_stds"] for r in rows),
            "max_rel_var_diff": max(r["max_rel_var_diff"] for r in rows),
            "val_loss": evaluate(_with_stats(model, tracker.stats[m]), Xva, Yva),
        }
        momentum_rows.append(row)
        table.row(
            "None" if m is None else str(m),
            row["max_mean_diff_in_stds"],
            row["max_rel_var_diff"],
            row["val_loss"],
        )
    return momentum_rows


def run(ctx: Context) -> dict:
    base_steps = QUICK_BASE_STEPS if ctx.quick else BASE_STEPS
    data = load_dataset(None, 3)
    device = ctx.device
    Xtr, Ytr = (t.to(device) for t in data.splits["train"])
    Xva, Yva = (t.to(device) for t in data.splits["val"])
    tcfg = lecture_sgd(base_steps, decay_step=base_steps // 2, seed=ctx.seed)
    print(
        f"batchnorm: base network 3 × 100 (Linear → BatchNorm1d → tanh), SGD batch 32, "
        f"{base_steps:,} steps, lr 0.1 → 0.01 at {base_steps // 2:,}, seed {ctx.seed}"
    )

    # 1 and 2: one run, four momenta tracked alongside the model's own (0.1)
    model = new_model(base_config(), data, ctx.seed)
    tracker = MomentumTracker(_batchnorms(model))
    # the tracker's hooks see every step's batch only on the eager step
    base = fit(model, data, replace(tcfg, compile=False), ctx, desc="base")
    tracker.remove()
    running = _stats(model)
    calibrated_model = copy.deepcopy(model)
    calibrate_batchnorm(calibrated_model, Xtr)
    calibrated = _stats(calibrated_model)
    running_rows = distance(running, calibrated)
    results = {"base_steps": base_steps, "base_train_val": base.losses}
    results["running_vs_calibrated"] = {
        "layers": running_rows,
        "val_loss_running": evaluate(model, Xva, Yva),
        "val_loss_calibrated": evaluate(calibrated_model, Xva, Yva),
        "train_loss_calibrated_eval": evaluate(calibrated_model, Xtr, Ytr),
        "train_loss_full_batch_train_mode": _full_batch_loss(model, Xtr, Ytr),
    }
    rc = results["running_vs_calibrated"]
    table = Table(
        "1. running (momentum 0.1) vs calibrated statistics, per BatchNorm",
        [("layer", 5), ("max|Δmean|", 10), ("in stds", 8), ("max|Δvar|", 10), ("rel.", 7)],
    )
    for i, row in enumerate(running_rows):
        table.row(
            i,
            row["max_abs_mean_diff"],
            row["max_mean_diff_in_stds"],
            row["max_abs_var_diff"],
            row["max_rel_var_diff"],
        )
    print(
        f"val loss: running {rc['val_loss_running']:.5f}, calibrated "
        f"{rc['val_loss_calibrated']:.5f}; train loss: calibrated eval "
        f"{rc['train_loss_calibrated_eval']:.6f}, one full-batch train-mode pass "
        f"{rc['train_loss_full_batch_train_mode']:.6f}"
    )

    results["tracker_matches_model_buffers"] = max(
        max((a - b).abs().max().item(), (v - w).abs().max().item())
        for (a, v), (b, w) in zip(tracker.stats[0.1], running, strict=True)
    )
    results["momentum"] = by_momentum(model, tracker, calibrated, Xva, Yva)
    results["gap"] = gap_by_batch_size(ctx)
    results["bias_before_bn"] = bias_before_batchnorm(ctx, data, tcfg, base)
    results["single_example"] = single_example(model, Xva, ctx.quick)
    ctx.save_figure(_figure(results), "batchnorm.png")
    return results


@torch.no_grad()
def _full_batch_loss(model: nn.Module, X: Tensor, Y: Tensor) -> float:
    """The training-mode loss of one batch holding every example (a copy: buffers untouched)."""
    copied = copy.deepcopy(model).train()
    _, loss = copied(X, Y)
    return loss.item()


def bias_before_batchnorm(ctx: Context, data, tcfg, base) -> dict:
    """The base run again with a random bias on every hidden Linear: what changes."""
    model = new_model(base_config(), data, ctx.seed)
    g = stream_generator(ctx.seed, "random-biases")
    biases = []
    for block in model.blocks:
        linear = block[0]
        linear.bias = nn.Parameter(torch.randn(linear.out_features, generator=g))
        biases.append(linear.bias)
    worst = {"bias": 0.0, "weight": 0.0}  # the largest gradient of any bias, and of any weight

    def track(kind: str):
        def hook(grad):
            worst[kind] = max(worst[kind], grad.abs().max().item())

        return hook

    handles = [b.register_hook(track("bias")) for b in biases]
    handles += [block[0].weight.register_hook(track("weight")) for block in model.blocks]
    initial = [b.detach().clone() for b in biases]
    # the gradient hooks see every step only on the eager step
    with_bias = fit(model, data, replace(tcfg, compile=False), ctx, desc="with bias")
    for handle in handles:
        handle.remove()
    diffs = [abs(a - b) for a, b in zip(base.step_losses, with_bias.step_losses, strict=True)]
    row = {
        "max_step_loss_diff": max(diffs),
        "final_step_loss_diff": diffs[-1],
        "val_loss_without_bias": base.losses["val"],
        "val_loss_with_bias": with_bias.losses["val"],
        "max_abs_bias_grad": worst["bias"],
        "max_abs_weight_grad": worst["weight"],
        "bias_moved": max(
            (b - b0).abs().max().item() for b, b0 in zip(biases, initial, strict=True)
        ),
    }
    print(
        f"\n4. bias before BatchNorm: training losses differ by at most "
        f"{row['max_step_loss_diff']:.2e} over {len(diffs):,} steps; val "
        f"{row['val_loss_without_bias']:.5f} without, {row['val_loss_with_bias']:.5f} with; "
        f"largest bias gradient {row['max_abs_bias_grad']:.2e} (largest weight gradient "
        f"{row['max_abs_weight_grad']:.2e}); the biases moved {row['bias_moved']:.2e} at most"
    )
    return row


@torch.no_grad()
def single_example(model: nn.Module, X: Tensor, quick: bool) -> dict:
    """Eval-mode logits of each example alone vs the same examples in one batch."""
    n = min(len(X), QUICK_SINGLE_EXAMPLES if quick else SINGLE_EXAMPLES)
    with set_mode(model, training=False):
        batched, _ = model(X[:n])  # (n, vocab)
        alone = torch.cat([model(X[i : i + 1])[0] for i in range(n)])  # (n, vocab)
    row = {
        "examples": n,
        "max_abs_logit_diff": (batched - alone).abs().max().item(),
        "bitwise_equal": bool(torch.equal(batched, alone)),
    }
    print(
        f"\n5. single-example eval over {n:,} val examples: largest logit difference from the "
        f"batched pass {row['max_abs_logit_diff']:.2e} (bitwise equal: {row['bitwise_equal']})"
    )
    return row


def gap_by_batch_size(ctx: Context) -> list[dict]:
    """Train–val gap with and without BatchNorm, at each batch size, same steps and optimizer."""
    steps = QUICK_GAP_STEPS if ctx.quick else GAP_STEPS
    batches = QUICK_GAP_BATCHES if ctx.quick else GAP_BATCHES
    data = load_dataset(None, gap_config("none").block_size)
    table = Table(
        f"3. train–val gap: n_embd 24, block 8, 2 × 256 tanh; AdamW lr 3e-3 cosine, "
        f"{steps:,} steps",
        [("batch", 5), ("norm", 5), ("train", 7), ("val", 7), ("gap", 7)],
    )
    rows = []
    for batch_size in batches:
        for norm in ("batch", "none"):
            tcfg = train_config(
                steps=steps,
                batch_size=batch_size,
                optimizer="adamw",
                lr=3e-3,
                schedule="cosine",
                warmup_steps=steps // 40,
                min_lr_ratio=0.05,
                weight_decay=0.1,
                seed=ctx.seed,
            )
            model = new_model(gap_config(norm), data, ctx.seed)
            result = fit(model, data, tcfg, ctx, desc=f"gap {norm} {batch_size}")
            train, val = result.losses["train"], result.losses["val"]
            rows.append(
                {
                    "batch_size": batch_size,
                    "norm": norm,
                    "train": train,
                    "val": val,
                    "gap": val - train,
                }
            )
            table.row(batch_size, norm, train, val, val - train)
    return rows


def _figure(results: dict):
    from normlab.report import pyplot

    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    for row in results["momentum"]:
        label = "None" if row["momentum"] is None else str(row["momentum"])
        means = [layer["max_mean_diff_in_stds"] for layer in row["layers"]]
        left.plot(range(len(means)), means, "o-", label=f"momentum {label}")
    left.set_xticks(range(len(results["momentum"][0]["layers"])))
    left.set_xlabel("BatchNorm layer")
    left.set_ylabel("max |running − calibrated mean| / std")
    left.set_yscale("log")
    left.legend(fontsize=7)
    left.set_title("running statistics at the end")
    for norm in ("batch", "none"):
        rows = [r for r in results["gap"] if r["norm"] == norm]
        right.plot([r["batch_size"] for r in rows], [r["gap"] for r in rows], "o-", label=norm)
    right.set_xscale("log", base=2)
    right.set_xlabel("batch size")
    right.set_ylabel("val − train loss")
    right.legend(title="norm", fontsize=7)
    right.set_title("train–val gap")
    return fig
