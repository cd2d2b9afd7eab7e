"""Models we did not write, built from their constructors with random weights, at small inputs.

PyPI's torchvision wheels are CUDA builds: against the pinned CPU torch their C++
operators do not load, and ``import torchvision`` (so also ``import timm``, and
Lightning's and transformers' optional imports of it) fails with "operator
torchvision::nms does not exist", raised where torchvision registers fake kernels
for the two operators its import names. The model builders use none of them, so
``declare_torchvision_operators`` declares those two schemas with ``torch.library``
before anything imports torchvision; where the operators did load, it does nothing.
The tests (``conftest.py``) and ``benchmarks/bench_zoo.py`` call it; the library never does.
"""

import contextlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

_DECLARED: list = []  # the torch.library.Library that holds the schemas must stay alive


def declare_torchvision_operators() -> None:
    """Declare ``torchvision::nms`` and ``torchvision::qnms`` where torchvision's own C++
    library did not (see the module docstring)."""
    spec = importlib.util.find_spec("torchvision")
    if _DECLARED or spec is None:
        return
    for extension in Path(spec.origin).parent.glob("_C*.so"):
        with contextlib.suppress(OSError):  # a build for this torch registers its own
            torch.ops.load_library(extension)
    if hasattr(torch.ops.torchvision, "nms"):
        return
    library = torch.library.Library("torchvision", "DEF")
    for name in ("nms", "qnms"):
        library.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _DECLARED.append(library)


@dataclass(frozen=True)
class ZooModel:
    """A third-party model and a batch for it."""

    name: str
    library: str  # torchvision | timm | transformers
    build: Callable[[], nn.Module]
    batch: Callable[[], object]  # what the model is called with (tensor or dict)
    traits: tuple[str, ...] = ()  # what makes it a test: in-place, squeeze-excite, ...


def _image(size: int = 32, n: int = 4):
    return lambda: torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def _torchvision(name: str, **kwargs):
    def build():
        import torchvision

        return torchvision.models.get_model(name, weights=None, **kwargs)

    return build


def _timm(name: str, **kwargs):
    def build():
        import timm

        return timm.create_model(name, pretrained=False, **kwargs)

    return build


def _hf(config_name: str, model_name: str, **config):
    def build():
        import transformers

        cfg = getattr(transformers, config_name)(**config)
        return getattr(transformers, model_name)(cfg)

    return build


def _tokens(vocab: int = 100, n: int = 4, t: int = 12):
    ids = lambda: torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(0))  # noqa: E731
    return lambda: {"input_ids": ids()}


_SMALL_BERT = dict(
    vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
)

ZOO = [
    ZooModel("resnet18", "torchvision", _torchvision("resnet18"), _image(),
             ("in-place", "residual")),
    ZooModel("mobilenet_v3_small", "torchvision", _torchvision("mobilenet_v3_small"), _image(),
             ("in-place", "squeeze-excite", "depthwise")),
    ZooModel("efficientnet_b0", "torchvision", _torchvision("efficientnet_b0"), _image(),
             ("squeeze-excite", "depthwise", "stochastic-depth")),
    ZooModel("densenet121", "torchvision", _torchvision("densenet121"), _image(),
             ("in-place", "concatenation")),
    ZooModel("squeezenet1_0", "torchvision", _torchvision("squeezenet1_0"), _image(64),
             ("in-place",)),
    ZooModel("vgg11_bn", "torchvision", _torchvision("vgg11_bn", num_classes=10), _image(32, 2),
             ("in-place",)),
    ZooModel("shufflenet_v2_x0_5", "torchvision", _torchvision("shufflenet_v2_x0_5"), _image(),
             ("in-place", "depthwise", "channel-shuffle")),
    ZooModel("regnet_y_400mf", "torchvision", _torchvision("regnet_y_400mf"), _image(),
             ("in-place", "squeeze-excite", "grouped")),
    ZooModel("swin_t", "torchvision", _torchvision("swin_t"), _image(64, 2),
             ("attention", "weights-used-without-their-module")),
    ZooModel("efficientnet_b0", "timm", _timm("efficientnet_b0"), _image(),
             ("norm-plus-activation", "squeeze-excite", "depthwise")),
    ZooModel("mobilenetv3_small_050", "timm", _timm("mobilenetv3_small_050"), _image(),
             ("norm-plus-activation", "squeeze-excite")),
    ZooModel("resnet18", "timm", _timm("resnet18"), _image(), ("in-place", "residual")),
    ZooModel("regnety_002", "timm", _timm("regnety_002"), _image(),
             ("norm-plus-activation", "squeeze-excite")),
    ZooModel("repvgg_a0", "timm", _timm("repvgg_a0"), _image(), ("norm-plus-activation",)),
    ZooModel("cspresnet50", "timm", _timm("cspresnet50"), _image(), ("norm-plus-activation",)),
    ZooModel("ghostnet_050", "timm", _timm("ghostnet_050"), _image(),
             ("squeeze-excite", "depthwise")),
    ZooModel("vit_tiny_patch16_224", "timm", _timm("vit_tiny_patch16_224", img_size=32,
             patch_size=8), _image(), ("attention", "gelu")),
    ZooModel("nf_resnet26", "timm", _timm("nf_resnet26"), _image(), ("weight-standardized",)),
    ZooModel("bert", "transformers", _hf("BertConfig", "BertModel", **_SMALL_BERT), _tokens(),
             ("attention", "gelu")),
    ZooModel("gpt2", "transformers", _hf("GPT2Config", "GPT2Model", vocab_size=100, n_embd=32,
             n_layer=2, n_head=2, n_positions=32), _tokens(), ("attention", "conv1d")),
    ZooModel("t5", "transformers", _hf("T5Config", "T5EncoderModel", vocab_size=100, d_model=32,
             d_kv=8, d_ff=64, num_layers=2, num_heads=2), _tokens(), ("attention", "rmsnorm")),
    ZooModel("resnet", "transformers", _hf("ResNetConfig", "ResNetModel", embedding_size=16,
             hidden_sizes=[16, 32], depths=[1, 1]), lambda: {"pixel_values": _image()()},
             ("in-place", "not-fx-traceable")),
]  # fmt: skip
