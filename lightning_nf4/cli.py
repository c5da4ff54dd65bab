"""``lightning-nf4``: QLoRA fine-tuning from a YAML file (fit/validate/test/predict) plus ``export``.

    lightning-nf4 fit --config configs/smollm2-pydoc.yaml
    lightning-nf4 export --config configs/smollm2-pydoc.yaml --ckpt_path last.ckpt --out_dir outputs/export

``NF4Precision`` and ``LoRACallback`` are configured as ``trainer.plugins`` / ``trainer.callbacks``; dtypes may
be written as strings ("bfloat16"). Without ``--config``, the repository's SmolLM2-on-pydoc config is used.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from jsonargparse.typing import register_type
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import ArgsType, LightningCLI

from lightning_nf4.callbacks.lora import _CKPT_KEY, LoRACallback
from lightning_nf4.checkpoint_io import check_checkpoint, load_checkpoint
from lightning_nf4.models.causal_lm import CausalLMModule
from lightning_nf4.plugins.precision import NF4Precision

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "smollm2-pydoc.yaml"


def _dtype(value: Any) -> torch.dtype:
    """YAML gives dtypes as strings: ``bfloat16`` or ``torch.bfloat16``."""
    dtype = getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{value!r} is not a torch dtype (e.g. bfloat16, float16, float32).")
    return dtype


register_type(torch.dtype, serializer=lambda d: str(d).removeprefix("torch."), deserializer=_dtype)


class NF4Trainer(Trainer):
    """Lightning's Trainer plus ``export``, so the CLI can offer it as a subcommand."""

    def export(
        self,
        model: LightningModule,
        datamodule: Optional[LightningDataModule] = None,
        ckpt_path: Optional[str] = None,
        out_dir: str = "outputs/export",
    ) -> dict[str, Path]:
        """Write a PEFT adapter and a merged float model from a checkpoint written by fit.

        Args:
            ckpt_path: an adapter-only (LoRACallback's default) or full Lightning checkpoint.
            out_dir: receives ``adapter/`` and ``merged/``.
        """
        if ckpt_path is None:
            raise ValueError("export needs --ckpt_path: a checkpoint written by fit.")
        if ckpt_path == "last":
            ckpt_path = self._last_checkpoint()
        elif _lightning_ckpt_alias(str(ckpt_path)):
            raise ValueError(
                f"export --ckpt_path {ckpt_path!r}: Lightning resolves that name only inside fit/validate/test. Pass the "
                "checkpoint file (ModelCheckpoint prints its best_model_path), or 'last'."
            )
        check_checkpoint(ckpt_path)  # before the model is built: a wrong path or an untrusted file fails at once
        callback = next((c for c in self.callbacks if isinstance(c, LoRACallback)), None)
        if callback is None:
            raise ValueError("export needs lightning_nf4.LoRACallback in trainer.callbacks, with the settings of the run that wrote the checkpoint.")
        model.trainer = self  # as in fit: the model reads the trainer's settings as it builds (NF4Precision's skip_modules)
        build = getattr(model, "build", None)
        build(self.strategy.root_device) if callable(build) else model.configure_model()
        if isinstance(self.precision_plugin, NF4Precision):
            self.precision_plugin.convert_module(model)  # no-op for a model the loader already quantized
        callback.inject(model)
        checkpoint = load_checkpoint(ckpt_path)  # weights-only: a shared file cannot run code here
        callback.on_load_checkpoint(self, model, checkpoint)  # r and alpha; an adapter-only one is applied and checked
        if not checkpoint.get(_CKPT_KEY, {}).get("adapter_only"):
            model.load_state_dict(checkpoint["state_dict"], strict=True)
        info = {"step": checkpoint.get("global_step"), "epoch": checkpoint.get("epoch"), "source": str(Path(ckpt_path).resolve())}
        written = callback.save_export(model, out_dir, tokenizer=getattr(model, "tokenizer", None), merged=True, info=info)
        assert written is not None
        for name, path in written.items():
            print(f"export: {name} -> {path}", flush=True)
        return written

    def _last_checkpoint(self) -> str:
        """``--ckpt_path last`` as Lightning resolves it for fit and validate: the newest ``last*.ckpt`` in the folders of
        the config's ``ModelCheckpoint`` callbacks."""
        found: set[str] = set()
        for callback in self.checkpoint_callbacks:
            find = getattr(callback, "_find_last_checkpoints", None)  # Lightning's own lookup, as its "last" uses
            if callable(find):
                found |= set(find(self))
        if not found:
            raise FileNotFoundError(
                "export --ckpt_path last: no last checkpoint in the folders of this config's ModelCheckpoint callbacks. "
                "Fit with ModelCheckpoint(save_last=True) in the same config, or pass the checkpoint file."
            )
        return max(found, key=os.path.getmtime)


