"""The examples run, end to end, as a user runs them."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_digits_trains_four_ways_and_folds_the_batchnorm_model():
    pytest.importorskip("sklearn", reason="examples/digits.py needs scikit-learn")
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "digits.py")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for way in ("naive", "kaiming", "kaiming + batchnorm", "residual"):
        assert f"\n{way}\n" in out
    sections = {s.split("\n")[0]: s for s in out.split("\n\n")}
    assert "exploding at" in sections["naive"]  # std-1 weights: the signal grows layer by layer
    assert "verdicts at initialization: none" in sections["kaiming"]
    accuracy = float(sections["kaiming + batchnorm"].split("after 300 steps: ")[1].split("%")[0])
    assert accuracy > 90
    assert out.count("folded ") >= DEPTH_BATCHNORMS
    assert "the folded model gives the same classes: True" in out


DEPTH_BATCHNORMS = 9  # examples/digits.py: a BatchNorm in each of its 9 blocks


@pytest.mark.slow
def test_digits_lr_find_compares_the_suggestion_with_a_grid():
    pytest.importorskip("sklearn", reason="examples/digits_lr_find.py needs scikit-learn")
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "digits_lr_find.py")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT / "examples",
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert (
        "find_lr suggests" in out and out.count("test loss") == 9
    )  # 7 rates, the suggestion, best
    assert "best of the grid: lr" in out
