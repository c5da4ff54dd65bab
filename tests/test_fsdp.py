"""Sharded QLoRA: the NF4Tensor ops FSDP2 uses, checked byte for byte against the unsharded weight, and
NF4FSDPStrategy runs on CPU (gloo, two processes, each run a subprocess with a timeout) against one process
and against DDP. The XPU part is simulated at the device boundary only (see test_strategy_builds_its_mesh_on_xpu)."""

import json
import os
import sys
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

import lightning_nf4  # noqa: F401  (registers the strategies)
from lightning_nf4 import NF4Linear, NF4Precision, quantize_nf4
from lightning_nf4.format.tensor import NF4ShardingError, NF4Tensor, check_shardable
from lightning_nf4.plugins.precision import NF4PrecisionError
from lightning_nf4.strategies import NF4FSDPStrategy, NF4ShardingConfigError
from lightning_nf4.strategies.fsdp import find_sharding_units
from tests import isolated

pytestmark = pytest.mark.timeout(1000)  # the fixture's three runs of up to 300 s count against its first test; a CLI run stops at 600 s

WORKER = Path(__file__).with_name("fsdp_worker.py")


class OneRankMesh:
    """What the all-gather hooks read from FSDP's mesh: its size."""

    def __init__(self, size: int) -> None:
        self._size = size

    def size(self) -> int:
        return self._size


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("world", [2, 4])
def test_shards_and_all_gather_rebuild_the_weight_byte_for_byte(double_quant, world):
    weight = torch.randn(256, 512, dtype=torch.bfloat16)
    quant = quantize_nf4(weight, double_quant=double_quant)
    tensor = NF4Tensor(quant)
    shards = torch.chunk(tensor, world, dim=0)  # what fully_shard does
    assert all(type(s) is NF4Tensor and s.shape == (256 // world, 512) for s in shards)
    rows = 256 // world
    for r, shard in enumerate(shards):  # each shard is exactly its rows of every row-indexed part
        torch.testing.assert_close(shard.dequantize(torch.float32), quant.dequantize(torch.float32)[r * rows:(r + 1) * rows], rtol=0, atol=0)
        padded = tensor.new_zeros(shard.shape)  # FSDP pads into fresh storage, then copies the shard in
        padded.narrow(0, 0, rows).copy_(shard)
        assert all(torch.equal(a, b) for a, b in zip(padded.quant.tensors(), shard.quant.tensors()))
    # the all-gather: each rank's inputs, concatenated per part (what the collective returns), then the post hook
    inputs = [s.fsdp_pre_all_gather(OneRankMesh(world), tensor.shape, (512, 1), None, None) for s in shards]
    gathered = tuple(torch.cat([i[0][k] for i in inputs]) for k in range(len(inputs[0][0])))
    assert all(t.dtype in (torch.uint8, torch.float32) for t in gathered)  # bytes and fp32 scales, never cast
    whole, inner = shards[0].fsdp_post_all_gather(gathered, inputs[0][1], torch.bfloat16)
    assert isinstance(whole, NF4Tensor) and whole.shape == weight.shape and whole.dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(whole.quant.tensors(), quant.tensors()))
    # a second gather into the same buffers: the first weight sees the new bytes without a rebuild
    for t in inner:
        t.zero_()
    assert shards[0].fsdp_post_all_gather(gathered, inputs[0][1], torch.bfloat16, out=whole) is None
    assert int(whole.quant.packed.sum()) == 0


def test_one_rank_gathers_one_buffer():
    quant = quantize_nf4(torch.randn(128, 256))
    tensor = NF4Tensor(quant)
    (buffer,), meta = tensor.fsdp_pre_all_gather(OneRankMesh(1), tensor.shape, (256, 1), None, None)
    assert buffer.dtype == torch.uint8 and buffer.numel() == sum(t.numel() * t.element_size() for t in quant.tensors()[:2] + [quant.nested.absmax])
    whole, _ = tensor.fsdp_post_all_gather((buffer.clone(),), meta, torch.float32)
    torch.testing.assert_close(whole.dequantize(), quant.dequantize(), rtol=0, atol=0)


def test_moves_and_casts_keep_the_bytes():
    quant = quantize_nf4(torch.randn(128, 256))
    tensor = NF4Tensor(quant)
    half = tensor.to(torch.float16)  # a mixed-precision cast changes what it dequantizes to, not the codes
    assert type(half) is NF4Tensor and half.dtype == torch.float16 and half.quant.packed is quant.packed
    assert tensor.view(-1).shape == (128 * 256,) and tensor.detach().quant is quant
    with pytest.raises(NotImplementedError, match="aten.add"):
        tensor + 1


def test_layer_with_nf4_tensor_weight_computes_the_same():
    linear = nn.Linear(256, 128)
    plain, sharded_form = NF4Linear.from_linear(linear), NF4Linear.from_linear(linear)
    sharded_form.to_nf4_tensor()
    assert isinstance(sharded_form.weight, NF4Tensor) and sharded_form._quant is None  # no second reference
    x = torch.randn(3, 256, requires_grad=True)
    torch.testing.assert_close(sharded_form(x), plain(x), rtol=0, atol=0)


def test_unshardable_layouts_are_named():
    with pytest.raises(NF4ShardingError, match=r"q_proj.weight: 10 rows do not split evenly across 4 ranks"):
        check_shardable(quantize_nf4(torch.randn(10, 64)), 4, name="q_proj.weight")
    with pytest.raises(NF4ShardingError, match=r"multiple of 16384 elements.*double_quant=False"):
        check_shardable(quantize_nf4(torch.randn(64, 256)), 2, name="k_proj.weight")
    check_shardable(quantize_nf4(torch.randn(64, 256), double_quant=False), 2)  # blocks of 64 alone split
    check_shardable(quantize_nf4(torch.randn(10, 64)), 1)  # one rank holds the whole weight: any layout


def test_fsdp1_with_nf4_fails_at_construction_naming_the_strategy():
    with pytest.raises(NF4PrecisionError, match="strategy='nf4_fsdp'"):
        pl.Trainer(accelerator="cpu", devices=2, strategy="fsdp", plugins=NF4Precision(), logger=False)


@pytest.mark.parametrize("name", ["nf4_fsdp", "fsdp2", "nf4_fsdp_cpu_offload"])
def test_strategy_names_resolve(name):
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=name, plugins=NF4Precision(), logger=False)
    assert isinstance(trainer.strategy, NF4FSDPStrategy)
    assert trainer.strategy.cpu_offload is name.endswith("offload")


