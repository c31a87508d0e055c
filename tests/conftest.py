"""Fixtures shared by several test modules. Constants shared the same way are in helpers.py."""

from pathlib import Path

import pytest
import torch

from helpers import TEXT


@pytest.fixture
def one_torch_thread():
    """Tiny models gain nothing from more threads, and lose a lot when the CPU is shared. A module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A file holding :data:`helpers.TEXT`."""
    path = tmp_path / "corpus.txt"
    path.write_bytes(TEXT)
    return path
