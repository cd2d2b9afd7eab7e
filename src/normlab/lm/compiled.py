"""The training step: one function, compiled into one graph unless ``--no-compile`` (or its
preset) turns that off.

These networks are small: an eager step spends most of its time on the
per-operator overhead of a hundred small kernels and of the autograd engine,
not on arithmetic. ``CompiledStep`` traces the step up to the update, written
with the model's own forward and autograd, into one graph (``make_fx``): the
forward pass, the running statistics, and the backward that autograd derives
from it (BatchNorm's closed-form backward included). Inductor, ``torch.compile``'s
compiler, turns that graph into fused kernels. Nothing in it is a second copy of the
model: a change to a layer changes the graph, and with it the compiled step. The update
is torch.optim's own (``normlab.lm.optim.FunctionalUpdate``), fused as
``make_optimizer`` builds it, on the gradients the graph writes: one kernel
per param group, and the same update, bit for bit, as ``optimizer.step()``.

On several processes the step all-reduces the gradients itself (summed, see
``normlab.lm.distributed``) and SyncBatchNorm's statistics, with functional
collectives that are part of the graph. The model, its optimizer and its
checkpoints are the same objects whichever path a step takes.

A diagnostics recording (``CompiledStep.recorded``) runs the same function untraced,
on the model's own tensors, with the ``Diagnostics`` hooks attached: autograd's
step, then the same update. A recording is one step in many (every 100 by
default), and tracing it costs more than it saves: at lecture-deep's batch 32 a
trace takes about 0.2 s, the traced graph run op by op saves nothing against
autograd, and compiling it as well takes seconds (``benchmarks/bench_recording.py``).

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

from normlab.diagnostics import Diagnostics
from normlab.errors import first_line
from normlab.lm.model import next_char_loss
from normlab.lm.optim import FunctionalUpdate, set_learning_rate
from normlab.nn import set_mode


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
    """
    options = {"fallback_random": True, "cpp_wrapper": device.type == "cpu"}
    if hasattr(torch._inductor.config.cpp, "use_decompose_tanh"):
        options["cpp.use_decompose_tanh"] = True
    return options


def _flat(gradients: Callable) -> Callable:
    """``gradients(tensors, x, y) -> loss`` as a function of its tensors one by one, returning
    ``(loss,)``: what inductor compiles (a graph of plain inputs and outputs)."""

    def flat(*tensors_x_y: Tensor) -> tuple[Tensor]:
        *tensors, x, y = tensors_x_y
        return (gradients(tensors, x, y),)

    return flat


def inductor_compile(graph: torch.fx.GraphModule, inputs: list[Tensor], options: dict) -> Callable:
    """``graph`` compiled by inductor with ``options`` (its config's names), for ``inputs``:
    a function of those inputs, one by one, that returns the graph's outputs."""
    # imported at the first compile: it imports dynamo, seconds that a command which never
    # compiles (--help, sample) would otherwise spend
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(graph, inputs, config_patches=options)


def _compile(graph: torch.fx.GraphModule, inputs: list[Tensor]) -> Callable:
    """``graph``, traced from ``_flat(gradients)`` on ``inputs`` (the step's tensors, then the
    batch), compiled by inductor: ``(tensors, x, y) -> loss``.

    Inductor compiles it directly, not through ``torch.compile``: the graph is already traced,
    and ``CompiledStep`` keys each compiled graph by all that dynamo's guards would check (the
    batch's shapes, strides, dtype and device, the model's mode), so the guards and the frame
    entry (about 25 µs of a 265 µs step at batch 32: docs/PERFORMANCE.md, section 1b) would
    check it again on every step.
    """
    graph.graph._codegen = torch.fx.graph.CodeGen()  # flat inputs and outputs, as inductor takes
    graph.recompile()
    compiled = inductor_compile(graph, inputs, _options(inputs[-2].device))  # x: the batch

    def step(tensors: list[Tensor], x: Tensor, y: Tensor) -> Tensor:
        (loss,) = compiled(*tensors, x, y)
        return loss

    return step


