"""The whole training step as one compiled graph: what a run trains with unless ``--no-compile``
(or its preset) turns it off.

These networks are small: an eager step spends most of its time on the
per-operator overhead of a hundred small kernels and of the autograd engine,
not on arithmetic. ``CompiledStep`` traces one step, written with the model's own
forward and autograd, into one graph (``make_fx``): the forward pass, the
backward that autograd derives from it (BatchNorm's closed-form backward
included), the optimizer's update and the running statistics. ``torch.compile``
turns that graph into fused kernels. Nothing in it is a second copy of the
model: a change to a layer changes the graph, and with it the compiled step.

It covers every model and option the CLI builds, trained by the optimizers
``make_optimizer`` builds: plain SGD and AdamW, with their weight decay. On
several processes the step all-reduces the gradients itself (summed, as
``normlab.lm.distributed``'s DDP hook does) and SyncBatchNorm's statistics, with
functional collectives that are part of the graph. The parameters and AdamW's
moments are updated in place, in the optimizer's own state, so the model, its
optimizer and its checkpoints are the same objects whichever path a step takes.

A diagnostics recording (``CompiledStep.recorded``) traces the same step with the
``Diagnostics`` hooks attached: they run while it is traced, so what they
capture (the layers' outputs, their gradients, BatchNorm's inputs and running
statistics) becomes the graph's outputs, with the parameters' gradients and
the batch's eval-mode loss. That graph runs without inductor: a recording is
one step in many (every 100 by default), measuring what it captured costs more
than the step itself, and compiling a second graph would cost about as much as
the first.

Other module hooks run while the step is traced, not in the compiled step, and
hooks on the parameters or their gradients never run in it (the step
differentiates detached copies): a run whose hooks must see every step trains
with ``--no-compile``. A BatchNorm with ``momentum=None`` (a cumulative
average, which reads its step count on the host) cannot be traced; the step
then says so and runs uncompiled.
"""

import os
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn
from torch.fx.experimental.proxy_tensor import make_fx

from normlab.diagnostics import Diagnostics
from normlab.errors import first_line
from normlab.lm.model import next_char_loss
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


def _options() -> dict:
    """Inductor options for the step.

    ``fallback_random``: dropout draws its masks with torch's own kernels, from
    the same generator and in the same order as the eager model, so the two
    paths compute the same masks and a resumed run draws what it would have.

    ``cpp.use_decompose_tanh``: inductor's own vectorized tanh on CPU is about 2×
    slower than its exp-based decomposition, 1 - 2/(exp(2x) + 1). torch leaves
    the decomposition off by default (pytorch#148241) because its error is
    absolute, not relative: up to 2e-7, large next to a tiny tanh(x) near 0 but
    float32 rounding for the activations of order 1 that normalization makes.
    Older torch has no such option.
    """
    options = {"fallback_random": True}
    if hasattr(torch._inductor.config.cpp, "use_decompose_tanh"):
        options["cpp.use_decompose_tanh"] = True
    return options


class ParamUpdate(NamedTuple):
    """How the optimizer updates one parameter, from that parameter's group."""

    index: int  # the parameter's place in the step's tensors
    weight_decay: float
    state: int | None  # AdamW: the place of its exp_avg; exp_avg_sq and step follow it
    betas: tuple[float, float] | None  # AdamW
    eps: float | None  # AdamW


class UpdatePlan(NamedTuple):
    """The optimizer's update, parameter by parameter: what ``_apply_update`` runs."""

    optimizer: str  # "sgd" | "adamw"
    params: tuple[ParamUpdate, ...]


