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
    check_quantize_on(device, w, blocksize, double_quant)


def check_quantize_on(device: torch.device, w: torch.Tensor, blocksize: int, double_quant: bool) -> None:
    """``w`` quantized on ``device`` against the CPU (bitsandbytes-exact) result, byte for byte, and both weights
    decoded on ``device`` against the CPU's decode of the same bytes."""
    from lightning_nf4.format import dynamic_map
    from lightning_nf4.kernels import reference

    cpu_q = L.quantize_nf4(w, blocksize, double_quant)
    gpu_q = L.quantize_nf4(w.to(device), blocksize, double_quant)
    assert torch.equal(gpu_q.packed.cpu(), cpu_q.packed)  # the 4-bit codes do not depend on the offset
    if not double_quant:
        assert torch.equal(gpu_q.absmax.cpu(), cpu_q.absmax)
    else:
        # The mean offset is reduced in another order on the device, so its last bits may differ from the CPU's.
        # Given the device's offset, the uint8 scale codes and the nested absmax are exactly the CPU reference's
        # double quantization of the same fp32 absmax (which the case without double quantization checks).
        offset = gpu_q.nested.offset.cpu()
        torch.testing.assert_close(offset, cpu_q.nested.offset, rtol=1e-6, atol=0)
        absmax = L.quantize_nf4(w, blocksize, double_quant=False).absmax
        codes, nested_absmax = reference.quantize_blockwise_8bit(absmax - offset, dynamic_map(), 256)
        assert gpu_q.absmax.dtype == torch.uint8 and torch.equal(gpu_q.absmax.cpu(), codes)
        assert torch.equal(gpu_q.nested.absmax.cpu(), nested_absmax)
        assert torch.equal(gpu_q.nested.code.cpu(), cpu_q.nested.code)
        if torch.equal(offset, cpu_q.nested.offset):  # the same offset: the same bytes throughout
            assert torch.equal(gpu_q.absmax.cpu(), cpu_q.absmax) and torch.equal(gpu_q.nested.absmax.cpu(), cpu_q.nested.absmax)
    for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
        # the CPU-quantized weight decodes on the device to the CPU's bits ...
        assert torch.equal(cpu_q.to(device).dequantize(out_dtype).cpu(), cpu_q.dequantize(out_dtype))
        # ... and so does the weight quantized on the device: to what the CPU decodes from its bytes
        assert torch.equal(gpu_q.dequantize(out_dtype).cpu(), gpu_q.to("cpu").dequantize(out_dtype))


