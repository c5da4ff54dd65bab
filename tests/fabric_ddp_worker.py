"""A QLoRA run under Lightning Fabric on CPU, one process or DDP over gloo; used by tests/test_fabric.py.

    python tests/fabric_ddp_worker.py OUT_DIR STRATEGY DEVICES

Each rank trains on its share of the same 32 examples and writes its trainable weights, and what the DDP wrapper
skips, to OUT_DIR/rank<r>.pt.
"""

import sys
from pathlib import Path

import lightning as L
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_nf4 import NF4FabricPrecision  # noqa: E402
from tests.test_fabric import _data, _peft_mlp  # noqa: E402


def main(out: Path, strategy: str, devices: int) -> None:
    fabric = L.Fabric(accelerator="cpu", devices=devices, strategy=strategy, plugins=NF4FabricPrecision(skip_modules=("head",)))
    fabric.launch()
    model = _peft_mlp()
    # SGD: the update is the averaged gradient itself (Adam would blow bf16 noise on near-zero gradients up to lr)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model, optimizer = fabric.setup(model, optimizer)
    x, y = _data()
    share = len(x) // fabric.world_size
    x, y = x[fabric.global_rank * share:(fabric.global_rank + 1) * share], y[fabric.global_rank * share:(fabric.global_rank + 1) * share]
    for _ in range(5):
        loss = nn.functional.cross_entropy(model(x).float(), y)
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    wrapped = model._forward_module
    state = {n: p.detach().clone() for n, p in model.module.named_parameters() if p.requires_grad}
    ignored = sorted(getattr(wrapped, "parameters_to_ignore", []))
    torch.save({"trainable": state, "ddp_ignored": ignored, "wrapper": type(wrapped).__name__}, out / f"rank{fabric.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
