"""One LoRA training step through the Lightning Trainer: bf16 LoRA vs NF4Precision + LoRACallback.

Each configuration runs in its own process (so peak memory is its own) on the same random Llama,
and the script prints median step time, tokens/s, the ratio to bf16 LoRA and peak memory side by side.

    python benchmarks/lora_step.py                      # CPU: hidden 1024, 12 layers (~220M), batch 2 x 256
    python benchmarks/lora_step.py --device cuda --peers   # GPU: Llama-3-8B shape, batch 1 x 2048, with peers
    python benchmarks/lora_step.py --device cuda --configs bf16-compiled,nf4-compiled --rounds 3   # a subset
    python benchmarks/lora_step.py --device cuda --preset qwen3-30b-a3b-4l --configs bf16,nf4,bnb --rounds 5   # MoE

lightning-nf4 and bf16 LoRA run through the Lightning Trainer; the peers (bitsandbytes Linear4bit and
torchao NF4Tensor bases under PEFT's LoRA) run a plain loop with the same model, optimizer and autocast.
The "compiled" rows are LoRACallback(compile=True) (each decoder layer compiled after conversion and
injection) and are compared with compiled bf16 LoRA; their first step includes the compile. The
"chunked loss" row computes the loss with lightning_nf4.losses.causal_lm_loss (as CausalLMModule does),
never holding the [tokens x vocab] logits whole: its peak memory against the plain-loss row is the saving.
The DoRA rows (on request: --configs bf16-dora,nf4-dora,bnb-dora) are LoRACallback(use_dora=True), and PEFT's
use_dora on bitsandbytes, compared with bf16 DoRA.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import statistics
import time

PRESETS = {
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=1024, batch=1, seq=64),
    "small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4, vocab_size=32000, batch=2, seq=256),
    # Llama-3-8B's 32 layers at a width where the matmuls cost next to nothing: the step is host time (Python,
    # dispatcher, autograd), the part of an eager 8B step on a GPU that the GPU does not hide
    "host": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=32, num_attention_heads=2, num_key_value_heads=1, vocab_size=256, batch=1, seq=8),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, batch=1, seq=2048),
    # mixture of experts (transformers' stacked experts, which NF4Precision quantizes and bitsandbytes leaves in bf16);
    # LoRA on the attention projections. Qwen3-30B-A3B's layer shape, 4 of its 48 layers.
    "tiny-moe": dict(arch="qwen3_moe", hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_experts=8, num_experts_per_tok=2,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=1024, batch=1, seq=64),
    "qwen3-30b-a3b-4l": dict(arch="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                             num_experts_per_tok=8, num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                             vocab_size=151936, batch=1, seq=2048),
}
UNGROUPED = "lightning-nf4 QLoRA, one dequantize launch per weight"  # --ablation: NF4Precision(group_dequantize=False)
UNFUSED = "lightning-nf4 QLoRA, LoRA update as PEFT computes it (mul + add)"  # --ablation: NF4LoraLinear.fuse_update = False
CONFIGS = {  # --configs key: row name
    "bf16": "bf16 LoRA",
    "nf4": "lightning-nf4 QLoRA",
    "bnb": "bitsandbytes NF4-DQ + PEFT LoRA",
    "torchao": "torchao NF4 + PEFT LoRA",
    "bf16-compiled": "bf16 LoRA, layers compiled",
    "nf4-compiled": "lightning-nf4 QLoRA, layers compiled",
    "bf16-compiled-cpp": "bf16 LoRA, layers compiled, inductor's C++ wrapper",  # compile={"options": {"cpp_wrapper": True}}
    "nf4-compiled-cpp": "lightning-nf4 QLoRA, layers compiled, inductor's C++ wrapper",
    "nf4-chunked": "lightning-nf4 QLoRA, chunked loss",
    "nf4-chunked-portable": "lightning-nf4 QLoRA, chunked loss, portable path",  # liger-kernel not used even where installed
    "nf4-ungrouped": UNGROUPED,
    "nf4-unfused": UNFUSED,
    "nf4-compiled-addmm": "lightning-nf4 QLoRA, layers compiled, eager's addmm_ LoRA update",  # fuse_update_compiled = True
    "bf16-dora": "bf16 DoRA",  # LoRACallback(use_dora=True), on request
    "nf4-dora": "lightning-nf4 QDoRA",
    "bnb-dora": "bitsandbytes NF4-DQ + PEFT DoRA",
}
PEERS, ABLATION = ("bnb", "torchao"), ("nf4-ungrouped", "nf4-unfused")
DORA = ("bf16-dora", "nf4-dora", "bnb-dora")  # compared with bf16 DoRA
PEER_LOOPS = PEERS + ("bnb-dora",)  # plain loops, as their users run them
COMPILED = ("bf16-compiled", "nf4-compiled", "nf4-compiled-addmm")
CPP_WRAPPER = ("bf16-compiled-cpp", "nf4-compiled-cpp")  # on request: the same, launched from C++ rather than Python


def baseline_of(key: str) -> str:
    """Compiled rows are compared with compiled bf16 LoRA, DoRA rows with bf16 DoRA, the others with eager bf16 LoRA."""
    return "bf16-compiled-cpp" if key in CPP_WRAPPER else "bf16-compiled" if key in COMPILED else "bf16-dora" if key in DORA else "bf16"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MOE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]  # a MoE layer's MLP has no linears: its experts are stacked weights


def targets_of(preset: dict) -> list[str]:
    return MOE_TARGETS if preset.get("arch") == "qwen3_moe" else TARGETS


def _build_model(preset: dict, seq: int, device: str, checkpointing: bool = True):
    """The preset's Llama (or ``arch``) with random bf16 weights on ``device``; ``checkpointing``: set up for training as the
    steps here are (non-reentrant activation checkpointing, no KV cache). A model for decoding passes False:
    transformers' checkpointing switch also hooks the embeddings' output (``requires_grad_``), and turning
    checkpointing off again leaves that hook, a graph break for torch.compile before 2.13."""
    import torch
    import transformers

    from lightning_nf4.loading.auto import _parameters_on_meta

    torch.manual_seed(0)
    preset = dict(preset)
    arch = preset.pop("arch", "llama")
    config_cls, model_cls = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM")}[arch]
    config = getattr(transformers, config_cls)(**preset, max_position_embeddings=seq, tie_word_embeddings=False)
    with _parameters_on_meta():  # parameters cost nothing until materialised on the device below
        model = getattr(transformers, model_cls)(config)
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                value = torch.empty(param.shape, dtype=torch.bfloat16, device=device).normal_(std=0.02)
                module._parameters[name] = torch.nn.Parameter(value)
    model.to(device)  # buffers (the rotary table) were built on the CPU
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def _peer_model(name: str, model, targets: list[str]):
    """bitsandbytes / torchao base layers under PEFT's LoRA, as their users set them up."""
    import torch
    from peft import LoraConfig, get_peft_model

    for module_name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, torch.nn.Linear) or child_name == "lm_head":
                continue
            if name.startswith("bitsandbytes"):
                import bitsandbytes as bnb

                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=torch.bfloat16,
                                          compress_statistics=True, quant_type="nf4")
                layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4")
                setattr(module, child_name, layer.to(child.weight.device))
            else:
                from torchao.quantization import to_nf4

                child.weight = torch.nn.Parameter(to_nf4(child.weight.data), requires_grad=False)
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets, use_dora="DoRA" in name)
    return get_peft_model(model, config)


