"""Sharded QLoRA (NF4FSDPStrategy) against one GPU and against DDP: step time, tokens/s, peak memory.

    python benchmarks/fsdp_scaling.py --rounds 3 --steps 8            # the table (driver)
    python benchmarks/fsdp_scaling.py --one 70b:nf4_fsdp:2 --steps 8  # one configuration (what the driver runs)
    python benchmarks/fsdp_scaling.py --write-checkpoint 1b --checkpoint /tmp/ck   # then --checkpoint /tmp/ck:
    python benchmarks/fsdp_scaling.py --specs 1b:nf4_fsdp:2,1b:ddp:2 --checkpoint /tmp/ck --rounds 1 --steps 1 --seq 64
        (host RAM per rank when the checkpoint streams into the shards, against each rank loading it whole)

Random Llama weights of the named shape, built on the meta device in ``configure_model`` (the DDP baseline
builds on the GPU, as it must), batch 1 x ``--seq`` tokens per GPU, HF gradient checkpointing, LoRA r=16 on
all 7 projections, AdamW. Each configuration runs in its own processes; the driver takes them in turn,
``--rounds`` times, and prints medians with ranges. All-gather time per step comes from a profiled step
(rank 0's NCCL all-gather kernels; device activity only, so the step keeps its pace; FSDP_SCALING_PROFILE_HOST=1
adds host ops and FSDP2's hook times, at about ten times the step). Each rank also prints, for forward, backward
and optimizer step, the host's time to issue the phase and the device's time to run it (``--host-profile``:
cProfile of the timed steps). Host RAM peak is each rank's max RSS when training starts.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPES = {
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
    "8b4": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=8),  # quick checks
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, vocab_size=32000),  # CPU load check
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "tiny32": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=32, num_attention_heads=4, num_key_value_heads=2),  # host overhead on CPU
}


def shape_config(shape: str, seq: int = 2048):
    from transformers import LlamaConfig

    settings = {"vocab_size": 128 if shape.startswith("tiny") else 128256, **SHAPES[shape]}
    return LlamaConfig(max_position_embeddings=max(seq, 64), tie_word_embeddings=False, **settings)


def write_checkpoint(shape: str, folder: Path) -> None:
    """Random bf16 weights of ``shape`` saved as a Hugging Face folder (what --checkpoint loads)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(shape_config(shape)).to(torch.bfloat16).save_pretrained(folder, max_shard_size="2GB")


def llama_step_module(config, build_on_meta: bool, loss: str = "chunked", checkpoint: str = "", loss_fn=None):
    """The step both scripts measure (``fsdp_memory.py`` too): a Llama of ``config`` built in ``configure_model``
    (on meta for the sharded strategy, which fills each unit as it shards it; else on the rank's device), or read
    from ``checkpoint``; HF gradient checkpointing; the chunked loss (``"plain"``: HF's own, ``loss_fn``: another)."""
    import lightning.pytorch as pl
    from transformers import LlamaForCausalLM

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = None

        def configure_model(self) -> None:
            if self.model is not None:
                return
            build = "meta" if build_on_meta else self.trainer.strategy.root_device
            if checkpoint:  # read from disk: on meta, each rank filling its shards unit by unit, or whole
                from transformers import BitsAndBytesConfig

                from lightning_nf4.loading import AutoModelForCausalLM

                nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
                self.model = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=nf4, device=build, progress=False).train()
            else:
                with torch.device(build):
                    self.model = LlamaForCausalLM(config)
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.config.use_cache = False

        def training_step(self, batch, batch_idx):
            if loss_fn is not None:
                return loss_fn(self.model, batch)
            if loss == "plain":
                return self.model(input_ids=batch, labels=batch).loss
            from lightning_nf4.losses import causal_lm_loss  # never the whole [tokens x vocab] logits

            return causal_lm_loss(self.model, batch, batch)

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-5)

    return Module()


SHARDED_FLAGS = {
    "keep": "reshard_after_forward=False", "p0": "no explicit prefetch", "p3": "three units ahead", "u2": "two layers per unit",
    "whole": "adapters not sharded", "novp": "no vocabulary-parallel tables",
    "fastrc": "NF4Precision(low_memory_recompute=False): the recompute keeps its dequantized layer",
    "offload": "NF4Precision(offload_activations=True): the layers' checkpointed inputs wait in host memory",
}


