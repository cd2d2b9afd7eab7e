"""Generate names from an exported normlab model with numpy and onnxruntime only: no torch.

    normlab export --run runs/demo --format onnx             # writes runs/demo/model.onnx
    python examples/sample_onnx.py runs/demo/model.onnx -n 10 --seed 0

The ONNX file holds the vocabulary and the block size in its metadata. Each
step runs the model on every growing sample at once, as ``normlab sample``
does. The probabilities are normlab's own (to float rounding); the draws come
from numpy's generator, not torch's, so for the same seed the names differ,
except with ``--top-k 1``, where both take the most likely character and give
the same names.
"""

import argparse
import json

import numpy as np
import onnxruntime as ort

BOUNDARY = 0  # the token that starts and ends every name


def load(path: str) -> tuple[ort.InferenceSession, list[str], int]:
    """The model, its vocabulary (id 1 onwards) and its block size."""
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    return session, json.loads(meta["normlab.vocab"]), int(meta["normlab.block_size"])


def generate(session, chars, block_size, n, max_len, temperature=1.0, top_k=None, seed=0):
    """``n`` names of at most ``max_len`` characters."""
    rng = np.random.default_rng(seed)
    idx = np.full((n, block_size), BOUNDARY, dtype=np.int64)  # (n, block_size)
    out = np.zeros((n, max_len), dtype=np.int64)
    rows = np.arange(n)  # the samples still growing
    for t in range(max_len):
        (logits,) = session.run(None, {"idx": idx})  # (rows, vocab)
        logits = logits.astype(np.float64) / temperature
        if top_k is not None:
            kth = np.sort(logits, axis=1)[:, -top_k][:, None]
            logits = np.where(logits < kth, -np.inf, logits)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        if top_k == 1:
            next_id = probs.argmax(axis=1)
        else:  # inverse-CDF draws, one uniform number per sample
            u = rng.random((len(rows), 1))
            next_id = np.minimum((probs.cumsum(axis=1) < u).sum(axis=1), probs.shape[1] - 1)
        out[rows, t] = next_id
        growing = next_id != BOUNDARY
        if not growing.any():
            break
        rows, idx = rows[growing], np.concatenate([idx[growing, 1:], next_id[growing, None]], 1)
    return [decode(row, chars) for row in out]


def decode(row: np.ndarray, chars: list[str]) -> str:
    """The characters of ``row`` up to its first boundary token."""
    ends = np.flatnonzero(row == BOUNDARY)
    return "".join(chars[i - 1] for i in row[: ends[0] if len(ends) else len(row)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="the .onnx file normlab export wrote")
    parser.add_argument("-n", "--num", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-len", type=int, default=40)
    args = parser.parse_args()
    session, chars, block_size = load(args.model)
    options = {"temperature": args.temperature, "top_k": args.top_k, "seed": args.seed}
    for name in generate(session, chars, block_size, args.num, args.max_len, **options):
        print(name)


if __name__ == "__main__":
    main()
