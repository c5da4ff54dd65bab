"""Peak host memory of loading a model into NF4 on the CPU: lightning-nf4's streaming loader against
transformers + bitsandbytes, each in its own process, on the same bf16 safetensors checkpoint.

    python benchmarks/load_memory.py                 # random 0.85B-parameter Llama written to a temp folder
    python benchmarks/load_memory.py --preset moe    # random 0.75B-parameter Qwen3-MoE (32 experts), per-expert checkpoint
    python benchmarks/load_memory.py --model DIR     # any local HF causal-LM folder
    python benchmarks/load_memory.py --preset qwen3-30b-a3b-8l --device cuda   # 8 of Qwen3-30B-A3B's layers, onto a GPU

With an MoE model a third row loads in bf16 with transformers, then quantizes linears and experts as NF4Precision
does: the way round before the streaming loader fused per-expert checkpoints.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import sys

# Run as a script, this folder comes first on sys.path, and its kernels.py would hide the `kernels` package
# that transformers' bitsandbytes integration imports.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def _vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def _load(kind: str, folder: str, device: str, queue: mp.Queue) -> None:
    import torch
    from transformers import BitsAndBytesConfig

    if device == "cpu":
        torch.set_num_threads(2)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    start = time.perf_counter()
    if kind == "lightning-nf4":
        from lightning_nf4.loading import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, progress=False, device=device)
    elif kind == "transformers bf16, then NF4Precision's conversion":
        import transformers

        from lightning_nf4.plugins.convert import convert_experts, convert_linears

        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map=device)
        convert_linears(model)
        convert_experts(model)
    else:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map=device, dtype=torch.bfloat16)
    if device != "cpu":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = _vm_hwm()
    gpu_peak = torch.cuda.max_memory_allocated() if device != "cpu" else 0
    from lightning_nf4.format.tensor import NF4Tensor

    nf4 = sum(p.numel() for p in model.parameters() if isinstance(p, NF4Tensor))  # stacked experts in NF4
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 8, dtype=torch.long, device=device))  # the model works
    queue.put(dict(kind=kind, peak=peak, seconds=seconds, nf4_experts=nf4, gpu_peak=gpu_peak))


def _write_model(folder: Path, preset: str) -> int:
    import torch
    import transformers

    if preset == "moe":
        config = transformers.Qwen3MoeConfig(
            hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512, num_experts=32, num_experts_per_tok=4,
            num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4, head_dim=64, vocab_size=32000, tie_word_embeddings=False)
        cls = transformers.Qwen3MoeForCausalLM
    elif preset == "qwen3-30b-a3b-8l":  # Qwen3-30B-A3B's config, 8 of its 48 layers
        config = transformers.Qwen3MoeConfig(
            hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
            num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936, tie_word_embeddings=False)
        cls = transformers.Qwen3MoeForCausalLM
    else:
        config = transformers.LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                                          num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False)
        cls = transformers.LlamaForCausalLM
    with torch.device("meta"):
        model = cls(config).to(torch.bfloat16)
    model = model.to_empty(device="cpu")
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    model.save_pretrained(folder, max_shard_size="500MB")
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--preset", choices=("llama", "moe", "qwen3-30b-a3b-8l"), default="llama", help="the random model written when --model is not given")
    parser.add_argument("--device", default="cpu", help="where the model is loaded: cpu, or cuda (peak GPU memory reported too)")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model) if args.model else Path(tmp)
        if not args.model:
            print(f"wrote a random {args.preset} of {_write_model(folder, args.preset) / 1e9:.2f}B parameters (bf16) to {folder}")
        on_disk = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        kinds = ["lightning-nf4", "transformers + bitsandbytes"]
        if _is_moe(folder):
            kinds.insert(1, "transformers bf16, then NF4Precision's conversion")
        rows = []
        for kind in kinds:
            queue = ctx.Queue()
            proc = ctx.Process(target=_load, args=(kind, str(folder), args.device, queue))
            proc.start()
            proc.join()
            rows.append(queue.get() if proc.exitcode == 0 else dict(kind=kind, peak=float("nan"), seconds=float("nan"), nf4_experts=0, gpu_peak=float("nan")))
    print(f"\ncheckpoint on disk: {on_disk / 2**30:.2f} GiB (bf16); loaded onto {args.device}\n")
    gpu = args.device != "cpu"
    print("| loader | peak host memory (VmHWM) |" + (" peak GPU memory |" if gpu else "") + " load time (s) | expert parameters in NF4 |")
    print("|---|---|---|---|" + ("---|" if gpu else ""))
    for r in rows:
        gpu_cell = f" {r['gpu_peak'] / 2**30:.2f} GiB |" if gpu else ""
        print(f"| {r['kind']} | {r['peak'] / 2**30:.2f} GiB |{gpu_cell} {r['seconds']:.1f} | {r['nf4_experts'] / 1e6:.0f} M |")


def _is_moe(folder: Path) -> bool:
    import json

    config = json.loads((folder / "config.json").read_text())
    return any(config.get(k) for k in ("num_experts", "num_local_experts", "n_routed_experts"))


if __name__ == "__main__":
    main()