def run_config(key: str, args: dict, queue: mp.Queue) -> None:
    import lightning.pytorch as pl
    import torch

    name = CONFIGS[key]
    torch.set_num_threads(args["threads"])
    preset = dict(PRESETS[args["preset"]])
    batch, seq = preset.pop("batch"), preset.pop("seq")
    device = args["device"]
    steps = args["warmup"] + args["steps"]
    data = torch.randint(0, preset["vocab_size"], (steps * batch, seq))

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def reset_peak() -> None:
        # Peak memory is measured from here: the model as it trains, not the float model it was built from.
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM, the peak resident set

    times: list[float] = []
    note = ""
    if key not in PEER_LOOPS:
        from lightning_nf4 import LoRACallback, NF4Precision
        from lightning_nf4.layers.lora import NF4LoraLinear
        from lightning_nf4.losses import causal_lm_loss, liger_available

        NF4LoraLinear.fuse_update = name != UNFUSED
        NF4LoraLinear.fuse_update_compiled = key == "nf4-compiled-addmm"

        class StepTimer(pl.Callback):
            def on_train_start(self, trainer, pl_module):
                reset_peak()

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                sync()
                self._t = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                sync()
                times.append(time.perf_counter() - self._t)

        class Module(pl.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.model = _build_model(preset, seq, device)

            def training_step(self, batch, batch_idx):
                if key.startswith("nf4-chunked"):
                    return causal_lm_loss(self.model, batch, batch, mode="chunked", backend="chunked" if key.endswith("portable") else "auto")
                return self.model(input_ids=batch, labels=batch).loss

            def configure_optimizers(self):
                return torch.optim.AdamW((p for p in self.parameters() if p.requires_grad), lr=1e-4)

        if key == "nf4-chunked":
            note = "liger-kernel" if device == "cuda" and liger_available() else "portable chunks"
        options = {**args["inductor_options"], **({"cpp_wrapper": True} if key in CPP_WRAPPER else {})}
        compiled = key in COMPILED or key in CPP_WRAPPER
        lora = LoRACallback(r=16, alpha=32, dropout=0.0, target_modules=targets_of(PRESETS[args["preset"]]), compile=({"options": options} if options else True) if compiled else False,
                            use_dora=key in DORA)
        kw = dict(precision="bf16-mixed") if key.startswith("bf16") else dict(plugins=NF4Precision(group_dequantize=False if key == "nf4-ungrouped" else "auto"))
        trainer = pl.Trainer(
            accelerator=device, devices=1, max_steps=steps, callbacks=[lora, StepTimer()], logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kw,
        )
        trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=batch))
    else:  # peers: a plain loop with the same model, optimizer and autocast
        try:
            model = _peer_model(name, _build_model(preset, seq, device), targets_of(preset)).train()
        except Exception as err:  # noqa: BLE001 - a missing or broken peer is reported, not fatal
            queue.put(dict(key=key, name=name, error=f"{type(err).__name__}: {err}"[:120]))
            return
        optimizer = torch.optim.AdamW((p for p in model.parameters() if p.requires_grad), lr=1e-4)
        reset_peak()
        for i in range(steps):
            ids = data[i * batch:(i + 1) * batch].to(device)
            sync()
            start = time.perf_counter()
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            times.append(time.perf_counter() - start)
    timed = times[args["warmup"]:]
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _vm_hwm()
    queue.put(dict(key=key, name=name, step=statistics.median(timed), fastest=min(timed), first=times[0],
                   tokens=batch * seq, peak=peak, note=note))