def sharded_strategy(flags: list[str], **kwargs):
    """``NF4FSDPStrategy`` as a configuration's ``+flags`` (``SHARDED_FLAGS``) set it."""
    from lightning_nf4.strategies import NF4FSDPStrategy

    return NF4FSDPStrategy(prefetch=0 if "p0" in flags else 3 if "p3" in flags else 1, reshard_after_forward="keep" not in flags,
                           layers_per_unit=2 if "u2" in flags else 1, shard_adapters="whole" not in flags,
                           vocab_parallel=False if "novp" in flags else "auto", **kwargs)


def precision_plugin(flags: list[str], **kwargs):
    from lightning_nf4 import NF4Precision

    return NF4Precision(low_memory_recompute=False if "fastrc" in flags else "auto", offload_activations="offload" in flags, **kwargs)


def phase_clock():
    """A callback that keeps, for every training step, the host's time to issue its forward (to the loss), its
    backward and its optimizer step, and on a GPU the device's time to run each (events on the compute stream):
    ``clock.steps[i] = {"host": [3 s], "device": [3 s or NaN]}``. Its batch-end hook waits for the device."""
    import lightning.pytorch as pl

    on_gpu = torch.cuda.is_available()

    class PhaseClock(pl.Callback):
        def __init__(self) -> None:
            self.marks: list[tuple] = []
            self.steps: list[dict] = []

        def _mark(self) -> None:
            self.marks.append((time.perf_counter(), torch.cuda.Event(enable_timing=True) if on_gpu else None))
            if on_gpu:
                self.marks[-1][1].record()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.marks = []
            self._mark()

        def on_before_backward(self, trainer, pl_module, loss):
            self._mark()

        def on_after_backward(self, trainer, pl_module):
            self._mark()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self._mark()
            if on_gpu:
                torch.cuda.synchronize()
            if len(self.marks) == 4:
                hosts, events = zip(*self.marks)
                device = [a.elapsed_time(b) / 1e3 for a, b in zip(events, events[1:])] if on_gpu else [float("nan")] * 3
                self.steps.append({"host": [b - a for a, b in zip(hosts, hosts[1:])], "device": device})

    return PhaseClock()


def median_phases(steps: list[dict]) -> dict:
    """Each phase's median over ``steps`` (``phase_clock``'s), host and device."""
    return {kind: [statistics.median(p[kind][i] for p in steps) for i in range(3)] for kind in ("host", "device")} if steps else {}


