"""The examples run, end to end, as a user runs them."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_example(script: str) -> str:
    """Run ``examples/SCRIPT`` as a user does (it needs scikit-learn); its stdout, once it has
    exited with 0."""
    pytest.importorskip("sklearn", reason=f"examples/{script} needs scikit-learn")
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT / "examples",
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.slow
def test_digits_trains_four_ways_and_folds_the_batchnorm_model():
    out = _run_example("digits.py")
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
    out = _run_example("digits_lr_find.py")
    assert (
        "find_lr suggests" in out and out.count("test loss") == 9
    )  # 7 rates, the suggestion, best
    assert "best of the grid: lr" in out
