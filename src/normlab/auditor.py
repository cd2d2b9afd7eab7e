"""``normlab.audit(model, batch)``: one recorded training step of any model, judged.

    from normlab import audit
    result = audit(model, batch)            # batch as for model(batch), (*batch) or (**batch)
    print(result.table())
    result.to_html("audit.html")

The step is a real one: forward, loss, backward and, given an optimizer, its
update (so that the update:data ratios are measured). The loss is ``loss_fn(output,
batch)``; or the model's own (a ``loss`` in its output, as transformers' models
return with labels); or, for a model that returns only outputs, the mean square
of its first output, which runs every layer's backward pass as a loss would.
"""

import importlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from normlab.dataflow import Batch, call_model, first_tensor
from normlab.diagnostics import Diagnostics, Report, Thresholds, format_table, judge_recording
from normlab.errors import NormlabError, first_line
from normlab.nn import set_mode
from normlab.report import Page, render_html, write_report


@dataclass
class Audit:
    """What ``audit`` found: the judged recording, as a table, JSON or an HTML page."""

    report: Report
    diagnostics: Diagnostics
    title: str

    @property
    def verdicts(self):
        return self.report.verdicts

    def table(self) -> str:
        return format_table(self.report)

    def to_json(self) -> str:
        return self.report.to_json()

    def to_html(self, path: str | Path) -> Path:
        summary = {"loss": self.report.snapshot.loss}
        page = Page(self.title, summary, report=self.report, history=self.diagnostics.history)
        write_report(Path(path), render_html(page))
        return Path(path)


def _loss(output, batch: Batch, loss_fn: Callable | None) -> Tensor:
    if loss_fn is not None:
        return loss_fn(output, batch)
    own = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    if torch.is_tensor(own) and own.dim() == 0:
        return own
    first = first_tensor(output)
    if first is None:
        raise ValueError("audit: the model returned no tensor; give a loss_fn(output, batch)")
    return first.float().square().mean()


def audit(
    model: nn.Module,
    batch: Batch,
    loss_fn: Callable | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    thresholds: Thresholds | None = None,
    num_classes: int | None = None,
) -> Audit:
    """Run one recorded training step of ``model`` on ``batch`` and judge it.

    Args:
        model: any module; it is put in training mode for the step, then back.
        batch: a tensor (``model(batch)``), a tuple or list (``model(*batch)``) or a
            dict (``model(**batch)``).
        loss_fn: ``loss_fn(output, batch) -> scalar``; see the module docstring for
            the loss without one.
        optimizer: takes the step, so that the update:data ratios are measured; without
            one, the weights stay as they were.
        thresholds: where the verdicts fire.
        num_classes: the model's output classes, for the confident-at-init verdict.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh())
        >>> result = audit(model, torch.randn(64, 8) * 10)
        >>> [v.kind for v in result.verdicts]
        ['saturated']
    """
    diagnostics = Diagnostics(model)
    with set_mode(model, training=True):
        diagnostics.arm()
        try:
            loss = _loss(call_model(model, batch), batch, loss_fn)
            model.zero_grad(set_to_none=True)
            loss.backward()
            if optimizer is not None:
                optimizer.step()
            diagnostics.collect(0, loss.item())
        finally:
            diagnostics.detach()
    report = judge_recording(diagnostics, num_classes, thresholds)
    return Audit(report, diagnostics, f"normlab audit of {type(model).__name__}")


def load_object(spec: str):
    """The object that ``MODULE:NAME`` names: ``MODULE`` a module to import or a ``.py`` file."""
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise NormlabError(f"expected MODULE:NAME, got {spec!r}")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            if module_spec is None or not path.is_file():
                raise ImportError(f"no file {path}")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[path.stem] = module
            module_spec.loader.exec_module(module)
        else:
            module = _import_from_working_folder(module_name)
        return getattr(module, name)
    except Exception as e:
        reason = first_line(e)
        raise NormlabError(f"cannot load {spec}: {type(e).__name__}: {reason}") from None


def _import_from_working_folder(module_name: str):
    """Import ``module_name`` as ``python -m`` would: modules in the working folder first."""
    sys.path.insert(0, str(Path.cwd()))
    try:
        return importlib.import_module(module_name)
    finally:
        sys.path.pop(0)


def build(spec: str, what: str):
    """Call the factory ``MODULE:NAME`` with no arguments; its failure is one line."""
    factory = load_object(spec)
    try:
        return factory()
    except Exception as e:
        reason = first_line(e)
        raise NormlabError(
            f"the {what} factory {spec} failed: {type(e).__name__}: {reason}"
        ) from None


def audit_factory(model_spec: str, input_shape: list[int] | None, batch_spec: str | None) -> Audit:
    """``normlab diagnose --model``: audit the model a factory builds on a batch of random
    inputs of ``input_shape``, or the batch another factory builds."""
    model = build(model_spec, "model")
    if not isinstance(model, nn.Module):
        raise NormlabError(f"{model_spec} returned a {type(model).__name__}, not a torch module")
    if batch_spec is not None:
        batch = build(batch_spec, "batch")
    elif input_shape:
        batch = torch.randn(*input_shape, generator=torch.Generator().manual_seed(0))
    else:
        raise NormlabError("--model needs --input-shape N,... or --batch MODULE:FACTORY")
    try:
        return audit(model, batch)
    except NormlabError:
        raise
    except Exception as e:
        reason = first_line(e)
        raise NormlabError(f"the model rejected the batch: {type(e).__name__}: {reason}") from None
