"""Peak host memory of loading a model into NF4 on the CPU: lightning-nf4's streaming loader against
transformers + bitsandbytes, each in its own process, on the same bf16 safetensors checkpoint.

    python benchmarks/load_memory.py                 # random 1.1B-parameter Llama written to a temp folder
    python benchmarks/load_memory.py --model DIR     # any local HF causal-LM folder
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


def _load(kind: str, folder: str, queue: mp.Queue) -> None:
    import torch
    from transformers import BitsAndBytesConfig

    torch.set_num_threads(2)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    start = time.perf_counter()
    if kind == "lightning-nf4":
        from lightning_nf4.loading import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, progress=False)
    else:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu", dtype=torch.bfloat16)
    seconds = time.perf_counter() - start
    peak = _vm_hwm()
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 8, dtype=torch.long))  # the model works
    queue.put(dict(kind=kind, peak=peak, seconds=seconds))


def _write_model(folder: Path) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                         num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    model.save_pretrained(folder, max_shard_size="500MB")
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model) if args.model else Path(tmp)
        if not args.model:
            print(f"wrote a random Llama of {_write_model(folder) / 1e9:.2f}B parameters (bf16) to {folder}")
        on_disk = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        rows = []
        for kind in ("lightning-nf4", "transformers + bitsandbytes"):
            queue = ctx.Queue()
            proc = ctx.Process(target=_load, args=(kind, str(folder), queue))
            proc.start()
            proc.join()
            rows.append(queue.get() if proc.exitcode == 0 else dict(kind=kind, peak=float("nan"), seconds=float("nan")))
    print(f"\ncheckpoint on disk: {on_disk / 2**30:.2f} GiB (bf16)\n")
    print("| loader | peak host memory (VmHWM) | load time (s) |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['peak'] / 2**30:.2f} GiB | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
