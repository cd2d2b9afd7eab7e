import json
import math

import pytest
import torch
from torch import nn

from normlab import nn as nl
from normlab.diagnostics import (
    Diagnostics,
    Thresholds,
    format_table,
    judge,
    snapshot_from_dict,
    snapshot_to_dict,
)
from normlab.lm.config import ModelConfig
from normlab.lm.model import LanguageModel
from normlab.lm.presets import PRESETS


def _step(model, diag, x, y, optimizer, step=0, loss_fn=nn.functional.cross_entropy):
    """One recorded training step on any model whose forward returns logits."""
    diag.arm()
    loss = loss_fn(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return diag.collect(step, loss.item())


def _kinds(rep):
    return {v.kind for v in rep.verdicts}


def _data(n=256, d=10, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def test_healthy_lecture_deep_at_step_0_is_quiet():
    model = LanguageModel(ModelConfig(**PRESETS["lecture-deep"]["model"]), verbose=False)
    diag = Diagnostics(model)
    X, Y = torch.randint(0, 27, (32, 3)), torch.randint(0, 27, (32,))
    diag.arm()
    _, loss = model(X, Y)
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    diag.collect(0, loss.item())
    rep = judge(diag.history, num_classes=27)
    assert rep.verdicts == []
    tanh = [x for x in rep.snapshot.layers if x.kind == "tanh"]
    assert len(tanh) == 5 and all(x.saturated < 0.1 for x in tanh)


def test_saturated_tanh_fires_and_names_the_layer():
    model = nn.Sequential(nn.Linear(10, 50), nn.Tanh(), nn.Linear(50, 5))
    with torch.no_grad():
        model[0].weight.mul_(20)
    diag = Diagnostics(model)
    _step(model, diag, *_data(), torch.optim.SGD(model.parameters(), lr=0.01))
    (v,) = [v for v in judge(diag.history).verdicts if v.kind == "saturated"]
    assert v.layer == "1" and v.value > 0.5 and "beyond" in v.message


def test_dead_relu_fires():
    model = nn.Sequential(nn.Linear(10, 50), nn.ReLU(), nn.Linear(50, 5))
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # never positive
    diag = Diagnostics(model)
    _step(model, diag, *_data(), torch.optim.SGD(model.parameters(), lr=0.01))
    dead = [v for v in judge(diag.history).verdicts if v.kind == "dead"]
    assert dead and dead[0].layer == "1" and dead[0].value == 1.0


def test_vanishing_stack_fires():
    layers = []
    for _ in range(12):  # gain 0.5 under tanh: the signal shrinks every layer
        layers += [
            nl.Linear(32, 32, init=lambda w: nn.init.normal_(w, std=0.5 / 32**0.5)),
            nl.Tanh(),
        ]
    model = nn.Sequential(*layers, nn.Linear(32, 5))
    diag = Diagnostics(model)
    _step(model, diag, *_data(d=32), torch.optim.SGD(model.parameters(), lr=0.01))
    rep = judge(diag.history)
    assert "vanishing" in _kinds(rep)
    assert "saturated" not in _kinds(rep)


def test_confident_at_init_fires_on_a_confidently_wrong_output():
    model = nn.Sequential(nn.Linear(10, 5))
    with torch.no_grad():
        model[0].weight.mul_(50)
    diag = Diagnostics(model)
    _step(model, diag, *_data(), torch.optim.SGD(model.parameters(), lr=0.01))
    rep = judge(diag.history, num_classes=5)
    (v,) = [v for v in rep.verdicts if v.kind == "confident-at-init"]
    assert v.value > math.log(5) + 1


def test_update_ratio_off_fires_only_when_sustained():
    model = nn.Sequential(nn.Linear(10, 20), nn.Tanh(), nn.Linear(20, 5))
    diag = Diagnostics(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-9)  # far too small: ratio near 1e-10
    for step in range(3):
        _step(model, diag, *_data(seed=step), optimizer, step=step)
        fired = [v for v in judge(diag.history).verdicts if v.kind == "update-ratio-off"]
        assert bool(fired) == (step == 2)
    assert {v.layer for v in fired} == {"0.weight", "2.weight"}


def test_bn_drift_fires_after_the_data_shifts():
    model = nn.Sequential(
        nl.Linear(10, 16, bias=False), nl.BatchNorm1d(16), nl.Tanh(), nn.Linear(16, 5)
    )
    diag = Diagnostics(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    for step in range(40):  # 40 batches at momentum 0.1: the running statistics have settled
        x, y = _data(seed=step)
        model(x)
    _step(model, diag, *_data(seed=99), optimizer, step=40)
    assert "bn-drift" not in _kinds(judge(diag.history))
    x, y = _data(seed=100)
    _step(model, diag, x + 5.0, y, optimizer, step=41)  # the inputs move: the running mean is stale
    drift = [v for v in judge(diag.history).verdicts if v.kind == "bn-drift"]
    assert drift and drift[0].layer == "1"


def test_update_ratio_is_right_for_sgd_and_adam():
    for make in (lambda p: torch.optim.SGD(p, lr=0.05), lambda p: torch.optim.Adam(p, lr=1e-3)):
        model = nn.Sequential(nn.Linear(10, 20), nn.Tanh(), nn.Linear(20, 5))
        optimizer = make(model.parameters())
        before = model[0].weight.detach().clone()
        diag = Diagnostics(model)
        snap = _step(model, diag, *_data(), optimizer)
        stats = {p.name: p for p in snap.params}["0.weight"]
        grad_std = model[0].weight.grad.std().item()
        change = (model[0].weight.detach() - before).std().item()
        assert stats.update_to_data == pytest.approx(change / before.std().item(), rel=1e-4)
        assert stats.grad_to_data == pytest.approx(grad_std / before.std().item(), rel=1e-4)
        if isinstance(optimizer, torch.optim.SGD):  # plain SGD: the change is lr × grad
            assert stats.update_to_data == pytest.approx(
                0.05 * grad_std / before.std().item(), rel=1e-3
            )


def test_hooks_leave_outputs_and_gradients_unchanged():
    torch.manual_seed(1)
    model = LanguageModel(ModelConfig(**PRESETS["lecture-deep"]["model"]), verbose=False)
    X, Y = torch.randint(0, 27, (64, 3)), torch.randint(0, 27, (64,))
    logits_plain, loss = model(X, Y)
    loss.backward()
    grads_plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for m in model.modules():  # undo the running-statistics update of the first pass
        if isinstance(m, nl.BatchNorm1d):
            m.reset_running_stats()
    diag = Diagnostics(model)
    diag.arm()
    logits, loss = model(X, Y)
    loss.backward()
    assert torch.equal(logits, logits_plain)
    for p, g in zip(model.parameters(), grads_plain, strict=True):
        assert torch.equal(p.grad, g)
    diag.collect(0, loss.item())


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_arming_twice_does_not_double_count_and_detach_removes_every_hook():
    model = nn.Sequential(nn.Linear(10, 20), nn.BatchNorm1d(20), nn.Tanh(), nn.Linear(20, 5))
    diag = Diagnostics(model)
    assert _hook_count(model) == 0  # nothing attached between recordings: no cost
    diag.arm()
    n_hooks = _hook_count(model)
    diag.arm()
    # four layers, the BatchNorm's pre-hook, and the model's two that watch in-place writes
    assert n_hooks == _hook_count(model) == 7
    snap = _step(model, diag, *_data(), torch.optim.SGD(model.parameters(), lr=0.1))
    assert [x.name for x in snap.layers] == ["0", "1", "2", "3"]  # torch's own layers work too
    assert [b.name for b in snap.batchnorms] == ["1"]
    assert _hook_count(model) == 0  # collect() detached them
    diag.arm()
    diag.detach()
    assert _hook_count(model) == 0


def test_one_host_transfer_per_recording(monkeypatch):
    model = nn.Sequential(nn.Linear(10, 20), nn.BatchNorm1d(20), nn.Tanh(), nn.Linear(20, 5))
    diag = Diagnostics(model)
    calls = {"cpu": 0}
    real_cpu = torch.Tensor.cpu

    def counting_cpu(self, *a, **k):
        calls["cpu"] += 1
        return real_cpu(self, *a, **k)

    def no_item(self):
        raise AssertionError(".item() during a recording")

    x, y = _data()
    diag.arm()
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "cpu", counting_cpu)
        m.setattr(torch.Tensor, "item", no_item)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        diag.collect(0)
    assert calls["cpu"] == 1


def test_eval_mode_passes_are_not_recorded():
    model = nn.Sequential(nn.Linear(10, 20), nn.Tanh(), nn.Linear(20, 5))
    diag = Diagnostics(model)
    diag.arm()
    model.eval()
    with torch.no_grad():
        model(_data()[0])
    model.train()
    assert diag.collect(0).layers == []


def test_json_round_trip_and_table():
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    diag = Diagnostics(model)
    _step(model, diag, *_data(), torch.optim.Adam(model.parameters()))
    rep = judge(diag.history, num_classes=5, thresholds=Thresholds(dead=0.0))  # fires, or none
    data = json.loads(rep.to_json())
    assert data["snapshot"]["step"] == 0 and data["num_classes"] == 5
    assert snapshot_from_dict(data["snapshot"]) == rep.snapshot
    table = format_table(rep)
    assert "log10 upd:data" in table and "verdicts" in table
    assert len(data["snapshot"]["layers"][1]["hist"]) == 50


def test_percentiles_and_histograms_match_torch():
    from normlab.diagnostics.snapshot import PERCENTILES
    from normlab.diagnostics.stats import BINS, FINE_BINS, histograms, percentiles

    rows = torch.randn(3, 30001) * torch.tensor([[0.5], [2.0], [9.0]]) + 0.5
    r = rows.abs().amax(1)
    hist = histograms(rows, r, BINS).view(3, BINS)
    fine = histograms(rows, r, FINE_BINS).view(3, FINE_BINS)
    got = percentiles(fine, r)
    for i in range(3):
        ri = r[i].item()
        torch.testing.assert_close(hist[i], torch.histc(rows[i], BINS, -ri, ri))
        expected = torch.quantile(rows[i], torch.tensor([p / 100 for p in PERCENTILES]))
        torch.testing.assert_close(got[i], expected, atol=2 * ri / FINE_BINS, rtol=0)


def test_snapshot_to_dict_equals_asdict():
    from dataclasses import asdict

    model = nn.Sequential(nn.Linear(10, 20), nn.BatchNorm1d(20), nn.Tanh(), nn.Linear(20, 5))
    snap = _step(model, Diagnostics(model), *_data(), torch.optim.SGD(model.parameters(), lr=0.1))
    assert snapshot_to_dict(snap) == asdict(snap)


def test_conv_batchnorm2d_model():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)
    )
    diag = Diagnostics(model)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,))
    snap = _step(model, diag, x, y, torch.optim.SGD(model.parameters(), lr=0.1))
    assert [b.name for b in snap.batchnorms] == ["1"]
    assert {x.kind for x in snap.layers} == {"conv", "batchnorm", "relu", "linear"}


