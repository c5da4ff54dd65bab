"""One LoRA training step through the Lightning Trainer: bf16 LoRA vs NF4Precision + LoRACallback.

Each configuration runs in its own process (so peak memory is its own) on the same random Llama,
and the script prints median step time, tokens/s, the ratio to bf16 LoRA and peak memory side by side.

    python benchmarks/lora_step.py                      # CPU: hidden 1024, 12 layers (~220M), batch 2 x 256
    python benchmarks/lora_step.py --device cuda --peers   # GPU: Llama-3-8B shape, batch 1 x 2048, with peers

lightning-nf4 and bf16 LoRA run through the Lightning Trainer; the peers (bitsandbytes Linear4bit and
torchao NF4Tensor bases under PEFT's LoRA) run a plain loop with the same model, optimizer and autocast.
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
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, batch=1, seq=2048),
}
CONFIGS = ("bf16 LoRA", "lightning-nf4 QLoRA", "bitsandbytes NF4-DQ + PEFT LoRA", "torchao NF4 + PEFT LoRA")
UNGROUPED = "lightning-nf4 QLoRA, one dequantize launch per weight"  # --ablation: NF4Precision(group_dequantize=False)
UNFUSED = "lightning-nf4 QLoRA, LoRA update as PEFT computes it (mul + add)"  # --ablation: NF4LoraLinear.fuse_update = False
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _build_model(preset: dict, seq: int, device: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_nf4.loading.auto import _parameters_on_meta

    torch.manual_seed(0)
    config = LlamaConfig(**preset, max_position_embeddings=seq, tie_word_embeddings=False)
    with _parameters_on_meta():  # parameters cost nothing until materialised on the device below
        model = LlamaForCausalLM(config)
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                value = torch.empty(param.shape, dtype=torch.bfloat16, device=device).normal_(std=0.02)
                module._parameters[name] = torch.nn.Parameter(value)
    model.to(device)  # buffers (the rotary table) were built on the CPU
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def _peer_model(name: str, model):
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
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS)
    return get_peft_model(model, config)


def run_config(name: str, args: dict, queue: mp.Queue) -> None:
    import lightning.pytorch as pl
    import torch

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
    if name in ("bf16 LoRA", "lightning-nf4 QLoRA", UNGROUPED, UNFUSED):
        from lightning_nf4 import LoRACallback, NF4Precision
        from lightning_nf4.layers.lora import NF4LoraLinear

        NF4LoraLinear.fuse_update = name != UNFUSED

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
                return self.model(input_ids=batch, labels=batch).loss

            def configure_optimizers(self):
                return torch.optim.AdamW((p for p in self.parameters() if p.requires_grad), lr=1e-4)

        lora = LoRACallback(r=16, alpha=32, dropout=0.0, target_modules=TARGETS)
        kw = dict(precision="bf16-mixed") if name == "bf16 LoRA" else dict(plugins=NF4Precision(group_dequantize=False if name == UNGROUPED else "auto"))
        trainer = pl.Trainer(
            accelerator=device, devices=1, max_steps=steps, callbacks=[lora, StepTimer()], logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kw,
        )
        trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=batch))
    else:  # peers: a plain loop with the same model, optimizer and autocast
        try:
            model = _peer_model(name, _build_model(preset, seq, device)).train()
        except Exception as err:  # noqa: BLE001 - a missing or broken peer is reported, not fatal
            queue.put(dict(name=name, error=f"{type(err).__name__}: {err}"[:120]))
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
    queue.put(dict(name=name, step=statistics.median(timed), tokens=batch * seq, peak=peak))


def _combine(rounds: list[list[dict]]) -> list[dict]:
    """Per configuration: the median step over the rounds, and each round's ratio to that round's bf16 LoRA
    step (the ratio's median and range). The first configuration is the baseline."""
    combined = []
    for i, first in enumerate(rounds[0]):
        runs = [r[i] for r in rounds if "error" not in r[i] and "error" not in r[0]]
        if not runs:
            combined.append(first if "error" in first else dict(name=first["name"], error="the baseline failed"))
            continue
        ratios = [r[i]["step"] / r[0]["step"] for r in rounds if "error" not in r[i] and "error" not in r[0]]
        combined.append(dict(name=first["name"], step=statistics.median(x["step"] for x in runs), tokens=first["tokens"],
                             peak=max(x["peak"] for x in runs), ratio=statistics.median(ratios), ratios=ratios))
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
    args = vars(parser.parse_args())
    args["preset"] = args["preset"] or ("small" if args["device"] == "cpu" else "llama3-8b")
    ctx = mp.get_context("spawn")
    names = list(CONFIGS[: 4 if args["peers"] else 2]) + ([UNGROUPED, UNFUSED] if args["ablation"] else [])
    rounds: list[list[dict]] = []
    for _ in range(args["rounds"]):
        rounds.append([])
        for name in names:
            queue = ctx.Queue()
            proc = ctx.Process(target=run_config, args=(name, args, queue))
            proc.start()
            proc.join()
            rounds[-1].append(queue.get() if not queue.empty() else dict(name=name, error=f"process exited with {proc.exitcode}"))
    results = _combine(rounds)
    import torch

    where = torch.cuda.get_device_name() if args["device"] == "cuda" else f"{platform.processor() or 'CPU'} ({args['threads']} threads)"
    memory = "peak GPU memory in training" if args["device"] == "cuda" else "peak RSS in training"
    print(f"Device: {where}; preset {args['preset']} {json.dumps(PRESETS[args['preset']])}")
    print(f"LoRA r=16 on {','.join(TARGETS)}, AdamW, gradient checkpointing; median of {args['steps']} steps after {args['warmup']} warm-up\n")
    spread = args["rounds"] > 1
    print(f"| configuration | step (s) | tokens/s | vs bf16 LoRA |{' ratio range over rounds |' if spread else ''} {memory} |")
    print("|---|---|---|---|" + ("---|" if spread else "") + "---|")
    for r in results:
        if "error" in r:
            print(f"| {r['name']} | n/a ({r['error']}) | | |{' |' if spread else ''} |")
            continue
        extra = f" {min(r['ratios']):.2f}-{max(r['ratios']):.2f} |" if spread else ""
        print(f"| {r['name']} | {r['step']:.3f} | {r['tokens'] / r['step']:.0f} | {r['ratio']:.2f} |{extra} {r['peak'] / 2**30:.2f} GiB |")


if __name__ == "__main__":
    main()