def test_what_sharding_leaves_moves_to_the_device_and_parameters_stay():
    """A LightningModule's metric (no parameters, so in no FSDP unit) and a loose buffer must follow the model to
    the root device, or a GPU run fails at the first validation step; parameters stay where sharding put them."""
    from torchmetrics.aggregation import MeanMetric

    from lightning_nf4.strategies.fsdp import move_unsharded_state

    module = pl.LightningModule()
    module.body = torch.nn.Linear(4, 4)
    module.body.register_buffer("scale", torch.ones(4))
    module.metric = MeanMetric()
    module.register_buffer("pending", torch.zeros(2, device="meta"))  # materialized later by its owner: left alone
    target = torch.device("meta")  # another device than the CPU, the only one here
    move_unsharded_state(module, target)
    assert module.metric.device == target and all(t.device == target for t in module.metric.metric_state.values())
    assert module.body.scale.device == target
    assert module.body.weight.device.type == "cpu" and module.body.bias.device.type == "cpu"
    assert module.pending.is_meta
    assert module.device == target  # the LightningModule's own record (its generate and perplexity place tensors by it)


def test_a_model_sharded_by_the_user_is_refused_and_a_refit_is_not():
    """A LightningModule whose configure_model calls fully_shard itself (Lightning's ModelParallelStrategy idiom)
    would train in float, without NF4 or LoRA: an error naming the fix. The same model fit a second time, found
    sharded by the strategy itself, trains on (one gloo rank in a child process, tests/fsdp_setup_worker.py)."""
    worker = str(Path(__file__).parent / "fsdp_setup_worker.py")
    refused = isolated.run([sys.executable, worker, "user_sharded"], capture_output=True, text=True, timeout=200)
    assert refused.returncode != 0 and "fit:" not in refused.stdout
    assert "already sharded (fully_shard in configure_model?)" in refused.stderr, refused.stderr[-3000:]
    refit = isolated.run([sys.executable, worker, "refit"], capture_output=True, text=True, timeout=200)
    assert refit.returncode == 0, refit.stderr[-3000:]
    fits = [line for line in refit.stdout.splitlines() if line.startswith("fit:")]
    assert len(fits) == 2 and fits[0] == fits[1] and "NF4LoraLinear" in fits[0], refit.stdout


