"""Shared test set-up."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny models run fastest on one thread, and `make test` already runs two test processes on two cores:
    more threads would only wait on each other. Tests that need threads start their own processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def client(server):
    """An HTTP client of the module's `server` fixture ((url, app) of a real server on loopback)."""
    import httpx

    with httpx.Client(base_url=server[0], timeout=30) as c:
        yield c
