"""``FlattenContext``: a context window's embeddings as one vector."""

from torch import Tensor, nn


class FlattenContext(nn.Module):
    """Concatenate the embeddings of a context window: ``(B, T, C) -> (B, T * C)``."""

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        return x.view(B, T * C)
