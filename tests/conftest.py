import os
import warnings

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*kernels-community.*")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_process_group_left():
    """A process group must never outlive its test: one left behind is torn down later, at interpreter
    exit or in another test, where gloo's destructor can block forever. Distributed runs go in subprocesses."""
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        pytest.fail("this test left a torch.distributed process group initialized; run it in a subprocess with a timeout")


def cuda_or_skip() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda")
