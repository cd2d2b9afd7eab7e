"""The run folder's JSON-lines logs: every row reads back as it was written, NaN included."""

import json
import math

import numpy as np
import pytest

from normlab.lm.rundir import _json_line, _JsonLines, _read_jsonl


def _same(a, b) -> bool:
    """Equal, NaN equal to NaN."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


FINITE = {
    "step": 3,
    "loss": 2.718281828459045,
    "layers": [{"name": "a", "hist": [0, 5, 2], "percentiles": {"p5": -1e-300, "p95": 1e300}}],
    "second_order": None,
    "flag": True,
}


@pytest.mark.parametrize(
    "row",
    [
        FINITE,
        {**FINITE, "loss": math.nan},  # a diverged run's statistics
        {**FINITE, "layers": [{"name": "a", "percentiles": {"p5": -math.inf}}]},
        {**FINITE, "shape": (1, (2.5, math.inf))},
        {**FINITE, "numpy": np.float64(0.1), "nan": [np.float64("nan")]},  # not orjson's
    ],
)
def test_a_row_reads_back_as_it_was_written_nan_and_infinities_included(row):
    line = _json_line(row)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    expected = json.loads(json.dumps(row))  # what json itself writes
    assert _same(json.loads(line), expected)


def test_the_log_appends_rows_through_one_descriptor_and_a_cut_last_line_is_skipped(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text("")
    log = _JsonLines(path)
    for step in range(3):
        log.append({**FINITE, "step": step})
    assert [row["step"] for row in _read_jsonl(path)] == [0, 1, 2]  # written, not buffered
    log.close()
    with path.open("ab") as f:  # a kill in the middle of a row
        f.write(_json_line(FINITE)[:40])
    assert [row["step"] for row in _read_jsonl(path)] == [0, 1, 2]


def test_a_note_outside_ascii_reads_back_whatever_the_locale_and_cut_mid_character(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text("")
    log = _JsonLines(path)
    row = {**FINITE, "note": "at a batch of 32, |G|² estimated ≤ 0"}
    log.append(row)
    log.close()
    assert _read_jsonl(path) == [row]  # orjson writes UTF-8; read as bytes, not the locale's
    line = _json_line({**row, "step": 4})
    with path.open("ab") as f:  # a kill inside the two bytes of "²"
        f.write(line[: line.index("²".encode()) + 1])
    assert _read_jsonl(path) == [row]