def test_saved_snapshots_can_be_judged_again_with_other_thresholds():
    model = nn.Sequential(nn.Linear(10, 50), nn.Tanh(), nn.Linear(50, 5))
    with torch.no_grad():
        model[0].weight.mul_(3)  # some saturation, below the default threshold
    diag = Diagnostics(model)
    _step(model, diag, *_data(), torch.optim.SGD(model.parameters(), lr=0.01))
    saved = [json.loads(json.dumps(snapshot_to_dict(s))) for s in diag.history]  # a jsonl row
    history = [snapshot_from_dict(row) for row in saved]
    saturated = history[-1].layers[1].saturated
    assert 0 < saturated < Thresholds().saturated
    assert "saturated" not in _kinds(judge(history))
    strict = judge(history, thresholds=Thresholds(saturated=saturated / 2))
    assert "saturated" in _kinds(strict)


def test_batchnorm_settling_is_measured_and_judged_by_the_threshold():
    model = nn.Sequential(nl.Linear(10, 16, bias=False), nl.BatchNorm1d(16), nl.Tanh())
    diag = Diagnostics(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    for step in range(5):
        x, y = _data(seed=step)
        _step(model, diag, x + 5.0 * step, y, optimizer, step=step, loss_fn=lambda o, _: o.sum())
    (bn,) = diag.history[-1].batchnorms
    assert bn.time_constants == pytest.approx(0.4)  # 4 batches tracked before it × momentum 0.1
    assert "bn-drift" not in _kinds(judge(diag.history))  # not settled at the default 3
    assert "bn-drift" in _kinds(judge(diag.history, thresholds=Thresholds(bn_settled=0.4)))


def test_row_std_and_param_stats_equal_torch_for_one_row_and_several():
    from normlab.diagnostics.stats import ParamCopies, copy_params, param_stats, row_std

    for shape in [(1, 1), (1, 70_000), (3, 1), (4, 33)]:
        rows = torch.randn(*shape, dtype=torch.float64) * 3 + 1
        expected = rows.std(1) if shape[1] > 1 else torch.zeros(shape[0], dtype=rows.dtype)
        torch.testing.assert_close(row_std(rows), expected)
    params = [torch.randn(5, 7, requires_grad=True) for _ in range(3)] + [torch.randn(70_000)]
    params[0].grad = torch.randn(5, 7)
    before = [p.detach().clone() for p in params]
    groups = ([0, 1, 2], [3])
    # the C++ operator's copies (with their moments) where it is built, and plain ones (ATen)
    copied = [copy_params([params[i] for i in indices]) for indices in groups]
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 1e-3)
    for indices, kernel_copies in zip(groups, copied, strict=True):
        group = [params[i] for i in indices]
        plain = ParamCopies([before[i].clone() for i in indices], None)  # ATen: updates them
        grads = [p.grad for p in group]
        for columns in (param_stats(kernel_copies, group, grads), param_stats(plain, group, grads)):
            for row, i in enumerate(indices):
                p, b = params[i], before[i]
                assert columns["data_std"][row].item() == pytest.approx(b.std().item(), rel=1e-5)
                update = (p.detach() - b).std().item()
                assert columns["update_std"][row].item() == pytest.approx(update, rel=1e-4)
                if p.grad is None:
                    assert math.isnan(columns["grad_std"][row].item())
                else:
                    grad_std, grad_range = p.grad.std().item(), p.grad.abs().max().item()
                    assert columns["grad_std"][row].item() == pytest.approx(grad_std, rel=1e-5)
                    assert columns["grad_range"][row].item() == pytest.approx(grad_range, rel=1e-6)


