"""One LoRA training step through the Lightning Trainer: bf16 LoRA vs NF4Precision + LoRACallback.

Each configuration runs in its own process (so peak memory is its own) on the same random Llama,
and the script prints median step time, tokens/s, the ratio to bf16 LoRA and peak memory side by side.

    python benchmarks/lora_step.py                      # CPU: hidden 1024, 12 layers (~220M), batch 2 x 256
    python benchmarks/lora_step.py --device cuda --preset llama3-8b   # GPU, batch 1 x 2048
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
    "small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4, vocab_size=32000, batch=2, seq=256),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, batch=1, seq=2048),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run_config(name: str, args: dict, queue: mp.Queue) -> None:
    import lightning.pytorch as pl
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_nf4 import LoRACallback, NF4Precision

    torch.set_num_threads(args["threads"])
    preset = dict(PRESETS[args["preset"]])
    batch, seq = preset.pop("batch"), preset.pop("seq")
    device = args["device"]

    class StepTimer(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_start(self, trainer, pl_module):
            # Peak memory is measured from here: the model as it trains, not the float model it was built from.
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            else:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM, the peak resident set

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if device == "cuda":
                torch.cuda.synchronize()
            self._t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if device == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._t)

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            config = LlamaConfig(**preset, max_position_embeddings=seq, tie_word_embeddings=False)
            with torch.device("meta" if device == "cuda" else "cpu"):
                self.model = LlamaForCausalLM(config).to(torch.bfloat16)
            if device == "cuda":  # materialise straight on the GPU, in bf16
                self.model.to_empty(device="cuda")
                for p in self.model.parameters():
                    torch.nn.init.normal_(p, std=0.02)
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.config.use_cache = False

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch, labels=batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW((p for p in self.parameters() if p.requires_grad), lr=1e-4)

    steps = args["warmup"] + args["steps"]
    data = torch.randint(0, preset["vocab_size"], (steps * batch, seq))
    loader = torch.utils.data.DataLoader(data, batch_size=batch)
    timer = StepTimer()
    lora = LoRACallback(r=16, alpha=32, dropout=0.0, target_modules=TARGETS)
    kw = dict(precision="bf16-mixed") if name == "bf16 LoRA" else dict(plugins=NF4Precision())
    trainer = pl.Trainer(
        accelerator=device, devices=1, max_steps=steps, callbacks=[lora, timer], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kw,
    )
    trainer.fit(Module(), loader)
    timed = timer.times[args["warmup"]:]
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _vm_hwm()
    queue.put(dict(name=name, step=statistics.median(timed), tokens=batch * seq, peak=peak))


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
    args = vars(parser.parse_args())
    args["preset"] = args["preset"] or ("small" if args["device"] == "cpu" else "llama3-8b")
    ctx = mp.get_context("spawn")
    results = []
    for name in ("bf16 LoRA", "lightning-nf4 QLoRA"):
        queue = ctx.Queue()
        proc = ctx.Process(target=run_config, args=(name, args, queue))
        proc.start()
        results.append(queue.get())
        proc.join()
    import torch

    where = torch.cuda.get_device_name() if args["device"] == "cuda" else f"{platform.processor() or 'CPU'} ({args['threads']} threads)"
    memory = "peak GPU memory in training" if args["device"] == "cuda" else "peak RSS in training"
    print(f"Device: {where}; preset {args['preset']} {json.dumps(PRESETS[args['preset']])}")
    print(f"LoRA r=16 on {','.join(TARGETS)}, AdamW, gradient checkpointing; median of {args['steps']} steps after {args['warmup']} warm-up\n")
    print(f"| configuration | step (s) | tokens/s | vs bf16 LoRA | {memory} |")
    print("|---|---|---|---|---|")
    base = results[0]["step"]
    for r in results:
        print(f"| {r['name']} | {r['step']:.3f} | {r['tokens'] / r['step']:.0f} | {r['step'] / base:.2f} | {r['peak'] / 2**30:.2f} GiB |")


if __name__ == "__main__":
    main()
