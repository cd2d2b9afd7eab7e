"""Diagnostics on models normlab did not write: every common layer, any input and output, DDP."""

import gc
import math
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
from models import ResNetLike
from torch import nn

from normlab.diagnostics import Diagnostics, Thresholds, format_table, judge_recording
from normlab.nn import Kind, layer_kind, register_kind


def _record(model, x, loss_of=lambda out: out.float().square().mean(), lr=0.01):
    diag = Diagnostics(model)
    diag.arm()
    loss = loss_of(model(x))
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=lr).step()
    diag.collect(0, loss.item())
    return diag


class NewGELU(nn.Module):
    """transformers' NewGELUActivation, written out: a class normlab has never seen."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


@pytest.mark.parametrize(
    "module, family, name",
    [
        (nn.GELU(), "rectifying", "gelu"),
        (nn.SiLU(), "rectifying", "silu"),
        (nn.LeakyReLU(0.2), "rectifying", "leaky_relu"),
        (nn.ELU(), "rectifying", "elu"),
        (nn.Mish(), "rectifying", "mish"),
        (nn.Softplus(), "rectifying", "softplus"),
        (nn.Hardtanh(-2, 2), "saturating", "hardtanh"),
        (nn.Softsign(), "saturating", "softsign"),
        (NewGELU(), "rectifying", "newgelu"),  # recognized by what it does
        (nn.Conv2d(3, 4, 3), "conv", "conv"),
        (nn.Embedding(10, 4), "embedding", "embedding"),
        (nn.MultiheadAttention(8, 2), "attention", "attention"),
        (nn.RMSNorm(4), "norm", "rmsnorm"),
    ],
)
def test_layers_are_recognized_by_what_they_do(module, family, name):
    kind = layer_kind(module)
    assert (kind.family, kind.name) == (family, name)
    if name == "hardtanh":
        assert (kind.low, kind.high) == (-2.0, 2.0)
    if name == "softplus":
        assert kind.floor == pytest.approx(math.log(2))
    for not_a_layer in (nn.Identity(), nn.Dropout(0.5), nn.Softmax(dim=-1), nn.Flatten()):
        assert layer_kind(not_a_layer) is None


def test_each_rectifier_counts_its_dead_units_against_its_own_floor():
    for act in (nn.GELU(), nn.Softplus(), NewGELU()):
        model = nn.Sequential(nn.Linear(6, 8), act)
        with torch.no_grad():
            model[0].bias[:4] = -50.0  # half the units never see a positive input
        snap = _record(model, torch.randn(64, 6)).history[-1]
        (layer,) = [x for x in snap.layers if x.family == "rectifying"]
        assert layer.dead == pytest.approx(0.5), type(act).__name__
        assert layer.saturated is None


def test_a_conv_nets_dead_relu_channels_and_the_fix_it_suggests():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        model[0].bias[:3] = -100.0  # 3 of 4 channels dead at every position
        model[0].weight.mul_(4)
    diag = _record(model, torch.randn(8, 3, 6, 6))
    relu = next(x for x in diag.history[-1].layers if x.name == "1")
    assert relu.dead == pytest.approx(0.75)  # per channel, over the batch and the pixels
    (verdict,) = [v for v in judge_recording(diag).verdicts if v.kind == "dead"]
    assert verdict.layer == "1" and "the weights of 0 have std" in verdict.message
    assert "Kaiming's for relu" in verdict.message


def test_a_saturated_layer_names_its_weights_scale_against_kaiming():
    model = nn.Sequential(nn.Linear(50, 50), nn.Tanh(), nn.Linear(50, 2))
    with torch.no_grad():
        nn.init.normal_(model[0].weight, std=3.0 / math.sqrt(50))  # 1.8× Kaiming's 5/3
    diag = _record(model, torch.randn(256, 50))
    (verdict,) = [v for v in judge_recording(diag).verdicts if v.kind == "saturated"]
    assert "the weights of 0 have std 1.8× Kaiming's for tanh" in verdict.message


def test_a_bias_before_a_batchnorm_is_named():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    diag = _record(model, torch.randn(8, 3, 6, 6))
    (verdict,) = [v for v in judge_recording(diag).verdicts if v.kind == "bias-before-batchnorm"]
    assert verdict.layer == "0" and "remove it" in verdict.message
    assert verdict.value < 1e-5  # it receives no gradient


class TinyTransformer(nn.Module):
    """Embeddings, attention (a tuple out), LayerNorm, a GELU MLP: GPT-2's pieces, by dict."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), NewGELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 20)

    def forward(self, input_ids):
        x = self.embed(input_ids)  # (B, T, 16)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        x = x + self.mlp(self.norm(x))
        return {"logits": self.head(x)}


@dataclass
class Output:
    loss: torch.Tensor
    logits: torch.Tensor


