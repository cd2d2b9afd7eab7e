"""A whole training step written out by hand and compiled as one graph (``--compile``).

These networks are small: an eager step spends most of its time on the
per-operator overhead of a hundred small kernels and of the autograd engine,
not on arithmetic. Here the forward pass, the backward pass (BatchNorm's
closed-form gradient, the rest by the chain rule), the optimizer's update and
the BatchNorm running-statistics update are one function of the model's own
tensors, which ``torch.compile`` turns into one graph of fused kernels.

It covers ``MLPLanguageModel`` with ``norm`` batch or none, tanh or ReLU,
residual blocks, hidden biases and an output BatchNorm, trained by the
optimizers ``make_optimizer`` builds: plain SGD and AdamW, with their weight
decay. ``COVERS`` lists, for every config field, the values it covers;
``unsupported()`` names what a run asks beyond them, and the training step
then takes the autograd path. The parameters and AdamW's moments are updated
in place, in the optimizer's own state, so the model, its optimizer and its
checkpoints are the same objects whichever path a step takes (diagnostic
recordings take the autograd path).
"""

from dataclasses import fields

import torch
from torch import Tensor, nn

from normlab import nn as nl
from normlab.config import ModelConfig, TrainConfig
from normlab.distributed import Ranks
from normlab.errors import first_line
from normlab.model import MLPLanguageModel

ANY = None
# Every config field, and the values of it that the compiled step covers (ANY: all).
# tests/test_fast.py fails when a config gains a field that this table does not mention.
COVERS: dict[str, tuple | None] = {
    # the model
    "vocab_size": ANY,
    "arch": ("mlp",),
    "block_size": ANY,
    "n_embd": ANY,
    "n_hidden": ANY,
    "n_layer": ANY,
    "norm": ("batch", "none"),
    "nonlinearity": ("tanh", "relu"),
    "residual": ANY,
    "init": ANY,  # the step starts from whatever weights the model holds
    "gain": ANY,
    "output_bn": ANY,
    "bias": ANY,
    "n_groups": ANY,  # only used by norm group
    "bn_over_positions": ANY,  # only used by arch wavenet
    "bn_momentum": ANY,
    "dropout": (0.0,),
    "embed_dropout": (0.0,),
    # the training
    "steps": ANY,
    "batch_size": ANY,
    "optimizer": ("sgd", "adamw"),
    "lr": ANY,  # passed to every step as a tensor
    "schedule": ANY,
    "decay_step": ANY,
    "warmup_steps": ANY,
    "min_lr_ratio": ANY,
    "weight_decay": ANY,
    "ema": ANY,  # the average is updated after the step, whichever path it took
    "eval_every": ANY,
    "eval_train_examples": ANY,
    "checkpoint_every": ANY,
    "diagnose_every": ANY,  # a recording step takes the autograd path
    "tensorboard": ANY,
    "sync_batchnorm": ANY,  # only several processes use it, and they take the autograd path
    "compile": ANY,
    "target_val_loss": ANY,
    "seed": ANY,
    "data": ANY,
    "device": ANY,
    "threads": ANY,
    "preset": ANY,
}


def unsupported(model_config: ModelConfig, train_config: TrainConfig, ranks: Ranks) -> str | None:
    """What the compiled step does not cover in this run (``COVERS``), or None if it covers all."""
    if ranks.distributed:
        return "several processes"
    for config in (model_config, train_config):
        for f in fields(config):
            covered, value = COVERS[f.name], getattr(config, f.name)
            if covered is not ANY and value not in covered:
                return f"{f.name.replace('_', '-')} {value}"
    return None


ACTIVATION_KINDS = {nl.Tanh: "tanh", nl.ReLU: "relu"}


