"""``normlab export``: a trained model out of normlab, as ONNX or as safetensors.

- **ONNX** (``model.onnx``): the eval-mode model from a context ``idx`` of shape
  ``(batch, block_size)`` (int64, any batch size) to ``logits`` of shape
  ``(batch, vocab_size)``, opset ``OPSET``. Each BatchNorm is folded into its
  Linear (``normlab.fold``) unless ``fold=False``; a BatchNorm left unfolded is
  an ONNX ``BatchNormalization`` node with its running statistics. The file's
  metadata holds the vocabulary and the block size, so a program with
  onnxruntime alone can generate (``examples/sample_onnx.py``).
- **safetensors** (``model.safetensors``): the model's state dict, with
  ``model.json`` beside it holding the config and the vocabulary, so that
  another program can rebuild the model (``load_safetensors``).

Both files are written to a temporary name and renamed, so a failed export
leaves nothing half written. onnx, onnxruntime, onnxscript and safetensors are
the optional extra ``normlab[export]``.
"""

import contextlib
import copy
import importlib
import io
import json
import logging
import os
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from normlab import nn as nl
from normlab.calibrate import calibrate_batchnorm
from normlab.errors import NormlabError
from normlab.files import atomic_write_bytes
from normlab.fold import fold_batchnorm
from normlab.lm.config import ModelConfig
from normlab.lm.data import Vocab
from normlab.lm.model import LanguageModel
from normlab.lm.runs import load_run

OPSET = 18  # the ONNX opset of the exported graph
FORMATS = ("onnx", "safetensors")
SAFETENSORS_FORMAT = "normlab-safetensors"


class ExportError(NormlabError):
    """The export cannot be made: a missing extra, or an output that cannot be written."""


def _require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(
            f"exporting needs the {module} package: pip install 'normlab[export]'"
        ) from None


class _Logits(nn.Module):
    """The model's logits alone: what the exported graph computes."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, idx):
        logits, _ = self.model(idx)
        return logits  # (B, vocab_size)


def with_torch_batchnorms(model: nn.Module) -> nn.Module:
    """``model`` with normlab's BatchNorm1d layers swapped for torch's, which hold the same
    state dict and export as ONNX ``BatchNormalization`` nodes."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nl.batchnorm._BatchNorm):
            torch_bn = nn.BatchNorm1d(
                module.num_features, module.eps, module.momentum, module.affine,
                module.track_running_stats, bias=module.bias is not None or not module.affine,
            )  # fmt: skip
            torch_bn.load_state_dict(module.state_dict())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, torch_bn.eval())
    return model


def export_onnx(
    model: LanguageModel, vocab: Vocab, path: Path, fold: bool = True, log=print
) -> Path:
    """Write ``model`` (in eval mode) to ``path`` as ONNX; ``log`` gets a line per BatchNorm."""
    _require("onnx")
    config = model.config
    example = torch.zeros(2, config.block_size, dtype=torch.long)
    model = fold_batchnorm(model, example, log=log) if fold else copy.deepcopy(model).eval()
    model = with_torch_batchnorms(model)  # what is left unfolded: BatchNormalization nodes
    with _quiet():
        program = torch.onnx.export(
            _Logits(model),
            (example,),
            dynamo=True,
            opset_version=OPSET,
            input_names=["idx"],
            output_names=["logits"],
            dynamic_shapes={"idx": {0: torch.export.Dim("batch")}},
            optimize=fold,  # onnxscript's optimizer would fold what is meant to stay
        )
    proto = program.model_proto
    metadata = {"normlab.vocab": json.dumps(list(vocab.chars))}
    metadata["normlab.block_size"] = str(config.block_size)
    metadata["normlab.model_config"] = json.dumps(asdict(config))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    _write(path, proto.SerializeToString())
    return path


@contextlib.contextmanager
def _quiet():
    """The exporter's progress lines and warnings, kept for a failure's message only."""
    buffer = io.StringIO()
    level = logging.getLogger("torch").level
    logging.getLogger("torch").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buffer):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.getLogger("torch").setLevel(level)


def export_safetensors(model: LanguageModel, vocab: Vocab, path: Path) -> tuple[Path, Path]:
    """Write ``model``'s state dict to ``path`` and its config and vocabulary to ``path``'s
    ``.json`` beside it."""
    st = _require("safetensors.torch")
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    _write(path, st.save(weights))
    config = {
        "format": SAFETENSORS_FORMAT,
        "model_config": asdict(model.config),
        "vocab": list(vocab.chars),
    }
    sidecar = path.with_suffix(".json")
    _write(sidecar, (json.dumps(config, indent=2) + "\n").encode())
    return path, sidecar


def load_safetensors(path: Path) -> tuple[LanguageModel, Vocab]:
    """The model (in eval mode) and vocabulary that ``export_safetensors`` wrote."""
    st = _require("safetensors.torch")
    config = json.loads(Path(path).with_suffix(".json").read_text())
    model = LanguageModel(ModelConfig.from_dict(config["model_config"]), verbose=False)
    model.load_state_dict(st.load_file(str(path)))
    return model.eval(), Vocab(tuple(config["vocab"]))


def _write(path: Path, data: bytes) -> None:
    try:
        atomic_write_bytes(path, data)
    except OSError as e:
        raise ExportError(f"cannot write {path}: {e.strerror or e}") from None


def default_path(run: Path, fmt: str) -> Path:
    """``model.onnx`` or ``model.safetensors`` in the run folder."""
    folder = run if run.is_dir() else run.parent
    return folder / f"model.{fmt}"


def check_output(path: Path) -> None:
    """Refuse an output that is a folder, or whose folder does not exist or is read-only."""
    if path.is_dir():
        raise ExportError(f"--out {path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise ExportError(f"--out {path}: the folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise ExportError(f"cannot write {path}: Permission denied")


def export_run(
    run: Path,
    fmt: str,
    out: Path | None = None,
    calibrate: bool = False,
    fold: bool = True,
    data_path: str | None = None,
    log=print,
) -> list[Path]:
    """Export a run's model (the weights it evaluates: under ``--ema``, their average) as
    ``fmt``; ``calibrate`` first sets the BatchNorm statistics to the training set's."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; valid choices: {', '.join(FORMATS)}")
    out = Path(out) if out is not None else default_path(Path(run), fmt)
    check_output(out)
    _require("onnx" if fmt == "onnx" else "safetensors.torch")
    model, data, _ = load_run(run, data_path, device="cpu")
    if calibrate:
        if not any(nl.is_batchnorm(m) for m in model.modules()):
            raise ExportError("--calibrate: this model has no BatchNorm statistics to calibrate")
        calibrate_batchnorm(model, data.splits["train"][0])
    if fmt == "onnx":
        return [export_onnx(model, data.vocab, out, fold=fold, log=log)]
    return list(export_safetensors(model, data.vocab, out))
