"""Checkpoints are read with ``torch.load(weights_only=True)``: a file whose unpickling would run code is refused."""

import pickle
import sys
from pathlib import Path

import pytest
import torch

from tests.test_cli import save_tiny_llama, write_config


class _WritesMarker:
    """Unpickling this object calls ``open(marker, "w")``: the file appears only if the loader ran the pickle's code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _malicious_checkpoint(path: Path, marker: Path, legacy: bool = False) -> Path:
    """What an adapter-only checkpoint of this package looks like, plus one object that runs code when loaded."""
    payload = {"state_dict": {}, "lightning_nf4": {"adapter_only": True}, "hyper_parameters": {"x": _WritesMarker(marker)}}
    if legacy:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    else:
        torch.save(payload, path)
    return path


@pytest.mark.parametrize("legacy", [False, True], ids=["torch.save", "plain-pickle"])
def test_load_checkpoint_refuses_code(tmp_path, legacy):
    from lightning_nf4.checkpoint_io import UntrustedCheckpointError, load_checkpoint

    marker = tmp_path / "pwned"
    ckpt = _malicious_checkpoint(tmp_path / "shared.ckpt", marker, legacy)
    with pytest.raises(UntrustedCheckpointError, match=r"shared\.ckpt.*not a checkpoint written by lightning-nf4.*untrusted"):
        load_checkpoint(ckpt)
    assert not marker.exists()
    if not legacy:  # the message names what the file asked to run
        with pytest.raises(UntrustedCheckpointError, match=r"needs \[.(io|builtins)\.open.\]"):
            load_checkpoint(ckpt)


def test_check_checkpoint_refuses_code_and_passes_a_package_checkpoint(tmp_path):
    """The fast check the CLI makes before building a model: the same verdicts as the weights-only load."""
    from lightning_nf4.checkpoint_io import UntrustedCheckpointError, check_checkpoint

    marker = tmp_path / "pwned"
    with pytest.raises(UntrustedCheckpointError, match=r"needs \[.(io|builtins)\.open.\]"):
        check_checkpoint(_malicious_checkpoint(tmp_path / "shared.ckpt", marker))
    with pytest.raises(UntrustedCheckpointError, match="not the zip archive"):
        check_checkpoint(_malicious_checkpoint(tmp_path / "legacy.ckpt", marker, legacy=True))
    assert not marker.exists()
    torch.save({"state_dict": {"w": torch.ones(3)}, "lightning_nf4": {"adapter_only": True}, "epoch": 1}, tmp_path / "ok.ckpt")
    assert check_checkpoint(tmp_path / "ok.ckpt") == tmp_path / "ok.ckpt"
    with pytest.raises(FileNotFoundError, match=r"nope\.ckpt"):
        check_checkpoint(tmp_path / "nope.ckpt")


def test_load_checkpoint_reports_missing_and_non_checkpoint_files(tmp_path):
    from lightning_nf4.checkpoint_io import UntrustedCheckpointError, load_checkpoint

    with pytest.raises(FileNotFoundError, match=r"nope\.ckpt"):
        load_checkpoint(tmp_path / "nope.ckpt")
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    with pytest.raises(UntrustedCheckpointError, match=r"text\.ckpt.*not the zip archive torch\.save writes"):
        load_checkpoint(tmp_path / "text.ckpt")
    torch.save({"state_dict": {"w": torch.ones(1000)}}, tmp_path / "whole.ckpt")
    (tmp_path / "truncated.ckpt").write_bytes((tmp_path / "whole.ckpt").read_bytes()[:-2000])
    with pytest.raises(ValueError, match=r"truncated\.ckpt.*cannot be read as a PyTorch checkpoint"):
        load_checkpoint(tmp_path / "truncated.ckpt")
    torch.save([1, 2, 3], tmp_path / "list.ckpt")
    with pytest.raises(ValueError, match=r"list\.ckpt.*not a Lightning checkpoint.*state_dict"):
        load_checkpoint(tmp_path / "list.ckpt")


@pytest.mark.parametrize("full_checkpoint", [False, True])
def test_the_package_checkpoints_load_weights_only(tmp_path, full_checkpoint):
    """Checkpoints Lightning writes with NF4Precision + LoRACallback (adapter-only or full) load through the safe
    loader to exactly what an unrestricted torch.load gives."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_nf4 import LoRACallback, NF4Precision
    from lightning_nf4.checkpoint_io import load_checkpoint
    from tests.lightning_models import CausalLM, token_loader

    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        max_steps=2, default_root_dir=str(tmp_path), plugins=NF4Precision(),
        callbacks=[LoRACallback(r=2, alpha=4, full_checkpoint=full_checkpoint), ModelCheckpoint(dirpath=tmp_path / "ckpt")],
    )
    trainer.fit(CausalLM(), token_loader(n=8))
    (path,) = (tmp_path / "ckpt").glob("*.ckpt")
    safe = load_checkpoint(path)
    trusted = torch.load(path, map_location="cpu", weights_only=False)
    assert safe.keys() == trusted.keys() and safe["state_dict"].keys() == trusted["state_dict"].keys()
    assert all(torch.equal(safe["state_dict"][k], trusted["state_dict"][k]) for k in trusted["state_dict"])
    assert any("base_layer.weight" in k for k in safe["state_dict"]) == full_checkpoint


