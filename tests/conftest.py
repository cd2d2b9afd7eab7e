import pytest
import torch
from zoo import declare_torchvision_operators

from normlab.lm.data import bundled_names_path
from normlab.nn import kernel

declare_torchvision_operators()  # before anything imports torchvision: see tests/zoo.py


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(params=["kernel", "aten"])
def batchnorm_path(request, monkeypatch):
    """Run the test on BatchNorm's C++ kernel, then on its ATen operators (the path that
    traced steps, SyncBatchNorm and other devices take)."""
    if request.param == "aten":
        monkeypatch.setattr(kernel, "applies", lambda *tensors: False)
    else:
        assert kernel.ops() is not None, "BatchNorm's C++ kernel is not built: see setup.py"
    return request.param


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
