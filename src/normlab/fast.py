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
        self.model = model
        self.weight_decay = weight_decay
        self.tanh = c.nonlinearity == "tanh"
        self.layers = []  # per Linear: (Linear, BatchNorm | None, activated, residual)
        for block in model.blocks:
            norm = block[1] if isinstance(block[1], nl.BatchNorm1d) else None
            self.layers.append((block[0], norm, True, block.residual))
        head_norm = model.head[1] if len(model.head) > 1 else None
        self.layers.append((model.head[0], head_norm, False, False))
        self.norms = [norm for _, norm, _, _ in self.layers if norm is not None]
        self._lr = None
        self._fn = torch.compile(self._step, dynamic=False) if compile else self._step

    def __call__(self, x: Tensor, y: Tensor, lr: float) -> Tensor:
        if self._lr is None or self._lr.device != x.device:
            self._lr = torch.zeros((), device=x.device)
        self._lr.fill_(lr)  # a tensor, so that a new learning rate is not a new graph
        args = (x, y, self._lr)
        if self._fn is self._step:
            return self._fn(*args)
        try:
            return self._fn(*args)
        except Exception as e:  # no C++ compiler, an unsupported platform: the same step, eager
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            print(f"normlab: torch.compile failed ({reason}); the step runs uncompiled")
            self._fn = self._step
            return self._fn(*args)

    @torch.no_grad()
    def _step(self, x: Tensor, y: Tensor, lr: Tensor) -> Tensor:
        emb = self.model.embedding.weight  # (V, E)
        B, T = x.shape
        h = emb[x].view(B, -1)  # (B, T·E)
        saved, stats = [], []
        for linear, norm, activated, residual in self.layers:
            z = h @ linear.weight.t()  # (B, out)
            if linear.bias is not None:
                z = z + linear.bias
            bn = None
            if norm is not None:
                z, xhat, invstd, mean, var = _bn_forward(z, norm.weight, norm.bias, norm.eps)
                bn = (xhat, invstd)
                stats.append((mean, var))
            a = (torch.tanh(z) if self.tanh else torch.relu(z)) if activated else z
            saved.append((h, bn, a))
            h = h + a if residual else a
        logp = torch.log_softmax(h, 1)  # (B, V)
        loss = -logp.gather(1, y[:, None]).mean()

        grads = []  # (tensor, gradient) pairs
        d = logp.exp()
        d[torch.arange(B, device=x.device), y] -= 1
        d = d / B  # ∂loss/∂logits, (B, V)
        for (linear, norm, activated, residual), (h_in, bn, a) in zip(
            reversed(self.layers), reversed(saved), strict=True
        ):
            dz = d
            if activated:
                dz = dz * (1 - a * a) if self.tanh else dz * (a > 0)
            if norm is not None:
                dz, dgain, dbias = _bn_backward(dz, *bn, norm.weight)
                grads += [(norm.weight, dgain), (norm.bias, dbias)]
            grads.append((linear.weight, dz.t() @ h_in))
            if linear.bias is not None:
                grads.append((linear.bias, dz.sum(0)))
            d = dz @ linear.weight + (d if residual else 0)  # (B, fan_in)
        demb = torch.zeros_like(emb).index_add_(0, x.reshape(-1), d.reshape(B * T, -1))
        grads.append((emb, demb))

        for p, g in grads:  # torch.optim.SGD: decay (L2) on matrices only, as make_optimizer
            if self.weight_decay and p.dim() >= 2:
                g = g + self.weight_decay * p
            p.sub_(lr * g)
        for norm, (mean, var) in zip(self.norms, stats, strict=True):  # as BatchNorm1d does
            norm.num_batches_tracked.add_(1)
            f = norm.momentum
            if f is None:  # the cumulative average
                f = 1.0 / norm.num_batches_tracked
            norm.running_mean.lerp_(mean, f)
            norm.running_var.lerp_(var * (B / (B - 1)), f)  # unbiased, as torch
        return loss
