"""A whole SGD training step written out by hand and compiled as one graph (``--compile``).

These networks are small: an eager step spends most of its time on the
per-operator overhead of a hundred small kernels and of the autograd engine,
not on arithmetic. Here the forward pass, the backward pass (BatchNorm's
closed-form gradient, the rest by the chain rule), the SGD update and the
BatchNorm running-statistics update are one function of the model's own
tensors, which ``torch.compile`` turns into one graph of fused kernels.

It covers ``MLPLanguageModel`` with ``norm`` batch or none, tanh or ReLU,
residual blocks, hidden biases and an output BatchNorm, trained by plain SGD
(with weight decay); ``unsupported()`` names what it does not cover, and the
training loop then takes the autograd path. The parameters are updated in
place, so the model, its optimizer and its checkpoints are the same objects
whichever path a step takes (diagnostic recordings take the autograd path).
"""

import torch
from torch import Tensor

from normlab import nn as nl
from normlab.model import MLPLanguageModel


def unsupported(model: MLPLanguageModel, optimizer: str) -> str | None:
    """Why the fast step cannot train this model with this optimizer, or None if it can."""
    c = model.config
    if optimizer != "sgd":
        return f"optimizer {optimizer} (the fast step is plain SGD)"
    if c.norm not in ("batch", "none"):
        return f"norm {c.norm} (the fast step has batch or none)"
    if c.dropout > 0:
        return "dropout"
    return None


def _bn_forward(z: Tensor, gain: Tensor, bias: Tensor, eps: float):
    """Training-mode BatchNorm of (B, C): output, x̂, 1/σ, batch mean, biased batch variance."""
    mean = z.mean(0)  # (C,)
    centered = z - mean  # (B, C)
    var = (centered * centered).mean(0)  # (C,)
    invstd = torch.rsqrt(var + eps)
    xhat = centered * invstd  # (B, C)
    return gain * xhat + bias, xhat, invstd, mean, var


def _bn_backward(dy: Tensor, xhat: Tensor, invstd: Tensor, gain: Tensor):
    r"""BatchNorm's closed-form backward, with :math:`g = \partial L/\partial y`:

    .. math::
        \frac{\partial L}{\partial z} = \frac{\gamma}{\sigma B}
            \left(B g - \sum g - \hat{x} \sum g \hat{x}\right)
    """
    B = dy.shape[0]
    dbias, dgain = dy.sum(0), (dy * xhat).sum(0)  # (C,)
    dz = (gain * invstd / B) * (B * dy - dbias - xhat * dgain)  # (B, C)
    return dz, dgain, dbias


class FastStep:
    """``step(x, y, lr) -> loss``: one SGD step of ``model`` on a batch, in place.

    ``compile=False`` runs the same function eagerly (for tests and where
    ``torch.compile`` is unavailable).
    """

    def __init__(
        self, model: MLPLanguageModel, weight_decay: float = 0.0, compile: bool = True
    ) -> None:
        c = model.config
        # the tensors the step reads and updates, as one list (fewer guards than module
        # attributes), and the plan of where each layer's tensors are in it
        self.tensors: list[Tensor] = [model.embedding.weight]
        plan = []
        layers = [(b[0], b[1], True, b.residual) for b in model.blocks]
        layers.append((model.head[0], model.head[1] if len(model.head) > 1 else None, False, False))
        for linear, norm, activated, residual in layers:
            i = len(self.tensors)
            self.tensors.append(linear.weight)
            bias = None
            if linear.bias is not None:
                bias = len(self.tensors)
                self.tensors.append(linear.bias)
            bn = None
            if isinstance(norm, nl.BatchNorm1d):
                bn = (len(self.tensors), norm.eps, norm.momentum)
                self.tensors += [
                    norm.weight,
                    norm.bias,
                    norm.running_mean,
                    norm.running_var,
                    norm.num_batches_tracked,
                ]
            plan.append((i, bias, bn, activated, residual))
        self.plan = tuple(plan)
        self.tanh = c.nonlinearity == "tanh"
        self.weight_decay = weight_decay
        self._lr = None
        self._fn = torch.compile(_step, dynamic=False) if compile else _step

    def __call__(self, x: Tensor, y: Tensor, lr: float) -> Tensor:
        if self._lr is None or self._lr.device != x.device:
            self._lr = torch.zeros((), device=x.device)
        self._lr.fill_(lr)  # a tensor, so that a new learning rate is not a new graph
        args = (self.tensors, x, y, self._lr, self.plan, self.tanh, self.weight_decay)
        if self._fn is _step:
            return self._fn(*args)
        try:
            return self._fn(*args)
        except Exception as e:  # no C++ compiler, an unsupported platform: the same step, eager
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            print(f"normlab: torch.compile failed ({reason}); the step runs uncompiled")
            self._fn = _step
            return self._fn(*args)


