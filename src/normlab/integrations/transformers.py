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

import transformers
from transformers.integrations import TensorBoardCallback

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
    """

    def __init__(
        self,
        trainer: transformers.Trainer | None = None,
        every_n_steps: int = 100,
        thresholds: Thresholds | None = None,
        report_path: str | Path | None = None,
        keep: int = 16,
    ) -> None:
        self.trainer = trainer
        self.recorder = Recorder(every_n_steps, thresholds, keep)
        self.report_path = report_path

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            self.recorder.start(model)

    def on_step_begin(self, args, state, control, **kwargs):
        self.recorder.arm(state.global_step)

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
