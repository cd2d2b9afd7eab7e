import pytest
import torch

from normlab.data import bundled_names_path


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def names_file(tmp_path_factory):
    """A small names file (the first 400 bundled names), quick to train on."""
    path = tmp_path_factory.mktemp("data") / "names.txt"
    names = bundled_names_path().read_text().splitlines()[:400]
    path.write_text("\n".join(names) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny(names_file):
    """CLI flags for a tiny, fast, CPU-only run on names_file: eager, as compiling the step
    would take longer than such a run."""
    return [
        "--data",
        str(names_file),
        "--n-layer",
        "2",
        "--n-hidden",
        "16",
        "--n-embd",
        "4",
        "--batch-size",
        "32",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--no-compile",
    ]
