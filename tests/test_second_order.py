"""The second-order verdicts (lr-too-high, batch-vs-noise) and the instruments in normlab.audit
and normlab diagnose: each verdict fires on a case built for it and stays quiet on a healthy one."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from models import CdistLoss, SquareOnce
from torch import nn

import normlab.nn as nl
from normlab import audit
from normlab.curvature import Hessian, hessian_trace, top_eigenvalue
from normlab.diagnostics import SecondOrderStats, Snapshot, snapshot_from_dict, snapshot_to_dict
from normlab.diagnostics.rules import Thresholds, verdicts
from normlab.lm.checkpoint import load_checkpoint
from normlab.lm.cli import main
from normlab.noise import gradient_noise
from normlab.second_order import default_micro_batch, measure_second_order


def _judged(**fields):
    stats = dict(
        sharpness=None,
        hessian_trace=None,
        noise_scale=None,
        preconditioned_sharpness=None,
        lr=None,
        beta1=None,
        batch_size=256,
    )
    snap = Snapshot(0, 1.0, None, [], [], [], SecondOrderStats(**{**stats, **fields}))
    return [v for v in verdicts([snap]) if v.layer == "model"]


def test_lr_too_high_fires_above_2_over_lr_and_says_which_rate_sits_under_the_line():
    (verdict,) = _judged(sharpness=300.0, lr=0.01)
    assert verdict.kind == "lr-too-high"
    assert verdict.threshold == pytest.approx(200.0)
    assert "2/lr = 200" in verdict.message and "below 0.00667" in verdict.message
    assert _judged(sharpness=150.0, lr=0.01) == []


def test_lr_too_high_judges_adams_preconditioned_sharpness_against_its_own_line():
    # (2 + 2·0.9)/(1 − 0.9) = 38: the line is 38/lr = 3,800 at lr 0.01
    (verdict,) = _judged(sharpness=1.0, preconditioned_sharpness=5000.0, lr=0.01, beta1=0.9)
    assert verdict.threshold == pytest.approx(3800.0)
    assert _judged(sharpness=1e6, preconditioned_sharpness=3000.0, lr=0.01, beta1=0.9) == []


def test_batch_vs_noise_fires_far_below_and_far_above_the_noise_scale_and_not_near_it():
    (below,) = _judged(noise_scale=10_000.0, batch_size=32)
    assert below.kind == "batch-vs-noise" and "far below" in below.message
    (above,) = _judged(noise_scale=100.0, batch_size=4096)
    assert "far above" in above.message
    assert _judged(noise_scale=1000.0, batch_size=256) == []
    assert _judged(noise_scale=300.0, batch_size=32) == []  # within the factor of 10
    loose = Thresholds(noise_factor=100.0)
    snap = Snapshot(
        0, 1.0, None, [], [], [], SecondOrderStats(None, None, 100.0, None, None, None, 4096)
    )
    assert [v for v in verdicts([snap], loose) if v.layer == "model"] == []


def test_a_snapshots_second_order_statistics_survive_its_json_row():
    so = SecondOrderStats(3.0, 40.0, 512.0, None, 0.1, None, 64, "a note")
    snap = Snapshot(5, 2.0, 2.1, [], [], [], so)
    assert snapshot_from_dict(json.loads(json.dumps(snapshot_to_dict(snap)))) == snap


class _Net(nn.Module):
    """Takes (x, y) as a batch, as audit calls model(*batch); returns logits."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 32), nl.BatchNorm1d(32), nn.Tanh(), nn.Linear(32, 4))

    def forward(self, x, y=None):
        return self.body(x)


def _batch(n=256):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def _loss(out, batch):
    return F.cross_entropy(out, batch[1])


def test_audit_measures_before_the_step_what_the_instruments_measure_alone():
    torch.manual_seed(0)
    model = _Net()
    batch = _batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    expected_model = _Net()
    expected_model.load_state_dict(model.state_dict())
    result = audit(model, batch, _loss, optimizer, second_order=True)
    # the same measurements, by hand, on the weights before the step
    g = torch.Generator().manual_seed(0)
    H = Hessian(expected_model, lambda m: _loss(m(*batch), batch))
    assert result.sharpness == top_eigenvalue(H, 20, generator=g).value
    assert result.hessian_trace == hessian_trace(H, 10, generator=g).value
    noise = gradient_noise(
        expected_model, lambda m, b: _loss(m(*b), b), batch, default_micro_batch(256)
    )
    assert result.noise_scale == pytest.approx(noise.b_simple, rel=1e-6)
    assert result.preconditioned_sharpness is None and result.second_order.note is None
    keys = json.loads(result.to_json())
    assert keys["sharpness"] == result.sharpness and keys["noise_scale"] == result.noise_scale
    assert "second order" in result.table()