def test_only_a_models_first_recording_watches_its_operations(monkeypatch):
    """The first recording watches every operation for in-place writes; later ones copy, at
    the hook, exactly the outputs the first saw written, and measure the same numbers."""
    from normlab.diagnostics.keep import KeepAsIs

    class Gate(nn.Module):  # a squeeze-excite-like gate, written in place outside any layer
        def __init__(self):
            super().__init__()
            self.linear, self.bn = nn.Linear(10, 16), nn.BatchNorm1d(16)
            self.act = nn.ReLU(inplace=True)

        def forward(self, x):
            h = self.bn(self.linear(x))
            return self.act(h.mul_(2.0))  # the BatchNorm's output, written twice in place

    calls = []
    dispatch = KeepAsIs.__torch_dispatch__

    def counted(self, *args, **kwargs):
        calls.append(1)
        return dispatch(self, *args, **kwargs)

    monkeypatch.setattr(KeepAsIs, "__torch_dispatch__", counted)
    model = Gate()
    x = torch.randn(32, 10)
    expected = model.bn(model.linear(x)).detach()  # what the BatchNorm's output was
    for watched in (True, False):
        calls.clear()
        diag = Diagnostics(model)
        diag.arm()
        model(x).sum().backward()
        layers = {layer.name: layer for layer in diag.collect(0).layers}
        diag.detach()
        assert bool(calls) == watched
        assert layers["bn"].mean == pytest.approx(expected.mean().item(), abs=1e-6)
        assert layers["bn"].std == pytest.approx(expected.std().item(), rel=1e-5)