class Gradients(NamedTuple):
    """The gradients that a compiled graph writes (views of the step's buffer; None for a
    parameter it leaves out), and the optimizer's update from them (``FunctionalUpdate.on``)."""

    grads: list[Tensor | None]
    update: Callable[[], None]


class CompiledStep:
    """``step(x, y, lr) -> loss``: one step of ``model`` and ``optimizer`` on a batch, in place.

    The step is one function, ``_gradients``, and then the optimizer's own update:
    ``_gradients`` runs the forward pass (which moves BatchNorm's running
    statistics), the loss and autograd's backward, and returns the gradients,
    which torch.optim's fused kernels apply (``FunctionalUpdate``: SGD
    without momentum, AdamW without amsgrad) with every param group's settings;
    ``lr`` is the schedule's rate, which each group scales by its ``lr_scale``
    (``normlab.lm.optim.set_learning_rate``).
    ``compile=True`` traces ``_gradients`` into one graph and compiles it;
    ``compile=False`` runs it as it is, on the parameters themselves: what
    ``--no-compile`` trains with, so that the parameters' hooks run.

    The loss is the rows' summed cross-entropy over ``batch_size`` (the global
    batch; by default the batch's own size, so its mean). With a process
    ``group``, each process steps on its own rows and the gradients are summed
    over the group, so every process takes the global batch's step. A batch of
    a new shape, or the model in another mode, traces and compiles again, and
    falls back as the first one does where that fails. The step holds the
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
        # the trainable parameters' gradients, in one buffer that each step writes in place
        # (as DDP's buckets): fixed views of it are what the update reads
        sizes = [self.params[i].numel() for i in self._trainable]
        first = self.params[self._trainable[0]] if self._trainable else torch.empty(0)
        grad_buffer = torch.zeros(sum(sizes), dtype=first.dtype, device=first.device)
        self._grad_views = {
            i: view.view(self.params[i].shape)
            for i, view in zip(self._trainable, grad_buffer.split(sizes), strict=True)
        }
        # the tensors the step reads and writes, as one list: the parameters, the buffers
        # (running statistics), then the gradients' buffer
        self.tensors: list[Tensor] = [t.detach() for t in named.values()] + [grad_buffer]
        self._leaves: list[Tensor] = [*named.values(), grad_buffer]  # what runs untraced
        self.update = FunctionalUpdate(optimizer, self.params)
        self.compile = compile
        self._compiled: dict[tuple, object] = {}  # by the batch and the model's mode
        self._places: dict[tuple, tuple[int, ...]] = {}  # by the same: the parameters with a grad
        self._grad_lists: dict[tuple, Gradients] = {}  # by those places: their grads, the update
        self._proven: set[tuple] = set()  # the keys whose graph has run: no more falling back
        self._traced: tuple[int, ...] = ()  # the parameters the last _gradients differentiated

    def _gradients(self, tensors: list[Tensor], x: Tensor, y: Tensor) -> Tensor:
        """The step up to the update, from the model's forward and autograd; what is traced.

        Writes the trainable parameters' gradients into the gradients' buffer (the last of
        ``tensors``), notes in ``self._traced`` the places of those that the loss uses, and
        returns the loss."""
        n_params = len(self.params)
        # autograd's leaves: the parameters themselves untraced, else copies
        params = [t if t.requires_grad else t.detach().requires_grad_() for t in tensors[:n_params]]
        state = dict(zip(self.names, params + tensors[n_params:-1], strict=True))
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
        tensors[-1].copy_(flat)
        return loss.detach()

    def _compiled_for(self, key: tuple, x: Tensor, y: Tensor):
        """The compiled ``_gradients`` for ``key`` (``_key``: this batch's shape, the model's
        mode)."""
        if key not in self._compiled:
            inputs = [*self.tensors, x, y]
            traced = make_fx(_flat(self._gradients), tracing_mode="fake")(*inputs)
            self._places[key] = self._traced
            self._compiled[key] = _compile(traced, inputs)
        return self._compiled[key]

    def _key(self, x: Tensor, y: Tensor) -> tuple:
        return (x.shape, x.stride(), y.shape, y.stride(), x.dtype, x.device, self.model.training)

    def _update(self, places: tuple[int, ...], lr: float) -> None:
        """The optimizer's update from the gradients at ``places``, at learning rate ``lr``."""
        set_learning_rate(self.optimizer, lr)
        self._grads_at(places).update()

    def _grads_at(self, places: tuple[int, ...]) -> Gradients:
        """Each parameter's gradient, a view of the buffer, or None where ``places`` (the
        parameters a graph differentiates) leaves it out, and the update from them: once per
        set of places."""
        if places not in self._grad_lists:
            views = self._grad_views
            grads = [views.get(i) if i in places else None for i in range(len(self.params))]
            self._grad_lists[places] = Gradients(grads, self.update.on(grads))
        return self._grad_lists[places]

    def _run_gradients(self, x: Tensor, y: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        """``_gradients``, compiled unless it cannot be: the loss, and the places of the
        gradients it wrote."""
        if not self.compile:
            return self._gradients(self._leaves, x, y), self._traced
        key = self._key(x, y)
        if key in self._proven:
            return self._compiled[key](self.tensors, x, y), self._places[key]
        # Until a graph has run once, keep what it updates in place (the running statistics):
        # a graph that fails (no C++ compiler, an unsupported platform) may have updated some
        # already, and the uncompiled retry must start from the same state.
        saved = [t.clone() for t in self.tensors]
        rng = torch.get_rng_state()  # and the dropout masks it may have drawn
        try:
            out = self._compiled_for(key, x, y)(self.tensors, x, y)
        except Exception as e:
            if self.group is None or dist.get_rank(self.group) == 0:  # one line per run
                print(
                    f"normlab: compiling the step failed ({first_line(e, 160)}); "
                    "the step runs uncompiled"
                )
            with torch.no_grad():
                for t, before in zip(self.tensors, saved, strict=True):
                    t.copy_(before)
            torch.set_rng_state(rng)
            self.compile = False
            return self._gradients(self._leaves, x, y), self._traced
        self._proven.add(key)
        return out, self._places[key]

    def __call__(self, x: Tensor, y: Tensor, lr: float) -> Tensor:
        loss, places = self._run_gradients(x, y)
        self._update(places, lr)
        return loss

    def untraced(self, x: Tensor, y: Tensor, lr: float) -> tuple[Tensor, Tensor]:
        """The step as a recording runs it, without recording: untraced, on the model's own
        tensors, then the batch's eval-mode loss before the update, then the update. Returns
        the loss and that eval-mode loss (0-dim tensors). Under several processes, the ones
        that do not record run this while one records, so that all run the same collectives
        (a SyncBatchNorm without running statistics synchronizes in eval mode too)."""
        loss = self._gradients(self._leaves, x, y)
        with torch.no_grad(), set_mode(self.model, training=False):
            # with the running statistics this batch moved, before the update
            eval_logits, _ = self.model(x)
        self._update(self._traced, lr)
        return loss, next_char_loss(eval_logits, y)

    def recorded(self, x: Tensor, y: Tensor, lr: float, recorder: Diagnostics) -> tuple:
        """``untraced``, recorded into ``recorder``, which must be armed: returns the loss and
        the batch's eval-mode loss before the update, and leaves in ``recorder`` what its hooks
        captured, and in each parameter's ``.grad`` its gradient (a view of the step's
        gradients' buffer, which the next step overwrites), for ``recorder.collect()`` to
        measure."""
        if not recorder.armed:  # its hooks would capture nothing
            raise RuntimeError("CompiledStep.recorded(): arm() the Diagnostics first")
        losses = self.untraced(x, y, lr)
        grads, _ = self._grads_at(self._traced)
        for p, grad in zip(self.params, grads, strict=True):  # as loss.backward() leaves them
            p.grad = grad
        return losses
