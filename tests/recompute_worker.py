"""How many dequantized NF4 weights are alive at once in backward; and a sharded fit that records it.

``DequantLedger`` is used in-process by tests/test_recompute_memory.py. As a script it runs tests/fsdp_worker.py's
fit (NF4FSDPStrategy on two gloo ranks, activation checkpointing, the same model, data and callbacks) with the NF4
layers of each decoder layer grouped and ``NF4Precision(low_memory_recompute=...)`` as given:

    python tests/recompute_worker.py OUT_DIR on|off

Each rank writes OUT_DIR/rank<r>.pt (fsdp_worker's record) and OUT_DIR/dequant_rank<r>.json (the ledger's figures).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import weakref
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_nf4.format.quantized import NF4Weight  # noqa: E402
from lightning_nf4.kernels import ops  # noqa: E402
from tests import isolated  # noqa: E402


class DequantLedger:
    """Dequantized weights alive at once, in elements. Every tensor that ``NF4Weight.dequantize`` or the group
    dequantize (``ops.dequantize_4bit_group``) returns is followed by its storage until that storage is freed;
    whenever one is made during a backward (its checkpoint recompute included), the live elements are sampled.
    The live total can only rise when one is made, so the samples hold the backward's peak. Eager code only:
    compiled code dequantizes inside its own kernels."""

    def __init__(self) -> None:
        self.live: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}
        self.backward_made = 0  # dequantize calls during backward
        self.backward_peak = 0  # most elements alive at once during backward
        self.backward_peak_storages = 0  # most separate dequantized storages alive at once during backward
        self._saved: tuple[Any, Any] = (None, None)

    def _made(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in self.live:
            self.live[key] = storage.nbytes() // tensor.element_size()
            self._refs[key] = weakref.ref(storage, functools.partial(self._gone, key))
        if torch._C._current_graph_task_id() != -1:
            self.backward_made += 1
            self.backward_peak = max(self.backward_peak, sum(self.live.values()))
            self.backward_peak_storages = max(self.backward_peak_storages, len(self.live))
        return tensor

    def _gone(self, key: int, _ref: Any) -> None:
        self.live.pop(key, None)
        self._refs.pop(key, None)

    def __enter__(self) -> "DequantLedger":
        dequantize, group = self._saved = (NF4Weight.dequantize, ops.dequantize_4bit_group)
        made = self._made

        @functools.wraps(dequantize)
        def tracked_dequantize(quant: NF4Weight, *args: Any, **kwargs: Any) -> torch.Tensor:
            return made(dequantize(quant, *args, **kwargs))

        @functools.wraps(group)
        def tracked_group(*args: Any, **kwargs: Any) -> torch.Tensor:
            return made(group(*args, **kwargs))

        NF4Weight.dequantize = tracked_dequantize  # type: ignore[method-assign]
        ops.dequantize_4bit_group = tracked_group
        return self

    def __exit__(self, *exc: Any) -> None:
        NF4Weight.dequantize, ops.dequantize_4bit_group = self._saved  # type: ignore[method-assign]

    def figures(self) -> dict[str, int]:
        return {"backward_made": self.backward_made, "backward_peak": self.backward_peak,
                "backward_peak_storages": self.backward_peak_storages}


def main(out: Path, low_memory: bool) -> None:
    import torch.distributed as dist

    from lightning_nf4 import NF4Precision
    from tests import fsdp_worker

    # fsdp_worker's fit, with each decoder layer's NF4 weights grouped (the GPU default) and the option as given
    fsdp_worker.NF4Precision = functools.partial(NF4Precision, group_dequantize=True, low_memory_recompute=low_memory)
    with DequantLedger() as ledger:
        fsdp_worker.run(out, "nf4_fsdp_ac", 2, 2, 1)
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("LOCAL_RANK", "0"))
    (out / f"dequant_rank{rank}.json").write_text(json.dumps(ledger.figures()))


isolated.end_process_groups_at_exit()


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[2] not in ("on", "off"):
        raise SystemExit("usage: python tests/recompute_worker.py OUT_DIR on|off")
    folder = Path(sys.argv[1])
    folder.mkdir(parents=True, exist_ok=True)
    main(folder, sys.argv[2] == "on")
