"""Greedy generation speed, batch 1: a bf16 model against the same model loaded into NF4 (and bitsandbytes).

Decoding runs the 1-token path of every linear (``NF4Linear``'s gemv) once per new token, so this is
the matvec benchmark as a user meets it: Python, launches and kernels together.

    python benchmarks/generate.py                                   # CPU: SmolLM2-135M-Instruct (packaged)
    python benchmarks/generate.py --device cuda --preset llama3-8b  # GPU: random Llama-3-8B-shaped model
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _bnb_config(compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def _load(name: str, args: argparse.Namespace) -> torch.nn.Module:
    dtype = torch.bfloat16
    if args.preset:
        from lora_step import PRESETS, _build_model

        preset = {k: v for k, v in PRESETS[args.preset].items() if k not in ("batch", "seq")}
        model = _build_model(preset, args.prompt_tokens + args.new_tokens, args.device)
        model.gradient_checkpointing_disable()
        model.config.use_cache = True
        if name == "lightning-nf4":
            from lightning_nf4.layers.group import group_nf4_layers  # noqa: F401 - decoding does not group
            from lightning_nf4.plugins.convert import convert_linears

            convert_linears(model, blocksize=64, double_quant=True, compute_dtype=dtype, device=torch.device(args.device))
        elif name == "bitsandbytes":
            raise RuntimeError("the bitsandbytes row needs a checkpoint on disk (--model)")
        return model.eval()
    if name == "bitsandbytes":
        import transformers

        from lightning_nf4.loading import resolve_model_path

        path = str(resolve_model_path(args.model))
        return transformers.AutoModelForCausalLM.from_pretrained(
            path, quantization_config=_bnb_config(dtype), device_map=args.device, dtype=dtype).eval()
    from lightning_nf4.loading import AutoModelForCausalLM

    config = _bnb_config(dtype) if name == "lightning-nf4" else None
    return AutoModelForCausalLM.from_pretrained(args.model, quantization_config=config, device=args.device, dtype=dtype,
                                                progress=False).eval()


PROMPT = "The with statement in Python is used to"


def _prompt(args: argparse.Namespace, vocab: int) -> torch.Tensor:
    """The tokenized PROMPT for a real model (greedy continuations then compare meaningfully), random ids
    of --prompt-tokens for a random one."""
    if not args.preset:
        from transformers import AutoTokenizer

        from lightning_nf4.loading import resolve_model_path

        tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_path(args.model)))
        return tokenizer(PROMPT, return_tensors="pt").input_ids.to(args.device)
    torch.manual_seed(0)
    return torch.randint(0, vocab, (1, args.prompt_tokens), device=args.device)


def _tokens_per_second(model: torch.nn.Module, args: argparse.Namespace) -> tuple[float, list[int]]:
    ids = _prompt(args, model.config.vocab_size)
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, use_cache=True,
                  pad_token_id=0)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    with torch.no_grad():
        first = model.generate(ids, **kwargs)  # warm-up (kernel compilation, allocator)
        rates = []
        for _ in range(args.repeats):
            sync()
            start = time.perf_counter()
            model.generate(ids, **kwargs)
            sync()
            rates.append(args.new_tokens / (time.perf_counter() - start))
    return statistics.median(rates), first[0, ids.shape[1]:].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default="packaged:smollm2-135m-instruct", help="a local model folder or packaged:<name>")
    parser.add_argument("--preset", default=None, help="a random model of a lora_step.py preset instead of --model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=16, help="prompt length of a random model (--preset)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peers", action="store_true", help="also bitsandbytes through transformers (needs --model)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = ["bf16", "lightning-nf4"] + (["bitsandbytes"] if args.peers else [])
    rows, base, reference = [], None, None
    for name in names:
        try:
            model = _load(name, args)
            rate, tokens = _tokens_per_second(model, args)
        except Exception as err:  # noqa: BLE001 - a peer that cannot run here is reported, not fatal
            rows.append(f"| {name} | n/a ({type(err).__name__}: {str(err)[:80]}) | | |")
            continue
        del model
        base = base or rate
        reference = reference or tokens
        same = sum(a == b for a, b in zip(tokens, reference))
        rows.append(f"| {name} | {rate:.1f} | {rate / base:.2f} | {same}/{len(reference)} |")
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} threads"
    prompt = f"{args.prompt_tokens} random prompt tokens" if args.preset else f"prompt {PROMPT!r}"
    print(f"{where}; {args.preset or args.model}; batch 1, {prompt}, {args.new_tokens} new tokens "
          f"(greedy), median of {args.repeats} runs after one warm-up")
    print("\n| model | tokens/s | vs bf16 | greedy tokens equal to bf16's |\n|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