def test_sharding_units_default_to_the_decoder_layer():
    from tests.lightning_models import tiny_llama

    model = tiny_llama()
    units = find_sharding_units(model)
    assert [type(u).__name__ for u in units] == ["LlamaDecoderLayer"] * 2
    with pytest.raises(NF4ShardingConfigError, match="matched no module.*LlamaDecoderLayer"):
        find_sharding_units(model, ["GPTBlock"])


def test_strategy_builds_its_mesh_on_xpu(monkeypatch):
    """Simulated: the process group is not made (this CPU torch has no XPU and no xccl); what is checked is the
    strategy's own choices at that boundary: the xccl backend and a device mesh of type "xpu", no CUDA call."""
    import torch.distributed.device_mesh as device_mesh
    from lightning.fabric.plugins.environments import LightningEnvironment

    from lightning_nf4.strategies import XCCLUnavailableError

    def no_cuda(*args, **kwargs):
        raise AssertionError("torch.cuda touched on the XPU path")

    for name in ("current_device", "set_device", "is_available", "device_count"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    calls = []
    monkeypatch.setattr(device_mesh, "init_device_mesh", lambda *a, **k: calls.append((a, k)) or "mesh")
    strategy = NF4FSDPStrategy()
    strategy.parallel_devices = [torch.device("xpu", 0), torch.device("xpu", 1)]
    env = LightningEnvironment()
    env.set_world_size(2)
    strategy.cluster_environment = env
    with pytest.raises(XCCLUnavailableError):
        strategy._get_process_group_backend()
    monkeypatch.setattr(dist, "is_xccl_available", lambda: True)
    assert strategy._get_process_group_backend() == "xccl"
    monkeypatch.setattr(strategy, "_setup_distributed", lambda: None)
    strategy.setup_environment()
    assert calls == [(("xpu", (2,)), {"mesh_dim_names": ("data_parallel",)})]


# -- real runs: two gloo processes per run, each in a subprocess with a timeout ----------------------------
def run_worker(out: Path, strategy: str, devices: int, batch_size: int, epochs: int = 2, resume: str = "", timeout: int = 300, checkpoint: str = ""):
    args = [sys.executable, str(WORKER), str(out), strategy, str(devices), str(batch_size), str(epochs)] + ([resume] if resume else [])
    env = {**os.environ, "FSDP_WORKER_CHECKPOINT": checkpoint} if checkpoint else None
    done = isolated.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(devices)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    return {
        "single": run_worker(root / "single", "auto", 1, 4),
        "fsdp": run_worker(root / "fsdp", "nf4_fsdp", 2, 2),  # 2 ranks x 2 = the single run's batch of 4
        "ddp": run_worker(root / "ddp", "ddp", 2, 2),
        "root": root,
    }


def test_sharded_run_matches_one_process_and_ddp(runs):
    single, fsdp, ddp = runs["single"][0], runs["fsdp"], runs["ddp"][0]
    assert fsdp[0]["strategy"] == "NF4FSDPStrategy" and fsdp[0]["trainable"].keys() == single["trainable"].keys()
    for name, value in fsdp[0]["trainable"].items():
        assert torch.equal(value, fsdp[1]["trainable"][name]), name
        assert not torch.equal(value, torch.zeros_like(value)) or "lora_B" not in name, name  # it trained
        # the same reductions as DDP but the loss's: split by vocabulary, the softmax sums and the hidden-state
        # gradient add two halves (float32 rounding, magnified by Adam in tiny gradients), as against one process
        torch.testing.assert_close(value, ddp["trainable"][name], atol=1e-4, rtol=1e-3)
        # fp32 on CPU; the sum over the global batch is reduced in another order than one process adds it
        torch.testing.assert_close(value, single["trainable"][name], atol=1e-4, rtol=1e-3)


def test_each_rank_holds_half_of_every_weight_between_steps(runs):
    for rank in runs["fsdp"]:
        held = rank["held"]
        nf4 = {n: h for n, h in held.items() if h["dtype"] == "torch.uint8"}
        assert len(nf4) == 14  # 7 projections x 2 layers, packed bytes kept as bytes
        for name, h in held.items():
            assert h["rows"] * 2 == h["full_rows"], name  # NF4 codes and scales, LoRA, embeddings, norms, lm_head
    single = runs["single"][0]["held"]
    for name, h in runs["fsdp"][0]["held"].items():
        if h["dtype"] == "torch.uint8":  # codes, absmax codes and nested absmax halve (tables stay whole)
            elements = single[name]["packed"] * 2
            assert h["packed"] * 2 == single[name]["packed"], name
            assert h["absmax"] * 2 == elements // 64 and h["nested"] * 2 == elements // (64 * 256), name


def test_sharded_runs_recompute_without_keeping_dequantized_weights(runs):
    """NF4FSDPStrategy turns low_memory_recompute on for every NF4 layer (NF4Precision's "auto"): sharding is for
    memory. One process under the default strategy keeps it off (speed)."""
    for rank in runs["fsdp"]:
        assert rank["low_memory_recompute"] == [True]
    assert runs["single"][0]["low_memory_recompute"] == [False]


def test_each_unit_is_gathered_where_a_step_needs_it(runs):
    """Per step: each decoder layer for its forward and again for its backward; the frozen input embeddings never
    (split by vocabulary: tests/test_vocab_parallel.py)."""
    gathers = runs["fsdp"][0]["gathers"]
    embeddings = [k for k in gathers if k.endswith("embed_tokens)")]
    layers = [k for k in gathers if ".layers." in k]
    assert not embeddings, gathers
    assert len(layers) == 2 and all(gathers[k] == 2 for k in layers), gathers


@pytest.mark.parametrize("variant", ["u2", "whole", "whole+skew"])
def test_unit_layouts_give_the_same_adapters(runs, variant):
    """Two layers per FSDP unit, or the adapters kept whole on every rank (averaged in one all-reduce after
    backward): the same adapters as the default layout (the same sums of two ranks' gradients), and the unit
    layout each promises. ``+skew``: rank 1's adapters start 0.01 away from rank 0's; whole adapters start from
    rank 0's on every rank (broadcast when sharded), so the run is still the default's."""
    fsdp = run_worker(runs["root"] / variant, f"nf4_fsdp+{variant}", 2, 2)
    default = runs["fsdp"][0]
    for name, value in fsdp[0]["trainable"].items():
        assert torch.equal(value, fsdp[1]["trainable"][name]), name
        assert not torch.equal(value, torch.zeros_like(value)) or "lora_B" not in name, name  # it trained
        torch.testing.assert_close(value, default["trainable"][name], rtol=0, atol=0)
    layers = {k: n for k, n in fsdp[0]["gathers"].items() if ".layers." in k}
    held = fsdp[0]["held"]
    lora = {n: h for n, h in held.items() if "lora_" in n}
    assert lora and held.keys() == runs["fsdp"][0]["held"].keys()
    if variant == "u2":  # both layers in one unit: gathered together, once for forward and once for backward
        assert len(layers) == 1 and list(layers.values()) == [2], fsdp[0]["gathers"]
        assert all(h["rows"] * 2 == h["full_rows"] for h in lora.values())
    else:  # adapters whole (not DTensors); the NF4 weights still split
        assert len(layers) == 2 and all(n == 2 for n in layers.values()), fsdp[0]["gathers"]
        assert all(h["rows"] == h["full_rows"] for h in lora.values()), lora
        assert all(h["rows"] * 2 == h["full_rows"] for n, h in held.items() if h["dtype"] == "torch.uint8")


def test_checkpointing_turns_the_kv_cache_off():
    """Under the strategy's activation checkpointing a KV cache would hold every recompute's graph to the end of the
    step; it is turned off as transformers' gradient_checkpointing_enable does."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_nf4.strategies.fsdp import without_kv_cache

    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, vocab_size=32, use_cache=True))
    assert without_kv_cache(model) and model.config.use_cache is False
    assert not without_kv_cache(model) and not without_kv_cache(nn.Linear(2, 2))


def test_layers_per_unit_must_be_a_count():
    with pytest.raises(NF4ShardingConfigError, match="layers_per_unit"):
        NF4FSDPStrategy(layers_per_unit=0)


def test_sharded_exports_match_the_single_process_ones(runs):
    root = runs["root"]
    a = load_file(root / "fsdp" / "export" / "adapter" / "adapter_model.safetensors")
    b = load_file(root / "single" / "export" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3)
    merged = root / "fsdp" / "export" / "merged"
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) == 4  # two decoder layers, the backbone (final norm, embeddings) and the root (head), one unit at a time
    from transformers import AutoModelForCausalLM

    sharded = AutoModelForCausalLM.from_pretrained(merged).state_dict()
    whole = AutoModelForCausalLM.from_pretrained(root / "single" / "export" / "merged").state_dict()
    assert sharded.keys() == whole.keys()
    for k in whole:
        torch.testing.assert_close(sharded[k], whole[k], atol=1e-4, rtol=1e-3)


def test_lora_on_a_tied_head_survives_the_sharded_merged_export(tmp_path):
    """With the head tied to the embeddings and LoRA on the head, the merged head is no longer the table: the
    sharded export writes both and says untied, as one process's does (a tied key dropped as a duplicate loses
    the head's training, silently: transformers ties it to the table again)."""
    from transformers import AutoModelForCausalLM

    run_worker(tmp_path / "single", "auto+tiedhead", 1, 4)
    run_worker(tmp_path / "fsdp", "nf4_fsdp+tiedhead", 2, 2)
    sharded = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "export" / "merged")
    whole = AutoModelForCausalLM.from_pretrained(tmp_path / "single" / "export" / "merged")
    assert not sharded.config.tie_word_embeddings and not whole.config.tie_word_embeddings
    assert not torch.equal(whole.lm_head.weight, whole.model.embed_tokens.weight)  # the head trained apart
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(sharded.state_dict()[key], value, atol=1e-4, rtol=1e-3, msg=key)