@pytest.fixture
def model_dir(tmp_path):
    return save_tiny_llama(tmp_path / "tiny-llama")


def test_export_does_not_run_a_shared_checkpoint(tmp_path, model_dir):
    """``NF4Trainer.export(ckpt_path=...)`` (the ``export`` subcommand's body) on a file someone shared: nothing in
    it runs, nothing is written, the error names the file and says why, and it comes before the model is built
    (``check_checkpoint`` reads the pickle's list of globals only, not a model's worth of tensors)."""
    from lightning_nf4 import LoRACallback, NF4Precision
    from lightning_nf4.checkpoint_io import UntrustedCheckpointError
    from lightning_nf4.cli import NF4Trainer
    from lightning_nf4.models.causal_lm import CausalLMModule

    marker = tmp_path / "pwned"
    ckpt = _malicious_checkpoint(tmp_path / "shared.ckpt", marker)
    trainer = NF4Trainer(accelerator="cpu", devices=1, logger=False, plugins=NF4Precision(), callbacks=[LoRACallback(r=4, alpha=8)])
    module = CausalLMModule(str(model_dir))
    with pytest.raises(UntrustedCheckpointError, match=r"shared\.ckpt.*untrusted"):
        trainer.export(module, ckpt_path=str(ckpt), out_dir=str(tmp_path / "export"))
    assert not marker.exists()
    assert not (tmp_path / "export").exists()
    assert module.model is None  # refused before the model was loaded


def test_cli_export_does_not_run_a_shared_checkpoint(tmp_path, model_dir, monkeypatch):
    """Through ``lightning-nf4 export`` the file is refused as well (LightningCLI reads its hyperparameters first,
    also weights-only)."""
    from lightning_nf4.cli import main

    monkeypatch.setattr(sys, "argv", ["lightning-nf4"])
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog.\n\nA dictionary maps keys to values.")
    data = {"class_path": "lightning_nf4.data.TextDataModule", "init_args": {"source": str(corpus), "block_size": 8, "batch_size": 2}}
    config = write_config(tmp_path, model_dir, data)
    marker = tmp_path / "pwned"
    ckpt = _malicious_checkpoint(tmp_path / "shared.ckpt", marker)
    with pytest.raises(pickle.UnpicklingError):
        main(["export", "--config", str(config), "--ckpt_path", str(ckpt), "--out_dir", str(tmp_path / "export")])
    assert not marker.exists()
    assert not (tmp_path / "export").exists()


def test_a_model_bin_that_would_run_code_is_refused_as_untrusted_not_as_damaged(tmp_path):
    """A ``pytorch_model.bin`` whose pickle builds objects beside the tensors is intact: the loader refuses it for what
    it is (it could run code), names what it asked for, and points to safetensors, not to a re-download."""
    from lightning_nf4.loading.checkpoint import CheckpointError, iter_tensors

    marker = tmp_path / "pwned"
    torch.save({"w": torch.ones(2), "x": _WritesMarker(marker)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin holds more than weights \(its pickle asks for: .*open.*\).*re-save the model as safetensors") as info:
        dict(iter_tensors([tmp_path / "pytorch_model.bin"]))
    assert "truncated" not in str(info.value) and "add_safe_globals" not in str(info.value)
    assert not marker.exists()
    (tmp_path / "cut.bin").write_bytes((tmp_path / "pytorch_model.bin").read_bytes()[:-200])
    with pytest.raises(CheckpointError, match=r"cut\.bin cannot be loaded .*truncated or corrupted"):
        dict(iter_tensors([tmp_path / "cut.bin"]))