def test_a_layer_whose_output_is_a_leaf_has_its_gradient_recorded():
    """A layer that returns a tensor no operation made (a learned table: a leaf) has no
    autograd node to hook: its gradient is kept as it reaches the leaf, the parameter's own."""

    class Table(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 3))

        def forward(self, _x):
            return self.weight

    nl.register_kind(Table, nl.Kind("table", "embedding"))
    model = nn.Sequential(Table(), nn.Tanh())
    diag = Diagnostics(model)
    diag.arm()
    model(None).sum().backward()  # no optimizer step: it would write the table (the output)
    snap = diag.collect(0)
    table, tanh = snap.layers
    assert table.grad_std == snap.params[0].grad_std  # the same gradient, measured twice
    expected = 1 - model(None).detach().square()  # d sum(tanh(w)) / dw = 1 - tanh(w)²
    assert table.grad_std == pytest.approx(expected.std().item(), rel=1e-6)
    assert tanh.grad_std == 0.0  # the gradient of a sum: ones


class _ShapedBatchNorm(nn.Module):
    """A BatchNorm of another library's making: running statistics shaped (1, C, 1, 1), and
    (``count=False``) no count of its batches."""

    def __init__(self, channels, count=True):
        super().__init__()
        self.track_running_stats, self.eps, self.momentum = True, 1e-5, 0.1
        self.register_buffer("running_mean", torch.randn(1, channels, 1, 1))
        self.register_buffer("running_var", torch.rand(1, channels, 1, 1) + 0.5)
        if count:
            self.register_buffer("num_batches_tracked", torch.tensor(4))

    def forward(self, x):
        mean, var = x.mean((0, 2, 3), keepdim=True), x.var((0, 2, 3), keepdim=True)
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var, self.momentum)
        return (x - mean) / (var + self.eps).sqrt()