def _plan_layer(layers: list[nn.Module]) -> tuple[nn.Module, nn.Module | None, str | None]:
    """The Linear, BatchNorm and activation of one block or the head, found by type."""
    linear, norm, activation = None, None, None
    for layer in layers:
        if isinstance(layer, nl.Linear) and linear is None:
            linear = layer
        elif isinstance(layer, nl.BatchNorm1d) and norm is None:
            norm = layer
        elif type(layer) in ACTIVATION_KINDS and activation is None:
            activation = ACTIVATION_KINDS[type(layer)]
        elif not isinstance(layer, nn.Identity):
            raise ValueError(f"the compiled step does not cover a {type(layer).__name__} layer")
    if linear is None:
        raise ValueError("the compiled step needs a Linear in every block")
    return linear, norm, activation


def _bn_forward(z: Tensor, gain: Tensor, bias: Tensor, eps: float):
    """Training-mode BatchNorm of (C, B), features by batch: output, x̂, 1/σ, batch mean and
    biased batch variance (C, 1)."""
    var, mean = torch.var_mean(z, 1, correction=0, keepdim=True)  # (C, 1): one pass
    invstd = torch.rsqrt(var + eps)
    xhat = (z - mean) * invstd  # (C, B)
    return gain[:, None] * xhat + bias[:, None], xhat, invstd, mean, var


def _bn_backward(dy: Tensor, xhat: Tensor, invstd: Tensor, gain: Tensor):
    r"""BatchNorm's closed-form backward on (C, B), with :math:`g = \partial L/\partial y`:

    .. math::
        \frac{\partial L}{\partial z} = \frac{\gamma}{\sigma B}
            \left(B g - \sum g - \hat{x} \sum g \hat{x}\right)
    """
    B = dy.shape[1]
    dbias, dgain = dy.sum(1), (dy * xhat).sum(1)  # (C,)
    dz = (gain[:, None] * invstd / B) * (B * dy - dbias[:, None] - xhat * dgain[:, None])
    return dz, dgain, dbias  # (C, B), (C,), (C,)


def _options() -> dict:
    """Inductor options for the step.

    Inductor's own vectorized tanh on CPU is about 2× slower than its exp-based
    decomposition, 1 - 2/(exp(2x) + 1). torch leaves the decomposition off by
    default (pytorch#148241) because its error is absolute, not relative: up to
    2e-7, large next to a tiny tanh(x) near 0 but float32 rounding for the
    activations of order 1 that BatchNorm makes. Older torch has no such option.
    """
    if hasattr(torch._inductor.config.cpp, "use_decompose_tanh"):
        return {"cpp.use_decompose_tanh": True}
    return {}


