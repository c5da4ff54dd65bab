"""Greedy generation speed, batch 1: a bf16 model against the same model loaded into NF4 (and bitsandbytes).

Decoding runs the 1-token path of every linear (``NF4Linear``'s gemv) once per new token, so this is
the matvec benchmark as a user meets it: Python, launches and kernels together.

``--compiled`` adds, for each model, a decode with a static KV cache under ``torch.compile`` through
transformers' own ``generate`` (``compile_config``): mode ``reduce-overhead`` on CUDA (CUDA graphs), ``default``
on the CPU. Its table gives decode tokens/s (prefill excluded: a 1-token generate is subtracted) beside the
end-to-end rate, each model's ratio to bf16 in the same mode, the graph breaks, graphs and CUDA-graph skips
compile reported, and the 1-token ``NF4Linear`` call against ``F.linear`` (``one_token.py``).

    python benchmarks/generate.py                                   # CPU: SmolLM2-135M-Instruct (packaged)
    python benchmarks/generate.py --device cuda --preset llama3-8b  # GPU: random Llama-3-8B-shaped model
    python benchmarks/generate.py --device cuda --preset llama3-8b --compiled --peers   # eager and compiled
    python benchmarks/generate.py --preset tiny --compiled --one-token 256x256          # CPU check of the above
"""

from __future__ import annotations

import argparse
import gc
import inspect
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

MODELS = ("bf16", "lightning-nf4", "bitsandbytes")
MODES = ("eager", "compiled", "loop")


def _bnb_config(compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def _bnb_linears(model: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """Every linear but ``lm_head`` replaced by ``bitsandbytes.nn.Linear4bit`` (NF4, double quantization), as
    transformers' bitsandbytes integration builds them; quantized where the weight is."""
    import bitsandbytes as bnb

    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, torch.nn.Linear) or child_name == "lm_head":
                continue
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4")
            if child.bias is not None:
                layer.bias = child.bias
            setattr(module, child_name, layer.to(child.weight.device))


def _load(name: str, args: argparse.Namespace) -> torch.nn.Module:
    dtype = torch.bfloat16
    if args.preset:
        from lora_step import PRESETS, _build_model

        preset = {k: v for k, v in PRESETS[args.preset].items() if k not in ("batch", "seq")}
        model = _build_model(preset, args.prompt_tokens + args.new_tokens, args.device, checkpointing=False)
        model.config.use_cache = True
        if name == "lightning-nf4":
            from lightning_nf4.plugins.convert import convert_linears

            convert_linears(model, blocksize=64, double_quant=True, compute_dtype=dtype, device=torch.device(args.device))
        elif name == "bitsandbytes":
            _bnb_linears(model, dtype)
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


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _tokens_per_second(model: torch.nn.Module, args: argparse.Namespace) -> tuple[float, list[int]]:
    ids = _prompt(args, model.config.vocab_size)
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, use_cache=True,
                  pad_token_id=0)
    with torch.no_grad():
        first = model.generate(ids, **kwargs)  # warm-up (kernel compilation, allocator)
        rates = []
        for _ in range(args.repeats):
            _sync(args.device)
            start = time.perf_counter()
            model.generate(ids, **kwargs)
            _sync(args.device)
            rates.append(args.new_tokens / (time.perf_counter() - start))
    return statistics.median(rates), first[0, ids.shape[1]:].tolist()


# -- --compiled: eager and static-cache compiled decoding side by side ------------------------------------------
def compile_mode(device: str, requested: Optional[str]) -> str:
    """``reduce-overhead`` (CUDA graphs) on CUDA, ``default`` on the CPU, unless asked otherwise."""
    return requested or ("reduce-overhead" if device == "cuda" else "default")


def compile_counts() -> dict[str, Any]:
    """What torch.compile has done in this process since the last ``torch.compiler.reset()``/counter clear."""
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"]["unique_graphs"], "breaks": sum(counters["graph_break"].values()),
            "break_reasons": list(counters["graph_break"]), "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}


