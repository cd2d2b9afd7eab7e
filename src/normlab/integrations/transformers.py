"""normlab's diagnostics in a Hugging Face ``transformers.Trainer``.

    from normlab.integrations.transformers import DiagnosticsCallback

    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.add_callback(DiagnosticsCallback(trainer, every_n_steps=100))
    trainer.train()               # report.html in args.output_dir at the end

transformers' ``Conv1D`` (GPT-2's projections) and its named norms are known to
``normlab.nn.layer_kind`` itself, so this callback and ``normlab.audit`` record the
same layers; its activation classes are recognized by what they do.
"""

from pathlib import Path

import torch
import transformers
from transformers.integrations import TensorBoardCallback

from normlab.dataflow import batch_loss
from normlab.diagnostics import Thresholds
from normlab.integrations import Recorder
from normlab.report import log_histograms, snapshot_scalars


class DiagnosticsCallback(transformers.TrainerCallback):
    """Record the model every ``every_n_steps`` optimizer steps (on the main process).

    With the ``trainer`` given, the scalars go through ``trainer.log``, to every
    integration it reports to, and the histograms to its TensorBoard writer; the
    trainer does not pass itself to callbacks, hence the argument. At the end of
    training the verdicts are printed and ``report.html`` is written to
    ``report_path`` (default: the run's ``output_dir``).

    Args:
        trainer: the Trainer to log through (None: only the printout and the report).
        every_n_steps: record the optimizer steps whose global step is a multiple of it.
        thresholds: where the verdicts fire.
        report_path: where the report goes.
        keep: recordings kept in memory besides the first (see ``Diagnostics``).
        second_order_every: also measure the sharpness, Hessian trace and gradient noise
            scale on the steps whose global step is a multiple of it (0: never), before
            their update, on a batch of the training data (the trainer does not show
            callbacks the step's own), with the model's own loss (the batch holds labels).
    """

    def __init__(
        self,
        trainer: transformers.Trainer | None = None,
        every_n_steps: int = 100,
        thresholds: Thresholds | None = None,
        report_path: str | Path | None = None,
        keep: int = 16,
        second_order_every: int = 0,
    ) -> None:
        self.trainer = trainer
        self.recorder = Recorder(every_n_steps, thresholds, keep, second_order_every)
        self.report_path = report_path

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            self.recorder.start(model)

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.recorder.arm(state.global_step)
        loader = kwargs.get("train_dataloader")
        if self.recorder.measures_second_order_at(state.global_step) and loader is not None:
            with torch.random.fork_rng():  # a new pass over the loader draws its order
                batch = next(iter(loader))
            device = next(model.parameters()).device
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            self.recorder.measure(model, batch_loss, batch, optimizer)

    def on_optimizer_step(self, args, state, control, **kwargs):
        # after the optimizer's step, before the gradients are zeroed
        snapshot = self.recorder.collect()
        if snapshot is None or self.trainer is None:
            return
        self.trainer.log({f"normlab/{k}": v for k, v in snapshot_scalars(snapshot).items()})
        for callback in self.trainer.callback_handler.callbacks:
            if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
                log_histograms(callback.tb_writer, snapshot)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            path = self.report_path or Path(args.output_dir) / "report.html"
            self.recorder.finish(Path(path), f"normlab diagnostics of {type(model).__name__}")