@torch.no_grad()
def _step(tensors, x, y, lr, plan, tanh: bool, weight_decay: float) -> Tensor:
    """The step itself: ``plan`` holds, per Linear, (weight index, bias index | None,
    (BatchNorm's first index, eps, momentum) | None, activated, residual)."""
    emb = tensors[0]  # (V, E)
    B, T = x.shape
    h = emb[x].view(B, -1)  # (B, T·E)
    saved = []
    for w, b, bn, activated, residual in plan:
        z = h @ tensors[w].t()  # (B, out)
        if b is not None:
            z = z + tensors[b]
        cache = None
        if bn is not None:
            k, eps, momentum = bn
            z, xhat, invstd, mean, var = _bn_forward(z, tensors[k], tensors[k + 1], eps)
            cache = (xhat, invstd, mean, var)
        a = (torch.tanh(z) if tanh else torch.relu(z)) if activated else z
        saved.append((h, cache, a))
        h = h + a if residual else a
    logp = torch.log_softmax(h, 1)  # (B, V)
    loss = -logp.gather(1, y[:, None]).mean()

    grads = []  # (index, gradient) pairs
    V = logp.shape[1]
    target = (
        torch.arange(V, device=x.device) == y[:, None]
    )  # one-hot, (B, V): fuses, unlike indexing
    d = (logp.exp() - target.to(logp.dtype)) / B  # ∂loss/∂logits, (B, V)
    for (w, b, bn, activated, residual), (h_in, cache, a) in zip(
        reversed(plan), reversed(saved), strict=True
    ):
        dz = d
        if activated:
            dz = dz * (1 - a * a) if tanh else dz * (a > 0)
        if bn is not None:
            k = bn[0]
            dz, dgain, dbias = _bn_backward(dz, cache[0], cache[1], tensors[k])
            grads += [(k, dgain), (k + 1, dbias)]
        grads.append((w, dz.t() @ h_in))
        if b is not None:
            grads.append((b, dz.sum(0)))
        d_in = dz @ tensors[w]  # (B, fan_in)
        d = d_in + d if residual else d_in  # the skip connection passes d on unchanged
    grads.append((0, torch.zeros_like(emb).index_add_(0, x.reshape(-1), d.reshape(B * T, -1))))

    for i, g in grads:  # torch.optim.SGD: decay (L2) on matrices only, as make_optimizer
        p = tensors[i]
        if weight_decay and p.dim() >= 2:
            g = g + weight_decay * p
        p.sub_(lr * g)
    for (_, _, bn, _, _), (_, cache, _) in zip(plan, saved, strict=True):
        if bn is None:
            continue
        k, _, momentum = bn
        running_mean, running_var, count = tensors[k + 2 : k + 5]
        count.add_(1)
        f = 1.0 / count if momentum is None else momentum  # None: the cumulative average
        running_mean.lerp_(cache[2], f)
        running_var.lerp_(cache[3] * (B / (B - 1)), f)  # unbiased, as torch
    return loss
