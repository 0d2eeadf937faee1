"""Test harness: where the suite runs.

Default (``FASTFT_TEST_DEVICE`` unset or "cpu"): every Triton kernel runs on CPU tensors under the Triton
interpreter. ``FASTFT_TEST_DEVICE=cuda``: the interpreter stays off, torch's default device is the GPU, so the same
tests build CUDA tensors and run the compiled kernels; the CUDA-only tests (``@pytest.mark.cuda``, tests/gpu/) run
instead of skipping.

TRITON_INTERPRET must be set before triton is first imported (triton decides at decoration time whether a kernel is
a compiled or an interpreted function), so it is set here, at the top of the first file pytest imports.
"""

import os

TEST_DEVICES = ("cpu", "cuda")
TEST_DEVICE = os.environ.get("FASTFT_TEST_DEVICE", "cpu").strip().lower() or "cpu"
if TEST_DEVICE not in TEST_DEVICES:
    raise RuntimeError(f"FASTFT_TEST_DEVICE must be one of {', '.join(TEST_DEVICES)}; got {TEST_DEVICE!r}")
if TEST_DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
elif os.environ.get("TRITON_INTERPRET", "0") == "1":
    # Refused rather than ignored: the CUDA suite exists to run the compiled kernels, not interpreted ones.
    raise RuntimeError("FASTFT_TEST_DEVICE=cuda runs the compiled kernels: unset TRITON_INTERPRET (it is 1)")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from fastft.offline import TINY_ARCHITECTURES, build_tiny_model, build_tokenizer  # noqa: E402

torch.set_num_threads(1)  # two cores, two xdist workers: one thread each avoids oversubscription

CUDA_READY = TEST_DEVICE == "cuda" and torch.cuda.is_available()
if TEST_DEVICE == "cuda":
    if not CUDA_READY:
        raise RuntimeError(
            "FASTFT_TEST_DEVICE=cuda but torch.cuda.is_available() is False (torch "
            f"{torch.__version__}, built for CUDA {torch.version.cuda})"
        )
    # Every factory call without an explicit device now makes CUDA tensors: the CPU tests run unchanged on the GPU.
    torch.set_default_device("cuda")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs FASTFT_TEST_DEVICE=cuda and a CUDA GPU (skipped otherwise)")


def pytest_collection_modifyitems(config, items):
    if CUDA_READY:
        return
    skip = pytest.mark.skip(reason=f"CUDA-only: run with FASTFT_TEST_DEVICE=cuda on a GPU (here: {TEST_DEVICE})")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def test_device() -> torch.device:
    """The device the suite runs on ("cpu" under the interpreter, or "cuda")."""
    return torch.device(TEST_DEVICE)


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


@pytest.fixture
def fresh_patches():
    """No fastft patch applied and every say-once message unsaid when the test starts (for tests that count what
    patching applies or says); ``_seed_and_unpatch`` reverts the patches afterwards."""
    import fastft
    from fastft._log import reset_once

    fastft.unpatch()
    reset_once()


@pytest.fixture(autouse=True)
def _seed_and_unpatch():
    torch.manual_seed(0)
    yield
    # fastft's RoPE patch is process-wide (per modeling module): revert everything after each test so no later test
    # in the same worker runs a "plain" model through patched (and, here, interpreted) kernels by accident.
    import fastft

    fastft.unpatch()
