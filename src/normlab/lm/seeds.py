"""A run's random streams, each derived from its one ``--seed``.

Each stream has a generator of its own, so that drawing more from one (a larger batch,
another init scheme) leaves the draws of every other as they were.
"""

import torch

STREAMS = {
    "weights": 0,  # the model's initial weights
    "batches": 1,  # which examples each training batch holds
    "lsuv": 2,  # LSUV's batch and its orthonormal starts
    "train-subset": 3,  # the train examples the periodic evaluations measure
    "random-biases": 3,  # the batchnorm experiment's biases (its run draws no train subset)
    "second-order": 4,  # the gradient noise scale's extra batches (second_order_batch_seed)
}


def stream_seed(seed: int, stream: str) -> int:
    """The seed of ``stream`` (a key of ``STREAMS``) in the run of ``seed``."""
    return seed + STREAMS[stream]


def stream_generator(seed: int, stream: str) -> torch.Generator:
    """A CPU generator at the start of ``stream`` in the run of ``seed``."""
    return torch.Generator().manual_seed(stream_seed(seed, stream))


def second_order_batch_seed(seed: int, step: int) -> int:
    """The seed of the extra examples that measure the gradient noise scale at ``step``: one
    per step, so that a resumed run measures on the examples an uninterrupted one does."""
    return hash((stream_seed(seed, "second-order"), step))


def dropout_seed(seed: int, rank: int) -> int:
    """The seed of torch's global generator, which draws dropout's masks: each rank its own."""
    return seed + rank


def resumed_dropout_seed(seed: int, step: int, rank: int) -> int:
    """The dropout seed of a run resumed at ``step`` on another number of processes than
    saved it, whose ranks' own streams cannot carry over: each rank starts one afresh."""
    return hash((hash((seed, step)), rank))  # ints hash alike in every process
