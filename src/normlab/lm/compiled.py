"""The training step: one function, compiled into one graph unless ``--no-compile`` (or its
preset) turns that off.

These networks are small: an eager step spends most of its time on the
per-operator overhead of a hundred small kernels and of the autograd engine,
not on arithmetic. ``CompiledStep`` traces the step, written with the model's
own forward and autograd, into one graph (``make_fx``): the forward pass, the
running statistics, the backward that autograd derives from it (BatchNorm's
closed-form backward included), and with SGD the update. Inductor, ``torch.compile``'s
compiler, turns that graph into fused kernels. Nothing in it is a second copy of the
model: a change to a layer changes the graph, and with it the compiled step. The update
is torch.optim's own. SGD's is part of the graph: torch.optim's functional SGD
(its foreach form, as ``torch.compile`` traces it), on a tensor of each param
group's rate, so a new rate is new data, not a new graph. AdamW's fused kernel
cannot be traced (torch 2.13 has no fake kernel for its tensor-rate form), so
AdamW's update runs after the graph, as ``FunctionalUpdate``
(``normlab.lm.optim``): torch.optim's fused kernel per param group, on the
gradients the graph writes, the same update, bit for bit, as ``optimizer.step()``.

On several processes the step all-reduces the gradients itself (summed, see
``normlab.lm.distributed``) and SyncBatchNorm's statistics, with functional
collectives that are part of the graph. The model, its optimizer and its
checkpoints are the same objects whichever path a step takes.

A diagnostics recording (``CompiledStep.record``) with SGD on one process is a graph of its
own, compiled: the same function traced with the ``Diagnostics`` hooks attached, the batch's
eval-mode loss, and every statistic of the recording (``Diagnostics.measure``, whose C++
operators inductor calls from the graph), returned in one tensor. A run that records too
rarely to repay that graph's compile (``RECORDINGS_TO_COMPILE``), AdamW, several processes and
a model with dropout record untraced: the same function on the model's own tensors, with the
hooks attached, then the optimizer's update by its fused kernel (``FunctionalUpdate``).

Other module hooks run while the step is traced, not in the compiled step, and
hooks on the parameters or their gradients never run in it (the graph
differentiates detached copies): a run whose hooks must see every step trains
with ``--no-compile``. A BatchNorm with ``momentum=None`` (a cumulative
average, which reads its step count on the host) cannot be traced; the step
then says so and runs uncompiled.
"""

import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn
from torch.func import functional_call
from torch.fx.experimental.proxy_tensor import make_fx
from torch.optim.sgd import sgd

from normlab.diagnostics import Diagnostics
from normlab.diagnostics.recorder import Form, Measured
from normlab.diagnostics.stats import measured_by_kernel
from normlab.errors import first_line
from normlab.lm.model import next_char_loss
from normlab.lm.optim import FunctionalUpdate, set_learning_rate
from normlab.nn import set_mode

# torch.optim's foreach SGD multiplies by a tensor learning rate only while torch.compile
# traces it; otherwise it reads the rate's value, which a trace can only carry as a
# data-dependent scalar. The same context, for the trace of the step's update; a torch
# without it updates after the graph, as AdamW does.
_COMPILING = getattr(torch.compiler, "_compile_session_context", None)


def compile_cache_dir() -> Path:
    """Where compiled steps are kept between runs: ``$TORCHINDUCTOR_CACHE_DIR`` when set,
    else ``normlab/torchinductor`` in the user's cache folder (``$XDG_CACHE_HOME``, or
    ``~/.cache``). Inductor keys each entry by the traced graph, the torch version and its
    options, so a changed model or a new torch compiles anew."""
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "normlab" / "torchinductor"


# inductor reads its cache folder from the environment, and the first time it needs one, which
# importing parts of torch's compile machinery can be, puts its own default there (under /tmp,
# which a reboot empties): set the user's cache folder before that
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(compile_cache_dir()))


