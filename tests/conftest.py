"""Shared test set-up."""

import pytest
import torch

# The files that take longest (seconds of test time in a `make test` on the 2-core machine, 2026-12-01): run first, so
# that `make test`'s two workers (-n 2 --dist loadfile --no-loadscope-reorder: whole files, in this order) end together
# instead of one finishing a long file alone. Files not listed follow in their usual order.
LONGEST_FIRST = ["test_faults_process.py", "test_benchmarks.py", "test_fsdp.py", "test_distributed_faults.py",
                 "test_cli.py", "test_sharded_checkpoint.py", "test_generate.py", "test_interop.py",
                 "test_speculative.py", "test_sweep.py", "test_distributed.py", "test_allocator.py", "test_serve.py"]


def pytest_collection_modifyitems(items: list) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


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
