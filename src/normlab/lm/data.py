"""Data: one item per line → vocabulary, the lecture's split, and context windows.

The split is the makemore lectures' own, so every number here compares with
theirs: ``random.seed(42); random.shuffle(items)``, then 80% train, 10% val,
10% test. Each item of length L gives L + 1 examples: every prefix (padded on
the left with the boundary token) predicts the next character, and the full
item predicts the boundary.
"""

import codecs
import hashlib
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

from normlab.errors import NormlabError

BOUNDARY = 0  # token id that starts and ends every item; not a character
BOUNDARY_DISPLAY = "."
SPLIT_SEED = 42


class DataError(NormlabError):
    """The data file cannot be used (missing, empty, not UTF-8, too small)."""


def bundled_names_path() -> Path:
    """The 32,033 names shipped with normlab (see ``normlab/lm/data/README.md``)."""
    return Path(str(resources.files("normlab.lm") / "data" / "names.txt"))


def read_items(path: str | Path) -> list[str]:
    """Read one item per line from a UTF-8 file; line ends stripped, blank lines dropped."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if path.is_dir():
        raise DataError(
            f"data path {path} is a directory, expected a text file with one item per line"
        )
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read data file {path}: {e.strerror}") from None
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"data file {path} is not valid UTF-8 (line {line})") from None
    if not text:
        raise DataError(f"data file {path} is empty")
    # splitlines() would also split on \x1c, \u2028 ...; items are separated by LF or CRLF only
    items = [line.removesuffix("\r") for line in text.split("\n")]
    items = [item for item in items if item.strip()]
    if not items:
        raise DataError(f"data file {path} has only blank lines")
    return items


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass(frozen=True)
class Vocab:
    """Every character seen, sorted, with ids from 1; id 0 is the boundary token."""

    chars: tuple[str, ...]

    @classmethod
    def from_items(cls, items: list[str]) -> "Vocab":
        return cls(tuple(sorted(set("".join(items)))))

    @property
    def size(self) -> int:
        return len(self.chars) + 1

    def encode(self, text: str) -> list[int]:
        stoi = self._stoi()
        unknown = sorted({ch for ch in text if ch not in stoi})
        if unknown:
            raise DataError(f"characters not in the vocabulary: {''.join(unknown)!r}")
        return [stoi[ch] for ch in text]

    def decode(self, ids: list[int]) -> str:
        """Characters for ids, stopping at the first boundary token."""
        out = []
        for i in ids:
            if i == BOUNDARY:
                break
            out.append(self.chars[i - 1])
        return "".join(out)

    def _stoi(self) -> dict[str, int]:
        return {ch: i + 1 for i, ch in enumerate(self.chars)}

    def display(self) -> str:
        return BOUNDARY_DISPLAY + "".join(self.chars)


def split_items(items: list[str]) -> tuple[list[str], list[str], list[str]]:
    """The lectures' split: shuffle with seed 42, then 80% / 10% / 10%."""
    shuffled = list(items)
    random.Random(SPLIT_SEED).shuffle(shuffled)  # same order as random.seed(42); random.shuffle
    n1, n2 = int(0.8 * len(shuffled)), int(0.9 * len(shuffled))
    train, val, test = shuffled[:n1], shuffled[n1:n2], shuffled[n2:]
    if not (train and val and test):
        raise DataError(
            f"{len(items)} items are too few to split 80/10/10 into non-empty train, val and "
            "test sets"
        )
    return train, val, test


def build_examples(items: list[str], vocab: Vocab, block_size: int) -> tuple[Tensor, Tensor]:
    """Context windows ``X`` of shape ``(N, block_size)`` and next ids ``Y`` of shape ``(N,)``."""
    stoi = vocab._stoi()
    X, Y = [], []
    for item in items:
        context = [BOUNDARY] * block_size
        for ix in [stoi[ch] for ch in item] + [BOUNDARY]:
            X.append(context)
            Y.append(ix)
            context = [*context[1:], ix]
    return torch.tensor(X, dtype=torch.long).view(-1, block_size), torch.tensor(Y, dtype=torch.long)


@dataclass
class Dataset:
    """A data file, split and turned into examples for one block size."""

    path: Path
    sha256: str
    n_items: int
    vocab: Vocab
    train_items: list[str]
    splits: dict[str, tuple[Tensor, Tensor]]  # name → (X, Y)

    @property
    def max_item_len(self) -> int:
        return max(len(item) for item in self.train_items)


def load_dataset(path: str | Path | None, block_size: int, vocab: Vocab | None = None) -> Dataset:
    """Read, split and window a data file (``None``: the bundled names).

    ``vocab`` (from a checkpoint) is checked against the file's characters.
    """
    path = Path(path) if path is not None else bundled_names_path()
    items = read_items(path)
    file_vocab = Vocab.from_items(items)
    if vocab is not None and vocab != file_vocab:
        raise DataError(f"data file {path} has a different vocabulary from the run's")
    train, val, test = split_items(items)
    splits = {
        name: build_examples(part, file_vocab, block_size)
        for name, part in (("train", train), ("val", val), ("test", test))
    }
    return Dataset(path, file_sha256(path), len(items), file_vocab, train, splits)