class CompiledStep:
    """``step(x, y, lr) -> loss``: one step of ``model`` and ``optimizer`` on a batch, in place.

    ``optimizer`` is a ``torch.optim.SGD`` (plain: no momentum) or
    ``torch.optim.AdamW`` over the model's parameters, as ``make_optimizer``
    builds them; each parameter's weight decay comes from its group. Build the
    step after loading a checkpoint into the optimizer: it works on the
    optimizer's state tensors, creating them in torch's own format when absent.
    The loss is the rows' summed cross-entropy over ``batch_size`` (the global
    batch; by default the batch's own size, so its mean). With a process
    ``group``, each process steps on its own rows and the gradients are summed
    over the group, so every process takes the global batch's step.
    ``compile=False`` runs the same
    step eagerly, untraced (for tests, and where ``torch.compile`` fails). A
    batch of a new shape, or the model in another mode, traces and compiles
    the step again, and falls back as the first one does where that fails.
    The step holds the model's tensors as they are when it is
    built: build it after moving the model to its device and dtype.
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
        self.batch_size = batch_size
        self.group = group
        # the tensors the step reads and updates, as one list: the parameters, the buffers
        # (running statistics), then the optimizer's state
        params = dict(model.named_parameters())
        named = params | dict(model.named_buffers())
        self.names = tuple(named)
        self.n_params = len(params)
        self.tensors: list[Tensor] = [t.detach() for t in named.values()]
        self.update = self._update_plan(optimizer, list(params.values()))
        self.compile = compile
        self._lr = None
        self._compiled: dict[tuple, object] = {}  # by the batch, the model's mode, the recording
        self._proven: set[tuple] = set()  # the keys whose graph has run: no more falling back
        self._record_eagerly = False  # a recording's trace failed: record without tracing

    def _update_plan(self, optimizer: torch.optim.Optimizer, params: list[Tensor]) -> UpdatePlan:
        """What the optimizer does to each parameter it holds, from that parameter's group;
        appends each AdamW state to the step's tensors."""
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        adamw = isinstance(optimizer, torch.optim.AdamW)
        if not adamw and not isinstance(optimizer, torch.optim.SGD):
            raise ValueError(f"the compiled step has SGD and AdamW, not {type(optimizer).__name__}")
        for g in optimizer.param_groups:
            if g.get("momentum") or g.get("amsgrad") or g.get("maximize"):
                raise ValueError("the compiled step has plain SGD, and AdamW without amsgrad")
        rules = []
        for i, p in enumerate(params):
            group = group_of.get(id(p))
            if group is None:  # frozen
                continue
            state = None
            if adamw:
                moments = optimizer.state[p]
                # absent before the first step: create them as torch.optim.AdamW(fused=True) does
                if not moments:
                    moments["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    moments["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    moments["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state = len(self.tensors)
                self.tensors += [moments["exp_avg"], moments["exp_avg_sq"], moments["step"]]
            betas = tuple(float(b) for b in group["betas"]) if adamw else None
            eps = float(group["eps"]) if adamw else None
            rules.append(ParamUpdate(i, float(group["weight_decay"]), state, betas, eps))
        if len(rules) != len(group_of):
            raise ValueError("the optimizer holds parameters that are not the model's")
        return UpdatePlan("adamw" if adamw else "sgd", tuple(rules))

    def _step(self, tensors: list[Tensor], x: Tensor, y: Tensor, lr: Tensor, recorder=None):
        """The step itself, from the model's forward and autograd; what is traced.

        Returns the loss; with ``recorder`` (an armed ``Diagnostics``, whose hooks capture as
        the forward and backward passes run) also the batch's eval-mode loss before the
        update, what the hooks captured, and the parameters' gradients (None where unused)."""
        params = [t.detach().requires_grad_() for t in tensors[: self.n_params]]
        buffers = tensors[self.n_params : len(self.names)]
        state = dict(zip(self.names, params + buffers, strict=True))
        with torch.enable_grad():
            logits, _ = torch.func.functional_call(self.model, state, (x,))
            loss = next_char_loss(logits, y, over=self.batch_size or len(y))
        # a parameter the loss does not use gets None, and no update, as in torch.optim
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        with torch.no_grad():
            if recorder is not None:  # with the running statistics this batch moved
                with set_mode(self.model, training=False):
                    eval_logits, _ = torch.func.functional_call(self.model, state, (x,))
                eval_loss = next_char_loss(eval_logits, y)
            used = {i: g for i, g in enumerate(grads) if g is not None}
            if self.group is not None:
                used = _sum_over_group(used, self.group)
            _apply_update(tensors, used, lr, self.update)
        if recorder is None:
            return loss.detach()
        param_grads = [used.get(i) for i in range(self.n_params)]
        return loss.detach(), eval_loss, recorder.captures(), param_grads

    def _compiled_for(self, key: tuple, x: Tensor, y: Tensor, recorder: Diagnostics | None):
        """The compiled step for ``key`` (``_key``: this batch's shape, the model's mode);
        with ``recorder``, the recording step (traced with its hooks attached, so that the graph
        returns what they capture), run uncompiled."""
        if key not in self._compiled:

            def step(tensors, x, y, lr):  # make_fx traces a function, not a bound method
                return self._step(tensors, x, y, lr, recorder)

            graph = make_fx(step, tracing_mode="fake")(self.tensors, x, y, self._lr)
            if recorder is None:
                graph = torch.compile(graph, dynamic=False, options=_options())
            self._compiled[key] = graph
        return self._compiled[key]

    def _key(self, x: Tensor, y: Tensor, recorder: Diagnostics | None) -> tuple:
        # a recording's graph returns what its recorder's layers capture
        layers = tuple(name for name, _, _ in recorder.layers) if recorder is not None else None
        return (x.shape, y.shape, x.dtype, x.device, self.model.training, layers)

    def _run(self, x: Tensor, y: Tensor, lr: float, recorder: Diagnostics | None):
        if self._lr is None or self._lr.device != x.device:
            self._lr = torch.zeros((), dtype=torch.float64, device=x.device)
        self._lr.fill_(lr)  # a tensor, so that a new learning rate is not a new graph
        if not self.compile or (recorder is not None and self._record_eagerly):
            return self._step(self.tensors, x, y, self._lr, recorder)
        key = self._key(x, y, recorder)
        if key in self._proven:
            return self._compiled[key](self.tensors, x, y, self._lr)
        # Until a graph has run once, keep what it updates in place: a step that fails
        # (no C++ compiler, an unsupported platform) may have updated some tensors already,
        # and the uncompiled retry must start from the same state.
        saved = [t.clone() for t in self.tensors]
        rng = torch.get_rng_state()  # and the dropout masks it may have drawn
        try:
            out = self._compiled_for(key, x, y, recorder)(self.tensors, x, y, self._lr)
        except Exception as e:
            reason = first_line(e, 160)
            message = (
                f"torch.compile failed ({reason}); the step runs uncompiled"
                if recorder is None
                else f"tracing a recording step failed ({reason}); recordings run untraced"
            )
            if self.group is None or dist.get_rank(self.group) == 0:  # one line per run
                print(f"normlab: {message}")
            with torch.no_grad():
                for t, before in zip(self.tensors, saved, strict=True):
                    t.copy_(before)
            torch.set_rng_state(rng)
            if recorder is None:
                self.compile = False
            else:  # the plain steps keep their compiled graph
                self._record_eagerly = True
                recorder.arm()  # drop what the failed trace's hooks captured
            return self._step(self.tensors, x, y, self._lr, recorder)
        self._proven.add(key)
        return out

    def __call__(self, x: Tensor, y: Tensor, lr: float) -> Tensor:
        return self._run(x, y, lr, None)

    def recorded(self, x: Tensor, y: Tensor, lr: float, recorder: Diagnostics) -> tuple:
        """The step, recorded into ``recorder``, which must be armed: returns the loss and the
        batch's eval-mode loss before the update (0-dim tensors), and leaves in ``recorder``
        what its hooks capture in an autograd step, and in each parameter's ``.grad`` its
        gradient, for ``recorder.collect()`` to measure."""
        if not recorder.armed:  # its hooks would capture nothing, in the graph too
            raise RuntimeError("CompiledStep.recorded(): arm() the Diagnostics first")
        loss, eval_loss, captured, grads = self._run(x, y, lr, recorder)
        recorder.restore(captured)
        for p, grad in zip(self.model.parameters(), grads, strict=True):
            p.grad = grad  # as loss.backward() leaves them, for recorder.collect()
        return loss, eval_loss


def _sum_over_group(grads: dict, group) -> dict:
    """``grads`` (index -> gradient) summed over the processes of ``group``: one all-reduce
    of them all, flattened."""
    flat = torch.cat([g.flatten() for g in grads.values()])  # (total numel,)
    flat = funcol.all_reduce(flat, "sum", group)
    summed = flat.split([g.numel() for g in grads.values()])
    return {i: s.view_as(g) for (i, g), s in zip(grads.items(), summed, strict=True)}


def _apply_update(tensors: list[Tensor], grads: dict, lr: Tensor, update: UpdatePlan) -> None:
    r"""The optimizer's update, in place, with :math:`\eta` the learning rate and
    :math:`\lambda` the weight decay. ``grads`` maps a parameter's index to its gradient;
    a parameter without one is left alone, as ``torch.optim`` does.

    ``torch.optim.SGD``: decay as L2, :math:`p \leftarrow p - \eta (g + \lambda p)`.

    ``torch.optim.AdamW``: decoupled decay :math:`p \leftarrow p (1 - \eta\lambda)`, the
    moments :math:`m \leftarrow \beta_1 m + (1 - \beta_1) g` and
    :math:`v \leftarrow \beta_2 v + (1 - \beta_2) g^2`, then at step :math:`t`

    .. math::
        p \leftarrow p - \frac{\eta}{1 - \beta_1^t}
            \frac{m}{\sqrt{v / (1 - \beta_2^t)} + \epsilon}
    """
    if update.optimizer == "sgd":
        for i, decay, *_ in update.params:
            if i not in grads:
                continue
            p, g = tensors[i], grads[i]
            if decay:
                g = g + decay * p
            p.sub_(lr * g)
        return
    for i, decay, k, (beta1, beta2), eps in update.params:
        if i not in grads:
            continue
        p, g = tensors[i], grads[i]
        exp_avg, exp_avg_sq, step = tensors[k : k + 3]
        step.add_(1)
        t = step.double()  # the scalar coefficients in float64, as torch's fused AdamW
        if decay:
            p.mul_((1 - lr * decay).to(p.dtype))
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step_size = (lr / (1 - beta1**t)).to(p.dtype)
        denom = exp_avg_sq.sqrt() / (1 - beta2**t).sqrt().to(p.dtype) + eps
        p.sub_(step_size * exp_avg / denom)
