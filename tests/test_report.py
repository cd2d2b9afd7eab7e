import base64
import builtins
import json
from html.parser import HTMLParser

import pytest

from normlab.lm.cli import main

VOID = {"meta", "img", "br", "hr", "link", "input"}


class _Checker(HTMLParser):
    """Fails on a closing tag that does not match the open one; collects image sources."""

    def __init__(self):
        super().__init__()
        self.stack, self.images, self.headings, self._in_h2 = [], [], [], False

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        if tag not in VOID:
            self.stack.append(tag)
        self._in_h2 = tag == "h2"

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1:]}>"
        self.stack.pop()
        self._in_h2 = False

    def handle_data(self, data):
        if self._in_h2:
            self.headings.append(data)


def _check_page(path):
    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>")
    checker = _Checker()
    checker.feed(text)
    checker.close()
    assert checker.stack == []
    for src in checker.images:
        assert src.startswith("data:image/png;base64,")  # self-contained: no external files
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    return checker


def test_training_writes_a_well_formed_self_contained_report(tmp_path, tiny, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                *tiny,
                "--steps",
                "60",
                "--eval-every",
                "20",
                "--diagnose-every",
                "20",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    stdout = capsys.readouterr().out
    assert "diagnostics at step 40" in stdout and "report.html" in stdout
    checker = _check_page(out / "report.html")
    # loss, 2 propagation, 2 activation histograms, then one view per family present
    # (activations, normalizations, linear layers, the embedding; each its outputs beside
    # their gradients), weight gradients, the second order measured at step 0, update ratios
    assert len(checker.images) == 5 + 4 + 3
    for heading in (
        "Result",
        "Loss",
        "Verdicts",
        "Signal propagation",
        "Update:data ratio",
        "Curvature and gradient noise",
        "Samples",
        "Config",
    ):
        assert heading in checker.headings, heading
    rows = [json.loads(line) for line in (out / "diagnostics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 20, 40]


def test_report_without_diagnostics(tmp_path, tiny, capsys):
    out = tmp_path / "run"
    assert main(["train", *tiny, "--steps", "10", "--diagnose-every", "0", "--out", str(out)]) == 0
    checker = _check_page(out / "report.html")
    assert "Verdicts" not in checker.headings and len(checker.images) == 1
    assert (out / "diagnostics.jsonl").read_text() == ""


def test_tensorboard_event_files(tmp_path, tiny):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                *tiny,
                "--steps",
                "20",
                "--diagnose-every",
                "10",
                "--eval-every",
                "10",
                "--tensorboard",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 1000


def test_tensorboard_missing_says_how_to_install(tmp_path, tiny, capsys, monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("no tensorboard")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    code = main(["train", *tiny, "--steps", "5", "--tensorboard", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "pip install tensorboard" in err and err.count("\n") == 1