def run_one(spec: str, steps: int, warmup: int, seq: int, out: Path, loss: str = "chunked", checkpoint: str = "", profile: bool = True,
            host_profile: bool = False) -> None:
    import lightning.pytorch as pl

    from lightning_nf4 import LoRACallback

    shape, strategy_name, devices = spec.split(":")
    devices = int(devices)
    strategy_name, *flags = strategy_name.split("+")  # e.g. nf4_fsdp+compile+keep, ddp+compile
    unknown = set(flags) - {"compile", *SHARDED_FLAGS}
    if unknown:
        raise SystemExit(f"unknown flag(s) {sorted(unknown)} in {spec}: use +compile (each layer compiled), "
                         + ", ".join(f"+{k} ({v})" for k, v in SHARDED_FLAGS.items()))
    config = shape_config(shape, seq)
    vocab = config.vocab_size
    on_gpu = torch.cuda.is_available()

    class Timer(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.gather_ms = float("nan")

        def on_train_start(self, trainer, pl_module):
            self.rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            if on_gpu:
                self.build_peak = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if on_gpu:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()
            if batch_idx == warmup and host_profile:  # Python's own profiler over the timed steps
                import cProfile

                self.cprof = cProfile.Profile()
                self.cprof.enable()
            if batch_idx == warmup + steps and devices > 1 and profile:
                # device activity only on a GPU (cheap: the step keeps its pace); FSDP_SCALING_PROFILE_HOST=1 adds host ops,
                # which slows the step about tenfold but times FSDP2's hooks
                host_ops = not on_gpu or os.environ.get("FSDP_SCALING_PROFILE_HOST") == "1"
                activities = ([torch.profiler.ProfilerActivity.CPU] if host_ops else []) + ([torch.profiler.ProfilerActivity.CUDA] if on_gpu else [])
                self.prof = torch.profiler.profile(activities=activities)
                self.prof.__enter__()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if on_gpu:
                torch.cuda.synchronize()
            if warmup <= batch_idx < warmup + steps:
                self.times.append(time.perf_counter() - self.t0)
            if batch_idx == warmup + steps - 1 and getattr(self, "cprof", None) is not None:
                self.cprof.disable()
                out.mkdir(parents=True, exist_ok=True)
                self.cprof.dump_stats(out / f"{spec.replace(':', '_')}_rank{trainer.global_rank}.pstats")
                self.cprof = None
            if getattr(self, "prof", None) is not None and batch_idx == warmup + steps:
                self.prof.__exit__(None, None, None)
                events = self.prof.key_averages()
                self.profile = profile_summary(events, time.perf_counter() - self.t0)
                self.gather_ms = self.profile["allgather_ms"]
                self.prof = None

    n = warmup + steps + (1 if devices > 1 and profile else 0)
    data = torch.randint(0, vocab, (n * devices, seq))
    loader = torch.utils.data.DataLoader(data, batch_size=1)
    if strategy_name.startswith("nf4_fsdp"):
        strategy = sharded_strategy(flags + (["p0"] if strategy_name.endswith("_p0") else []))
    else:
        strategy = strategy_name if devices > 1 else "auto"
    timer, clock = Timer(), phase_clock()  # the clock marks each step's end before the timer waits for the device
    trainer = pl.Trainer(
        accelerator="gpu" if on_gpu else "cpu", devices=devices, strategy=strategy, max_steps=n, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        plugins=precision_plugin(flags), callbacks=[LoRACallback(r=16, alpha=32, dropout=0.0, target_modules="all-linear", compile="compile" in flags), clock, timer],
    )
    module = llama_step_module(config, strategy_name.startswith("nf4_fsdp"), loss=loss, checkpoint=checkpoint)
    trainer.fit(module, train_dataloaders=loader)
    peak = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else float("nan")
    result = {
        "spec": spec, "times": timer.times, "peak_gib": peak, "build_peak_gib": getattr(timer, "build_peak", float("nan")),
        "rss_gib": timer.rss_gib, "gather_ms": timer.gather_ms, "rank": trainer.global_rank, "tokens_per_step": seq * devices,
        "device": torch.cuda.get_device_name() if on_gpu else "cpu", "loss": loss, "checkpoint": checkpoint,
        "profile": getattr(timer, "profile", {}),
        "phases": median_phases(clock.steps[warmup:warmup + steps]),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{spec.replace(':', '_')}_rank{trainer.global_rank}.json").write_text(json.dumps(result))


def profile_summary(events, wall_s: float) -> dict:
    """One profiled step: NCCL and compute kernel time, host time inside FSDP2's hooks, the top host ops."""
    def is_nccl(key: str) -> bool:
        return "nccl" in key.lower()

    cuda = [e for e in events if e.device_time_total > 0 and e.device_type == torch.autograd.DeviceType.CUDA]
    fsdp: dict[str, list] = {}  # by hook, over units ("FSDP::pre_forward (model.layers.3)" -> "FSDP::pre_forward")
    for e in events:
        if e.key.startswith("FSDP::"):
            kind = e.key.split(" (")[0].split(" for ")[0]
            entry = fsdp.setdefault(kind, [0.0, 0])
            entry[0] = round(entry[0] + e.cpu_time_total / 1e3, 2)
            entry[1] += e.count
    top = sorted(((round(e.self_cpu_time_total / 1e3, 2), e.count, e.key[:80]) for e in events), reverse=True)[:15]
    return {
        "wall_ms": round(wall_s * 1e3, 1),
        "allgather_ms": sum(e.device_time_total for e in events if "allgather" in e.key.lower().replace("_", "")) / 1e3,
        "nccl_ms": round(sum(e.device_time_total for e in cuda if is_nccl(e.key)) / 1e3, 2),
        "kernel_ms": round(sum(e.device_time_total for e in cuda if not is_nccl(e.key)) / 1e3, 2),
        "fsdp_host_ms": fsdp, "top_host": top,
    }


def lane_first_gpus(batch: list[str]) -> list[int]:
    """The first GPU index of each configuration run at once: consecutive, disjoint ranges of their sizes
    (``70b:nf4_fsdp:2`` beside ``70b:nf4_fsdp:1`` takes GPUs 0-1 and 2)."""
    return [sum(int(spec.split(":")[2]) for spec in batch[:lane]) for lane in range(len(batch))]


def _launch(spec: str, r: int, lane: int, lanes: int, args: list[str], tag: Path, first_gpu: int = 0) -> subprocess.Popen:
    """One configuration's processes; with several lanes, on its own GPUs (from ``first_gpu`` on) and rendezvous port."""
    env = dict(os.environ)
    if lanes > 1:
        per = int(spec.split(":")[2])
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(first_gpu + i) for i in range(per))
        env["MASTER_PORT"] = str(29500 + 10 * lane + r % 10)
    elif spec.endswith(":1"):
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    return subprocess.Popen([sys.executable, __file__, "--one", spec, *args, "--out", str(tag)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def drive(specs: list[str], rounds: int, steps: int, warmup: int, seq: int, out: Path, timeout: int, loss: str = "chunked", checkpoint: str = "",
          lanes: int = 1, profile_rounds: int = 1000, host_profile: bool = False) -> None:
    """Each round runs every configuration once. With ``lanes`` > 1 (a host with lanes x N GPUs), that many
    configurations run at once on disjoint GPUs, their order rotating each round so each meets every lane."""
    results: dict[str, list[dict]] = {s: [] for s in specs}
    for r in range(rounds):
        order = specs[r % len(specs):] + specs[:r % len(specs)] if lanes > 1 else specs
        for start in range(0, len(order), lanes):
            batch = order[start:start + lanes]
            tag = out / f"round{r}"
            args = ["--steps", str(steps), "--warmup", str(warmup), "--seq", str(seq), "--loss", loss, "--checkpoint", checkpoint] + ([] if r < profile_rounds else ["--no-profile"]) + (["--host-profile"] if host_profile else [])
            t0 = time.perf_counter()
            firsts = lane_first_gpus(batch)
            procs = [(spec, _launch(spec, r, lane, lanes, args, tag, firsts[lane])) for lane, spec in enumerate(batch)]
            for spec, proc in procs:
                try:
                    _, stderr = proc.communicate(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    _, stderr = proc.communicate()
                if proc.returncode != 0:
                    print(f"{spec} round {r} failed ({proc.returncode}):\n{stderr[-2500:]}", flush=True)
                    continue
                record(results, spec, r, tag, t0)
    report(results, specs, rounds, steps, seq, loss, out)


def record(results: dict, spec: str, r: int, tag: Path, t0: float) -> None:
    """One finished configuration's rank files, added to ``results`` and printed."""
    ranks = [json.loads(p.read_text()) for p in sorted(tag.glob(f"{spec.replace(':', '_')}_rank*.json"))]
    results[spec].append({
        "step": statistics.median(ranks[0]["times"]), "fastest": min(ranks[0]["times"]),
        "peak": max(x["peak_gib"] for x in ranks), "rss": max(x["rss_gib"] for x in ranks),
        "gather_ms": ranks[0]["gather_ms"], "tokens": ranks[0]["tokens_per_step"], "device": ranks[0]["device"],
        "build_peak": max(x["build_peak_gib"] for x in ranks), "wall": time.perf_counter() - t0,
        "profiles": [x.get("profile", {}) for x in ranks],
        "phases": [x.get("phases", {}) for x in ranks],
    })
    row = results[spec][-1]
    print(f"round {r} {spec}: " + str({k: v for k, v in row.items() if k not in ("profiles", "phases")}), flush=True)
    for rank, phases in enumerate(row["phases"]):
        if phases:
            fmt = lambda xs: "/".join(f"{1e3 * x:.0f}" for x in xs)  # noqa: E731
            print(f"   rank {rank} forward/backward/optimizer ms, median step: host issues {fmt(phases['host'])}, device runs {fmt(phases['device'])}", flush=True)
    for rank, prof in enumerate(row["profiles"]):
        if prof:
            host = {k[6:]: v for k, v in prof["fsdp_host_ms"].items() if k in ("FSDP::pre_forward", "FSDP::post_forward", "FSDP::pre_backward", "FSDP::post_backward_reduce", "FSDP::all_gather_copy_out")}
            print(f"   rank {rank} profiled step {prof['wall_ms']} ms: kernels {prof['kernel_ms']} ms, NCCL {prof['nccl_ms']} ms, FSDP hooks (host ms, calls) {host}", flush=True)


def report(results: dict, specs: list[str], rounds: int, steps: int, seq: int, loss: str, out: Path) -> None:
    print(f"\n{results[specs[0]][0]['device'] if results[specs[0]] else ''}; batch 1 x {seq} per GPU; {steps} timed steps; {rounds} alternating rounds; {loss} loss\n")
    print("| configuration | step s (median of rounds, range) | fastest step s | tokens/s | peak GiB per GPU (train) | peak GiB (build) | host RSS GiB per rank | all-gather ms/step |")
    print("|---|---|---|---|---|---|---|---|")
    summary = {}
    for spec, rows in results.items():
        if not rows:
            print(f"| {spec} | failed | | | | | | |")
            continue
        steps_ = [x["step"] for x in rows]
        med = statistics.median(steps_)
        fastest = min(x["fastest"] for x in rows)
        summary[spec] = {"step": med, "tokens_s": rows[0]["tokens"] / med, "peak": max(x["peak"] for x in rows), "fastest": fastest, "tokens": rows[0]["tokens"]}
        print(f"| {spec} | {med:.3f} ({min(steps_):.3f}-{max(steps_):.3f}) | {fastest:.3f} | {rows[0]['tokens'] / med:.0f} | {max(x['peak'] for x in rows):.2f} | "
              f"{max(x['build_peak'] for x in rows):.2f} | {max(x['rss'] for x in rows):.2f} | {statistics.median(x['gather_ms'] for x in rows):.1f} |")
    # ratios against the first configuration of the same shape: tokens/s at the median and at the fastest step
    print()
    for spec, row in summary.items():
        base = next(k for k in summary if k.split(":")[0] == spec.split(":")[0])
        if base != spec:
            ref = summary[base]
            print(f"{spec} / {base}: tokens/s {row['tokens_s'] / ref['tokens_s']:.2f}x (fastest steps: "
                  f"{(row['tokens'] / row['fastest']) / (ref['tokens'] / ref['fastest']):.2f}x), peak {row['peak'] / ref['peak']:.2f}x")
    (out / "summary.json").write_text(json.dumps({"results": results, "summary": summary}, indent=1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--one")
    parser.add_argument("--specs", default="70b:nf4_fsdp:2,70b:nf4_fsdp:1,8b:nf4_fsdp:2,8b:ddp:2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--loss", choices=["chunked", "plain"], default="chunked", help="lightning_nf4.losses.causal_lm_loss, or HF's own")
    parser.add_argument("--checkpoint", default="", help="load this Hugging Face folder instead of random weights")
    parser.add_argument("--write-checkpoint", metavar="SHAPE", help="save random weights of SHAPE to --checkpoint and exit")
    parser.add_argument("--out", default=os.environ.get("OUT", "outputs/fsdp_scaling"))
    parser.add_argument("--lanes", type=int, default=1, help="configurations run at once, each on its own GPUs (a 4-GPU host: 2 lanes of 2)")
    parser.add_argument("--profile-rounds", type=int, default=1000, help="profile one extra step only in the first this-many rounds")
    parser.add_argument("--no-profile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--host-profile", action="store_true", help="cProfile the timed steps, each rank's stats to <out>/round<r>/<spec>_rank<k>.pstats")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if args.write_checkpoint:
        write_checkpoint(args.write_checkpoint, Path(args.checkpoint))
    elif args.one:
        run_one(args.one, args.steps, args.warmup, args.seq, Path(args.out), args.loss, args.checkpoint, profile=not args.no_profile,
                host_profile=args.host_profile)
    else:
        drive(args.specs.split(","), args.rounds, args.steps, args.warmup, args.seq, Path(args.out), args.timeout, args.loss, args.checkpoint,
              lanes=args.lanes, profile_rounds=args.profile_rounds, host_profile=args.host_profile)