def test_qdora_sharded_matches_one_process(tmp_path):
    """DoRA on NF4 bases under NF4FSDPStrategy: the magnitudes shard and train with the adapters, the two ranks end
    equal and equal to one process (float32 rounding of the two-rank sums), and so do the merged exports."""
    from transformers import AutoModelForCausalLM

    single = run_worker(tmp_path / "single", "auto+dora", 1, 4)[0]["trainable"]
    fsdp = run_worker(tmp_path / "fsdp", "nf4_fsdp+dora", 2, 2)
    assert sum("lora_magnitude_vector" in k for k in single) == 14 and fsdp[0]["trainable"].keys() == single.keys()
    for name, value in fsdp[0]["trainable"].items():  # Adam magnifies the two-rank sums' rounding through the norms
        assert torch.equal(value, fsdp[1]["trainable"][name]), name
        torch.testing.assert_close(value, single[name], atol=1e-3, rtol=1e-3)
    sharded = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "export" / "merged").state_dict()
    for key, value in AutoModelForCausalLM.from_pretrained(tmp_path / "single" / "export" / "merged").state_dict().items():
        torch.testing.assert_close(sharded[key], value, atol=1e-3, rtol=1e-3, msg=key)


def test_sharded_resume_continues_exactly(runs, tmp_path):
    ckpt = next((runs["root"] / "fsdp" / "ckpt").glob("epoch=0-*.ckpt"))
    state = torch.load(ckpt, weights_only=True)
    assert all(".lora_" in k for k in state["state_dict"])  # adapter-only, consolidated
    resumed = run_worker(tmp_path, "nf4_fsdp", 2, 2, 2, str(ckpt))
    for name, value in runs["fsdp"][0]["trainable"].items():
        torch.testing.assert_close(resumed[0]["trainable"][name], value, rtol=0, atol=0)


