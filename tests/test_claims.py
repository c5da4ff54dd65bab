"""README claims checked one by one: exports are atomic; ``LoRACallback(full_checkpoint=True)`` writes whole-model
checkpoints; ``NF4LoraLinear.merge`` re-quantizes and warns; bitsandbytes is not needed at run time."""

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_nf4 import LoRACallback, NF4Linear, NF4Precision, quantize_nf4
from lightning_nf4.layers.lora import NF4LoraLinear, lora_config
from tests.lightning_models import CausalLM, Regressor, token_loader
from tests import isolated

ROOT = Path(__file__).resolve().parent.parent


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _lora_regressor(seed: int) -> tuple[nn.Module, LoRACallback]:
    """A converted, LoRA-injected plain module (no Trainer needed to export it), with non-zero adapters."""
    module = Regressor()
    NF4Precision(compute_dtype=torch.float32).convert_module(module)
    callback = LoRACallback(r=2, alpha=4, dropout=0.0)
    callback.inject(module)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if ".lora_B." in name:
                p.normal_()
    return module, callback


@pytest.mark.parametrize("artifact", ["adapter", "merged"])
def test_a_failed_export_leaves_the_previous_one_whole(tmp_path, monkeypatch, artifact):
    """An export is written into a temporary folder and renamed into place: while it is written the target still
    holds the previous export, a failure half way (a full disk) leaves that export byte for byte and no
    temporary folder, and a successful one replaces it whole."""
    from lightning_nf4 import export

    out = tmp_path / "out"
    target = out / artifact

    def save(module, callback):
        return (callback.save_adapter if artifact == "adapter" else callback.save_merged)(module, target)

    first, callback = _lora_regressor(seed=1)
    save(first, callback)
    before = _files(target)
    assert "adapter_model.safetensors" in before or "model.safetensors" in before
    second, callback = _lora_regressor(seed=2)

    real_save_file = export.save_file
    seen_during_write = []

    def disk_full(tensors, filename, metadata=None):
        seen_during_write.append(_files(target))  # what a reader of the target sees meanwhile
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save(second, callback)
    assert seen_during_write == [before]
    assert _files(target) == before
    assert not [p.name for p in out.iterdir() if "tmp" in p.name or "old" in p.name]

    monkeypatch.setattr(export, "save_file", real_save_file)
    save(second, callback)
    after = _files(target)
    assert after.keys() == before.keys() and after != before
    assert not [p.name for p in out.iterdir() if "tmp" in p.name or "old" in p.name]


