"""``lightning_nf4.load_from_checkpoint``: a trained module back from its Lightning checkpoint without a Trainer (for
inference or evaluation), where ``YourModule.load_from_checkpoint`` cannot rebuild the NF4 layers and adapters. The
rebuilt module equals the trained one bit for bit, for adapter-only and full checkpoints, modules built in
``__init__`` or ``configure_model``, the NF4 plugin or Lightning's own precision, and the CLI's module."""

import sys

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_nf4 import LoRACallback, NF4Linear, NF4Precision, load_from_checkpoint
from lightning_nf4.layers.lora import NF4LoraLinear
from tests.lightning_models import CausalLM, regression_loader, token_loader
from tests.test_reliability import BuiltInConfigureModel


class Net(pl.LightningModule):
    """A user's module with hyperparameters (``save_hyperparameters``) that shape the model."""

    def __init__(self, width: int = 64, lr: float = 1e-2):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(32, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x).float(), y)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)


def fit(tmp_path, model, loader, plugins=None, precision=None, **lora):
    last = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         max_steps=3, default_root_dir=str(tmp_path), plugins=plugins, precision=precision,
                         callbacks=[LoRACallback(**{"r": 4, "alpha": 8, **lora}), last])
    trainer.fit(model, loader)
    return last.last_model_path


def assert_same_module(trained, loaded):
    a, b = trained.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("full_checkpoint", [False, True])
def test_a_user_module_comes_back_as_trained(tmp_path, full_checkpoint):
    """Hyperparameters shape the module (``width``), the plugin's block size and compute dtype and the callback's
    targets and ``modules_to_save`` come from the checkpoint; outputs equal the trained module's."""
    trained = Net(width=48)
    path = fit(tmp_path, trained, regression_loader(), plugins=NF4Precision(compute_dtype=torch.float16, blocksize=32, skip_modules=["net.4"]),
               full_checkpoint=full_checkpoint, target_modules=["net.0", "net.2"], modules_to_save=["net.4"])
    loaded = load_from_checkpoint(Net, path)
    assert loaded.hparams.width == 48 and isinstance(loaded.net[0], NF4LoraLinear) and not hasattr(loaded.net[4], "lora_A")
    nf4 = loaded.net[2].base_layer
    assert isinstance(nf4, NF4Linear) and nf4.compute_dtype == torch.float16 and nf4.blocksize == 32
    assert_same_module(trained, loaded)
    x, _ = next(iter(regression_loader()))
    trained.eval(), loaded.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        assert torch.equal(trained(x), loaded(x))
    assert load_from_checkpoint(Net, path, lr=0.5).hparams.lr == 0.5  # keyword arguments override, as in Lightning


@pytest.mark.parametrize("make", [CausalLM, BuiltInConfigureModel])
def test_a_model_built_in_init_or_in_configure_model_comes_back(tmp_path, make):
    trained = make()
    path = fit(tmp_path, trained, token_loader(n=16), plugins=NF4Precision(compute_dtype=torch.float32))
    assert_same_module(trained, load_from_checkpoint(make, path))


class LoadsOnMeta(CausalLM):
    """A model loaded with ``from_pretrained(..., device="meta")`` in ``configure_model`` (the README's loading path for
    ``nf4_fsdp``; one process reads it whole at the conversion)."""

    def __init__(self, folder: str, lr: float = 1e-2):
        pl.LightningModule.__init__(self)
        self.save_hyperparameters({"folder": folder, "lr": lr})
        self.model, self.lr = None, lr

    def configure_model(self):
        if self.model is None:
            from transformers import BitsAndBytesConfig

            from lightning_nf4.loading import AutoModelForCausalLM

            nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
            self.model = AutoModelForCausalLM.from_pretrained(self.hparams.folder, quantization_config=nf4, device="meta", progress=False)


def test_a_module_that_loads_its_model_on_meta_comes_back(tmp_path):
    from tests.lightning_models import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "base")
    trained = LoadsOnMeta(str(tmp_path / "base"))
    path = fit(tmp_path, trained, token_loader(n=16), plugins=NF4Precision(compute_dtype=torch.float32))
    loaded = load_from_checkpoint(LoadsOnMeta, path)
    assert not any(p.is_meta for p in loaded.parameters())
    assert_same_module(trained, loaded)


def test_a_float_base_under_lightnings_own_precision_stays_float(tmp_path):
    trained = CausalLM()
    path = fit(tmp_path, trained, token_loader(n=16), precision="bf16-mixed")
    loaded = load_from_checkpoint(CausalLM, path)
    assert not any(isinstance(m, NF4Linear) for m in loaded.modules())
    assert_same_module(trained, loaded)