def _options(device: torch.device) -> dict:
    """Inductor options for the step on ``device``.

    ``fallback_random``: dropout draws its masks with torch's own kernels, from
    the same generator and in the same order as the eager model, so the two
    paths compute the same masks and a resumed run draws what it would have.

    ``cpp.use_decompose_tanh``: inductor's own vectorized tanh on CPU is about 2×
    slower than its exp-based decomposition, 1 - 2/(exp(2x) + 1). torch leaves
    the decomposition off by default (pytorch#148241) because its error is
    absolute, not relative: up to 2e-7, large next to a tiny tanh(x) near 0 but
    float32 rounding for the activations of order 1 that normalization makes.
    Older torch has no such option.

    ``cpp_wrapper`` (CPU): the compiled graph's wrapper is C++, which calls the matrix
    products and fused kernels without a Python call each.

    ``size_asserts`` off: the wrapper would check the sizes and strides of every input and
    of every ATen kernel's output (formatting each check's message into a string stream)
    on every call, about 10 µs of a 190 µs step at batch 32 (docs/PERFORMANCE.md, section
    1b). ``CompiledStep`` keys each compiled graph by the batch's shapes and strides, its
    other inputs are its own tensors, and the kernels are ATen's own.
    """
    options = {
        "fallback_random": True,
        "cpp_wrapper": device.type == "cpu",
        "size_asserts": False,
    }
    if hasattr(torch._inductor.config.cpp, "use_decompose_tanh"):
        options["cpp.use_decompose_tanh"] = True
    return options


def _flat(step: Callable) -> Callable:
    """``step(tensors, x, y) -> outputs`` (a tuple of tensors) as a function of its tensors one
    by one: what inductor compiles (a graph of plain inputs and outputs)."""

    def flat(*tensors_x_y: Tensor) -> tuple[Tensor, ...]:
        *tensors, x, y = tensors_x_y
        return tuple(step(tensors, x, y))

    return flat


def inductor_compile(graph: torch.fx.GraphModule, inputs: list[Tensor], options: dict) -> Callable:
    """``graph`` compiled by inductor with ``options`` (its config's names), for ``inputs``:
    a function of those inputs, one by one, that returns the graph's outputs."""
    # imported at the first compile: it imports dynamo, seconds that a command which never
    # compiles (--help, sample) would otherwise spend
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(graph, inputs, config_patches=options)


def _compile(graph: torch.fx.GraphModule, inputs: list[Tensor]) -> Callable:
    """``graph``, traced from ``_flat(step)`` on ``inputs`` (the step's tensors, then the
    batch), compiled by inductor: ``(tensors, x, y) -> outputs``.

    Inductor compiles it directly, not through ``torch.compile``: the graph is already traced,
    and ``CompiledStep`` keys each compiled graph by all that dynamo's guards would check (the
    batch's shapes, strides, dtype and device, the model's mode), so the guards and the frame
    entry (about 25 µs of a 265 µs step at batch 32: docs/PERFORMANCE.md, section 1b) would
    check it again on every step.
    """
    graph.graph._codegen = torch.fx.graph.CodeGen()  # flat inputs and outputs, as inductor takes
    graph.recompile()
    compiled = inductor_compile(graph, inputs, _options(inputs[-2].device))  # x: the batch

    def step(tensors: list[Tensor], x: Tensor, y: Tensor) -> tuple[Tensor, ...]:
        return compiled(*tensors, x, y)

    return step


class Computed(NamedTuple):
    """What ``_gradients`` computes: the loss, with ``evaluate`` the batch's eval-mode loss
    before the update (else None), and the trainable parameters' gradients end to end."""

    loss: Tensor
    eval_loss: Tensor | None
    gradients: Tensor  # (numel,)