def _combine(rounds: list[dict[str, dict]]) -> list[dict]:
    """Per configuration: the median step over the rounds, the fastest step of all, the first step's range (with
    torch.compile, the compile), and each round's ratios to that round's baseline (``baseline_of``): of the
    median steps and of the fastest steps (their medians and ranges). No baseline in a round: no ratio."""
    combined = []
    for key, first in rounds[0].items():
        runs = [r[key] for r in rounds if "error" not in r[key]]
        if not runs:
            combined.append(dict(first))
            continue
        base = baseline_of(key)
        pairs = [(r[key], r[base]) for r in rounds if "error" not in r[key] and base in r and "error" not in r[base]]
        row = dict(key=key, name=first["name"], step=statistics.median(x["step"] for x in runs), fastest=min(x["fastest"] for x in runs),
                   first=[x["first"] for x in runs], tokens=first["tokens"], peak=max(x["peak"] for x in runs), note=first.get("note", ""))
        if pairs:
            row["ratios"] = [a["step"] / b["step"] for a, b in pairs]
            row["fastest_ratios"] = [a["fastest"] / b["fastest"] for a, b in pairs]
        combined.append(row)
    return combined


def _vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--peers", action="store_true", help="also bitsandbytes and torchao (plain loops), where installed")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every configuration this many times, in turn (A B C A B C ...); the table gives the median "
                             "of the rounds and the range of each ratio, so that drift of the host between processes shows")
    parser.add_argument("--ablation", action="store_true", help="also lightning-nf4 without grouped dequantization, and without the fused LoRA update")
    parser.add_argument("--configs", default=None,
                        help=f"comma-separated subset, run in this order: {','.join(CONFIGS)} (default: bf16, nf4, the peers with "
                             "--peers, bf16-compiled and nf4-compiled on cuda, nf4-chunked, the ablation rows with --ablation)")
    parser.add_argument("--inductor-options", type=json.loads, default={},
                        help='JSON of inductor options for every compiled configuration alike, e.g. \'{"size_asserts": false}\'')
    args = vars(parser.parse_args())
    args["preset"] = args["preset"] or ("small" if args["device"] == "cpu" else "llama3-8b")
    if args["configs"]:
        keys = [k.strip() for k in args["configs"].split(",") if k.strip()]
        unknown = [k for k in keys if k not in CONFIGS]
        if unknown:
            parser.error(f"unknown configuration(s) {unknown}; choose from {list(CONFIGS)}")
    else:
        compiled = ["bf16-compiled", "nf4-compiled"] if args["device"] == "cuda" else []  # on the CPU on request: inductor takes minutes there
        keys = ["bf16", "nf4"] + (list(PEERS) if args["peers"] else []) + compiled + ["nf4-chunked"] + (list(ABLATION) if args["ablation"] else [])
    ctx = mp.get_context("spawn")
    rounds: list[dict[str, dict]] = []
    for index in range(args["rounds"]):
        rounds.append({})
        for key in keys:
            queue = ctx.Queue()
            proc = ctx.Process(target=run_config, args=(key, args, queue))
            proc.start()
            proc.join()
            result = queue.get() if not queue.empty() else dict(key=key, name=CONFIGS[key], error=f"process exited with {proc.exitcode}")
            rounds[-1][key] = result
            if "error" in result:
                print(f"round {index + 1}: {result['name']}: {result['error']}", flush=True)
            else:  # as it comes, so that a run cut short by a time limit still leaves its numbers
                print(f"round {index + 1}: {result['name']}: median {result['step']:.3f} s, fastest {result['fastest']:.3f} s, "
                      f"first {result['first']:.1f} s, peak {result['peak'] / 2**30:.2f} GiB", flush=True)
    results = _combine(rounds)
    import torch

    where = torch.cuda.get_device_name() if args["device"] == "cuda" else f"{platform.processor() or 'CPU'} ({args['threads']} threads)"
    memory = "peak GPU memory in training" if args["device"] == "cuda" else "peak RSS in training"
    print(f"\nDevice: {where}; preset {args['preset']} {json.dumps(PRESETS[args['preset']])}" + (f"; inductor options {json.dumps(args['inductor_options'])}" if args['inductor_options'] else ""))
    print(f"LoRA r=16 on {','.join(targets_of(PRESETS[args['preset']]))}, AdamW, gradient checkpointing; median of {args['steps']} steps after {args['warmup']} warm-up, "
          f"{args['rounds']} round(s); compiled rows are compared with compiled bf16 LoRA, DoRA rows with bf16 DoRA; first step includes the compile\n")
    print(f"| configuration | median step (s) | tokens/s | vs bf16 LoRA (range) | fastest step (s) | fastest vs bf16 (range) | first step (s) | {memory} |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['name']} | n/a ({r['error']}) | | | | | | |")
            continue
        name = f"{r['name']} ({r['note']})" if r["note"] else r["name"]
        ratio = _ratio_cell(r.get("ratios"))
        fastest = _ratio_cell(r.get("fastest_ratios"))
        first = f"{min(r['first']):.1f}" + (f"-{max(r['first']):.1f}" if len(r["first"]) > 1 else "")
        print(f"| {name} | {r['step']:.3f} | {r['tokens'] / r['step']:.0f} | {ratio} | {r['fastest']:.3f} | {fastest} | {first} | {r['peak'] / 2**30:.2f} GiB |")


def _ratio_cell(ratios: "list[float] | None") -> str:
    if not ratios:
        return "n/a"
    cell = f"{statistics.median(ratios):.2f}"
    return cell + (f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else "")


if __name__ == "__main__":
    main()