def test_the_cli_module_comes_back_from_a_cli_checkpoint(tmp_path, monkeypatch):
    from lightning_nf4.cli import main
    from lightning_nf4.models.causal_lm import CausalLMModule
    from tests.test_cli import save_tiny_llama
    from tests.test_cli_user import _config

    monkeypatch.setattr(sys, "argv", ["lightning-nf4"])
    config = _config(tmp_path, save_tiny_llama(tmp_path / "base"))
    cli = main(["fit", "--config", str(config), "--trainer.max_steps", "2"])
    loaded = load_from_checkpoint(CausalLMModule, tmp_path / "ckpt" / "last.ckpt")
    assert_same_module(cli.model, loaded)


def test_checkpoints_it_cannot_rebuild_from_are_named(tmp_path):
    path = fit(tmp_path, CausalLM(), token_loader(n=16), plugins=NF4Precision(compute_dtype=torch.float32))
    with pytest.raises(ValueError, match=r"trained with r=4, alpha=8, but lora has r=4, alpha=16"):
        load_from_checkpoint(CausalLM, path, lora=LoRACallback(r=4, alpha=16))
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["lightning_nf4"]["settings"]  # as an older lightning-nf4 wrote them
    torch.save(checkpoint, tmp_path / "older.ckpt")
    with pytest.raises(ValueError, match=r"records no LoRACallback settings.*lora=LoRACallback\(r=4, alpha=8"):
        load_from_checkpoint(CausalLM, tmp_path / "older.ckpt")
    trained_as = load_from_checkpoint(CausalLM, tmp_path / "older.ckpt", lora=LoRACallback(r=4, alpha=8),
                                      precision=NF4Precision(compute_dtype=torch.float32))
    assert_same_module(load_from_checkpoint(CausalLM, path), trained_as)
    with pytest.raises(RuntimeError, match=r"adapter checkpoint does not fit this model: missing \[\]"):
        load_from_checkpoint(CausalLM, tmp_path / "older.ckpt", lora=LoRACallback(r=4, alpha=8, target_modules=["q_proj"]))
    del checkpoint["lightning_nf4"]  # the trained weights and no record: what nf4_fsdp writes with save_weights_only
    torch.save(checkpoint, tmp_path / "weights_only.ckpt")
    with pytest.raises(ValueError, match=r"holds LoRA weights but no LoRACallback record.*Pass lora=LoRACallback"):
        load_from_checkpoint(CausalLM, tmp_path / "weights_only.ckpt")
    assert_same_module(load_from_checkpoint(CausalLM, path), load_from_checkpoint(
        CausalLM, tmp_path / "weights_only.ckpt", lora=LoRACallback(r=4, alpha=8), precision=NF4Precision(compute_dtype=torch.float32)))
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if ".lora_" not in k}
    torch.save(checkpoint, tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match=r"not written with LoRACallback.*CausalLM.load_from_checkpoint"):
        load_from_checkpoint(CausalLM, tmp_path / "plain.ckpt")
    for remap in ({"cuda:0": "cpu"}, lambda storage, location: storage):  # Lightning's per-tensor forms
        with pytest.raises(TypeError, match=r"builds the module on one device; pass that device \(map_location='cuda:0'"):
            load_from_checkpoint(CausalLM, path, map_location=remap)
    if not torch.cuda.is_available():  # a device that is not here: named, with what is, before anything is built
        for absent in ("cuda", "cuda:1", 0):
            with pytest.raises(ValueError, match=r"(Device cuda(:\d)? is not available: (this PyTorch build|no CUDA device is visible).*|Unknown device 0); available here: \['cpu'"):
                load_from_checkpoint(CausalLM, path, map_location=absent)


class StrictWithHook(CausalLM):
    """A module that sets ``strict_loading`` itself and reads its checkpoint in ``on_load_checkpoint``."""

    def __init__(self, lr: float = 1e-2):
        super().__init__(lr=lr)
        self.strict_loading = True
        self.seen: list[str] = []

    def on_load_checkpoint(self, checkpoint):
        self.seen = sorted(checkpoint["state_dict"])


def test_a_module_with_its_own_strict_loading_and_checkpoint_hook_comes_back(tmp_path):
    """Lightning's builder refused ``strict=False`` against the module's own ``strict_loading=True``, and the module's
    ``on_load_checkpoint`` saw an empty state dict (its edits to it were lost)."""
    trained = StrictWithHook()
    path = fit(tmp_path, trained, token_loader(n=16), plugins=NF4Precision(compute_dtype=torch.float32))
    loaded = load_from_checkpoint(StrictWithHook, path)
    assert loaded.seen and loaded.seen == sorted(torch.load(path, weights_only=True)["state_dict"])
    assert_same_module(trained, loaded)


def test_lora_and_precision_take_the_objects_not_their_settings(tmp_path):
    with pytest.raises(TypeError, match=r"lora= takes a LoRACallback \(lora=LoRACallback\(r=\.\.\..*got dict"):
        load_from_checkpoint(CausalLM, tmp_path / "any.ckpt", lora=dict(r=4, alpha=8))
    with pytest.raises(TypeError, match=r"precision= takes an NF4Precision.*got str"):
        load_from_checkpoint(CausalLM, tmp_path / "any.ckpt", precision="nf4")
