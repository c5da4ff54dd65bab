"""The same format and layer checks on CUDA (skipped without a GPU).

bitsandbytes is the CPU reference here; the GPU kernels must reproduce the CPU results bit for bit.
"""

import pytest
import torch
from torch import nn

import lightning_nf4 as L
from lightning_nf4 import NF4Linear
from tests.conftest import cuda_or_skip


@pytest.mark.parametrize("shape", [(64, 64), (100, 70), (33, 17), (4096, 1024), (1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("double_quant", [False, True])
def test_cuda_quantize_dequantize_equal_cpu(shape, dtype, blocksize, double_quant):
    device = cuda_or_skip()
    w = (torch.randn(shape) * 0.02).to(dtype)
    cpu_q = L.quantize_nf4(w, blocksize, double_quant)
    gpu_q = L.quantize_nf4(w.to(device), blocksize, double_quant)
    assert torch.equal(gpu_q.packed.cpu(), cpu_q.packed)
    assert torch.equal(gpu_q.absmax.cpu(), cpu_q.absmax) if not double_quant else True
    if double_quant:
        # the mean is reduced in another order on the GPU; compare what the codes decode to
        torch.testing.assert_close(gpu_q.nested.offset.cpu(), cpu_q.nested.offset, rtol=1e-6, atol=0)
    for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
        on_gpu = cpu_q.to(device).dequantize(out_dtype).cpu()
        assert torch.equal(on_gpu, cpu_q.dequantize(out_dtype))


def test_cuda_non_finite_detected():
    device = cuda_or_skip()
    w = torch.randn(4, 128, device=device)
    w[1, 3] = float("nan")
    with pytest.raises(L.NF4FormatError, match="NaN or Inf"):
        L.quantize_nf4(w)


def test_cuda_nf4linear_forward_backward_and_move():
    device = cuda_or_skip()
    linear = nn.Linear(256, 512)
    layer = NF4Linear.from_linear(linear).cuda()
    assert layer.weight.device.type == "cuda" and layer.quant.nested.absmax.device.type == "cuda"
    x = torch.randn(8, 256, device=device, requires_grad=True)
    out = layer(x)
    ref = torch.nn.functional.linear(x.bfloat16(), layer.dequantize(torch.bfloat16), layer.bias.bfloat16())
    assert out.dtype == torch.float32  # outside autocast: computed in bf16, returned in the input's dtype
    torch.testing.assert_close(out, ref.float(), atol=2e-2, rtol=2e-2)
    out.float().sum().backward()
    assert x.grad is not None and layer.weight.grad is None
    on_gpu = layer.dequantize().cpu()
    back = layer.to("cpu")
    assert back.quant.absmax.device.type == "cpu" and torch.equal(back.dequantize(), on_gpu)


def test_cuda_nested_8bit_quantize_equals_reference():
    device = cuda_or_skip()
    from lightning_nf4.format import dynamic_map
    from lightning_nf4.kernels import ops, reference

    x = torch.randn(100_003) * 0.01
    x[512:768] = 0  # an all-zero block
    q_cpu, a_cpu = reference.quantize_blockwise_8bit(x, dynamic_map(), 256)
    q_gpu, a_gpu = ops.quantize_blockwise_8bit(x.to(device), dynamic_map(device), 256)
    assert torch.equal(a_gpu.cpu(), a_cpu)
    assert torch.equal(q_gpu.cpu(), q_cpu)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(4096, 1024), (1000, 320), (64, 100)])
def test_cuda_one_token_gemv_matches_dequantized_matmul(double_quant, shape):
    device = cuda_or_skip()
    linear = nn.Linear(shape[1], shape[0], bias=True, device=device)
    layer = NF4Linear.from_linear(linear, double_quant=double_quant, compute_dtype=torch.float32)
    x = torch.randn(1, 1, shape[1], device=device)
    with torch.no_grad():
        out = layer(x)  # one token without autograd: the fused gemv path
        ref = torch.nn.functional.linear(x, layer.dequantize(torch.float32), layer.bias)
    assert out.shape == (1, 1, shape[0])
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
