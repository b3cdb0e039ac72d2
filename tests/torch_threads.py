"""Fixture for tests of tiny models: run torch single-threaded, restore the thread count after.

On a loaded 2-core machine, OpenMP threads spinning on tiny ops made a 0.2 s test take 9 s.
Use with ``from tests.torch_threads import single_thread`` and
``pytestmark = pytest.mark.usefixtures("single_thread")``.
"""

import pytest
import torch


@pytest.fixture
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