@pytest.mark.parametrize("double_quant", [True, False])
def test_cuda_repeated_dequantize_takes_the_checked_direct_launch(double_quant):
    """The second dequantize of a weight of the same specialisation reuses the compiled kernel's launcher (checked
    once against Triton's launch); every call, direct or not, equals the CPU decode of the same bytes. A row shard
    (other addresses, other alignment) gets its own check."""
    from lightning_nf4.kernels import triton_kernels

    device = cuda_or_skip()
    triton_kernels._dequantize_launchers.clear()
    w = torch.randn(1024, 512) * 0.02
    q = L.quantize_nf4(w, 64, double_quant).to(device)
    want = q.to("cpu").dequantize(torch.bfloat16)
    for _ in range(3):
        assert torch.equal(q.dequantize(torch.bfloat16).cpu(), want)
    launchers = list(triton_kernels._dequantize_launchers.values())
    assert len(launchers) == 1 and callable(launchers[0]), launchers  # checked bit for bit, and taken since
    other = L.quantize_nf4(torch.randn(1024, 512) * 0.02, 64, double_quant).to(device)  # same shape, new bytes
    assert torch.equal(other.dequantize(torch.bfloat16).cpu(), other.to("cpu").dequantize(torch.bfloat16))
    assert torch.equal(other.dequantize(torch.bfloat16).cpu(), other.to("cpu").dequantize(torch.bfloat16))


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
    assert layer.to(device) is layer and layer.cuda() is layer  # a move within the card returns the module itself
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
@pytest.mark.parametrize("shape", [(4096, 1024), (1000, 320), (1001, 256), (64, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_one_token_gemv_matches_dequantized_matmul(double_quant, shape, dtype):
    """The fused gemv (warp-shuffle code lookups) against dequantize + matmul in fp32: rows that do not
    fill the last program (1001), rows of 5 blocks (320) and a width that is not whole blocks (100)."""
    device = cuda_or_skip()
    torch.manual_seed(0)
    linear = nn.Linear(shape[1], shape[0], bias=True, device=device)
    layer = NF4Linear.from_linear(linear, double_quant=double_quant, compute_dtype=dtype)
    x = torch.randn(1, 1, shape[1], device=device).to(dtype)
    with torch.no_grad():
        out = layer(x)  # one token without autograd: the fused gemv path
        ref = torch.nn.functional.linear(x.float(), layer.dequantize(torch.float32), layer.bias.float())
    assert out.shape == (1, 1, shape[0]) and out.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # a half-precision output rounds once
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("split", [1, 2])
def test_cuda_repeated_one_token_call_takes_the_checked_direct_launch(split):
    """A layer's second 1-token call goes through its plan's direct launcher (checked once against Triton's launch),
    with and without the split-sum kernel; every call equals Triton's launch bit for bit, and an input at an
    unaligned address still takes Triton's launch."""
    from lightning_nf4.kernels import ops, triton_kernels

    device = cuda_or_skip()
    torch.manual_seed(0)
    layer = NF4Linear.from_linear(nn.Linear(1024, 768, bias=False, device=device), compute_dtype=torch.bfloat16)
    quant = layer.quant
    plan = triton_kernels.gemv_plan(quant.packed, quant.absmax, quant.code, 64, 768, 1024, *quant.nested_args(),
                                    torch.bfloat16, setting=triton_kernels._gemv_setting((4, 16, 1, 3, split), 1024 // 64))
    xs = [torch.randn(1024, device=device).to(torch.bfloat16) for _ in range(3)]
    with torch.no_grad():
        for x in xs:
            assert torch.equal(plan(x), plan.triton_launch(x))
        assert callable(plan.fast), plan.fast  # checked bit for bit, and taken since
        unaligned = torch.randn(1025, device=device).to(torch.bfloat16)[1:]
        assert torch.equal(plan(unaligned), plan.triton_launch(unaligned))
        outs = [layer(x.view(1, 1, -1)).view(-1) for x in xs]  # the layer's own prepared plan takes the same path
        own = ops.prepared_gemv(layer, layer.quant, torch.bfloat16, 768, 1024)
        assert callable(own.fast), own.fast
        assert all(torch.equal(out, own.triton_launch(x)) for out, x in zip(outs, xs))


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_group_dequantize_equals_one_weight_at_a_time(double_quant, dtype):
    """One launch for several weights (the group kernel) gives the single-weight kernel's bytes; a set with
    a weight the kernel cannot take (numel not a multiple of 64) falls back to one launch per weight."""
    from lightning_nf4.kernels import ops

    device = cuda_or_skip()
    torch.manual_seed(0)
    shapes = [(4096, 1024), (1024, 1024), (3584, 1024), (256, 64), (100, 70)]
    qs = [L.quantize_nf4((torch.randn(*s, device=device) * 0.02).to(torch.bfloat16), 64, double_quant) for s in shapes]
    for subset in (qs[:4], qs):
        nested = [q.nested for q in subset] if double_quant else []
        flat = ops.dequantize_4bit_group(
            [q.packed for q in subset], [q.absmax for q in subset], subset[0].code, 64, [q.numel for q in subset], dtype,
            [n.absmax for n in nested], nested[0].code if nested else None, [n.offset for n in nested],
        )
        assert torch.equal(flat, torch.cat([q.dequantize(dtype).reshape(-1) for q in subset]))


def test_cuda_grouped_checkpointed_step_equals_ungrouped():
    from tests.lightning_models import tiny_llama

    device = cuda_or_skip()
    ids = torch.randint(0, 128, (2, 32), device=device)
    results = []
    for group in (True, False):
        torch.manual_seed(0)
        model = tiny_llama().to(device)
        L.NF4Precision(device="cuda", group_dequantize=group).convert_module(model)
        model.model.embed_tokens.weight.requires_grad_(True)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), model.model.embed_tokens.weight.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("double_quant", [True, False])
def test_compiled_dequantize_equals_the_kernel_at_llama_shapes(double_quant):
    """Under torch.compile the dequantize is inductor's own fused kernel (``ops.COMPILED_DEQUANTIZE``): it must give
    the tuned Triton kernel's values bit for bit (2026-11-27, H200: equal at all four 8B shapes and 8192x8192)."""
    device = cuda_or_skip()
    from lightning_nf4.format import quantize_nf4

    torch.manual_seed(0)
    for shape in ((4096, 4096), (1024, 4096), (14336, 4096)):
        quant = quantize_nf4(torch.randn(*shape, device=device, dtype=torch.bfloat16) * 0.02, 64, double_quant)
        torch._dynamo.reset()
        compiled = torch.compile(lambda: quant.dequantize(torch.bfloat16), dynamic=False)()
        assert torch.equal(compiled, quant.dequantize(torch.bfloat16)), shape


def test_cuda_prepared_gemv_direct_launch_and_every_candidate():
    """NF4Linear's prepared 1-token launch on CUDA: Triton's launch, then the checked direct launch, equal to the
    op's result bit for bit; and every gemv launch candidate (split-K included) against dequantize + matvec."""
    from lightning_nf4.kernels import ops
    from lightning_nf4.kernels import triton_kernels as tk

    device = cuda_or_skip()
    layer = NF4Linear.from_linear(nn.Linear(1024, 384, bias=False)).to(device)
    x = torch.randn(1, 1, 1024, device=device, dtype=torch.bfloat16)
    q = layer.quant
    expected = ops._gemv_4bit(x.reshape(-1), q.packed, q.absmax, q.code, 64, 384, 1024, *q.nested_args())
    with torch.no_grad():
        outs = [layer(x).reshape(-1) for _ in range(3)]
    plan = ops.prepared_gemv(layer, layer.quant, torch.bfloat16, 384, 1024)
    assert plan.fast, "the direct launch was not taken into use (its check against Triton's launch failed)"
    # the setting chosen for this shape is reported for "cuda" (the current card) as for the card's own index
    if tk.GEMV_CONFIG is None:
        assert tk.gemv_launch_config("cuda", 384, 1024) == tk.gemv_launch_config(device, 384, 1024) is not None
    for out in outs:
        assert torch.equal(out, expected)
    ref = q.dequantize(torch.float32) @ x.reshape(-1).float()
    for setting in tk.GEMV_CANDIDATES:
        got = tk.gemv_plan(q.packed, q.absmax, q.code, 64, 384, 1024, *q.nested_args(), torch.bfloat16, setting=setting)(x.reshape(-1))
        torch.testing.assert_close(got.float(), ref, atol=2e-2, rtol=2e-2, msg=lambda m: f"{setting}: {m}")


@pytest.mark.parametrize("gpu_sleep", [True, False], ids=["gpu-sleep", "no-gpu-sleep"])
def test_cuda_gemv_first_use_timing_picks_a_candidate_and_frees_its_copies(gpu_sleep, monkeypatch):
    """The first 1-token call of a shape times the candidates over L2-cold copies of the weight: it records one of
    them, leaves no copy allocated, and under CUDA graph capture (where nothing may be timed) it times nothing. Also
    where PyTorch has no ``torch.cuda._sleep`` (private): the timing then runs without the sleep in front."""
    from lightning_nf4.format import quantize_nf4
    from lightning_nf4.kernels import triton_kernels as tk

    device = cuda_or_skip()
    if tk.GEMV_CONFIG is not None:
        pytest.skip("GEMV_CONFIG forces a setting")
    if not gpu_sleep:
        monkeypatch.delattr(torch.cuda, "_sleep", raising=False)
    n, k = 640 + 16 * (not gpu_sleep), 2048  # shapes no other test uses: their choice is made here
    q = quantize_nf4(torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02, 64, True)
    x = torch.randn(k, device=device, dtype=torch.bfloat16)
    key = tk._gemv_key(q.packed.device, n, k, True, torch.bfloat16, 64)  # cuda:N, as the op keys it
    tk._gemv_choice.pop(key, None)
    tk.gemv_plan(q.packed, q.absmax, q.code, 64, n, k, *q.nested_args(), torch.bfloat16, setting=tk.GEMV_CANDIDATES[0])(x)  # compiled
    stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            tk.gemv_4bit(x, q.packed, q.absmax, q.code, 64, n, k, *q.nested_args())
    assert key not in tk._gemv_choice, "a setting was timed while a CUDA graph was captured"
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(device)
    out = tk.gemv_4bit(x, q.packed, q.absmax, q.code, 64, n, k, *q.nested_args())
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated(device) - before <= out.nbytes + (1 << 20), "the timing's weight copies outlived it"
    fitted = {tk._gemv_setting(c, k // 64) for c in tk.GEMV_CANDIDATES}
    assert tk._gemv_choice[key] in fitted
    torch.testing.assert_close(out.float(), q.dequantize(torch.float32) @ x.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("double_quant", [True, False])
def test_cuda_gemv_of_codes_at_an_unaligned_address(double_quant):
    """Codes at an address that is not 16-byte aligned (a view into a larger buffer): Triton specialises the gemv
    kernel on its pointers' alignment, so they take a variant without vector loads (whose sums may be ordered
    differently from the aligned variant's): same result as dequantize + matvec, prepared launch or not."""
    from lightning_nf4.kernels import triton_kernels as tk

    device = cuda_or_skip()
    q = NF4Linear.from_linear(nn.Linear(512, 96, bias=False), double_quant=double_quant).to(device).quant
    buffer = torch.zeros(q.packed.numel() + 1, dtype=torch.uint8, device=device)
    buffer[1:] = q.packed.reshape(-1)
    shifted = buffer[1:].view(q.packed.shape)
    assert shifted.data_ptr() % 4
    x = torch.randn(512, device=device, dtype=torch.bfloat16)
    ref = q.dequantize(torch.float32) @ x.float()
    got = tk.gemv_4bit(x, shifted, q.absmax, q.code, 64, 96, 512, *q.nested_args())
    torch.testing.assert_close(got.float(), ref, atol=2e-2, rtol=2e-2)
    plan = tk.gemv_plan(shifted, q.absmax, q.code, 64, 96, 512, *q.nested_args(), torch.bfloat16)
    assert torch.equal(plan(x), got) and torch.equal(plan(x), got)  # Triton's launch, then the direct one


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_cuda_offload_activations_keeps_gradients_and_frees_the_checkpoint_inputs(compiled):
    """``offload_activations``: under checkpointing the layers' inputs wait in pinned host memory. The gradients are
    the same bit for bit (the copies are exact), and between forward and backward the device holds at least 90% of
    those inputs' bytes less; the same with each decoder layer compiled (``LoRACallback(compile=True)``'s form)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_nf4.layers.offload import offload_activations

    device = cuda_or_skip()
    config = LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)
    ids = torch.randint(0, 256, (2, 1024), device=device)
    results = []
    for offload in (False, True):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(device, torch.bfloat16)
        L.NF4Precision(device="cuda").convert_module(model)
        model.model.embed_tokens.weight.requires_grad_(True)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if compiled:
            from lightning_nf4.plugins.compile import compile_blocks

            compile_blocks(model)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if offload:
                with offload_activations() as hooks:
                    loss = model(input_ids=ids, labels=ids).loss
            else:
                loss = model(input_ids=ids, labels=ids).loss
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - before
        loss.backward()
        results.append((loss.detach(), model.model.embed_tokens.weight.grad.clone(), held))
    inputs = config.num_hidden_layers * ids.numel() * config.hidden_size * 2  # bf16 hidden states, one per layer
    assert hooks.offloaded_bytes >= inputs
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert results[0][2] - results[1][2] >= 0.9 * inputs, (results[0][2], results[1][2], inputs)


def test_cuda_index_past_the_visible_gpus_is_named_before_anything_is_built():
    """An index past the visible GPUs fails at once in the plugin and the loader, with the count, not in a kernel."""
    from lightning_nf4.devices import resolve_device
    from lightning_nf4.plugins import NF4Precision, NF4PrecisionError

    cuda_or_skip()
    count = torch.cuda.device_count()
    assert resolve_device(f"cuda:{count - 1}") == torch.device("cuda", count - 1)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    with pytest.raises(NF4PrecisionError, match=rf"found {count} cuda device\(s\), so index {count} is out of range"):
        NF4Precision(device=f"cuda:{count}")
    with pytest.raises(ValueError, match=rf"Device cuda:{count} is not available: found {count} cuda"):
        resolve_device(f"cuda:{count}")
