"""The diagnostics callbacks, with the real Lightning and transformers on models from configs."""

import csv

import pytest
import torch
from torch import nn

lightning = pytest.importorskip("lightning", reason="the lightning extra is not installed")
transformers = pytest.importorskip("transformers", reason="the transformers extra is not installed")


def _tensorboard_histograms(folder) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in folder.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events), size_guidance={"histograms": 0})
        accumulator.Reload()
        tags |= set(accumulator.Tags()["histograms"])
    return tags


class TinyModule(lightning.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(8, 16, bias=False), nn.BatchNorm1d(16), nn.GELU(), nn.Linear(16, 3)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit_tiny_module(tmp_path, callback, max_steps, loggers):
    """TinyModule fit on random data for ``max_steps`` with ``callback``, on the CPU."""
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(256, 8), torch.randint(0, 3, (256,)))
    trainer = lightning.Trainer(
        max_steps=max_steps,
        default_root_dir=tmp_path,
        logger=loggers,
        callbacks=[callback],
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(TinyModule(), torch.utils.data.DataLoader(data, batch_size=32))


@pytest.mark.slow
def test_lightning_callback_logs_through_the_trainers_loggers_and_writes_the_report(
    tmp_path, capsys
):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from normlab.integrations.lightning import DiagnosticsCallback

    callback = DiagnosticsCallback(every_n_steps=5)
    loggers = [CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")]
    _fit_tiny_module(tmp_path, callback, 12, loggers)
    diagnostics = callback.recorder.diagnostics
    assert [s.step for s in diagnostics.history] == [0, 5, 10]
    kinds = {x.name: x.kind for x in diagnostics.history[-1].layers}
    assert kinds == {"net.0": "linear", "net.1": "batchnorm", "net.2": "gelu", "net.3": "linear"}
    (metrics,) = tmp_path.rglob("metrics.csv")
    columns = next(csv.reader(metrics.open()))
    assert (
        "normlab/dead/net.2" in columns and "normlab/log10_update_to_data/net.0.weight" in columns
    )
    assert "activations/net.2" in _tensorboard_histograms(tmp_path / "tb")
    assert (tmp_path / "report.html").stat().st_size > 10_000
    assert "normlab diagnostics at step 10:" in capsys.readouterr().out


def _gpt2_trainer(tmp_path, callback_factory):
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)  # random weights: nothing is downloaded
    ids = torch.randint(0, 64, (64, 16))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=7,
        per_device_train_batch_size=8,
        logging_steps=100,
        report_to=["tensorboard"],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    callback = callback_factory(trainer)
    trainer.add_callback(callback)
    return trainer, callback


@pytest.mark.slow
def test_transformers_callback_logs_through_the_trainer_and_writes_the_report(tmp_path, capsys):
    from normlab.integrations.transformers import DiagnosticsCallback

    trainer, callback = _gpt2_trainer(
        tmp_path, lambda trainer: DiagnosticsCallback(trainer, every_n_steps=3)
    )
    trainer.train()
    diagnostics = callback.recorder.diagnostics
    assert [s.step for s in diagnostics.history] == [0, 3, 6]
    layers = {x.name: x for x in diagnostics.history[-1].layers}
    assert layers["transformer.h.0.mlp.act"].family == "rectifying"  # NewGELUActivation
    assert layers["transformer.h.0.mlp.c_fc"].kind == "linear"  # transformers' Conv1D
    assert layers["transformer.h.0.attn"].kind == "attention"
    assert layers["transformer.wte"].kind == "embedding"
    assert layers["transformer.h.0.attn"].grad_std > 0
    logged = [
        row for row in trainer.state.log_history if "normlab/dead/transformer.h.0.mlp.act" in row
    ]
    assert len(logged) == 3
    assert "activations/transformer.h.1.mlp.act" in _tensorboard_histograms(tmp_path / "runs")
    assert (tmp_path / "report.html").stat().st_size > 10_000
    assert "normlab diagnostics at step 6:" in capsys.readouterr().out


@pytest.mark.slow
def test_lightning_callback_measures_the_second_order_statistics_at_its_cadence(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    from normlab.integrations.lightning import DiagnosticsCallback

    callback = DiagnosticsCallback(every_n_steps=5, second_order_every=4)
    _fit_tiny_module(tmp_path, callback, 9, CSVLogger(tmp_path, name="csv"))
    history = callback.recorder.diagnostics.history
    assert [s.step for s in history] == [0, 4, 5, 8]  # the second order's steps are recorded too
    measured = {s.step: s.second_order for s in history if s.second_order is not None}
    assert set(measured) == {0, 4, 8} and all(so.sharpness > 0 for so in measured.values())
    assert measured[0].lr == 0.1 and measured[0].batch_size == 32
    (metrics,) = tmp_path.rglob("metrics.csv")
    assert "normlab/second_order/sharpness" in next(csv.reader(metrics.open()))


@pytest.mark.slow
def test_transformers_callback_measures_the_second_order_statistics(tmp_path):
    from normlab.integrations.transformers import DiagnosticsCallback

    trainer, callback = _gpt2_trainer(
        tmp_path,
        lambda trainer: DiagnosticsCallback(trainer, every_n_steps=3, second_order_every=6),
    )
    trainer.train()
    history = callback.recorder.diagnostics.history
    measured = {s.step: s.second_order for s in history if s.second_order is not None}
    assert set(measured) == {0, 6}
    so = measured[0]
    assert so.sharpness is not None or "second derivative" in so.note  # measured, or said why
    assert so.noise_scale is not None or "noise" in so.note
    logged = [
        row for row in trainer.state.log_history if "normlab/second_order/hessian_trace" in row
    ]
    assert len(logged) == (2 if so.hessian_trace is not None else 0)
