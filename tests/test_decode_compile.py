"""Decoding an NF4 model under torch.compile with a static KV cache (issue 12, goal 5).

The 1-token path of ``NF4Linear`` (the ``gemv_4bit`` custom op) must trace whole: greedy decoding through
transformers' ``generate`` with a static cache, compiled, gives eager's tokens with no graph break and the op in
the graph once per linear. On CUDA, the 1-token call also runs inside a CUDA graph without syncing with the host,
and ``mode="reduce-overhead"`` decodes without skipping CUDA graphs.
"""

import pytest
import torch
from torch._dynamo.utils import counters

from lightning_nf4 import NF4Linear
from lightning_nf4.plugins.convert import convert_linears
from tests.conftest import cuda_or_skip
from tests.lightning_models import tiny_llama

PROMPT, NEW = 6, 12
GEMV = torch.ops.lightning_nf4.gemv_4bit.default


def _nf4_llama(device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    model = tiny_llama().to(device=device, dtype=dtype).eval()
    convert_linears(model, blocksize=64, double_quant=True, compute_dtype=dtype, device=device)
    return model


def _generate(model: torch.nn.Module, ids: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens and the logits of each step."""
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True, **kwargs)
    return out.sequences[0, ids.shape[1]:], torch.stack(out.logits)


def _compiled(model: torch.nn.Module, ids: torch.Tensor, backend, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``generate`` with a static cache, its decode step compiled by ``backend`` (transformers' compile_config)."""
    from transformers import CompileConfig

    config = CompileConfig(backend=backend, mode=mode, fullgraph=False)
    config._compile_all_devices = True  # transformers compiles on accelerators only unless told
    return _generate(model, ids, cache_implementation="static", compile_config=config)


GRAPHS: list[torch.fx.GraphModule] = []


def _recording_inductor(gm: torch.fx.GraphModule, example_inputs: list) -> object:
    """Inductor, keeping each graph dynamo hands it (a plain function: transformers deep-copies compile_config,
    which would copy a recording object and leave the original empty)."""
    from torch._inductor.compile_fx import compile_fx

    GRAPHS.append(gm)
    return compile_fx(gm, example_inputs)


def _gemv_calls(graphs: list[torch.fx.GraphModule]) -> int:
    return sum(node.target is GEMV for gm in graphs for node in gm.graph.nodes)


@pytest.mark.slow
def test_compiled_static_cache_decode_gives_eager_tokens_without_graph_breaks():
    """fp32, so that inductor's fused kernels round too little to move a greedy choice: the same tokens, logits
    within 1e-4, one graph for the decode step holding the gemv op once per NF4 linear (7 per layer), no break."""
    torch._dynamo.reset()
    counters.clear()
    model = _nf4_llama(torch.device("cpu"), torch.float32)
    linears = sum(isinstance(m, NF4Linear) for m in model.modules())
    assert linears == 14
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT))
    eager_tokens, eager_logits = _generate(model, ids)
    static_tokens, _ = _generate(model, ids, cache_implementation="static", disable_compile=True)
    GRAPHS.clear()
    tokens, logits = _compiled(model, ids, _recording_inductor, "default")
    again, _ = _compiled(model, ids, _recording_inductor, "default")  # a second call reuses the compiled step

    assert torch.equal(static_tokens, eager_tokens)
    assert torch.equal(tokens, eager_tokens) and torch.equal(again, eager_tokens), (tokens, eager_tokens)
    torch.testing.assert_close(logits, eager_logits, atol=1e-4, rtol=1e-4)
    assert dict(counters["graph_break"]) == {}
    assert len(GRAPHS) == 1  # one decode-step graph, not recompiled
    assert _gemv_calls(GRAPHS) == linears  # the op itself is in the graph, not traced through or around


# -- CUDA -------------------------------------------------------------------------------------------------------
def test_cuda_one_token_call_in_a_cuda_graph_without_host_sync():
    """The eager 1-token call never syncs with the host (sync debug mode raises if it does), so it captures into
    a CUDA graph; the replay gives the eager output."""
    device = cuda_or_skip()
    linear = torch.nn.Linear(4096, 1024, bias=True, device=device, dtype=torch.bfloat16)
    layer = NF4Linear.from_linear(linear, compute_dtype=torch.bfloat16)
    x = torch.randn(1, 1, 4096, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = layer(x)  # first call: Triton compiles the kernel
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            layer(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(x)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, layer(x), atol=0, rtol=0)
    assert not torch.equal(out, expected)  # the replay read the new input


def test_cuda_reduce_overhead_decode_gives_eager_tokens():
    """mode="reduce-overhead" (CUDA graphs) over the NF4 decode step: eager's tokens, no graph break, no CUDA
    graph skipped (a host sync or CPU tensor in the step would make inductor skip or fail the capture)."""
    device = cuda_or_skip()
    torch._dynamo.reset()
    counters.clear()
    model = _nf4_llama(device, torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT), device=device)
    eager_tokens, eager_logits = _generate(model, ids)
    first, _ = _compiled(model, ids, "inductor", "reduce-overhead")
    tokens, logits = _compiled(model, ids, "inductor", "reduce-overhead")  # replays the recorded graphs
    assert torch.equal(first, eager_tokens) and torch.equal(tokens, eager_tokens)
    torch.testing.assert_close(logits, eager_logits, atol=1e-3, rtol=1e-3)
    assert dict(counters["graph_break"]) == {}
    assert counters["inductor"]["cudagraph_skips"] == 0
    torch._dynamo.reset()
