"""normlab's diagnostics in a Lightning ``Trainer``.

from normlab.integrations.lightning import DiagnosticsCallback

trainer = lightning.Trainer(max_steps=1000, callbacks=[DiagnosticsCallback(every_n_steps=100)])
trainer.fit(model, data)      # report.html in trainer.default_root_dir at the end
"""

from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from normlab.diagnostics import Thresholds
from normlab.integrations import Recorder
from normlab.report import log_histograms, snapshot_scalars


class DiagnosticsCallback(pl.Callback):
    """Record the LightningModule every ``every_n_steps`` optimizer steps (on rank 0).

    The scalars (activation and gradient std, saturation, dead units, update:data
    ratios) go to every logger of the trainer, the histograms to its TensorBoard
    loggers. At the end of fit the verdicts are printed and ``report.html`` is
    written to ``report_path`` (default: the trainer's ``default_root_dir``).

    Args:
        every_n_steps: record the optimizer steps whose global step is a multiple of it.
        thresholds: where the verdicts fire.
        report_path: where the report goes.
        keep: recordings kept in memory besides the first (see ``Diagnostics``).
        second_order_every: also measure the sharpness, Hessian trace and gradient noise
            scale on the steps whose global step is a multiple of it (0: never), on the
            step's batch, before its update, with the module's first optimizer.
        loss_fn: ``loss_fn(module, batch)``, the batch's mean loss, for those measurements;
            default: ``training_step(batch, 0)`` (its ``"loss"`` if it returns a dict).
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        thresholds: Thresholds | None = None,
        report_path: str | Path | None = None,
        keep: int = 16,
        second_order_every: int = 0,
        loss_fn: Callable | None = None,
    ) -> None:
        self.recorder = Recorder(every_n_steps, thresholds, keep, second_order_every)
        self.report_path = report_path
        self.loss_fn = loss_fn or _training_step_loss

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.recorder.start(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.recorder.arm(trainer.global_step)
        if self.recorder.measures_second_order_at(trainer.global_step):
            optimizer = trainer.optimizers[0] if trainer.optimizers else None
            self.recorder.measure(pl_module, self.loss_fn, batch, optimizer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # after the optimizer's step; Lightning zeroes the gradients before the next backward
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        snapshot = self.recorder.collect(loss.item() if torch.is_tensor(loss) else None)
        if snapshot is None:
            return
        for logger in trainer.loggers:
            logger.log_metrics(
                {f"normlab/{k}": v for k, v in snapshot_scalars(snapshot).items()}, snapshot.step
            )
            if isinstance(logger, TensorBoardLogger):
                log_histograms(logger.experiment, snapshot)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            path = self.report_path or Path(trainer.default_root_dir) / "report.html"
            self.recorder.finish(Path(path), f"normlab diagnostics of {type(pl_module).__name__}")


def _training_step_loss(module: pl.LightningModule, batch):
    """The batch's loss as the module's own ``training_step`` computes it."""
    out = module.training_step(batch, 0)
    return out["loss"] if isinstance(out, dict) else out
