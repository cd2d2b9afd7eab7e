import random

import pytest
import torch

from normlab.lm.data import (
    BOUNDARY,
    DataError,
    Vocab,
    build_examples,
    bundled_names_path,
    load_dataset,
    read_items,
    split_items,
)


def test_bundled_names_split_sizes_match_the_lecture():
    data = load_dataset(None, block_size=3)
    sizes = {name: len(X) for name, (X, _) in data.splits.items()}
    assert sizes == {"train": 182_625, "val": 22_655, "test": 22_866}
    assert (
        data.n_items == 32_033
        and data.vocab.size == 27
        and data.vocab.display() == ".abcdefghijklmnopqrstuvwxyz"
    )
    assert data.sha256 == "0a30b5557f192f32ab962680889aac5f6fda0f4cecf40a6d0b5694f58ea8cc4d"


def test_split_is_the_lectures_global_random_shuffle():
    items = read_items(bundled_names_path())
    state = random.getstate()
    try:
        random.seed(42)
        expected = list(items)
        random.shuffle(expected)
    finally:
        random.setstate(state)
    train, val, test = split_items(items)
    assert train + val + test == expected
    assert len(train) == int(0.8 * len(items)) and len(train) + len(val) == int(0.9 * len(items))


def test_examples_are_padded_windows():
    vocab = Vocab.from_items(["ab"])
    X, Y = build_examples(["ab"], vocab, block_size=3)
    a, b = vocab.encode("ab")
    assert X.tolist() == [[0, 0, 0], [0, 0, a], [0, a, b]]
    assert Y.tolist() == [a, b, BOUNDARY]
    assert X.dtype == torch.long and X.shape == (3, 3)


def test_line_ends_blank_lines_and_odd_characters(tmp_path):
    path = tmp_path / "d.txt"
    path.write_bytes(b"anna\r\n\r\n  \nj. r.\nzo\xc3\xab\n\n")
    assert read_items(path) == ["anna", "j. r.", "zoë"]
    vocab = Vocab.from_items(read_items(path))
    assert vocab.chars[0] == " " and "." in vocab.chars  # '.' is a character, not the boundary
    assert vocab.decode(vocab.encode("j. r.")) == "j. r."


def test_byte_order_mark_is_dropped(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfamy\nbo\n")
    assert read_items(path) == ["amy", "bo"]


@pytest.mark.parametrize(
    "content,match",
    [
        (b"", "is empty"),
        (b"\n\n  \r\n", "only blank lines"),
        (b"amy\nbob\n\xff\xfeoops\n", r"not valid UTF-8 \(line 3\)"),
        (b"a\nb\nc\n", "too few"),
    ],
)
def test_bad_data_is_a_data_error(tmp_path, content, match):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=match):
        load_dataset(path, block_size=3)


def test_missing_path_and_directory(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_items(tmp_path / "nope.txt")
    with pytest.raises(DataError, match="is a directory"):
        read_items(tmp_path)


def test_vocab_mismatch_and_unknown_characters(names_file):
    with pytest.raises(DataError, match="different vocabulary"):
        load_dataset(names_file, 3, vocab=Vocab(("a", "b")))
    with pytest.raises(DataError, match="not in the vocabulary"):
        Vocab(("a", "b")).encode("abc")
