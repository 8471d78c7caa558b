import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402
import torch  # noqa: E402

# Triton decides interpreted or compiled when a function is decorated with @triton.jit, its own
# standard library (tl.interleave, ...) included, at ``import triton``: set the CPU interpreter before
# any test file imports triton, so that every kernel and every helper it calls is interpreted alike
# (a file that imported triton first once left the standard library compiled under interpreted kernels:
# "Cannot call @triton.jit'd outside of the scope of a kernel"). Subprocesses that compile for sm_90
# drop the variable themselves.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (the README's ``-n 2``) each worker computes on one thread, its subprocesses too: two
# workers of two OpenMP threads each on two cores stall at each other's barriers.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture
def fresh_dynamo():
    """Each test compiles from a reset Dynamo and leaves it reset. Use with
    ``pytestmark = pytest.mark.usefixtures("fresh_dynamo")``."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny graphs: several OpenMP threads only contend on a shared CPU. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