def test_a_ddp_checkpoint_resumes_under_nf4_fsdp(runs, tmp_path):
    """The optimizer state of a DDP (or one-process) checkpoint is keyed by index; FSDP2 reads it by name: it is
    renamed on load (it failed with KeyError 'state.0.step'), and the run ends where the DDP run ended, to the
    float32 rounding between the two strategies."""
    ckpt = next((runs["root"] / "ddp" / "ckpt").glob("epoch=0-*.ckpt"))
    resumed = run_worker(tmp_path, "nf4_fsdp", 2, 2, 2, str(ckpt))
    for name, value in runs["ddp"][0]["trainable"].items():
        torch.testing.assert_close(resumed[0]["trainable"][name], value, atol=1e-4, rtol=1e-3, msg=name)


def load_worker():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fsdp_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    return worker


def assert_ranks_hold_their_rows(sharded: list[dict], folder: Path, device: str = "cpu") -> None:
    """Each rank's NF4 codes, absmax codes, nested absmax (by rows; the nested offset whole) and float rows
    are, byte for byte, its rows of the same checkpoint loaded whole on ``device`` (where the ranks quantized)."""
    worker = load_worker()
    loaded = worker.load_checkpoint_model(str(folder), deferred=False, device=device)
    reference = {n: worker.local_parts(p) for n, p in loaded.named_parameters()}
    for n, layer in loaded.named_modules():
        if isinstance(layer, NF4Linear):
            q = layer.quant
            reference[f"{n}.weight"] = [q.packed, q.absmax, q.nested.absmax, q.nested.offset]
    world = len(sharded)
    assert len(sharded[0]["base"]) == 14 + 2 * 2 + 3  # 14 NF4 weights, 4 layer norms, embed/norm/lm_head
    for rank, result in enumerate(sharded):
        for name, parts in result["base"].items():
            full = reference[name.removeprefix("model.").replace(".base_layer", "")]
            expected = [t.chunk(world)[rank] for t in full[:3]] + full[3:] if len(full) == 4 else [full[0].chunk(world)[rank]]
            assert len(parts) == len(expected), name
            for got, want in zip(parts, expected):
                assert torch.equal(got.cpu(), want.cpu()), (rank, name)


