"""For the doctests in src/: every example sees ``torch``, as a reader of the docstring would."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _torch_in_doctests(doctest_namespace):
    doctest_namespace["torch"] = torch
