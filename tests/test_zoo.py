"""The library on models we did not write (tests/zoo.py): torchvision, timm and transformers
models built with random weights, each checked against an exact answer."""

import copy

import pytest
import torch
from torch import nn
from zoo import ZOO, ZooModel

from normlab import audit
from normlab.calibrate import calibrate_batchnorm
from normlab.dataflow import call_model, first_tensor
from normlab.fold import fold_batchnorm
from normlab.lsuv import lsuv_
from normlab.nn import batchnorm_training, is_batchnorm

BY_NAME = {f"{z.library}/{z.name}": z for z in ZOO}
# the zoo's models with no BatchNorm: nothing for fold to do
NO_BATCHNORM = {"torchvision/squeezenet1_0", "torchvision/swin_t", "timm/vit_tiny_patch16_224"}
NO_BATCHNORM |= {"timm/nf_resnet26", "transformers/bert", "transformers/gpt2", "transformers/t5"}
WITH_BATCHNORM = [k for k in BY_NAME if k not in NO_BATCHNORM]


def _build(key: str, dtype=torch.float32):
    z: ZooModel = BY_NAME[key]
    torch.manual_seed(0)
    model, batch = z.build().to(dtype), z.batch()
    if isinstance(batch, dict):
        return model, {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
    return model, batch.to(dtype)


def test_the_zoo_covers_what_users_bring():
    libraries = [z.library for z in ZOO]
    assert libraries.count("torchvision") >= 8 and libraries.count("timm") >= 8
    assert libraries.count("transformers") >= 4
    traits = {t for z in ZOO for t in z.traits}
    wanted = ["in-place", "squeeze-excite", "depthwise", "norm-plus-activation", "attention"]
    wanted += ["weight-standardized", "not-fx-traceable", "weights-used-without-their-module"]
    assert set(wanted) <= traits


@pytest.mark.parametrize("key", list(BY_NAME))
def test_audit_records_each_output_as_it_left_its_layer(key):
    """Every recorded mean and std equals that of a copy of the output taken at its hook,
    though in-place activations, residual additions and gates write it afterwards: on the
    model's first recording, which watches every operation, and on the next, which copies at
    the hooks what the first saw written."""
    model, batch = _build(key)
    for _ in range(2):
        copies = {}

        def copy_at_hook(name, copies=copies):
            def hook(_module, _inputs, out):
                out = first_tensor(out)
                # training mode: the recorded pass (kinds are probed in eval mode)
                if out is not None and name not in copies and _module.training:
                    copies[name] = out.detach().double().clone()

            return hook

        handles = [m.register_forward_hook(copy_at_hook(n)) for n, m in model.named_modules()]
        result = audit(model, batch)
        for h in handles:
            h.remove()
        layers = result.report.snapshot.layers
        assert layers and not result.diagnostics.overwritten
        for layer in layers:
            x = copies[layer.name]
            # float32 sums of N values: relative rounding ~ log2(N) · 6e-8 of the sum of |x|
            scale = x.abs().mean().item()
            assert layer.mean == pytest.approx(x.mean().item(), abs=1e-5 * scale + 1e-12), (
                layer.name
            )
            assert layer.std == pytest.approx(x.std().item(), rel=1e-4, abs=1e-12), layer.name


def _random_statistics(model: nn.Module) -> nn.Module:
    """Every BatchNorm's running statistics and affine parameters drawn at random, so that a
    fold that drops or misplaces one shows in the outputs."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if is_batchnorm(m):
                C = m.running_mean.numel()
                m.running_mean.copy_(torch.randn(C, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(C, generator=g) + 0.5)
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(torch.rand(C, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(C, generator=g) * 0.2)
    return model.eval()


# BatchNorms that cannot fold: densenet121's 58 norm1s, 3 transitions' norms and norm5 read
# a concatenation or a pooling; repvgg_a0's 17 identity branches read an activation's output
# that two convolutions read too
LEFT = {"torchvision/densenet121": 62, "timm/repvgg_a0": 17}


@pytest.mark.parametrize("key", WITH_BATCHNORM)
def test_fold_finds_its_pairs_in_any_model(key):
    model, batch = _build(key, torch.float64)
    model = _random_statistics(model)
    before = copy.deepcopy(model.state_dict())
    lines = []
    folded = fold_batchnorm(model, batch, log=lines.append)
    names = [n for n, m in model.named_modules() if is_batchnorm(m)]
    assert sorted(line.split()[1] for line in lines) == sorted(names)  # one line each
    left = [line for line in lines if line.startswith("left ")]
    assert len(left) == LEFT.get(key, 0), left[:3]
    assert type(folded) is type(model)
    assert sum(is_batchnorm(m) for m in folded.modules()) == len(left)
    with torch.no_grad():
        expected, got = (
            first_tensor(call_model(model, batch)),
            first_tensor(call_model(folded, batch)),
        )
    # float64: the folded arithmetic differs from the unfolded by rounding alone
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9 * expected.abs().max().item())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    if left:
        with pytest.raises(ValueError, match="fold_batchnorm left"):
            fold_batchnorm(model, batch, strict=True)


@pytest.mark.parametrize("key", ["torchvision/densenet121", "timm/efficientnet_b0"])
def test_calibration_makes_eval_outputs_equal_one_training_pass_over_the_data(key):
    model, batch = _build(key, torch.float64)
    model = _random_statistics(model)
    full = copy.deepcopy(model)
    with torch.no_grad(), batchnorm_training(full):  # dropout and stochastic depth off
        expected = first_tensor(call_model(full, batch))
    calibrate_batchnorm(model, batch)
    with torch.no_grad():
        got = first_tensor(call_model(model.eval(), batch))
    # float64, and BatchNorm's own batch statistics against calibrated ones: rounding alone
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9 * expected.abs().max().item())


def test_fold_handles_frozen_batchnorm_and_names_an_unknown_subclass():
    import torchvision
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d).double()
    model = _random_statistics(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    lines = []
    folded = fold_batchnorm(model, x, log=lines.append, strict=True)
    assert len(lines) == 20 and all(line.startswith("folded ") for line in lines)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-9, atol=1e-9)

    class Scaled(nn.BatchNorm2d):  # BatchNorm's buffers, another meaning
        def forward(self, x):
            return 2 * super().forward(x)

    odd = nn.Sequential(nn.Conv2d(3, 4, 3), Scaled(4)).eval()
    lines = []
    folded = fold_batchnorm(odd, torch.randn(2, 3, 8, 8), log=lines.append)
    assert lines == [
        "left 1 (Scaled): normlab does not know what its forward computes (declare it with "
        "normlab.nn.register_batchnorm)"
    ]
    assert isinstance(folded[1], Scaled)


@pytest.mark.slow
@pytest.mark.parametrize("key", ["torchvision/resnet18", "timm/efficientnet_b0"])
def test_a_folded_zoo_model_exports_to_onnx_and_runs_in_onnxruntime(key, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model, x = _build(key)
    folded = fold_batchnorm(_random_statistics(model), x, strict=True)
    path = tmp_path / "model.onnx"
    torch.onnx.export(folded, (x,), str(path), dynamo=True, verbose=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = folded(x)
    scale = expected.abs().max().item()
    torch.testing.assert_close(torch.from_numpy(out), expected, rtol=1e-4, atol=1e-4 * scale)


def _convs_feeding_a_batchnorm(model, batch):
    from normlab.dataflow import trace_dataflow

    modules = dict(model.named_modules())
    flow = trace_dataflow(model.eval(), batch)
    return {
        n
        for n, readers in flow.feeds.items()
        if isinstance(modules[n], nn.Conv2d)
        and readers
        and all(is_batchnorm(modules[r]) for r in readers)
    }


@pytest.mark.parametrize(
    "key", ["timm/efficientnet_b0", "timm/regnety_002", "torchvision/resnet18"]
)
def test_lsuv_skips_every_layer_that_feeds_a_normalization(key):
    model, batch = _build(key)
    feeding = _convs_feeding_a_batchnorm(model, batch)
    report = lsuv_(model, batch, generator=torch.Generator().manual_seed(0))
    skipped = {r.name for r in report if r.skipped == "it feeds a normalization"}
    assert skipped == feeding and feeding
    # independently of the dataflow record: in these models each BatchNorm reads one conv
    assert len(feeding) == sum(is_batchnorm(m) for m in model.modules())
    assert all(r.iterations == 0 for r in report if r.name in feeding)
    for r in report:
        if r.skipped is None:
            assert abs(r.variance / r.target - 1) <= 0.02 or r.iterations == 10, r


def test_lsuv_reports_uncalled_and_scale_invariant_layers_instead_of_failing():
    model, batch = _build("torchvision/swin_t")
    report = lsuv_(model, batch)
    uncalled = {r.name for r in report if r.skipped and "does not call" in r.skipped}
    assert uncalled == {
        n for n, _ in model.named_modules() if n.endswith(("attn.qkv", "attn.proj"))
    }
    model, batch = _build("timm/nf_resnet26")
    before = {n: p.clone() for n, p in model.named_parameters()}
    report = lsuv_(model, batch)
    invariant = [r for r in report if r.skipped and "does not follow its weight" in r.skipped]
    assert len(invariant) >= 10 and all(r.iterations == 1 for r in invariant)  # one try, then stop
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_lsuv_rescales_a_parametrized_weight_through_its_parametrization():
    torch.manual_seed(0)
    conv = nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 16, 3))
    model = nn.Sequential(conv, nn.GELU(), nn.Conv2d(16, 8, 3))
    x = torch.randn(64, 3, 12, 12)
    report = lsuv_(model, x)
    assert report[0].skipped is None and abs(report[0].variance / report[0].target - 1) <= 0.02
    with torch.no_grad():
        assert (
            abs(model[1](model[0](x)).double().var(correction=0).item() / report[0].target - 1)
            <= 0.02
        )


def test_lsuv_takes_a_dict_batch_and_measures_with_dropout_off():
    model, batch = _build("transformers/bert")
    model.train()
    report = lsuv_(model, batch)
    assert report and all(r.skipped is None or "normalization" in r.skipped for r in report)
    assert model.training  # the mode is put back
    again = copy.deepcopy(model)
    assert [r.variance for r in lsuv_(again, batch)] == pytest.approx([r.variance for r in report])


def test_the_dead_verdict_waits_for_a_batch_that_can_show_it():
    model, _ = _build("timm/vit_tiny_patch16_224")
    small = audit(model, torch.randn(2, 3, 32, 32))
    assert not [v for v in small.verdicts if v.kind == "dead"]
    assert [v.kind for v in small.verdicts].count("batch-too-small") == 1
    large = audit(model, torch.randn(16, 3, 32, 32))
    assert "batch-too-small" not in [v.kind for v in large.verdicts]


def test_audit_and_the_transformers_callback_record_the_same_layers():
    model, batch = _build("transformers/gpt2")
    recorded = {layer.name for layer in audit(model, batch).report.snapshot.layers}
    conv1d = {n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    assert conv1d and conv1d <= recorded
    model, batch = _build("transformers/t5")
    recorded = {layer.name for layer in audit(model, batch).report.snapshot.layers}
    assert {n for n, m in model.named_modules() if type(m).__name__ == "T5LayerNorm"} <= recorded