def test_a_transformer_with_dict_input_and_output_records_every_layer():
    model = TinyTransformer()
    batch = {"input_ids": torch.randint(0, 20, (4, 7))}
    diag = Diagnostics(model)
    diag.arm()
    out = model(**batch)
    out["logits"].square().mean().backward()
    diag.collect(0)
    kinds = {x.name: x.kind for x in diag.history[-1].layers}
    assert kinds["embed"] == "embedding" and kinds["attn"] == "attention"
    assert kinds["mlp.1"] == "newgelu" and kinds["norm"] == "layernorm"
    assert diag.history[-1].layers[1].grad_std is not None  # the attention's gradient too
    assert diag.unrecorded == []


def test_a_dataclass_output_and_an_unknown_layer_is_listed_not_dropped():
    class Scale(nn.Module):  # parameters, no known kind: listed as not recorded
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return x * self.s

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.scale = nn.Linear(3, 3), Scale()

        def forward(self, x):
            y = self.scale(self.linear(x))
            return Output(loss=y.square().mean(), logits=y)

    model = Model()
    diag = Diagnostics(model)
    diag.arm()
    model(torch.randn(5, 3)).loss.backward()
    diag.collect(0)
    assert diag.unrecorded == ["scale"]
    assert "not recorded (no known kind): scale" in format_table(judge_recording(diag))


def test_a_registered_kind_is_recorded_as_its_family():
    class Cube(nn.Module):
        def forward(self, x):
            return x**3

    register_kind(Cube, Kind("cube", "saturating", low=-1.0, high=1.0))
    diag = _record(nn.Sequential(nn.Linear(4, 4), Cube()), torch.randn(32, 4))
    (layer,) = [x for x in diag.history[-1].layers if x.kind == "cube"]
    assert layer.family == "saturating" and layer.saturated is not None


def test_a_resnet_is_recorded_conv_by_conv():
    model = ResNetLike()
    diag = _record(model, torch.randn(4, 3, 8, 8))
    kinds = [x.kind for x in diag.history[-1].layers]
    assert kinds.count("conv") == 6 and kinds.count("batchnorm") == 6
    assert len(diag.history[-1].batchnorms) == 6


def test_torch_compile_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"wrapped by torch\.compile.*record model\._orig_mod"):
        Diagnostics(torch.compile(nn.Linear(3, 3)))


def test_a_ddp_model_is_recorded(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(4, 8), nn.Tanh()))
        layers = _record(model, torch.randn(16, 4)).history[-1].layers
        # DDP's reducer goes while its group lives: freed after it, gloo's teardown can hang
        del model
        gc.collect()  # and any cycle through it
    finally:
        dist.destroy_process_group()
    assert [x.name for x in layers] == ["module.0", "module.1"]
    assert layers[1].grad_std > 0


def test_memory_does_not_grow_with_the_recordings():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
    diag = Diagnostics(model, keep=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(30):
        diag.arm()
        model(torch.randn(16, 4)).square().mean().backward()
        optimizer.step()
        diag.collect(step)
    assert [s.step for s in diag.history] == [0, 26, 27, 28, 29]  # the first and the last 4
    assert len(diag.update_history["0.weight"]) == 30  # a pair of floats per recording
    report = judge_recording(diag, thresholds=Thresholds(update_sustained=3))
    assert len(report.update_history["0.weight"]) == 30


def test_an_armed_step_without_a_backward_pass_is_a_clear_error():
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
    diag = Diagnostics(model)
    diag.arm()
    model(torch.randn(4, 3))
    with pytest.raises(RuntimeError, match="forward pass but no backward pass"):
        diag.collect(0)


def test_audit_judges_one_step_of_any_model(tmp_path):
    import normlab

    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    before = [p.detach().clone() for p in model.parameters()]
    result = normlab.audit(model, torch.randn(128, 8) * 20)  # saturates the tanh
    assert [v.kind for v in result.verdicts] == ["saturated"]
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert "verdicts (1):" in result.table() and '"verdicts"' in result.to_json()
    page = result.to_html(tmp_path / "audit.html").read_text()
    assert "<img" in page and "saturated" in page
    # one recording: its propagation drawn once, not as first and last; its activations are
    # the first view by kind, and its update:data ratios a column of the table, not a figure
    assert page.count('alt="signal propagation at the only recording"') == 1
    assert page.count('alt="activation histograms') == 0
    assert page.count('alt="activations: outputs and their gradients at step 0 (1 layers)"') == 1
    assert page.count("<img") == 4  # propagation, activations, linear layers, weight gradients
    # the model's own loss (transformers-style), a loss function, an optimizer that steps
    batch = {"input_ids": torch.randint(0, 20, (2, 5))}
    out = normlab.audit(TinyTransformer(), batch, lambda out, _: out["logits"].logsumexp(-1).mean())
    assert out.report.snapshot.loss is not None
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stepped = normlab.audit(model, torch.randn(32, 8), optimizer=optimizer)
    assert stepped.report.snapshot.params[0].update_to_data > 0