class NF4CLI(LightningCLI):
    """LightningCLI for ``CausalLMModule`` with any datamodule, and an ``export`` subcommand."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "export": {"model", "datamodule"}}

    def parse_arguments(self, parser: Any, args: ArgsType) -> None:
        """Parse, then check ``--ckpt_path`` before anything reads it: LightningCLI loads the file for its
        hyperparameters right after this, and the model is built after that."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and not _lightning_ckpt_alias(str(ckpt_path)):
            check_checkpoint(ckpt_path)

    def before_predict(self) -> None:
        """LightningCLI drops what ``trainer.predict`` returns: a writer prints the continuations."""
        if not any(isinstance(c, PrintPredictions) for c in self.trainer.callbacks):
            self.trainer.callbacks.append(PrintPredictions())

    def _parse_ckpt_path(self) -> None:
        """LightningCLI puts the checkpoint's hyperparameters over the config and command line. A base model that has
        moved since (another machine, another mount) is then unreachable: the config's folder is kept when it exists
        and the checkpoint's does not, with a warning."""
        subcommand = self.config.get("subcommand")
        model = self.config[subcommand].get("model") if subcommand else None
        given = model.get("model_name_or_path") if model is not None else None
        super()._parse_ckpt_path()
        if given is None:
            return
        model = self.config[subcommand]["model"]
        saved = model.get("model_name_or_path")
        if saved != given and _model_exists(given) and not _model_exists(saved):
            rank_zero_warn(f"The checkpoint names the base model {saved!r}, which is not there; using {given!r} from the config.")
            model["model_name_or_path"] = given


class PrintPredictions(BasePredictionWriter):
    """Prints every prompt's continuation once, numbered by the prompt's place in the data, on the first process:
    under DDP each process predicts a share of the prompts (Lightning's predict sampler deals them out), so the
    shares are gathered first."""

    def __init__(self) -> None:
        super().__init__(write_interval="epoch")

    def write_on_epoch_end(self, trainer: Trainer, pl_module: LightningModule, predictions: Any, batch_indices: Any) -> None:
        if predictions and predictions[0] and isinstance(predictions[0][0], list):
            predictions = predictions[0]  # one dataloader, given as a list of one
        if batch_indices and batch_indices[0] and isinstance(batch_indices[0][0], list):
            batch_indices = batch_indices[0]
        mine = [(index, text) for batch, indices in zip(predictions, batch_indices) for index, text in zip(indices, batch)]
        shares = [mine]
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            shares = [None] * trainer.world_size
            torch.distributed.all_gather_object(shares, mine)
        if trainer.is_global_zero:
            for index, text in sorted(dict(pair for share in shares for pair in share).items()):
                print(f"prediction {index}: {text!r}", flush=True)


def _model_exists(name: Any) -> bool:
    return isinstance(name, str) and (name.startswith("packaged:") or Path(name).expanduser().is_dir())


def _lightning_ckpt_alias(value: str) -> bool:
    """``last``, ``best``, ``hpc``, ``registry[:...]`` and remote URLs: ckpt_path values Lightning resolves itself."""
    return value in ("last", "best", "hpc") or value.startswith("registry") or "://" in value


def _with_default_config(args: list[str]) -> list[str]:
    """Add ``--config <default>`` to a subcommand given no config, when the repository's default exists."""
    if not args or args[0] not in NF4CLI.subcommands() or not DEFAULT_CONFIG.is_file():
        return args
    if any(_names_config(a) for a in args[1:]):
        return args
    return [args[0], "--config", str(DEFAULT_CONFIG), *args[1:]]


def _names_config(arg: str) -> bool:
    """``--config F``, ``--config=F``, ``-c F``, ``-c=F`` and ``-cF``: every way argparse takes the config option."""
    return arg == "--config" or arg.startswith("--config=") or (arg.startswith("-c") and not arg.startswith("--"))


def run() -> None:
    """The ``lightning-nf4`` console script. Returns None: a console script's return value becomes the
    exit status, and returning the CLI object made every successful run exit with status 1."""
    main()


def main(args: ArgsType = None) -> NF4CLI:
    """Console entry point (``lightning-nf4``); ``args`` runs it in-process, as a list of CLI words or a dict."""
    if args is None:
        sys.argv[1:] = _with_default_config(sys.argv[1:])
    elif isinstance(args, list):
        args = _with_default_config([str(a) for a in args])
    return NF4CLI(
        CausalLMModule,
        None,
        trainer_class=NF4Trainer,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,  # the module's AdamW sees only trainable (LoRA) parameters
        args=args,
    )


if __name__ == "__main__":
    main()