class FastStep:
    """``step(x, y, lr) -> loss``: one step of ``model`` and ``optimizer`` on a batch, in place.

    ``optimizer`` is a ``torch.optim.SGD`` (plain: no momentum) or
    ``torch.optim.AdamW`` over the model's parameters, as ``make_optimizer``
    builds them; each parameter's weight decay comes from its group. Build the
    step after loading a checkpoint into the optimizer: it works on the
    optimizer's state tensors, creating them in torch's own format when absent.
    ``compile=False`` runs the same function eagerly (for tests and where
    ``torch.compile`` is unavailable).
    """

    def __init__(
        self, model: MLPLanguageModel, optimizer: torch.optim.Optimizer, compile: bool = True
    ) -> None:
        # the tensors the step reads and updates, as one list (fewer guards than module
        # attributes), and the plan of where each layer's tensors are in it
        self.tensors: list[Tensor] = [model.embedding.weight]
        plan = []
        layers = [(*_plan_layer(list(b)), b.residual) for b in model.blocks]
        layers.append((*_plan_layer(list(model.head)), False))
        for linear, norm, activation, residual in layers:
            i = len(self.tensors)
            self.tensors.append(linear.weight)
            bias = None
            if linear.bias is not None:
                bias = len(self.tensors)
                self.tensors.append(linear.bias)
            bn = None
            if norm is not None:
                bn = (len(self.tensors), norm.eps, norm.momentum)
                self.tensors += [
                    norm.weight,
                    norm.bias,
                    norm.running_mean,
                    norm.running_var,
                    norm.num_batches_tracked,
                ]
            plan.append((i, bias, bn, activation, residual))
        self.plan = tuple(plan)
        self.update = self._update_plan(optimizer)
        self._lr = None
        self._fn = torch.compile(_step, dynamic=False, options=_options()) if compile else _step
        self._proven = False  # a compiled step has run: no more falling back

    def _update_plan(self, optimizer: torch.optim.Optimizer) -> tuple:
        """("sgd", rules) or ("adamw", β1, β2, ε, rules); a rule per parameter is (its index,
        its weight decay, the index of its AdamW state: exp_avg, exp_avg_sq, step)."""
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        adamw = isinstance(optimizer, torch.optim.AdamW)
        if not adamw and not isinstance(optimizer, torch.optim.SGD):
            raise ValueError(f"the fast step has SGD and AdamW, not {type(optimizer).__name__}")
        for g in optimizer.param_groups:
            if g.get("momentum") or g.get("amsgrad") or g.get("maximize"):
                raise ValueError("the fast step has plain SGD, and AdamW without amsgrad")
        rules = []
        for i, t in enumerate(list(self.tensors)):
            group = group_of.get(id(t))
            if group is None:  # a buffer
                continue
            state = None
            if adamw:
                moments = optimizer.state[t]
                # absent before the first step: create them as torch.optim.AdamW(fused=True) does
                if not moments:
                    moments["step"] = torch.zeros((), dtype=torch.float32, device=t.device)
                    moments["exp_avg"] = torch.zeros_like(t, memory_format=torch.preserve_format)
                    moments["exp_avg_sq"] = torch.zeros_like(t, memory_format=torch.preserve_format)
                state = len(self.tensors)
                self.tensors += [moments["exp_avg"], moments["exp_avg_sq"], moments["step"]]
            rules.append((i, float(group["weight_decay"]), state))
        if len(rules) != len(group_of):
            raise ValueError("the optimizer holds parameters that are not the model's")
        if not adamw:
            return ("sgd", tuple(rules))
        beta1, beta2 = optimizer.param_groups[0]["betas"]
        return (
            "adamw",
            float(beta1),
            float(beta2),
            float(optimizer.param_groups[0]["eps"]),
            tuple(rules),
        )

    def __call__(self, x: Tensor, y: Tensor, lr: float) -> Tensor:
        if self._lr is None or self._lr.device != x.device:
            self._lr = torch.zeros((), dtype=torch.float64, device=x.device)
        self._lr.fill_(lr)  # a tensor, so that a new learning rate is not a new graph
        args = (self.tensors, x, y, self._lr, self.plan, self.update)
        if self._fn is _step or self._proven:
            return self._fn(*args)
        # Until a compiled step has run once, keep what it updates in place: a step that fails
        # (no C++ compiler, an unsupported platform) may have updated some tensors already,
        # and the uncompiled retry must start from the same state.
        saved = [t.clone() for t in self.tensors]
        try:
            loss = self._fn(*args)
        except Exception as e:
            reason = first_line(e, 160)
            print(f"normlab: torch.compile failed ({reason}); the step runs uncompiled")
            with torch.no_grad():
                for t, before in zip(self.tensors, saved, strict=True):
                    t.copy_(before)
            self._fn = _step
            return self._fn(*args)
        self._proven = True
        return loss