@pytest.mark.parametrize("variant", ["", "+dora", "+float"])
def test_checkpoint_streams_into_shards_each_rank_keeping_its_rows(tmp_path, variant):
    """from_pretrained(..., device="meta") under NF4FSDPStrategy: each rank reads the checkpoint one unit at a
    time and keeps only its rows, byte for byte the rows of the same checkpoint loaded whole; the adapters start
    from LoRACallback's init_seed as in one process (they drew from the global generator), DoRA's magnitudes from
    the weights' norms (they were left uninitialized), and a float base is read too (it was left uninitialized), so
    the run trains what one process trains."""
    folder = tmp_path / "hf"
    load_worker().shardable_llama().save_pretrained(folder)
    sharded = run_worker(tmp_path / "deferred", "nf4_fsdp" + variant, 2, 2, 1, checkpoint=str(folder))
    whole = run_worker(tmp_path / "whole", "auto" + variant, 1, 4, 1, checkpoint=str(folder))[0]
    if variant != "+float":
        assert_ranks_hold_their_rows(sharded, folder)
    # LoRA B starts at zero, so the first loss is the base model's: the same as from the whole checkpoint
    sharded_loss = (sharded[0]["first_loss"] + sharded[1]["first_loss"]) / 2
    torch.testing.assert_close(sharded_loss, whole["first_loss"], atol=1e-5, rtol=1e-5)
    assert sharded[0]["trainable"].keys() == whole["trainable"].keys()
    atol = 1e-3 if variant == "+dora" else 1e-4  # Adam magnifies the two-rank sums' rounding through DoRA's norms
    for name, value in whole["trainable"].items():
        torch.testing.assert_close(sharded[0]["trainable"][name], value, atol=atol, rtol=1e-3, msg=name)


def test_prefetch_must_be_a_count():
    with pytest.raises(NF4ShardingConfigError, match="prefetch=-1"):
        NF4FSDPStrategy(prefetch=-1)


def test_cli_fit_under_nf4_fsdp_streams_the_checkpoint(tmp_path):
    """``lightning-nf4 fit`` with ``strategy: nf4_fsdp`` on two gloo ranks (tests/test_gpu_fsdp.py: on two GPUs)."""
    cli_fit_on_two_ranks(tmp_path)