# The fewest recordings a run makes for its recordings to run as a compiled graph of their own:
# compiling it costs 0.4 s from the compile cache and about 13 s without, and saves about 3 ms
# a recording at lecture-deep's batch 32 (docs/PERFORMANCE.md, "Recording steps"); the
# lecture presets make 2,000.
RECORDINGS_TO_COMPILE = 1000


class Ran(NamedTuple):
    """One run of a step's graph, or of ``_gradients`` untraced: its outputs (the loss first),
    the places of the parameters it differentiated, and whether it applied the optimizer's
    update itself (a compiled SGD step) rather than writing their gradients into the step's
    buffer."""

    outputs: tuple[Tensor, ...]
    places: tuple[int, ...]
    updated: bool


class Recorded(NamedTuple):
    """A recorded step (``CompiledStep.record``): the loss, the batch's eval-mode loss before
    the update, and the recording's statistics, for ``Diagnostics.take``."""

    loss: Tensor
    eval_loss: Tensor
    measured: Measured


class Gradients(NamedTuple):
    """The gradients that ``_gradients`` writes where it does not update (views of the step's
    buffer; None for a parameter it leaves out), and the optimizer's update from them
    (``FunctionalUpdate.on``)."""

    grads: list[Tensor | None]
    update: Callable[[], None]


