"""The end of a run: the final losses, ``summary.json``, samples, verdicts and ``report.html``."""

import time

import torch

from normlab.diagnostics import judge_recording
from normlab.lm.evaluate import evaluate
from normlab.lm.rundir import RunFolder
from normlab.lm.sample import format_samples, sample_run
from normlab.lm.state import Training
from normlab.report import Page, render_html


def finish_run(t: Training, folder: RunFolder, config: dict, wall_start: float) -> dict:
    """Final losses (test once), summary.json, 20 samples, verdicts and report.html."""
    tcfg, progress, model = t.train_config, t.progress, t.eval_model
    splits = {name: t.data.splits[name] for name in ("train", "val", "test")}
    device = next(model.parameters()).device
    losses = {f"{k}_loss": evaluate(model, *(v.to(device) for v in xy)) for k, xy in splits.items()}
    metrics = folder.read_metrics()
    recorded_s, train_s, step_s = progress.diagnostics_s(), progress.train_time_s, progress.step_s()
    summary = {
        **losses,
        "steps": progress.step,
        "wall_s": round(time.perf_counter() - wall_start, 3),  # start-up to the final evaluation
        "train_time_s": round(train_s, 3),
        "steps_per_s": round(progress.step / train_s, 1),
        "params": sum(p.numel() for p in model.parameters()),
        "preset": tcfg.preset,
        "seed": tcfg.seed,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "init_loss": progress.init_loss,
        "target_val_loss": tcfg.target_val_loss,
        "time_to_target_s": None
        if progress.time_to_target_s is None
        else round(progress.time_to_target_s, 3),
        "best_val_loss": min((r["val_loss"] for r in metrics), default=None),
        "step_s": round(step_s, 3),  # evaluations, compile, second order aside
        "diagnostics_recordings": progress.recordings,
        "diagnostics_s": round(recorded_s, 3),
        "diagnostics_share": round(recorded_s / train_s, 4),
        # of the steps' own time: what the share tends to in a long run
        "diagnostics_step_share": round(recorded_s / max(step_s, 1e-9), 4),
        "second_order_measurements": progress.second_order_measurements,
        "second_order_s": round(progress.second_order_s, 3),
        "second_order_share": round(progress.second_order_s / train_s, 4),
    }
    folder.write_summary(summary)
    print(
        f"\nsteps {progress.step:,} | train {losses['train_loss']:.4f} | "
        f"val {losses['val_loss']:.4f} | test {losses['test_loss']:.4f} | {summary['wall_s']:.1f} s"
    )
    if tcfg.target_val_loss is not None:
        reached = progress.time_to_target_s
        said = "not reached" if reached is None else f"reached after {reached:.1f} s"
        print(f"target val loss {tcfg.target_val_loss}: {said}")
    samples = sample_run(model, t.data, 20, seed=tcfg.seed)
    print(format_samples(samples))
    history = t.diagnostics.history if t.diagnostics is not None else []
    report = judge_recording(t.diagnostics, num_classes=t.data.vocab.size) if history else None
    if report is not None:
        print(
            f"diagnostics: {progress.recordings} recordings took "
            f"{summary['diagnostics_s']:.2f} s, {summary['diagnostics_share']:.1%} of the "
            "training time"
        )
        fired = "; ".join(f"{v.kind} ({v.layer})" for v in report.verdicts)
        print(f"diagnostics at step {report.snapshot.step:,}: {fired or 'no verdict fired'}")
    page = Page(
        f"normlab run {folder.path}",
        summary,
        config=config,
        metrics=metrics,
        report=report,
        history=history,
        samples=samples,
    )
    folder.write_report(render_html(page))
    print(f"run folder: {folder.path} (open report.html)")
    return summary