def test_batchnorms_of_any_making_have_their_drift_from_the_statistics_before_the_batch():
    """Running statistics of another shape, and none counted (NaN time constants): the drift
    against the batch's own statistics and the copy of the running ones taken before it; a
    lazy BatchNorm armed before its first batch has none to compare yet."""
    nl.register_kind(_ShapedBatchNorm, nl.Kind("batchnorm", "batchnorm"))
    model = nn.Sequential(nn.Conv2d(2, 3, 3), _ShapedBatchNorm(3), _ShapedBatchNorm(3, count=False))
    x = torch.randn(4, 2, 6, 6)
    before = [
        (m.running_mean.clone().flatten(), m.running_var.clone().flatten()) for m in model[1:]
    ]
    diag = Diagnostics(model)
    diag.arm()
    inputs = [model[0](x)]
    inputs.append(model[1](inputs[0]))
    model[2](inputs[1]).square().mean().backward()
    snap = diag.collect(0)
    for bn, x_in, (running_mean, running_var) in zip(snap.batchnorms, inputs, before, strict=True):
        mean, var = x_in.mean((0, 2, 3)), x_in.var((0, 2, 3), unbiased=False)
        drift = ((running_mean - mean).abs() / (var + 1e-5).sqrt()).max().item()
        ratio = (running_var + 1e-5) / (var + 1e-5)
        assert bn.mean_drift == pytest.approx(drift, rel=1e-5)
        assert bn.var_ratio == pytest.approx(torch.maximum(ratio, 1 / ratio).max().item(), rel=1e-5)
    assert snap.batchnorms[0].time_constants == pytest.approx(0.4)
    assert math.isnan(snap.batchnorms[1].time_constants)

    lazy = nn.Sequential(nn.Linear(4, 3), nn.LazyBatchNorm1d(affine=False))
    diag = Diagnostics(lazy)
    diag.arm()
    lazy(torch.randn(8, 4)).square().mean().backward()
    snap = diag.collect(0)
    assert [layer.name for layer in snap.layers] == ["0", "1"] and snap.batchnorms == []


def test_a_gradient_taken_with_respect_to_a_recorded_output_is_recorded():
    """``torch.autograd.grad`` with respect to a layer's output runs that tensor's hooks,
    though not the node that made it."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    diag = Diagnostics(model)
    diag.arm()
    features = model[1](model[0](torch.randn(8, 4)))
    (grad,) = torch.autograd.grad(model[2](features).square().sum(), [features])
    snap = diag.collect(0)
    assert snap.layers[1].grad_std == pytest.approx(grad.std().item(), rel=1e-6)
    assert snap.layers[0].grad_std is None  # no gradient reached it