def test_full_checkpoint_holds_the_whole_model(tmp_path):
    """With ``full_checkpoint=True`` the checkpoint's state dict is the whole module's (NF4 codes, scales and
    quant states included), loads strictly into a freshly built module to the same logits, and resumes exactly
    (at an epoch boundary, without dropout: the conditions under which adapter-only resume is exact)."""

    def fit(epochs, ckpt_path=None, save=False):
        model = CausalLM(lr=1e-2)
        callbacks = [LoRACallback(r=2, alpha=4, dropout=0.0, full_checkpoint=True)]
        if save:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True))
        trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                             max_epochs=epochs, default_root_dir=str(tmp_path), enable_checkpointing=save,
                             plugins=NF4Precision(), callbacks=callbacks)
        trainer.fit(model, token_loader(n=8), ckpt_path=ckpt_path)
        return model

    trained = fit(1, save=True)
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    whole = trained.state_dict()
    saved = checkpoint["state_dict"]
    assert saved.keys() == whole.keys()
    assert any(k.endswith("base_layer.weight.nested_absmax") for k in saved) and any(".lora_A." in k for k in saved)
    assert all(torch.equal(saved[k], whole[k]) for k in whole)
    assert not checkpoint.get("lightning_nf4", {}).get("adapter_only")

    fresh = CausalLM()
    NF4Precision().convert_module(fresh)
    LoRACallback(r=2, alpha=4, dropout=0.0).inject(fresh)
    fresh.load_state_dict(saved, strict=True)
    ids = next(iter(token_loader(n=4)))[0]
    trained.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(ids), trained(ids))

    resumed = fit(2, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    straight = fit(2)
    for (n, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        if a.requires_grad:
            assert torch.equal(a, b), n


def test_merge_into_the_nf4_base_requantizes_and_warns():
    """``NF4LoraLinear.merge`` replaces the base by the NF4 quantization of base + delta (lossy: it warns), after
    which the layer computes with the base alone; unmerging is refused."""
    torch.manual_seed(0)
    base = NF4Linear.from_linear(nn.Linear(128, 96), compute_dtype=torch.float32)
    layer = NF4LoraLinear(base, "default", lora_config(r=8, lora_alpha=16, target_modules=["x"]), r=8, lora_alpha=16)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(std=0.1)
    x = torch.randn(4, 128)
    merged_float = layer.merged_weight(torch.float32)
    expected = quantize_nf4(merged_float.to(base.quant.dtype), base.blocksize, base.double_quant)
    with torch.no_grad():
        before = layer(x)
    with pytest.warns(UserWarning, match="re-quantizes the weight and loses precision"):
        layer.merge()
    assert layer.merged and layer.merged_adapters == ["default"]
    assert torch.equal(base.weight, expected.packed) and torch.equal(base.quant.absmax, expected.absmax)
    assert torch.equal(base.quant.nested.absmax, expected.nested.absmax)
    assert torch.equal(base.dequantize(torch.float32), expected.dequantize(torch.float32))
    with torch.no_grad():
        after = layer(x)
        assert torch.equal(after, base(x))
    # lossy, but the merged layer computes base + delta to within NF4's error of that sum
    assert (after - before).norm() / before.norm() < 0.15 and not torch.equal(after, before)
    with pytest.raises(RuntimeError, match="cannot be unmerged"):
        layer.unmerge()


_WITHOUT_BITSANDBYTES = r"""
import importlib.metadata, sys
sys.modules["bitsandbytes"] = None  # as if not installed: import fails, find_spec gives None
_version, _distribution = importlib.metadata.version, importlib.metadata.distribution
def _no_bnb(fn):
    def wrapped(name, *args, **kwargs):
        if name.replace("_", "-").lower() == "bitsandbytes":
            raise importlib.metadata.PackageNotFoundError(name)
        return fn(name, *args, **kwargs)
    return wrapped
importlib.metadata.version, importlib.metadata.distribution = _no_bnb(_version), _no_bnb(_distribution)
try:
    import bitsandbytes  # noqa: F401
    raise SystemExit("bitsandbytes could still be imported")
except ImportError:
    pass

import tempfile
from pathlib import Path
import torch
import lightning.pytorch as pl
from transformers import BitsAndBytesConfig
import lightning_nf4 as L
from lightning_nf4.loading import AutoModelForCausalLM
from tests.lightning_models import CausalLM, tiny_llama, token_loader

q = L.quantize_nf4(torch.randn(300, 257), 64, True)
assert q.dequantize(torch.bfloat16).shape == (300, 257)
out = Path(tempfile.mkdtemp())
model = CausalLM(lr=1e-2)
pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
           enable_model_summary=False, max_steps=2, plugins=L.NF4Precision(),
           callbacks=[L.LoRACallback(r=2, alpha=4, save_dir=str(out / "export"))]).fit(model, token_loader(n=8))
assert (out / "export" / "adapter" / "adapter_model.safetensors").is_file() and (out / "export" / "merged" / "config.json").is_file()
tiny_llama().save_pretrained(out / "float")
config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.bfloat16)
loaded = AutoModelForCausalLM.from_pretrained(out / "float", quantization_config=config, progress=False)
loaded.save_pretrained(out / "bnb-4bit")
again = AutoModelForCausalLM.from_pretrained(out / "bnb-4bit", progress=False)  # a pre-quantized checkpoint
ids = torch.randint(0, 128, (1, 8))
with torch.no_grad():
    assert torch.equal(loaded(input_ids=ids).logits, again(input_ids=ids).logits)
    assert loaded.generate(ids, max_new_tokens=2, do_sample=False).shape == (1, 10)
assert sys.modules.get("bitsandbytes") is None
print("ok")
"""


@pytest.mark.timeout(660)  # its subprocess stops at 600 s
def test_runs_without_bitsandbytes(tmp_path):
    """In a process where bitsandbytes cannot be imported and has no installed metadata: quantize, fit with
    NF4Precision + LoRACallback, export, load a float checkpoint into NF4, save it in bitsandbytes' format, load
    that back, generate."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = isolated.run([sys.executable, "-c", _WITHOUT_BITSANDBYTES], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout[-2000:] + done.stderr[-4000:]