class CompiledStep:
    """``step(x, y, lr) -> loss``: one step of ``model`` and ``optimizer`` on a batch, in place.

    The step is one function, ``_gradients``, and the optimizer's own update:
    ``_gradients`` runs the forward pass (which moves BatchNorm's running
    statistics), the loss and autograd's backward, and writes the gradients
    into the step's buffer, which torch.optim's fused kernels then apply
    (``FunctionalUpdate``: SGD without momentum, AdamW without amsgrad) with
    every param group's settings; ``lr`` is the schedule's rate, which each
    group scales by its ``lr_scale`` (``normlab.lm.optim.set_learning_rate``).
    ``compile=True`` traces ``_gradients`` into one graph and compiles it; with
    SGD the traced function applies the update itself (torch.optim's foreach SGD,
    its rounding: a product and a sum, where the fused kernel rounds once), and
    leaves the buffer as it was. ``compile=False`` runs it as it is, on the
    parameters themselves: what ``--no-compile`` trains with, so that the
    parameters' hooks run.

    The loss is the rows' summed cross-entropy over ``batch_size`` (the global
    batch; by default the batch's own size, so its mean). With a process
    ``group``, each process steps on its own rows and the gradients are summed
    over the group, so every process takes the global batch's step. A batch of
    a new shape, or the model in another mode, traces and compiles again, and
    falls back as the first one does where that fails. ``compile_recordings``: recordings
    run as a compiled graph of their own where they can (``record``). The step holds the
    model's tensors as they are when it is built: build it after moving the
    model to its device and dtype.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        compile: bool = True,
        *,
        batch_size: int | None = None,
        group=None,
        compile_recordings: bool = True,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.batch_size = batch_size
        self.group = group
        params = dict(model.named_parameters())
        named = params | dict(model.named_buffers())
        self.names = tuple(named)
        self.params = list(params.values())
        self._trainable = [i for i, p in enumerate(self.params) if p.requires_grad]
        # the trainable parameters' gradients, in one buffer that a step updating after its
        # graph writes in place (as DDP's buckets): fixed views of it are what that update reads
        self._sizes = [self.params[i].numel() for i in self._trainable]
        first = self.params[self._trainable[0]] if self._trainable else torch.empty(0)
        grad_buffer = torch.zeros(sum(self._sizes), dtype=first.dtype, device=first.device)
        self.update = FunctionalUpdate(optimizer, self.params)
        # SGD's update is traced into the compiled graph; AdamW's fused kernel cannot be
        self._update_in_graph = compile and not self.update.adamw and _COMPILING is not None
        # what a recording graph needs of the model, fixed as its tensors are (record)
        self._recordable = (
            self._update_in_graph
            and group is None
            and measured_by_kernel(self.params)
            and not _draws_masks(model)
        )
        # each param group's learning rate, an input of the graph (float64, as the groups
        # hold it; the update multiplies in the gradients' dtype), and the rates it last held
        n_groups = len(optimizer.param_groups)
        self.rates = torch.zeros(n_groups, dtype=torch.float64, device=first.device)
        self._rate_of_group = self.rates.unbind()
        self._rates_held: tuple[float, ...] | None = None
        # the tensors the step reads and writes, as one list: the parameters, the buffers
        # (running statistics), the gradients' buffer, then the learning rates
        self.tensors: list[Tensor] = [t.detach() for t in named.values()]
        self.tensors += [grad_buffer, self.rates]
        self._leaves: list[Tensor] = [*named.values(), grad_buffer, self.rates]  # untraced
        self.compile = compile
        self._compiled: dict[tuple, object] = {}  # by the batch and the model's mode
        self._places: dict[tuple, tuple[int, ...]] = {}  # by the same: the parameters with a grad
        self._grad_lists: dict[tuple, Gradients] = {}  # by those places: their grads, the update
        self._proven: set[tuple] = set()  # the keys whose graph has run: no more falling back
        self._traced: tuple[int, ...] = ()  # the parameters the last _gradients differentiated
        self._forms: dict[tuple, Form] = {}  # by a recording graph's key: what its values hold
        # recordings as a compiled graph of their own where they can (record): False for a
        # run too short to repay its compile; True, and a graph that failed, sets it False
        self.compile_recordings = compile_recordings
        self._plain_compiled = False  # a plain step's graph has run
        self._unsaid: str | None = None  # a recording graph's failure, until a plain step runs

    def _gradients(
        self, tensors: list[Tensor], x: Tensor, y: Tensor, evaluate: bool = False
    ) -> Computed:
        """The step, from the model's forward and autograd; what is traced.

        Notes in ``self._traced`` the places of the parameters that the loss uses. Untraced, or
        traced with AdamW, writes the trainable parameters' gradients into the gradients'
        buffer (``tensors[-2]``), for the update after it; traced with SGD, applies the update
        itself (``_sgd``). ``evaluate``: also the batch's eval-mode loss, with the running
        statistics this batch moved, before the update."""
        n_params = len(self.params)
        # autograd's leaves: the parameters themselves untraced, else copies
        params = [t if t.requires_grad else t.detach().requires_grad_() for t in tensors[:n_params]]
        state = dict(zip(self.names, params + tensors[n_params:-2], strict=True))
        # untraced, the model's own tensors: calling it is the same, without swapping them in
        forward = (
            self.model if tensors is self._leaves else partial(functional_call, self.model, state)
        )
        with torch.enable_grad():
            logits, _ = forward(x)
            loss = next_char_loss(logits, y, over=self.batch_size or len(y))
        # a parameter the loss does not use gets None, and no update, as in torch.optim
        trainable = [params[i] for i in self._trainable]
        found = torch.autograd.grad(loss, trainable, allow_unused=True)
        # fixed by the graph: known when it is traced
        self._traced = tuple(
            i for i, g in zip(self._trainable, found, strict=True) if g is not None
        )
        found = [
            torch.zeros_like(p) if g is None else g for p, g in zip(trainable, found, strict=True)
        ]
        flat = torch.cat([g.flatten() for g in found])  # (numel,)
        if self.group is not None:  # one all-reduce of them all
            flat = funcol.all_reduce(flat, "sum", self.group)
        eval_loss = None
        if evaluate:
            with torch.no_grad(), set_mode(self.model, training=False):
                eval_logits, _ = forward(x)
            eval_loss = next_char_loss(eval_logits, y)
        if tensors is self._leaves or not self._update_in_graph:
            tensors[-2].copy_(flat)
        else:
            self._sgd(tensors[:n_params], flat, rates=tensors[-1])
        return Computed(loss.detach(), eval_loss, flat)

    def _recording(self, recorder: Diagnostics, key: tuple) -> Callable:
        """The step recorded into ``recorder``, as one function for ``make_fx``: ``recorder``
        armed on the traced tensors, ``_gradients`` (its update included), then the
        recording's statistics (``Diagnostics.measure``, on the statistics' C++ operators).
        Returns the loss, the eval-mode loss and the statistics in one tensor, and keeps
        what that tensor holds in ``self._forms[key]``."""

        def recording(tensors: list[Tensor], x: Tensor, y: Tensor) -> tuple[Tensor, ...]:
            recorder.arm(dict(zip(self.names, tensors[:-2], strict=True)))
            computed = self._gradients(tensors, x, y, evaluate=True)
            measured = recorder.measure(self._grads_of(computed.gradients, self._traced))
            self._forms[key] = measured.form
            return computed.loss, computed.eval_loss, measured.values

        return recording

    def _grads_of(self, flat: Tensor, places: tuple[int, ...]) -> list[Tensor | None]:
        """Each parameter's gradient, a view of ``flat``, or None where ``places`` (the
        parameters a graph differentiates) leaves it out."""
        views = self._by_parameter(flat)
        return [views[i] if i in places else None for i in range(len(self.params))]

    def _sgd(self, params: list[Tensor], flat: Tensor, rates: Tensor) -> None:
        """torch.optim's SGD update of ``params`` (the traced step's own tensors) from the
        gradients in ``flat``, group by group, each at its rate in ``rates``.

        The update reads views of ``flat``, which every gradient feeds, so no update can be
        ordered before a read of a parameter that feeds a gradient: a workaround. Updating
        each parameter from its own gradient lets torch 2.13's inductor fold the update into
        the gradient's matrix product, an ``addmm`` into the weight, and the weights come
        out wrong; ``tests/test_compiled.py`` holds the update to the fused kernel's."""
        grads = self._by_parameter(flat)
        with torch.no_grad(), _COMPILING():
            groups = zip(self.optimizer.param_groups, self.update.places, strict=True)
            for g, (group, places) in enumerate(groups):
                present = [i for i in places if i in self._traced]  # None: no update
                if not present:
                    continue
                sgd(
                    [params[i] for i in present],
                    [grads[i] for i in present],
                    [None] * len(present),  # no momentum
                    foreach=True,
                    weight_decay=group["weight_decay"],
                    momentum=0.0,
                    lr=rates[g],
                    dampening=group["dampening"],
                    nesterov=group["nesterov"],
                    maximize=group["maximize"],
                )

    def _by_parameter(self, flat: Tensor) -> dict[int, Tensor]:
        """``flat`` (numel,), the trainable parameters' values end to end, as a view for each
        parameter's place, shaped as the parameter."""
        views = flat.split(self._sizes)
        return {
            i: view.view(self.params[i].shape)
            for i, view in zip(self._trainable, views, strict=True)
        }

    def _compiled_for(self, key: tuple, x: Tensor, y: Tensor, step: Callable):
        """The graph for ``key`` (``_key``: this batch's shape, the model's mode, a recording's
        layers): ``step`` traced and compiled on its first call."""
        if key not in self._compiled:
            inputs = [*self.tensors, x, y]
            traced = make_fx(_flat(step), tracing_mode="fake")(*inputs)
            self._places[key] = self._traced
            self._compiled[key] = _compile(traced, inputs)
        return self._compiled[key]

    def _key(self, x: Tensor, y: Tensor) -> tuple:
        key = (x.shape, x.stride(), y.shape, y.stride(), x.dtype, x.device, self.model.training)
        if self._update_in_graph:  # the groups' settings that the traced update holds
            key += tuple((g["weight_decay"], g["maximize"]) for g in self.optimizer.param_groups)
        return key

    def _take_rate(self, lr: float) -> None:
        """The schedule's rate ``lr`` into the param groups (each scaled by its ``lr_scale``),
        and into ``self.rates`` where the graph updates."""
        set_learning_rate(self.optimizer, lr)
        if self._update_in_graph:
            self._hold_rates()

    def _hold_rates(self) -> None:
        """``self.rates``: the param groups' learning rates, written when they change (a fill
        each, which on a GPU waits for nothing, where a copy from host memory would)."""
        rates = tuple(group["lr"] for group in self.optimizer.param_groups)
        if rates != self._rates_held:
            for rate, value in zip(self._rate_of_group, rates, strict=True):
                rate.fill_(value)
            self._rates_held = rates

    def _update(self, places: tuple[int, ...], lr: float) -> None:
        """The optimizer's update from the gradients at ``places``, at learning rate ``lr``."""
        set_learning_rate(self.optimizer, lr)
        self._grads_at(places).update()

    def _grads_at(self, places: tuple[int, ...]) -> Gradients:
        """Each parameter's gradient, a view of the buffer, or None where ``places`` (the
        parameters a graph differentiates) leaves it out, and the update from them: once per
        set of places."""
        if places not in self._grad_lists:
            grads = self._grads_of(self.tensors[-2], places)  # views of the gradients' buffer
            self._grad_lists[places] = Gradients(grads, self.update.on(grads))
        return self._grad_lists[places]

    def _run_gradients(self, x: Tensor, y: Tensor) -> Ran:
        """``_gradients``, compiled unless it cannot be."""
        if self.compile:
            ran = self._run_compiled(self._key(x, y), x, y, self._plain, self._plain_failed)
            if ran is not None:
                self._plain_compiled = True
                if self._unsaid is not None:  # the plain step compiles: a recording's own fault
                    self._say(self._unsaid)
                    self._unsaid = None
                return ran
            self.compile = False
        return Ran(tuple(self._gradients(self._leaves, x, y)), self._traced, updated=False)

    def _plain_failed(self, reason: str) -> None:
        self._say(f"compiling the step failed ({reason}); the step runs uncompiled")
        self._unsaid = None  # a recording graph's failure, for the same reason

    def _recording_failed(self, reason: str) -> None:
        line = f"compiling the recording step failed ({reason}); recordings run untraced"
        if self._plain_compiled:
            self._say(line)
        else:  # said once a plain step compiles: where none can, its line says it all
            self._unsaid = line

    def _say(self, line: str) -> None:
        if self.group is None or dist.get_rank(self.group) == 0:  # one line per run
            print(f"normlab: {line}")

    def _plain(self, tensors: list[Tensor], x: Tensor, y: Tensor) -> tuple[Tensor]:
        """The plain step's graph: ``_gradients``, returning the loss."""
        return (self._gradients(tensors, x, y).loss,)

    def _run_compiled(
        self, key: tuple, x: Tensor, y: Tensor, step: Callable, failed: Callable[[str], None]
    ) -> Ran | None:
        """The graph of ``step`` for ``key``, run on this batch; None where tracing, compiling
        or its first run failed, with the step's tensors as they were, after ``failed(why)``."""
        if key in self._proven:
            outputs = self._compiled[key](self.tensors, x, y)
            return Ran(outputs, self._places[key], self._update_in_graph)
        # Until a graph has run once, keep what it updates in place (the running statistics,
        # the parameters): a graph that fails (no C++ compiler, an unsupported platform) may
        # have updated some already, and the uncompiled retry must start from the same state.
        saved = [t.clone() for t in self.tensors]
        rng = torch.get_rng_state()  # and the dropout masks it may have drawn
        try:
            out = self._compiled_for(key, x, y, step)(self.tensors, x, y)
        except Exception as e:
            failed(first_line(e, 160))
            with torch.no_grad():
                for t, before in zip(self.tensors, saved, strict=True):
                    t.copy_(before)
            torch.set_rng_state(rng)
            return None
        self._proven.add(key)
        return Ran(out, self._places[key], self._update_in_graph)

    def __call__(self, x: Tensor, y: Tensor, lr: float) -> Tensor:
        self._take_rate(lr)
        ran = self._run_gradients(x, y)
        if not ran.updated:
            self._grads_at(ran.places).update()
        return ran.outputs[0]

    def untraced(self, x: Tensor, y: Tensor, lr: float) -> Computed:
        """The step as an untraced recording runs it, without recording: on the model's own
        tensors, with the batch's eval-mode loss before the update, then the update. Under
        several processes, the ones that do not record run this while one records, so that
        all run the same collectives (a SyncBatchNorm without running statistics synchronizes
        in eval mode too)."""
        computed = self._gradients(self._leaves, x, y, evaluate=True)
        self._update(self._traced, lr)
        return computed

    def record(self, x: Tensor, y: Tensor, lr: float, recorder: Diagnostics) -> Recorded:
        """The step, recorded into ``recorder`` (a ``Diagnostics`` of the model).

        Compiled, with SGD's update in the graph, on one process, where the statistics' C++
        operators measure the model's tensors and the model draws no dropout masks
        (``_draws_masks``), the recording is a graph of its own, traced
        with ``recorder``'s hooks attached and compiled: the step, the eval-mode loss and every
        statistic in one call, which returns them in one tensor. The trace copies the outputs
        that the model's forward pass writes in place (``Diagnostics.written_in_place``),
        learned first from a pass that changes nothing (``_learn_writes``), so every
        recording of a process takes the same path, a resumed run's too. Any other recording
        runs untraced: ``untraced``, with the hooks attached, then ``Diagnostics.measure``."""
        if self._records_in_graph():
            if recorder.written_in_place is None:
                self._learn_writes(recorder, x)
            self._take_rate(lr)
            layers = tuple(name for name, _, _ in recorder.layers)
            key = (*self._key(x, y), layers, recorder.written_in_place)
            step = self._recording(recorder, key)
            ran = self._run_compiled(key, x, y, step, self._recording_failed)
            if ran is not None:
                loss, eval_loss, values = ran.outputs
                return Recorded(loss, eval_loss, Measured(values, self._forms[key]))
            self.compile_recordings = False
            self._forms.pop(key, None)
            recorder.detach()  # what the failed trace's hooks captured
        recorder.arm()
        computed = self.untraced(x, y, lr)
        measured = recorder.measure(self._grads_of(computed.gradients, self._traced))
        return Recorded(computed.loss, computed.eval_loss, measured)

    def _learn_writes(self, recorder: Diagnostics, x: Tensor) -> None:
        """What the model's forward pass writes in place, learned by ``recorder`` from a
        training-mode pass on copies of the running statistics (``Diagnostics.learn_writes``),
        which leaves the model, its statistics and the random stream as they were."""
        n_params = len(self.params)
        params = [p.detach().requires_grad_(p.requires_grad) for p in self.params]
        buffers = [t.clone() for t in self.tensors[n_params:-2]]
        state = dict(zip(self.names, params + buffers, strict=True))
        rng = torch.get_rng_state()
        with torch.enable_grad():
            recorder.learn_writes(state, lambda: functional_call(self.model, state, (x,)))
        torch.set_rng_state(rng)

    def _records_in_graph(self) -> bool:
        """Whether a recording runs as a compiled graph of its own (``record``)."""
        return self.compile and self.compile_recordings and self._recordable


def _draws_masks(model: nn.Module) -> bool:
    """Whether ``model`` draws dropout masks in training mode. Its recordings run untraced: in
    the recording graph, torch 2.13's inductor orders a mask's ``bernoulli_`` (torch's own
    kernel, ``fallback_random``) after a fused kernel that reads the mask, so the loss comes
    out NaN; ``tests/test_compiled.py`` runs the dropout models' recordings."""
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())