def _cache_keyword(model: torch.nn.Module) -> str:
    """The name transformers gives the cache argument (``cache`` in 5.x, ``past_key_values`` before)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class Decoder:
    """Greedy decoding of one model, ``n`` new tokens per call, in one of three modes:

    * ``eager``: ``generate`` with its default dynamic cache, no compile;
    * ``compiled``: ``generate`` with a static cache under ``torch.compile`` (transformers' ``compile_config``);
      one cache kept across calls and reset before each, so a CUDA graph recorded once is replayed, not re-recorded;
    * ``loop``: the same compiled decode step (argmax included) in a plain loop that never waits for the GPU, where
      ``generate`` reads a stop flag on the host after every step: what the model's step costs without the loop.
    """

    def __init__(self, model: torch.nn.Module, ids: torch.Tensor, new_tokens: int, mode: str, compile_mode: str) -> None:
        self.model, self.ids, self.new_tokens, self.mode = model, ids, new_tokens, mode
        self.cache_kw = _cache_keyword(model)
        self.kwargs: dict[str, Any] = dict(do_sample=False, use_cache=True, pad_token_id=0)
        self.cache = None
        if mode != "eager":
            from transformers import CompileConfig, StaticCache

            self.cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + new_tokens)
            config = CompileConfig(mode=compile_mode, fullgraph=False)
            config._compile_all_devices = True  # transformers compiles only on accelerators unless told
            self.kwargs["compile_config"] = config
            self.step = torch.compile(self._step, mode=compile_mode) if mode == "loop" else None

    def _step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=token, position_ids=position, use_cache=True, logits_to_keep=1, **{self.cache_kw: self.cache})
        return out.logits[:, -1:].argmax(-1)

    def _loop(self, n: int) -> torch.Tensor:
        self.cache.reset()
        prefill = self.model(input_ids=self.ids, use_cache=True, logits_to_keep=1, **{self.cache_kw: self.cache})
        token = prefill.logits[:, -1:].argmax(-1)
        tokens = torch.empty(n, dtype=torch.long, device=self.ids.device)
        tokens[0] = token[0, 0]
        position = torch.full((1, 1), self.ids.shape[1], dtype=torch.long, device=self.ids.device)
        for i in range(1, n):
            torch.compiler.cudagraph_mark_step_begin()
            token = self.step(token, position).clone()  # the graph's output buffer is overwritten by the next replay
            tokens[i] = token[0, 0]
            position += 1
        return tokens

    def __call__(self, new_tokens: Optional[int] = None) -> torch.Tensor:
        n = new_tokens or self.new_tokens
        with torch.no_grad():
            if self.mode == "loop":
                return self._loop(n)
            kwargs = dict(self.kwargs, max_new_tokens=n, min_new_tokens=n)
            if self.cache is not None:
                self.cache.reset()
                kwargs[self.cache_kw] = self.cache
            return self.model.generate(self.ids, **kwargs)[0, self.ids.shape[1]:]

    def timed(self, new_tokens: Optional[int] = None) -> float:
        _sync(self.ids.device.type)
        start = time.perf_counter()
        self(new_tokens)
        _sync(self.ids.device.type)
        return time.perf_counter() - start


def decode_rates(model: torch.nn.Module, args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """Decode tokens/s (N new tokens minus a 1-token call, i.e. the prefill) and end-to-end tokens/s, medians over
    ``args.repeats`` pairs after two warm-up calls; for the compiled modes also what compile reported."""
    from torch._dynamo.utils import counters

    ids = _prompt(args, model.config.vocab_size)
    decoder = Decoder(model, ids, args.new_tokens, mode, compile_mode(args.device, args.compile_mode))
    counters.clear()
    first = decoder.timed()  # compiles (compiled modes) or warms the kernels up
    tokens = decoder().tolist()  # a second warm-up call, whose tokens are compared
    result: dict[str, Any] = {"tokens": tokens, "first_s": first, **compile_counts()}
    if mode != "eager" and result["graphs"] == 0:
        raise RuntimeError("nothing was compiled (transformers' generate skips models it deems uncompileable)")
    prefill, full = [], []
    for _ in range(args.repeats):  # interleaved, so that drift reaches both alike
        prefill.append(decoder.timed(1))
        full.append(decoder.timed())
    decode_s = statistics.median(full) - statistics.median(prefill)
    if decode_s <= 0:
        raise RuntimeError(f"a {args.new_tokens}-token call took no longer than a 1-token one: too few --new-tokens to time")
    result.update(decode=(args.new_tokens - 1) / decode_s, e2e=args.new_tokens / statistics.median(full),
                  recompiled=compile_counts()["graphs"] - result["graphs"])
    return result


def _free(device: str) -> None:
    """After the caller dropped its model: free what compiling and running it left behind."""
    torch.compiler.reset()  # compiled code and CUDA-graph pools of the model just measured
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _same(a: list[int], b: Optional[list[int]]) -> str:
    return "" if b is None else f"{sum(x == y for x, y in zip(a, b))}/{len(b)}"


def run_compiled(args: argparse.Namespace, names: list[str]) -> None:
    """Eager and compiled rows per model, printed as each finishes (a run cut short keeps what it measured)."""
    started = time.perf_counter()
    modes = args.modes.split(",")
    mode = compile_mode(args.device, args.compile_mode)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} threads"
    print(f"{where}; torch {torch.__version__}; {args.preset or args.model}; batch 1, "
          f"{f'{args.prompt_tokens} random prompt tokens' if args.preset else f'prompt {PROMPT!r}'}, {args.new_tokens} new "
          f"tokens (greedy); median of {args.repeats} after two warm-up calls; compiled = static KV cache, "
          f"torch.compile(mode={mode!r}) through generate(compile_config=...); loop = the same compiled step in a loop "
          "that does not wait for the GPU", flush=True)
    if args.one_token != "none":
        from one_token import compare

        n, k = args.one_token
        with torch.no_grad():
            print("\n".join(compare(n, k, torch.device(args.device))), flush=True)
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    print("\n| model | mode | decode tokens/s | vs bf16 (same mode) | end-to-end tokens/s | first call s | "
          "tokens equal to bf16's (same mode) | compiled tokens equal to eager | graphs | graph breaks | "
          "CUDA-graph skips | recompiles while timed |\n|" + "---|" * 12, flush=True)
    base: dict[str, float] = {}
    reference: dict[str, list[int]] = {}
    notes: list[str] = []
    for name in names:
        model, eager_tokens = None, None
        try:
            model = _load(name, args)
        except Exception as err:  # noqa: BLE001 - a peer that cannot run here is reported, not fatal
            traceback.print_exc()
            print(f"| {name} | all | n/a ({type(err).__name__}: {str(err)[:100]}) |" + " |" * 10, flush=True)
            _free(args.device)
            continue
        for m in modes:
            try:
                r = decode_rates(model, args, m)
            except Exception as err:  # noqa: BLE001 - the row says so, the traceback goes to stderr
                traceback.print_exc()
                print(f"| {name} | {m} | n/a ({type(err).__name__}: {(str(err).splitlines() or [''])[0][:100]}) |"
                      + " |" * 10, flush=True)
                continue
            if name == "bf16":
                base[m], reference[m] = r["decode"], r["tokens"]
            if m == "eager":
                eager_tokens = r["tokens"]
            compiled = m != "eager"
            cells = [name, m, f"{r['decode']:.1f}", f"{r['decode'] / base[m]:.2f}" if m in base else "", f"{r['e2e']:.1f}",
                     f"{r['first_s']:.1f}", _same(r["tokens"], reference.get(m))]
            if compiled:
                cells += [_same(r["tokens"], eager_tokens), *(str(r[k]) for k in ("graphs", "breaks", "cudagraph_skips", "recompiled"))]
            print("| " + " | ".join(cells + [""] * (12 - len(cells))) + " |", flush=True)
            if compiled and r["breaks"]:
                notes.append(f"{name}: graph breaks: " + "; ".join(reason[:160] for reason in r["break_reasons"][:3]))
        model = None
        _free(args.device)
    for note in notes:
        print(note)
    print(f"(whole run {time.perf_counter() - started:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default="packaged:smollm2-135m-instruct", help="a local model folder or packaged:<name>")
    parser.add_argument("--preset", default=None, help="a random model of a lora_step.py preset instead of --model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=16, help="prompt length of a random model (--preset)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peers", action="store_true", help="also bitsandbytes (Linear4bit layers in the transformers model)")
    parser.add_argument("--compiled", action="store_true",
                        help="eager and static-cache torch.compile decoding side by side (CUDA graphs on CUDA)")
    parser.add_argument("--modes", default="eager,compiled",
                        help=f"with --compiled: a comma-separated subset of {','.join(MODES)} (see Decoder)")
    parser.add_argument("--models", default=None, help=f"with --compiled: a comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode (default: reduce-overhead on cuda, default on cpu)")
    parser.add_argument("--one-token", default="8192x8192", metavar="NxK|none",
                        help="with --compiled: the eager 1-token NF4Linear call against F.linear at this shape")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = ["bf16", "lightning-nf4"] + (["bitsandbytes"] if args.peers else [])
    if args.compiled:
        if args.models:
            unknown = sorted(set(args.models.split(",")) - set(MODELS))
            if unknown:
                parser.error(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
            names = [n for n in MODELS if n in args.models.split(",")]
        unknown = sorted(set(args.modes.split(",")) - set(MODES))
        if unknown:
            parser.error(f"--modes: unknown {unknown}; choose from {', '.join(MODES)}")
        if args.one_token != "none":
            parts = args.one_token.lower().split("x")
            if len(parts) != 2 or not all(p.isdigit() for p in parts):
                parser.error(f"--one-token takes NxK (e.g. 8192x8192) or none; got {args.one_token!r}")
            args.one_token = tuple(int(p) for p in parts)
        run_compiled(args, names)
        return
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