@torch.no_grad()
def _step(tensors, x, y, lr, plan, update: tuple) -> Tensor:
    """The step itself: ``plan`` holds, per Linear, (weight index, bias index | None,
    (BatchNorm's first index, eps, momentum) | None, activation "tanh" | "relu" | None,
    residual); ``update`` is ``FastStep._update_plan``'s.

    Activations are kept features by batch, (C, B), the transpose of the model's
    layout: BatchNorm's sums over the batch then run along contiguous rows, one
    pass each, where over (B, C) they would stride across the whole tensor once
    per few columns. The matrix products read either layout as it is, without copies.
    """
    emb = tensors[0]  # (V, E)
    B, T = x.shape
    h = emb[x].view(B, -1).t()  # (T·E, B), a view: the first product reads it transposed
    saved = []
    for w, b, bn, activation, residual in plan:
        z = tensors[w] @ h  # (out, B)
        if b is not None:
            z = z + tensors[b][:, None]
        cache = None
        if bn is not None:
            k, eps, momentum = bn
            z, xhat, invstd, mean, var = _bn_forward(z, tensors[k], tensors[k + 1], eps)
            cache = (xhat, invstd, mean, var)
        a = z
        if activation == "tanh":
            a = torch.tanh(z)
        elif activation == "relu":
            a = torch.relu(z)
        saved.append((h, cache, a))
        h = h + a if residual else a
    logp = torch.log_softmax(h, 0)  # (V, B)
    loss = -logp.gather(0, y[None, :]).mean()

    grads = []  # (index, gradient) pairs
    V = logp.shape[0]
    target = torch.arange(V, device=x.device)[:, None] == y  # one-hot, (V, B): fuses
    d = (logp.exp() - target.to(logp.dtype)) / B  # ∂loss/∂logits, (V, B)
    for (w, b, bn, activation, residual), (h_in, cache, a) in zip(
        reversed(plan), reversed(saved), strict=True
    ):
        dz = d
        if activation == "tanh":
            dz = dz * (1 - a * a)
        elif activation == "relu":
            dz = dz * (a > 0)
        if bn is not None:
            k = bn[0]
            dz, dgain, dbias = _bn_backward(dz, cache[0], cache[1], tensors[k])
            grads += [(k, dgain), (k + 1, dbias)]
        grads.append((w, dz @ h_in.t()))  # (out, in)
        if b is not None:
            grads.append((b, dz.sum(1)))
        d_in = tensors[w].t() @ dz  # (in, B)
        d = d_in + d if residual else d_in  # the skip connection passes d on unchanged
    d_emb = d.t().reshape(B * T, -1)  # (B·T, E)
    grads.append((0, torch.zeros_like(emb).index_add_(0, x.reshape(-1), d_emb)))

    _apply_update(tensors, dict(grads), lr, update)
    for (_, _, bn, _, _), (_, cache, _) in zip(plan, saved, strict=True):
        if bn is None:
            continue
        k, _, momentum = bn
        running_mean, running_var, count = tensors[k + 2 : k + 5]
        count.add_(1)
        f = 1.0 / count if momentum is None else momentum  # None: the cumulative average
        running_mean.lerp_(cache[2].view(-1), f)
        running_var.lerp_(cache[3].view(-1) * (B / (B - 1)), f)  # unbiased, as torch
    return loss


def _apply_update(tensors, grads: dict, lr: Tensor, update: tuple) -> None:
    r"""The optimizer's update, in place, with :math:`\eta` the learning rate and
    :math:`\lambda` the weight decay.

    ``torch.optim.SGD``: decay as L2, :math:`p \leftarrow p - \eta (g + \lambda p)`.

    ``torch.optim.AdamW``: decoupled decay :math:`p \leftarrow p (1 - \eta\lambda)`, the
    moments :math:`m \leftarrow \beta_1 m + (1 - \beta_1) g` and
    :math:`v \leftarrow \beta_2 v + (1 - \beta_2) g^2`, then at step :math:`t`

    .. math::
        p \leftarrow p - \frac{\eta}{1 - \beta_1^t}
            \frac{m}{\sqrt{v / (1 - \beta_2^t)} + \epsilon}
    """
    if update[0] == "sgd":
        for i, decay, _ in update[1]:
            p, g = tensors[i], grads[i]
            if decay:
                g = g + decay * p
            p.sub_(lr * g)
        return
    _, beta1, beta2, eps, rules = update
    for i, decay, k in rules:
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
