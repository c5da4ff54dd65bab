"""Host time of a sharded QLoRA step, without the network: one process plays rank 0 of a 2-rank group whose
collectives do nothing (PyTorch's "fake" process-group backend), so what is timed is the host work alone: FSDP2's
hooks, the NF4 all-gather hooks, the layers' Python, the optimizer. On a GPU host the eager 8B step is host-bound
(each phase's host time equals its device time, ``fsdp_scaling.py`` prints both), so host time here is step time
there, up to the host's speed.

    python benchmarks/fsdp_host_overhead.py                       # DDP against nf4_fsdp variants, tiny32 shape
    python benchmarks/fsdp_host_overhead.py --specs nf4_fsdp --cprofile /tmp/p   # and each run's cProfile stats (timed steps)

Prints, per configuration, the median host milliseconds of forward, backward and optimizer step, and the extra
milliseconds per decoder layer against the first configuration. The gathered bytes are whatever the fake
collectives leave (zeros), so losses are meaningless; only time is measured.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fsdp_scaling import SHARDED_FLAGS  # noqa: E402

FLAGS = {**SHARDED_FLAGS, "nodq": "double_quant=False", "compile": "LoRACallback(compile=True): each decoder layer compiled",
         "one_nf4": "a what-if: FSDP2 handles one NF4 weight a layer, the other six left whole (as one flat NF4 parameter a layer would)"}


def _fake_allreduce(state, bucket):  # no annotations: DDP checks them as classes, and this module's are strings
    """DDP's bucket all-reduce, issued (the fake group does nothing) and answered with the bucket itself: the fake
    group's own future carries no tensor, which DDP refuses."""
    torch.distributed.all_reduce(bucket.buffer(), async_op=True)
    done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    done.set_result(bucket.buffer())
    return done


def _one_nf4_parameter_per_layer() -> None:
    """What-if for the host time of a layout with one flat NF4 parameter per layer: ``fully_shard`` of a decoder layer
    leaves six of its seven NF4 weights to FSDP2's ``ignored_params`` (whole on each rank, never gathered), so FSDP2
    does per-parameter work for one NF4 weight a layer. The bytes gathered are not the flat layout's; the host work is."""
    import torch.distributed.fsdp as fsdp

    from lightning_nf4.layers import NF4Linear

    shard = fsdp.fully_shard

    def fully_shard(module, **kwargs):
        for layer in module if isinstance(module, list) else [module]:
            weights = [m.weight for m in layer.modules() if isinstance(m, NF4Linear)]
            if len(weights) == 7:
                kwargs["ignored_params"] = set(kwargs.get("ignored_params") or ()) | set(weights[:6])
        return shard(module, **kwargs)

    fsdp.fully_shard = fully_shard


def run(spec: str, steps: int, warmup: int, seq: int, layers: int, cprofile: str) -> dict:
    import lightning.pytorch as pl
    from fsdp_scaling import llama_step_module, median_phases, phase_clock, precision_plugin, shape_config, sharded_strategy

    from lightning_nf4 import LoRACallback

    name, *flags = spec.split("+")
    config = shape_config("tiny32", seq)
    config.num_hidden_layers = layers
    if set(flags) - set(FLAGS):
        raise SystemExit(f"unknown flag(s) {sorted(set(flags) - set(FLAGS))} in {spec}: " + ", ".join(f"+{k} ({v})" for k, v in FLAGS.items()))
    if name == "nf4_fsdp":
        strategy = sharded_strategy(flags)
    elif name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        class FakeGroupDDP(DDPStrategy):  # Lightning registers a comm hook on CUDA only
            def _register_ddp_hooks(self) -> None:
                self.model.register_comm_hook(None, _fake_allreduce)

        strategy = FakeGroupDDP()
    else:
        raise SystemExit(f"unknown configuration {spec}: ddp or nf4_fsdp[+{'+'.join(FLAGS)}]")
    clock = phase_clock()
    if "one_nf4" in flags:
        _one_nf4_parameter_per_layer()
    data = torch.randint(0, config.vocab_size, (warmup + steps, seq))
    timed_profile = None
    if cprofile:  # Python's profiler over the timed steps only (set-up, compile and warm-up left out)
        import cProfile

        timed_profile = cProfile.Profile()

        class TimedProfile(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if batch_idx == warmup:
                    timed_profile.enable()

            def on_train_end(self, trainer, pl_module):
                timed_profile.disable()
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=warmup + steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        plugins=precision_plugin(flags, double_quant="nodq" not in flags),
        callbacks=[LoRACallback(r=16, alpha=32, dropout=0.0, target_modules="all-linear", compile="compile" in flags), clock]
        + ([TimedProfile()] if cprofile else []),
    )
    module = llama_step_module(config, name == "nf4_fsdp")
    loader = torch.utils.data.DataLoader(data, batch_size=1)
    trainer.fit(module, train_dataloaders=loader)
    if timed_profile is not None:
        Path(cprofile).mkdir(parents=True, exist_ok=True)
        timed_profile.dump_stats(Path(cprofile) / f"{spec}.pstats")
    phases = [1e3 * x for x in median_phases(clock.steps[warmup:warmup + steps])["host"]]
    return {"spec": spec, "forward": phases[0], "backward": phases[1], "optimizer": phases[2], "step": sum(phases)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--specs", default="ddp,nf4_fsdp,nf4_fsdp+whole")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1, help="configurations in turn, this many times; medians over rounds")
    parser.add_argument("--cprofile", default="", help="folder for each configuration's cProfile stats of its timed steps")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # a fresh process per configuration: FSDP and DDP leave state behind
        import json

        import torch.distributed as dist
        from torch.testing._internal.distributed.fake_pg import FakeStore

        os.environ.update(LOCAL_RANK="0", RANK="0", NODE_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29599")
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)  # Lightning keeps a group it finds
        from lightning_nf4.strategies import vocab_parallel

        vocab_parallel._host_group = lambda group: group  # token counts: over the fake group too (no gloo peer here)
        try:
            print(json.dumps(run(args.one, args.steps, args.warmup, args.seq, args.layers, args.cprofile)))
        finally:
            dist.destroy_process_group()
        return
    import json
    import subprocess

    rows: dict[str, list[dict]] = {}
    for _ in range(args.rounds):
        for spec in args.specs.split(","):
            cmd = [sys.executable, __file__, "--one", spec, "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--seq", str(args.seq), "--layers", str(args.layers), "--cprofile", args.cprofile]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if done.returncode != 0:
                raise SystemExit(f"{spec} failed:\n{done.stderr[-3000:]}")
            rows.setdefault(spec, []).append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = None
    print(f"\nhost ms per step, {args.layers} layers x (hidden 256), 1 x {args.seq} tokens, fake 2-rank group, median of {args.steps} steps"
          f" and of {args.rounds} round(s)\n")
    print("| configuration | forward | backward | optimizer | step | extra ms per layer vs first |")
    print("|---|---|---|---|---|---|")
    for spec, runs in rows.items():
        med = {k: statistics.median(r[k] for r in runs) for k in ("forward", "backward", "optimizer", "step")}
        base = base or med
        extra = (med["step"] - base["step"]) / args.layers
        print(f"| {spec} | {med['forward']:.1f} | {med['backward']:.1f} | {med['optimizer']:.1f} | {med['step']:.1f} | {extra:+.2f} |")


if __name__ == "__main__":
    main()
