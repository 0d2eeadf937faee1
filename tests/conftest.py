"""Test harness: every Triton kernel runs on CPU tensors under the Triton interpreter.

TRITON_INTERPRET must be set before triton is first imported (triton decides at decoration time whether a kernel is
a compiled or an interpreted function), so it is set here, at the top of the first file pytest imports.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from fastft.offline import TINY_ARCHITECTURES, build_tiny_model, build_tokenizer  # noqa: E402

torch.set_num_threads(1)  # two cores, two xdist workers: one thread each avoids oversubscription


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(params=sorted(TINY_ARCHITECTURES))
def model_type(request):
    return request.param


@pytest.fixture
def tiny_model(model_type):
    return build_tiny_model(model_type)


@pytest.fixture
def bnb_default_cpu_kernels():
    """For a test whose unfused baseline is PEFT + bitsandbytes: bitsandbytes dequantizes on CPU with its generic
    backend for the duration, so the baseline is right on every CPU (bitsandbytes 0.50.2's native AVX-512 dequantization
    is wrong for rows that do not hold whole blocks; see tests/bnb_reference.py). Restored afterwards."""
    from tests.bnb_reference import bitsandbytes_default_cpu_kernels

    with bitsandbytes_default_cpu_kernels():
        yield


@pytest.fixture(autouse=True)
def _seed_and_unpatch():
    torch.manual_seed(0)
    yield
    # fastft's RoPE patch is process-wide (per modeling module): revert everything after each test so no later test
    # in the same worker runs a "plain" model through patched (and, here, interpreted) kernels by accident.
    import fastft

    fastft.unpatch()
