"""Context flattening: the whole window at once (``FlattenContext``), or pairs of positions
level by level (``FlattenConsecutive``, makemore part 5's hierarchy)."""

from torch import Tensor, nn


class FlattenContext(nn.Module):
    """Concatenate the embeddings of a context window: ``(B, T, C) -> (B, T * C)``."""

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        return x.view(B, T * C)


class FlattenConsecutive(nn.Module):
    """Concatenate each ``n`` consecutive positions: ``(B, T, C) -> (B, T / n, n * C)``.

    Where one position is left, it is squeezed out, ``(B, n, C) -> (B, n * C)``,
    so the last level of a hierarchy hands the output layer a plain vector.

    Example:
        >>> FlattenConsecutive(2)(torch.zeros(4, 8, 10)).shape
        torch.Size([4, 4, 20])
        >>> FlattenConsecutive(2)(torch.zeros(4, 2, 10)).shape
        torch.Size([4, 20])
    """

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        if T % self.n != 0:
            raise ValueError(
                f"FlattenConsecutive({self.n}) needs positions in multiples of "
                f"{self.n}, got input of shape {tuple(x.shape)}"
            )
        x = x.view(B, T // self.n, C * self.n)
        return x.squeeze(1) if x.size(1) == 1 else x

    def extra_repr(self) -> str:
        return f"n={self.n}"
