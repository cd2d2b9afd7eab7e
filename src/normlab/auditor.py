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
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from normlab.dataflow import Batch, batch_loss
from normlab.diagnostics import (
    Diagnostics,
    Report,
    SecondOrderStats,
    Thresholds,
    finite,
    format_table,
    judge_recording,
)
from normlab.diagnostics.nogc import gc_paused
from normlab.errors import NormlabError, first_line
from normlab.nn import set_mode
from normlab.report import Page, render_html, write_report
from normlab.second_order import measure_second_order

# the second-order statistics an audit's JSON carries at its top level
SECOND_ORDER_KEYS = ("sharpness", "hessian_trace", "noise_scale", "preconditioned_sharpness")


@dataclass
class Audit:
    """What ``audit`` found: the judged recording, as a table, JSON or an HTML page."""

    report: Report
    diagnostics: Diagnostics
    title: str

    @property
    def verdicts(self):
        return self.report.verdicts

    @property
    def second_order(self) -> SecondOrderStats | None:
        """The curvature and gradient noise, with ``second_order=True``; else None."""
        return self.report.snapshot.second_order

    @property
    def sharpness(self) -> float | None:
        """The top Hessian eigenvalue of the batch's loss (``second_order=True``)."""
        return self.second_order.sharpness if self.second_order else None

    @property
    def hessian_trace(self) -> float | None:
        """Hutchinson's estimate of the Hessian's trace (``second_order=True``)."""
        return self.second_order.hessian_trace if self.second_order else None

    @property
    def noise_scale(self) -> float | None:
        """The gradient noise scale B_simple (``second_order=True``)."""
        return self.second_order.noise_scale if self.second_order else None

    @property
    def preconditioned_sharpness(self) -> float | None:
        """λmax(P⁻¹H) with an Adam-type optimizer's preconditioner (``second_order=True``)."""
        return self.second_order.preconditioned_sharpness if self.second_order else None

    def table(self) -> str:
        return format_table(self.report)

    def to_json(self) -> str:
        """The report, with the second-order statistics also at the top level (None where not
        measured): ``sharpness``, ``hessian_trace``, ``noise_scale``,
        ``preconditioned_sharpness``."""
        second_order = {key: getattr(self, key) for key in SECOND_ORDER_KEYS}
        return json.dumps(finite({**asdict(self.report), **second_order}))

    def to_html(self, path: str | Path) -> Path:
        summary = {"loss": self.report.snapshot.loss}
        page = Page(self.title, summary, report=self.report, history=self.diagnostics.history)
        write_report(Path(path), render_html(page))
        return Path(path)


def audit(
    model: nn.Module,
    batch: Batch,
    loss_fn: Callable | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    thresholds: Thresholds | None = None,
    num_classes: int | None = None,
    second_order: bool = False,
    micro_batch: int | None = None,
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
        second_order: also measure, before the step, the sharpness, the Hessian trace, the
            gradient noise scale and (given an Adam-type optimizer that has stepped) the
            preconditioned sharpness (``normlab.second_order``), for the lr-too-high and
            batch-vs-noise verdicts; the loss must then be a batch mean.
        micro_batch: the noise scale's small batch (default: ``default_micro_batch``).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh())
        >>> result = audit(model, torch.randn(64, 8) * 10)
        >>> [v.kind for v in result.verdicts]
        ['saturated']
    """
    # a tensor for each layer's output and gradient, each parameter's copy: refcounting
    # frees them (normlab.diagnostics.nogc)
    with gc_paused():
        diagnostics = Diagnostics(model)
        with set_mode(model, training=True):
            measured = None
            if second_order:  # on the weights the step starts from
                measured = measure_second_order(
                    model,
                    lambda m, b: batch_loss(m, b, loss_fn),
                    batch,
                    optimizer,
                    micro_batch=micro_batch,
                )
            diagnostics.arm()
            try:
                loss = batch_loss(model, batch, loss_fn)
                model.zero_grad(set_to_none=True)
                loss.backward()
                if optimizer is not None:
                    optimizer.step()
                diagnostics.collect(0, loss.item()).second_order = measured
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
    inputs of ``input_shape``, or the batch another factory builds, second order included."""
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
        return audit(model, batch, second_order=True)
    except NormlabError:
        raise
    except Exception as e:
        reason = first_line(e)
        raise NormlabError(f"the model rejected the batch: {type(e).__name__}: {reason}") from None
