import bitsandbytes.functional as bnbF
import pytest
import torch

from fastft.kernels import dequantize_nf4, force_path, path_counts

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (shape, blocksize): even and odd element counts, partial last blocks, a 1-D and a 3-D weight, every blocksize family
CASES = [
    ((64, 96), 64),
    ((33, 17), 64),  # odd numel: last byte half-used, partial last block
    ((130, 257), 32),
    ((7,), 128),
    ((3, 3, 5), 256),
    ((96, 40), 512),
    ((50, 90), 1024),
    ((64, 64), 2048),
    ((40, 130), 4096),  # one partial block
]


def _quantize(shape, dtype, blocksize, nested):
    w = torch.randn(shape, dtype=dtype) * 0.1
    if nested:  # blocks of different magnitudes, so the nested absmax codes and offset matter
        w = w * torch.linspace(0.1, 3.0, w.numel()).reshape(shape).to(dtype)
    return bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type="nf4")


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,blocksize", CASES, ids=str)
def test_triton_bitwise_equals_bitsandbytes(shape, blocksize, dtype, nested):
    packed, qs = _quantize(shape, dtype, blocksize, nested)
    assert qs.nested == nested
    expected = bnbF.dequantize_4bit(packed, qs)
    before = path_counts[("dequantize_nf4", "triton")]
    got = dequantize_nf4(packed, qs)
    assert path_counts[("dequantize_nf4", "triton")] == before + 1, "the Triton kernel did not run"
    assert got.shape == expected.shape and got.dtype == expected.dtype == dtype
    assert torch.equal(got, expected)


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_path_bitwise_equals_bitsandbytes(dtype, nested):
    for shape, blocksize in CASES[:4]:
        packed, qs = _quantize(shape, dtype, blocksize, nested)
        with force_path("torch"):
            before = path_counts[("dequantize_nf4", "torch")]
            got = dequantize_nf4(packed, qs)
            assert path_counts[("dequantize_nf4", "torch")] == before + 1
        assert torch.equal(got, bnbF.dequantize_4bit(packed, qs)), (shape, blocksize)


def test_out_buffer_is_reused_and_validated():
    packed, qs = _quantize((48, 80), torch.bfloat16, 64, True)
    out = torch.full((48, 80), float("nan"), dtype=torch.bfloat16)
    result = dequantize_nf4(packed, qs, out=out)
    assert result is out
    assert torch.equal(out, bnbF.dequantize_4bit(packed, qs))
    with pytest.raises(ValueError, match="out must be"):
        dequantize_nf4(packed, qs, out=torch.empty(80, 48, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="out must be"):
        dequantize_nf4(packed, qs, out=torch.empty(48, 80, dtype=torch.float32))
    with pytest.raises(ValueError, match="contiguous"):
        dequantize_nf4(packed, qs, out=torch.empty(80, 48, dtype=torch.bfloat16).t())


def test_params4bit_from_linear4bit_and_non_uint8_storage():
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(72, 40, bias=False, quant_type="nf4", compute_dtype=torch.bfloat16,
                              quant_storage=torch.bfloat16)
    layer.weight = bnb.nn.Params4bit(torch.randn(40, 72, dtype=torch.bfloat16), requires_grad=False,
                                     quant_type="nf4", quant_storage=torch.bfloat16)
    layer = layer.to("cpu")
    w = layer.weight
    assert w.dtype == torch.bfloat16 and w.quant_state is not None
    assert torch.equal(dequantize_nf4(w.data, w.quant_state), bnbF.dequantize_4bit(w.data, w.quant_state))


def test_packing_is_high_nibble_first():
    # Hand-built state: codes 0..15 in order, absmax 1 -> the output is the NF4 table itself, element order intact.
    packed, qs = _quantize((64,), torch.float32, 64, False)
    packed = torch.tensor([(2 * i) << 4 | (2 * i + 1) for i in range(8)] * 4, dtype=torch.uint8).reshape(-1, 1)
    qs.absmax = torch.ones(1)
    got = dequantize_nf4(packed, qs)
    assert torch.equal(got[:16], qs.code.float())
    # (bitsandbytes' CPU kernel returns 1-D even-sized weights as [1, n]; the values are what must agree)
    assert torch.equal(got, bnbF.dequantize_4bit(packed, qs).reshape(-1))


def test_bad_inputs_raise_clear_errors():
    packed, qs = _quantize((16, 16), torch.float32, 64, False)
    with pytest.raises(ValueError, match="bytes"):
        dequantize_nf4(packed[:-1], qs)
    fp4_packed, fp4_qs = bnbF.quantize_4bit(torch.randn(16, 16), quant_type="fp4")
    with pytest.raises(ValueError, match="nf4"):
        dequantize_nf4(fp4_packed, fp4_qs)
    with pytest.raises(ValueError, match="quant_state"):
        dequantize_nf4(packed, None)


def test_fake_impl_traces_on_meta():
    packed, qs = _quantize((64, 96), torch.bfloat16, 64, True)
    meta_packed = packed.to("meta")
    qs.absmax, qs.code = qs.absmax.to("meta"), qs.code.to("meta")
    qs.state2.absmax, qs.state2.code = qs.state2.absmax.to("meta"), qs.state2.code.to("meta")
    qs.offset = qs.offset.to("meta")
    out = dequantize_nf4(meta_packed, qs)
    assert out.shape == (64, 96) and out.dtype == torch.bfloat16 and out.device.type == "meta"
    buf = torch.empty(64, 96, dtype=torch.bfloat16, device="meta")
    assert dequantize_nf4(meta_packed, qs, out=buf) is buf