def test_audit_with_a_learning_rate_far_above_the_stability_line_says_lr_too_high():
    for lr, fires in ((100.0, True), (0.01, False)):
        torch.manual_seed(0)
        model = _Net()
        result = audit(
            model, _batch(), _loss, torch.optim.SGD(model.parameters(), lr=lr), second_order=True
        )
        kinds = [v.kind for v in result.verdicts]
        assert ("lr-too-high" in kinds) is fires, lr


def test_audit_with_adamw_after_its_first_step_measures_the_preconditioned_sharpness():
    torch.manual_seed(0)
    model = _Net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = audit(model, _batch(), _loss, optimizer, second_order=True)
    assert (
        first.preconditioned_sharpness is None
        and "before its first step" in first.second_order.note
    )
    second = audit(model, _batch(), _loss, optimizer, second_order=True)
    assert second.preconditioned_sharpness is not None and second.preconditioned_sharpness > 0


def test_a_model_without_a_second_derivative_keeps_its_first_order_diagnostics():
    model = nn.Sequential(nn.Linear(8, 8), SquareOnce(), nn.Tanh())
    result = audit(
        model, torch.randn(64, 8, generator=torch.Generator().manual_seed(0)), second_order=True
    )
    assert result.sharpness is None and result.hessian_trace is None
    assert "autograd Function OnceDifferentiableSquare in layer '1'" in result.second_order.note
    assert result.noise_scale is not None  # the gradient noise needs only first derivatives
    assert result.report.snapshot.layers  # the first-order recording ran


def test_an_operator_without_a_double_backward_leaves_the_curvature_out_with_a_note():
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))  # cdist's own kernel
    stats = measure_second_order(CdistLoss(), lambda m, b: m(b), x)
    assert stats.sharpness is None and stats.hessian_trace is None
    assert "_cdist_backward" in stats.note
    assert stats.noise_scale is not None  # the gradient noise needs only first derivatives


def test_normlab_diagnose_json_carries_the_second_order_keys_at_the_top(capsys):
    assert main(["diagnose", "--preset", "lecture-deep", "--batch-size", "256", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    # Hutchinson's estimate from 10 probes falls on either side of 0 where the trace is small
    # against its spread, as at initialization: its sign is not what this test checks
    assert out["sharpness"] > 0 and math.isfinite(out["hessian_trace"])
    assert out["sharpness"] == out["snapshot"]["second_order"]["sharpness"]
    assert out["hessian_trace"] == out["snapshot"]["second_order"]["hessian_trace"]
    assert "preconditioned_sharpness" in out and "noise_scale" in out


def test_a_run_measures_at_its_second_order_cadence_and_trains_the_same_numbers(tmp_path, tiny):
    def train(name, every):
        flags = ["--steps", "40", "--diagnose-every", "10", "--second-order-every", every]
        assert (
            main(["train", *tiny, "--dropout", "0.1", *flags, "--out", str(tmp_path / name)]) == 0
        )
        return tmp_path / name

    measured, plain = train("measured", "20"), train("plain", "0")

    def rows(run):
        return [json.loads(line) for line in (run / "diagnostics.jsonl").read_text().splitlines()]

    assert [r["step"] for r in rows(measured) if r["second_order"]] == [0, 20]
    so = rows(measured)[0]["second_order"]
    assert so["sharpness"] > 0 and so["lr"] is not None
    assert all(r["second_order"] is None for r in rows(plain))
    # measuring moved nothing: not the weights, not the running statistics, not dropout's draws
    assert (measured / "metrics.jsonl").read_text() == (plain / "metrics.jsonl").read_text()
    a = load_checkpoint(measured)["model"]
    b = load_checkpoint(plain)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "Curvature and gradient noise" in (measured / "report.html").read_text()