def cli_fit_on_two_ranks(tmp_path: Path, accelerator: str = "cpu", command: Optional[list[str]] = None, strategy: str = "nf4_fsdp") -> None:
    """``lightning-nf4 fit`` (or ``command``) with ``strategy: nf4_fsdp`` on two ranks: CausalLMModule loads its
    checkpoint on meta, each rank fills its shards, the chunked loss runs on the sharded model, validation measures
    perplexity, and the exports are written. ``strategy="ddp"``: each rank loads the whole model on its device."""
    import yaml

    from tests.test_cli import SENTENCES, save_tiny_llama, write_config

    model_dir = save_tiny_llama(tmp_path / "model")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"{s} {t}" for s in SENTENCES for t in SENTENCES))
    data = {"class_path": "lightning_nf4.data.TextDataModule",
            "init_args": {"source": str(corpus), "block_size": 16, "batch_size": 2, "val_fraction": 0.25}}
    config_path = write_config(tmp_path, model_dir, data, bnb_4bit_use_double_quant=False, generation_prompts=["The quick"])
    config = yaml.safe_load(config_path.read_text())
    config["trainer"].update(devices=2, max_steps=2, strategy=strategy, accelerator=accelerator, val_check_interval=1,
                             logger={"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "logs")}})
    config["trainer"]["plugins"]["init_args"]["double_quant"] = False  # 64-wide layers split on 64-element blocks
    config_path.write_text(yaml.safe_dump(config))
    if command is None:
        import shutil

        script = shutil.which("lightning-nf4")  # Lightning starts the second rank by running the same command again
        assert script is not None, "the package is not installed (pip install -e .)"
        command = [script]
    done = isolated.run([*command, "fit", "--config", str(config_path)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    said = done.stdout + done.stderr
    sharded = strategy == "nf4_fsdp"
    if sharded:
        assert f"sharded 2 LlamaDecoderLayer units, the embeddings and head by vocabulary rows and the root across 2 ranks, each filled from {model_dir}" in said
    assert "perplexity change:" in said  # measured before and after fit, on the sharded model
    assert "generation: 'The quick' -> " in said  # generate() on the sharded model, its prompt on the module's device
    logged = (next((tmp_path / "logs").rglob("metrics.csv"))).read_text()
    assert "val_perplexity" in logged.splitlines()[0]  # validation steps ran (the metric on the ranks' device)
    out = tmp_path / "fit-out"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "merged" / ("model.safetensors.index.json" if sharded else "model.safetensors")).is_file()


def test_the_consolidated_state_holds_persistent_buffers_and_loads_them_back():
    """``nf4_fsdp``'s checkpoints (``lightning_module_state_dict``: ``full_trainable_state``) held the trainable
    parameters only: a persistent buffer (a norm's running statistics, a step counter) was dropped, and a resume or
    ``load_from_checkpoint`` silently restarted it from its initial value. Non-persistent buffers stay out."""
    from lightning_nf4.strategies.fsdp import full_trainable_state, load_full_state

    def build():
        torch.manual_seed(0)
        module = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        module[0].weight.requires_grad_(False)
        module.register_buffer("table", torch.arange(3.0), persistent=False)
        return module

    trained = build()
    trained.train()
    trained(torch.randn(8, 4))  # moves the running statistics
    state = full_trainable_state(trained)
    assert {"1.running_mean", "1.running_var", "1.num_batches_tracked", "0.bias"} <= set(state)
    assert "table" not in state and "0.weight" not in state
    fresh = build()
    load_full_state(fresh, state)
    assert torch.equal(fresh[1].running_mean, trained[1].running_mean) and int(fresh[1].num_batches_tracked) == 1


def test_a_full_checkpoint_is_refused_by_nf4_fsdp_with_the_way_out():
    """A one-process or DDP full checkpoint under ``nf4_fsdp`` failed on "size mismatch ... checkpoint (32768, 1),
    model (256, 256)" (its packed NF4 base against the sharded weight); ``full_checkpoint=True`` under ``nf4_fsdp``
    wrote the trainable weights only, unmarked, and its load then blamed the LoRA settings. Both are refused by
    name before anything is written or changed (the callback's check runs without a process group)."""
    import lightning.pytorch as pl

    from lightning_nf4 import LoRACallback
    from lightning_nf4.strategies.fsdp import NF4ShardingConfigError, load_full_state

    layer = NF4Linear.from_linear(nn.Linear(64, 32))
    whole = layer.state_dict()
    layer.to_nf4_tensor()  # the form nf4_fsdp shards
    holder = nn.Module()
    holder.layer = layer
    with pytest.raises(NF4ShardingConfigError, match=r"holds the whole model's NF4 base \(layer.weight and 0 more\).*adapter-only"):
        load_full_state(holder, {f"layer.{k}": v for k, v in whole.items()}, strict=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy="nf4_fsdp", logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"full_checkpoint=True\) under nf4_fsdp.*Leave full_checkpoint=False"):
        LoRACallback(full_checkpoint=True).setup(trainer, pl.LightningModule(), "fit")
