"""Reliability on misuse and interruption (issue 13): skipped modules under LoRA, exact resume, safe export
folders, complete merged folders, clear errors for bad input. Everything runs on CPU."""

import json
import warnings
import os

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_nf4 import LoRACallback, NF4Linear, NF4Precision
from tests.lightning_models import CausalLM, tiny_llama, token_loader


def tiny_llama_tied():
    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    return model
from tests import isolated


class Validated(CausalLM):
    """CausalLM with a validation step: validations inside fit, whose loaders draw from the global generator."""

    def validation_step(self, batch, batch_idx):
        (ids,) = batch
        self.log("val_loss", self.model(input_ids=ids, labels=ids).loss)


def trainer(tmp_path, **kw):
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, max_epochs=2, default_root_dir=str(tmp_path),
    )
    defaults.update(kw)
    return pl.Trainer(**defaults)


# -- skipped modules stay float, however they are wrapped ---------------------------------------------
def test_lora_on_a_skipped_module_trains_and_exports(tmp_path):
    """LoRA on ``lm_head`` (skipped by NF4Precision): Lightning's own convert_module runs after LoRACallback
    wrapped it and must leave ``lm_head.base_layer`` in float; its adapter trains and the merged export equals
    the trained model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = CausalLM(lr=1e-2)
    head = model.model.lm_head.weight.detach().clone()
    callback = LoRACallback(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "lm_head"], save_dir=str(tmp_path / "out"))
    trainer(tmp_path, max_epochs=3, plugins=NF4Precision(compute_dtype=torch.float32), callbacks=[callback]).fit(model, token_loader())

    lm_head = model.model.lm_head
    assert type(lm_head.base_layer) is nn.Linear and torch.equal(lm_head.base_layer.weight, head)
    assert isinstance(model.model.model.layers[0].self_attn.q_proj.base_layer, NF4Linear)
    assert lm_head.lora_B["default"].weight.abs().sum() > 0  # the head's adapter trained
    ids = next(iter(token_loader(n=4)))[0]
    model.eval()
    with torch.no_grad():
        ours = model(ids).float()
        merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "merged")).eval()(input_ids=ids).logits
        via_peft = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "out" / "adapter")).eval()(input_ids=ids).logits
    torch.testing.assert_close(merged, ours, atol=1e-4, rtol=1e-4)
    assert (via_peft - ours).abs().mean() < 0.1 * ours.abs().mean()  # the float base: NF4 error only


def test_a_tied_head_trained_in_full_trains_the_shared_table_and_exports_it_under_both_names(tmp_path):
    """``modules_to_save=["lm_head"]`` on a model whose head is tied to its embeddings (SmolLM2, Llama-3.2): the shared
    tensor trains (it is listed under the embeddings' name only), with a warning, and the adapter saves it under both
    names with ``ensure_weight_tying``, so PEFT's loader gives the trained model on the float base."""
    from peft import PeftModel
    from safetensors.torch import load_file

    model = CausalLM(model=tiny_llama_tied(), lr=1e-2)
    table = model.model.lm_head.weight.detach().clone()
    callback = LoRACallback(r=4, alpha=8, dropout=0.0, modules_to_save=["lm_head"], save_dir=str(tmp_path / "out"))
    with pytest.warns(UserWarning, match=r"lm_head's weight is tied to \['model.embed_tokens'\]"):
        trainer(tmp_path, max_epochs=3, plugins=NF4Precision(compute_dtype=torch.float32), callbacks=[callback]).fit(model, token_loader())

    head, embed = model.model.lm_head.weight, model.model.model.embed_tokens.weight
    assert head is embed and head.requires_grad and not torch.equal(head, table)  # trained, still one tensor
    adapter = tmp_path / "out" / "adapter"
    saved = load_file(adapter / "adapter_model.safetensors")
    assert torch.equal(saved["base_model.model.lm_head.weight"], head.detach()) and torch.equal(saved["base_model.model.model.embed_tokens.weight"], head.detach())
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert set(config["modules_to_save"]) == {"lm_head", "model.embed_tokens"} and config["ensure_weight_tying"]
    ids = next(iter(token_loader(n=4)))[0]
    model.eval()
    with torch.no_grad():
        ours = model(ids).float()
        via_peft = PeftModel.from_pretrained(tiny_llama_tied(), str(adapter)).eval()(input_ids=ids).logits
    assert (via_peft - ours).abs().mean() < 0.1 * ours.abs().mean()  # the float base: NF4 error only
    untrained = CausalLM(model=tiny_llama_tied()).eval()(ids).float()
    assert (via_peft - ours).abs().mean() < 0.5 * (untrained - ours).abs().mean()  # the trained table was loaded


@pytest.mark.parametrize("tied", [True, False], ids=["tied_head", "own_head"])
def test_a_bf16_model_trains_a_table_in_full_on_the_cpu_and_exports_in_bf16(tmp_path, tied):
    """GPT-2 (LayerNorm) held in bf16, ``modules_to_save`` on its head (tied: the embeddings train) or its embeddings.
    What trains is kept in float32 for AdamW, yet the table's rows reach the model in bf16: CPU autocast covers neither
    the lookup nor LayerNorm, and float32 rows failed the first step. The merged export is bf16 throughout, as its
    config says (the trained table was written in float32, and a tied config then recorded float32)."""
    from safetensors import safe_open
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, tie_word_embeddings=tied))
    gpt2 = gpt2.to(torch.bfloat16)
    saved = ["lm_head"] if tied else ["transformer.wte"]
    callback = LoRACallback(r=4, alpha=8, target_modules=["c_attn"], modules_to_save=saved, save_dir=str(tmp_path / "out"))
    model = CausalLM(model=gpt2, lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tied-table warning, tested above
        trainer(tmp_path, max_steps=3, plugins=NF4Precision(compute_dtype=torch.bfloat16), callbacks=[callback]).fit(model, token_loader())
    table = gpt2.transformer.wte
    assert table.weight.dtype == torch.float32 and table.weight.requires_grad
    assert table(torch.tensor([1, 2])).dtype == torch.bfloat16  # the float32 table's rows, in the model's dtype
    merged = tmp_path / "out" / "merged"
    with safe_open(str(merged / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert set(dtypes.values()) == {"BF16"}, dtypes
    assert json.loads((merged / "config.json").read_text())["dtype"] == "bfloat16"


class TiedTinyLM(pl.LightningModule):
    """A plain LM whose output layer shares the embedding table, tied the PyTorch way, under a name that is not
    ``lm_head``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(128, 64)
        self.body = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64))
        self.head = nn.Linear(64, 128, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.body(self.emb(ids)))

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return nn.functional.cross_entropy(self(ids[:, :-1]).flatten(0, 1).float(), ids[:, 1:].flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW((p for p in self.parameters() if p.requires_grad), lr=1e-2)


def test_a_linear_tied_to_the_embeddings_stays_float_and_tied_under_any_name(tmp_path):
    """``head.weight = emb.weight``: the head stays a float layer tied to the table, with a warning naming it (it was
    quantized, the tie cut, and the merged export then computed another model), and the merged export loads into the
    same class as the trained model."""
    from safetensors.torch import load_file

    model = TiedTinyLM()
    callback = LoRACallback(r=4, alpha=8, target_modules=["body.0", "body.2"], save_dir=str(tmp_path / "out"))
    with pytest.warns(UserWarning, match=r"head stays in float: its weight is tied to another module's"):
        trainer(tmp_path, max_steps=3, plugins=NF4Precision(compute_dtype=torch.float32), callbacks=[callback]).fit(model, token_loader())
    assert type(model.head) is nn.Linear and model.head.weight is model.emb.weight
    assert isinstance(model.body[0].base_layer, NF4Linear)
    merged = TiedTinyLM()
    merged.load_state_dict(load_file(str(tmp_path / "out" / "merged" / "model.safetensors")))
    assert merged.head.weight is merged.emb.weight
    ids = next(iter(token_loader(n=4)))[0]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), model(ids).float(), atol=1e-4, rtol=1e-4)


class BatchNormBuiltInConfigureModel(pl.LightningModule):
    """Built in ``configure_model``, so in the plugin's compute dtype (bf16), BatchNorm included."""

    def __init__(self):
        super().__init__()
        self.net = None

    def configure_model(self):
        if self.net is None:
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x).float(), y)

    def configure_optimizers(self):
        return torch.optim.AdamW((p for p in self.parameters() if p.requires_grad), lr=1e-2)


def test_a_batchnorm_trained_in_full_keeps_its_running_statistics_in_its_weights_dtype(tmp_path):
    """``modules_to_save`` on a BatchNorm of a model built in bf16: its weight and bias train in float32, and its running
    statistics go with them (left in bf16, the first CPU forward failed: 'mixed dtype (CPU)'), and they update."""
    from tests.lightning_models import regression_loader

    model = BatchNormBuiltInConfigureModel()
    callback = LoRACallback(r=4, alpha=8, target_modules=["net.0", "net.3"], modules_to_save=["net.1"])
    trainer(tmp_path, max_steps=3, plugins=NF4Precision(compute_dtype=torch.bfloat16), callbacks=[callback]).fit(model, regression_loader())
    norm = model.net[1].modules_to_save["default"] if hasattr(model.net[1], "modules_to_save") else model.net[1]
    assert {norm.weight.dtype, norm.running_mean.dtype, norm.running_var.dtype} == {torch.float32}
    assert norm.num_batches_tracked.item() == 3 and not torch.equal(norm.running_mean, torch.zeros_like(norm.running_mean))


def test_lora_on_a_tied_head_exports_a_merged_model_that_says_untied(tmp_path):
    """LoRA on ``lm_head`` when it is tied to the embeddings: the merged head (table + update) is no longer the table,
    so ``merged/config.json`` must say ``tie_word_embeddings: false``, or loaders tie the two and drop the update."""
    from transformers import AutoModelForCausalLM

    model = CausalLM(model=tiny_llama_tied(), lr=1e-2)
    callback = LoRACallback(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "lm_head"], save_dir=str(tmp_path / "out"))
    trainer(tmp_path, max_epochs=3, plugins=NF4Precision(compute_dtype=torch.float32), callbacks=[callback]).fit(model, token_loader())
    assert model.model.lm_head.lora_B["default"].weight.abs().sum() > 0
    config = json.loads((tmp_path / "out" / "merged" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and model.model.config.tie_word_embeddings  # the live model keeps its own
    ids = next(iter(token_loader(n=4)))[0]
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "merged")).eval()(input_ids=ids).logits
        torch.testing.assert_close(merged, model.eval()(ids).float(), atol=1e-4, rtol=1e-4)


class CarriesPeftLoRA(pl.LightningModule):
    """The usual PEFT workflow: adapters injected in ``__init__``, before NF4Precision quantizes the base layers."""

    def __init__(self):
        super().__init__()
        from peft import LoraConfig, inject_adapter_in_model

        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=False), self.net)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.mse_loss(self.net(batch[0]).float(), batch[1])

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def test_a_model_that_carries_peft_lora_trains_on_nf4_and_exports_a_merged_model(tmp_path):
    """PEFT's own LoRA layers around bases NF4Precision quantized: training runs, and the merged export dequantizes
    the NF4 base before adding the update (it added the update to the packed codes and failed after the fit).
    LoRACallback settings that differ from the layers' are refused before training, since its exports use them."""
    from safetensors.torch import load_file
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(16, 64, generator=g), torch.randn(16, 64, generator=g)), batch_size=4)
    with pytest.raises(ValueError, match=r"r=4, lora_alpha=8, but LoRACallback has r=8, alpha=8"):
        trainer(tmp_path, max_steps=1, plugins=NF4Precision(compute_dtype=torch.float32), callbacks=[LoRACallback(r=8, alpha=8)]).fit(CarriesPeftLoRA(), loader)
    model = CarriesPeftLoRA()
    callback = LoRACallback(r=4, alpha=8, save_dir=str(tmp_path / "out"))
    trainer(tmp_path, max_steps=3, plugins=NF4Precision(compute_dtype=torch.float32), callbacks=[callback]).fit(model, loader)
    assert isinstance(model.net[0].base_layer, NF4Linear)
    plain = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    plain.load_state_dict({k.removeprefix("net."): v for k, v in load_file(tmp_path / "out" / "merged" / "model.safetensors").items()})
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model.eval()(x).float(), atol=1e-5, rtol=1e-5)


def test_a_skipped_layer_stays_float_inside_any_wrapper():
    class Wrapper(nn.Module):  # e.g. a user's or a checkpointing wrapper: the layer's name changes
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    precision = NF4Precision(skip_modules=("1",))
    precision.convert_module(model)
    model[1] = Wrapper(model[1])  # now "1.inner", which no longer matches the pattern "1"
    precision.convert_module(model)
    assert isinstance(model[0], NF4Linear) and type(model[1].inner) is nn.Linear


# -- bad input gets nn.Linear's behaviour or a clear error ----------------------------------------------
def test_integer_input_raises_like_nn_linear():
    linear = nn.Linear(64, 32)
    layer = NF4Linear.from_linear(linear)
    ids = torch.randint(0, 5, (2, 64))
    with pytest.raises(RuntimeError):
        linear(ids)
    with pytest.raises(RuntimeError, match="expects a floating-point input.*torch.int64"):
        layer(ids)


@pytest.mark.parametrize("bias", [True, False])
def test_meta_forward_gives_the_shape_like_nn_linear(bias):
    x = torch.empty(3, 5, 64, device="meta")
    expected = nn.Linear(64, 32, bias=bias, device="meta")(x)
    out = NF4Linear(64, 32, bias=bias, device="meta")(x)
    assert out.device.type == "meta" and out.shape == expected.shape == (3, 5, 32) and out.dtype == expected.dtype
    assert NF4Linear(64, 32, bias=bias, device="meta")(x.bfloat16()).dtype == torch.bfloat16  # the input's dtype, as on a device
    with pytest.raises(RuntimeError, match="last dimension is 60"):
        NF4Linear(64, 32, device="meta")(torch.empty(2, 60, device="meta"))
    with pytest.raises(RuntimeError, match="same device"):  # nn.Linear refuses a meta input with real weights too
        NF4Linear.from_linear(nn.Linear(64, 32))(x)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without a usable CUDA device")
def test_precision_on_a_missing_device_says_so():
    from lightning_nf4.plugins import NF4PrecisionError

    with pytest.raises(NF4PrecisionError, match=r"device='cuda'.*(no CUDA support|no CUDA device is visible).*leave device unset"):
        NF4Precision(device="cuda")
    with pytest.raises(NF4PrecisionError, match=r"device='cuda:1'.*(no CUDA support|no CUDA device is visible)"):
        NF4Precision(device="cuda:1")  # an index is checked as the bare kind is
    if not torch.xpu.is_available():
        with pytest.raises(NF4PrecisionError, match=r"device='xpu'.*(no XPU support|no XPU device is visible).*leave device unset"):
            NF4Precision(device="xpu")
    with pytest.raises(NF4PrecisionError, match="not a torch device"):
        NF4Precision(device="gpu0")


def test_export_checks_the_checkpoint_before_building_the_model(tmp_path, monkeypatch):
    import sys

    from lightning_nf4.cli import NF4Trainer, main

    monkeypatch.setattr(sys, "argv", ["lightning-nf4"])
    from lightning_nf4.models.causal_lm import CausalLMModule

    module = CausalLMModule("packaged:no-such-model")  # building it would fail with another error
    export = NF4Trainer(accelerator="cpu", devices=1, logger=False, plugins=NF4Precision(), callbacks=[LoRACallback()])
    with pytest.raises(FileNotFoundError, match=r"missing\.ckpt.*does not exist"):
        export.export(module, ckpt_path=str(tmp_path / "missing.ckpt"), out_dir=str(tmp_path / "out"))
    assert module.model is None
    with pytest.raises(FileNotFoundError, match=r"missing\.ckpt.*does not exist"):
        main(["export", "--model.model_name_or_path", "packaged:no-such-model", "--ckpt_path", str(tmp_path / "missing.ckpt")])
    assert not (tmp_path / "out").exists()


def test_cli_names_an_untrusted_checkpoint(tmp_path, monkeypatch):
    import pickle
    import sys

    from lightning_nf4.checkpoint_io import UntrustedCheckpointError
    from lightning_nf4.cli import main

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    ckpt = tmp_path / "shared.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": RunsCode()}}, ckpt)
    monkeypatch.setattr(sys, "argv", ["lightning-nf4"])
    for subcommand in ("export", "validate"):
        with pytest.raises(UntrustedCheckpointError, match=r"shared\.ckpt.*not a checkpoint written by lightning-nf4.*system"):
            main([subcommand, "--model.model_name_or_path", "packaged:no-such-model", "--ckpt_path", str(ckpt)])
    assert not (tmp_path / "pwned").exists()
    assert isinstance(UntrustedCheckpointError("x"), pickle.UnpicklingError)


def test_top_level_auto_model_is_the_loader():
    import lightning_nf4
    from lightning_nf4.loading import AutoModelForCausalLM

    assert lightning_nf4.AutoModelForCausalLM is AutoModelForCausalLM


# -- the bf16 LoRA baseline through the same CLI and module ---------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests.test_cli import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def cli_config(tmp_path, model_dir, **trainer):
    """test_cli's config (NF4Precision + LoRACallback on the tiny Llama, text data), with trainer overrides."""
    import yaml

    from tests.test_cli import SENTENCES, write_config

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"{s} {t}" for s in SENTENCES for t in SENTENCES))
    data = {"class_path": "lightning_nf4.data.TextDataModule",
            "init_args": {"source": str(corpus), "block_size": 16, "batch_size": 4, "val_fraction": 0.25}}
    path = write_config(tmp_path, model_dir, data)
    config = yaml.safe_load(path.read_text())
    for key, value in trainer.items():
        if value is None:
            config["trainer"].pop(key, None)
        else:
            config["trainer"][key] = value
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("precision", ["bf16-mixed", "NF4Precision"])
def test_cli_runs_the_bf16_lora_baseline(tmp_path, model_dir, monkeypatch, precision):
    """``model.load_in_4bit: false`` trains LoRA on a float base, with Lightning's bf16-mixed or with NF4Precision
    kept in the config; the module builds its model in configure_model either way."""
    import sys

    from transformers import AutoModelForCausalLM

    from lightning_nf4.cli import main

    monkeypatch.setattr(sys, "argv", ["lightning-nf4"])
    overrides = {"plugins": None, "precision": "bf16-mixed"} if precision == "bf16-mixed" else {}
    config = cli_config(tmp_path, model_dir, **overrides)
    cli = main(["fit", "--config", str(config), "--model.load_in_4bit", "false"])
    model = cli.model.model
    assert not any(isinstance(m, NF4Linear) for m in model.modules())
    q_proj = model.model.layers[0].self_attn.q_proj
    reference = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16).model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer) is nn.Linear and torch.equal(q_proj.base_layer.weight, reference.weight)  # float, untouched
    assert not q_proj.base_layer.weight.requires_grad and q_proj.lora_B["default"].weight.abs().sum() > 0  # LoRA trained
    assert (tmp_path / "fit-out" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "fit-out" / "merged" / "config.json").is_file()


# -- exact resume with dropout and shuffling -------------------------------------------------------------
def _trainable(module):
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def _assert_same(a, b):
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def shuffled_tokens(n: int = 24, batch_size: int = 4):
    """A user's plain loader: shuffle=True draws each epoch's order from the global torch generator."""
    from torch.utils.data import DataLoader

    return DataLoader(token_loader(n=n).dataset, batch_size=batch_size, shuffle=True)


def fit_for_resume(tmp_path, max_epochs, ckpt_path=None, save=False, make_trainer=trainer, model=None, **lora):
    """One fit of the resume tests: default dropout, a shuffling loader, a fresh seed when resumed (a resumed process
    starts from other generator states), ``last.ckpt`` kept each epoch when ``save``; the trainable weights after."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    pl.seed_everything(0 if ckpt_path is None else 1234)
    model = model if model is not None else CausalLM(lr=1e-2)
    callbacks = [LoRACallback(**{"r": 4, "alpha": 8, **lora})]
    if save:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_epochs=1))
    t = make_trainer(tmp_path, max_epochs=max_epochs, plugins=NF4Precision(), callbacks=callbacks, enable_checkpointing=save)
    t.fit(model, shuffled_tokens(), ckpt_path=ckpt_path, weights_only=ckpt_path is not None)
    return _trainable(model)


def test_resume_at_an_epoch_boundary_is_exact_with_dropout_and_a_shuffling_loader(tmp_path):
    """LoRACallback's default dropout (0.05) and a plain shuffling DataLoader: stopping after epoch 2 and resuming
    (a weights-only load) ends with the adapters of an uninterrupted 4-epoch run, bit for bit."""
    from lightning_nf4.checkpoint_io import load_checkpoint

    assert LoRACallback().dropout == 0.05
    straight = fit_for_resume(tmp_path, 4)
    fit_for_resume(tmp_path, 2, save=True)
    load_checkpoint(tmp_path / "ckpt" / "last.ckpt")  # the checkpoint loads weights-only
    _assert_same(straight, fit_for_resume(tmp_path, 4, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")))


class BuiltInConfigureModel(CausalLM):
    """The tiny Llama built in ``configure_model`` (as CausalLMModule and the CLI build theirs)."""

    def __init__(self, lr: float = 1e-2):
        pl.LightningModule.__init__(self)
        self.model, self.lr = None, lr

    def configure_model(self):
        if self.model is None:
            self.model = tiny_llama()


def test_a_full_checkpoint_of_a_model_built_in_configure_model_resumes_exactly(tmp_path):
    """``full_checkpoint=True`` with a model built in configure_model: Lightning restores the checkpoint before the
    conversion and injection, so its NF4 and LoRA keys are held back and loaded once the model has them; the resumed
    run ends on the uninterrupted run's adapters, and a checkpoint that does not fit is named."""
    from lightning_nf4.checkpoint_io import load_checkpoint

    def run(max_epochs, ckpt_path=None, save=False, r=4):
        return fit_for_resume(tmp_path, max_epochs, ckpt_path, save, model=BuiltInConfigureModel(), r=r, full_checkpoint=True)

    straight = run(4)
    run(2, save=True)
    last = str(tmp_path / "ckpt" / "last.ckpt")
    assert any(k.endswith(".base_layer.weight.absmax") for k in load_checkpoint(last)["state_dict"])  # a full checkpoint
    _assert_same(straight, run(4, ckpt_path=last))
    with pytest.raises(ValueError, match=r"trained with r=4, alpha=8, but LoRACallback has r=8"):  # before any key is read
        run(4, ckpt_path=last, r=8)
    with pytest.raises(RuntimeError, match="full checkpoint does not fit"):
        fit_for_resume(tmp_path, 4, last, model=BuiltInConfigureModel(), full_checkpoint=True, target_modules=["q_proj"])


@pytest.mark.parametrize("built_in", ["init", "configure_model"])
def test_an_adapter_only_checkpoint_resumes_under_full_checkpoint(tmp_path, built_in):
    """A run switched to ``full_checkpoint=True`` resumes from its adapter-only checkpoints (Lightning's strict load
    failed with torch's list of every base key), exactly as with the default; a full checkpoint that lacks keys of
    this model is named."""
    make = (lambda: CausalLM(lr=1e-2)) if built_in == "init" else BuiltInConfigureModel
    straight = fit_for_resume(tmp_path, 4, model=make())
    fit_for_resume(tmp_path, 2, save=True, model=make())
    last = str(tmp_path / "ckpt" / "last.ckpt")
    _assert_same(straight, fit_for_resume(tmp_path, 4, ckpt_path=last, model=make(), full_checkpoint=True))
    if built_in == "init":
        fit_for_resume(tmp_path / "full", 2, save=True, model=make(), full_checkpoint=True, target_modules=["q_proj"])
        with pytest.raises(RuntimeError, match=r"full checkpoint does not fit this model: missing \['model.model.layers.0.mlp"):
            fit_for_resume(tmp_path, 4, ckpt_path=str(tmp_path / "full" / "ckpt" / "last.ckpt"), model=make(), full_checkpoint=True)


@pytest.mark.parametrize("stop", ["epoch_end", "mid_epoch"])
def test_the_package_data_modules_resume_exactly(tmp_path, model_dir, stop):
    """CausalLMModule + TextDataModule (a shuffling, resumable loader), default dropout: a run stopped at an epoch's
    end or three batches into an epoch and resumed from its checkpoint ends with the uninterrupted run's
    adapters, bit for bit; resumed mid-epoch, it trains on exactly the batches the uninterrupted run had left."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_nf4.data import TextDataModule
    from lightning_nf4.models.causal_lm import CausalLMModule
    from tests.test_cli import SENTENCES

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"{s} {t}" for s in SENTENCES for t in SENTENCES))
    total = 22  # 9 batches an epoch: into the third epoch

    class Seen(pl.Callback):
        def __init__(self):
            self.first_ids = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.first_ids.append((trainer.current_epoch, batch_idx, batch["input_ids"][:, 0].tolist()))

    def run(ckpt_path=None, **limits):
        pl.seed_everything(0 if ckpt_path is None else 1234)
        seen = Seen()
        callbacks = [LoRACallback(r=4, alpha=8), seen]
        if limits:
            every = {"every_n_epochs": 1} if stop == "epoch_end" else {"every_n_train_steps": limits["max_steps"]}
            callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, **every))
        module = CausalLMModule(str(model_dir), learning_rate=1e-2, compute_dtype="float32")
        data = TextDataModule(source=str(corpus), block_size=16, batch_size=4, val_fraction=0.25)
        t = trainer(tmp_path, max_steps=limits.get("max_steps", total), max_epochs=limits.get("max_epochs", -1),
                    plugins=NF4Precision(compute_dtype=torch.float32), callbacks=callbacks, enable_checkpointing=bool(limits))
        t.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=ckpt_path is not None)
        return _trainable(module), seen.first_ids

    straight, straight_batches = run()
    first, first_batches = run(**({"max_epochs": 1} if stop == "epoch_end" else {"max_steps": 12}))
    resumed, resumed_batches = run(ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert straight_batches[0][0] == 0 and len({ids[0] for _, _, ids in straight_batches[:9]}) > 1
    assert straight_batches[9][2] != straight_batches[0][2]  # each epoch has its own order
    assert first_batches + resumed_batches == straight_batches  # no batch twice, none left out, same order
    _assert_same(straight, resumed)


def test_resume_mid_epoch_with_a_stateful_loader_that_draws_from_the_global_generator(tmp_path):
    """A user's resumable loader whose iterator draws its worker seed from the global generator (no generator of
    its own): the states are restored again right before the next batch, after that draw. A resumed run that is
    stopped again in the same epoch and resumed once more still ends where the uninterrupted run does: the batches
    the first resume skipped count as trained on in the second checkpoint."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DistributedSampler

    from lightning_nf4.data.resumable import ResumableDataLoader

    dataset = token_loader(n=24).dataset  # 6 batches an epoch

    def run(max_steps, ckpt_path=None, save=None):
        pl.seed_everything(0 if ckpt_path is None else 1234)
        model = CausalLM(lr=1e-2)
        loader = ResumableDataLoader(dataset, batch_size=4, sampler=DistributedSampler(dataset, num_replicas=1, rank=0, seed=3))
        callbacks = [LoRACallback(r=4, alpha=8)]
        if save:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path / save, save_last=True, every_n_train_steps=max_steps))
        t = trainer(tmp_path, max_steps=max_steps, max_epochs=-1, plugins=NF4Precision(), callbacks=callbacks, enable_checkpointing=bool(save))
        t.fit(model, loader, ckpt_path=ckpt_path, weights_only=ckpt_path is not None)
        return _trainable(model)

    straight = run(16)
    run(9, save="first")  # three batches into the second epoch
    _assert_same(straight, run(16, ckpt_path=str(tmp_path / "first" / "last.ckpt")))
    run(11, ckpt_path=str(tmp_path / "first" / "last.ckpt"), save="second")  # resumed, stopped again 2 batches on
    _assert_same(straight, run(16, ckpt_path=str(tmp_path / "second" / "last.ckpt")))


def test_resume_mid_epoch_from_a_checkpoint_saved_just_before_a_validation(tmp_path):
    """``every_n_train_steps`` equal to ``val_check_interval``: the checkpoint is saved at a batch's end, then the
    validation runs, and its plain loader draws its base seed from the global generator before the next batch. The
    resumed run does not repeat that validation, so it went on from other states (every later loss differed). Each
    validation inside fit now leaves the states as the batch before it did."""
    resume_before_validation(tmp_path, trainer)


def resume_before_validation(tmp_path, make_trainer):
    """The run of the test above, with trainers from ``make_trainer`` (the GPU tests give theirs)."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, DistributedSampler

    from lightning_nf4.data.resumable import ResumableDataLoader

    dataset = token_loader(n=24).dataset  # 6 batches an epoch

    def run(ckpt_path=None):
        pl.seed_everything(0 if ckpt_path is None else 1234)
        model = Validated(lr=1e-2)
        loader = ResumableDataLoader(dataset, batch_size=4, sampler=DistributedSampler(dataset, num_replicas=1, rank=0, seed=3))
        callbacks = [LoRACallback(r=4, alpha=8)]  # the default dropout draws from the generator every step
        if ckpt_path is None:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", save_top_k=-1, every_n_train_steps=3))
        t = make_trainer(tmp_path, max_epochs=2, val_check_interval=3, num_sanity_val_steps=0, plugins=NF4Precision(),
                    callbacks=callbacks, enable_checkpointing=ckpt_path is None)
        t.fit(model, loader, DataLoader(dataset, batch_size=8), ckpt_path=ckpt_path, weights_only=ckpt_path is not None)
        return _trainable(model)

    straight = run()
    _assert_same(straight, run(str(tmp_path / "ckpt" / "step=3.ckpt")))  # mid-epoch: 3 of 6 batches


@pytest.mark.parametrize("val_check_interval, limits", [(6, {"max_epochs": 3}), (1.0, {"max_steps": 14, "max_epochs": -1})])
def test_resume_from_an_epoch_end_checkpoint_with_validation(tmp_path, val_check_interval, limits):
    """A plain shuffling loader, a validation loader, and a checkpoint saved at the first epoch's end: by the
    validation inside its last batch (``val_check_interval`` equal to the epoch's length), or at the epoch's end in a
    run limited by steps. The resumed run makes its loader's iterator (a base-seed draw) when fit sets up its data
    and again as the next epoch starts: the states are put back again there (every later batch and dropout mask
    differed)."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader

    dataset = token_loader(n=24).dataset  # 6 batches an epoch

    def run(ckpt_path=None):
        pl.seed_everything(0 if ckpt_path is None else 1234)
        model = Validated(lr=1e-2)
        callbacks = [LoRACallback(r=4, alpha=8)]  # the default dropout draws from the generator every step
        if ckpt_path is None:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1, every_n_epochs=1))
        t = trainer(tmp_path, **limits, val_check_interval=val_check_interval, num_sanity_val_steps=0,
                    plugins=NF4Precision(), callbacks=callbacks, enable_checkpointing=ckpt_path is None)
        t.fit(model, DataLoader(dataset, batch_size=4, shuffle=True), DataLoader(dataset, batch_size=8),
              ckpt_path=ckpt_path, weights_only=ckpt_path is not None)
        return _trainable(model)

    straight = run()
    _assert_same(straight, run(str(tmp_path / "ckpt" / "epoch=0.ckpt")))

@pytest.mark.parametrize("val_check_interval, warned", [(3, True), (4, False)])
def test_a_checkpoint_saved_inside_an_accumulation_window_says_its_resume_is_not_exact(tmp_path, val_check_interval, warned):
    """Lightning saves no gradients: a checkpoint a validation writes between two optimizer steps (after batch 3 of
    an accumulation of 2) resumes one batch short of the next step. It warns, naming the fix; at a step it does not."""
    import warnings

    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader

    dataset = token_loader(n=24).dataset

    t = trainer(tmp_path, max_epochs=1, accumulate_grad_batches=2, val_check_interval=val_check_interval, limit_val_batches=1,
                num_sanity_val_steps=0, plugins=NF4Precision(), enable_checkpointing=True,
                callbacks=[LoRACallback(r=4, alpha=8), ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(Validated(lr=1e-2), DataLoader(dataset, batch_size=4), DataLoader(dataset, batch_size=8))
    said = [str(w.message) for w in caught if "accumulated and not yet applied" in str(w.message)]
    assert bool(said) == warned, said
    if warned:
        assert "1 of 2 batches" in said[0] and "multiple of accumulate_grad_batches" in said[0]


@pytest.mark.timeout(540)  # two two-rank runs, each stopped at 240 s
def test_ddp_resume_restores_every_ranks_generators(tmp_path):
    """Two gloo ranks with different dropout streams, stopped mid-epoch and resumed: the adapters equal an
    uninterrupted two-rank run's exactly (each rank got its own states back). Runs in subprocesses with timeouts."""
    import sys
    from pathlib import Path

    worker = Path(__file__).with_name("resume_worker.py")

    def run(out, *args):
        done = isolated.run([sys.executable, str(worker), str(out), *map(str, args)], capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
        return torch.load(out / "trainable.pt")

    straight = run(tmp_path / "straight", 14, "save:8")  # 6 batches an epoch per rank: saved two into the second
    resumed = run(tmp_path / "resumed", 14, tmp_path / "straight" / "ckpt" / "last.ckpt")
    _assert_same(straight, resumed)


def test_generator_states_round_trip_as_plain_tensors():
    import io
    import random

    import numpy as np

    from lightning_nf4.callbacks.rng import capture, restore

    random.gauss(0, 1), np.random.standard_normal()  # leave a cached Gaussian in both
    saved = io.BytesIO()
    torch.save(capture(), saved)
    draw = lambda: (random.random(), random.gauss(0, 1), np.random.rand(), np.random.standard_normal(), torch.rand(3).tolist())  # noqa: E731
    expected = draw()
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    saved.seek(0)
    restore(torch.load(saved, weights_only=True))  # nothing to allow-list
    assert draw() == expected


@pytest.mark.parametrize("kind", ["cuda", "xpu"])
def test_the_accelerators_generator_is_saved_per_device(monkeypatch, kind):
    """No GPU here: the device module's own get/set_rng_state are stood in for, to check which device's state
    is read and written."""
    from lightning_nf4.callbacks.rng import capture, restore

    module = getattr(torch, kind)
    written = {}
    monkeypatch.setattr(module, "get_rng_state", lambda device: torch.full((16,), device.index, dtype=torch.uint8))
    monkeypatch.setattr(module, "set_rng_state", lambda state, device: written.update(state=state, device=device))
    states = capture(torch.device(kind, 1))
    assert torch.equal(states[kind], torch.full((16,), 1, dtype=torch.uint8))
    restore(states, torch.device(kind, 1))
    assert written["device"] == torch.device(kind, 1) and torch.equal(written["state"], states[kind])
    written.clear()
    restore(states, torch.device("cpu"))  # not onto another kind of device
    assert not written


# -- export folders: a matching pair or the previous one, never a mix; leftovers cleared; user files kept -----
PUBLISH_KILL_SCRIPT = r"""
import importlib.util, os, sys
spec = importlib.util.spec_from_file_location("publish", sys.argv[1])
publish = importlib.util.module_from_spec(spec)
spec.loader.exec_module(publish)
root, version, kill_at = sys.argv[2], sys.argv[3], sys.argv[4]

def stage(name):
    if name == kill_at:
        os._exit(9)  # a kill: no exception handler, no cleanup runs

def writer(part, files):
    def write(folder):
        for i in range(files):
            if kill_at == f"writing:{part}" and i == 1:
                stage(kill_at)
            (folder / f"{part}-{i}.bin").write_bytes(version.encode() * (1000 + i))
        (folder / "sub").mkdir()
        (folder / "sub" / "config.json").write_text(version)
        if version == "v1":
            (folder / "sub" / "only-in-v1.bin").write_bytes(b"v1")  # ours: goes when v1 is replaced
    return write

publish._stage = stage
publish.publish(root, {"adapter": writer("adapter", 2), "merged": writer("merged", 3)}, manifest={"step": int(version[1:])})
"""

STAGES = [
    "writing:adapter", "written:adapter", "writing:merged", "written:merged", "journal", "manifest-withdrawn",
    "moved-aside:adapter", "moved-in:adapter", "moved-aside:merged", "moved-in:merged", "manifest", "journal-removed",
]


def _load_publish():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "lightning_nf4" / "publish.py"
    spec = importlib.util.spec_from_file_location("publish_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, path


def _export_version(root, publish):
    """The version of every file of the complete export in ``root`` (they must all agree), via the manifest."""
    manifest = publish.read_export(root)
    versions = {(root / name / rel).read_bytes()[:2].decode() for name, part in manifest["parts"].items() for rel in part["files"]}
    assert len(versions) == 1, f"a mixed pair: {versions}"
    (version,) = versions
    assert manifest["step"] == int(version[1:])
    return version


@pytest.mark.parametrize("kill_at", STAGES)
def test_a_kill_at_any_stage_leaves_a_complete_pair_and_the_next_start_finishes(tmp_path, kill_at):
    """A real kill (os._exit in a child process) at each step of replacing export v1 by v2. Readers going by
    export.json see all of v1, all of v2, or no export (never a mix); the next start (recover) leaves exactly
    one complete pair: v2 once its journal was written, else v1. Nothing of the user's is lost."""
    import sys

    publish, path = _load_publish()
    root = tmp_path / "out"

    def run(version, kill="none"):
        return isolated.run([sys.executable, "-c", PUBLISH_KILL_SCRIPT, str(path), str(root), version, kill], timeout=60)

    assert run("v1").returncode == 0
    (root / "adapter" / "NOTES.md").write_text("mine")  # a user's files, in an export folder and beside them
    (root / "README.md").write_text("mine too")
    (root / ".hidden-of-mine").mkdir()
    assert _export_version(root, publish) == "v1"

    assert run("v2", kill_at).returncode == 9
    try:
        assert _export_version(root, publish) in ("v1", "v2")  # what a reader trusts now
    except publish.ExportIncompleteError:
        assert kill_at in ("manifest-withdrawn", "moved-aside:adapter", "moved-in:adapter", "moved-aside:merged", "moved-in:merged")

    publish.recover(root)  # what the next export or fit does first
    expected = "v2" if STAGES.index(kill_at) >= STAGES.index("journal") else "v1"
    assert _export_version(root, publish) == expected
    assert sorted(os.listdir(root)) == [".hidden-of-mine", "README.md", "adapter", "export.json", "merged"]
    assert (root / "adapter" / "NOTES.md").read_text() == "mine"
    assert sorted(os.listdir(root / "merged")) == ["merged-0.bin", "merged-1.bin", "merged-2.bin", "sub"]
    assert (root / "merged" / "sub" / "only-in-v1.bin").exists() == (expected == "v1")

    assert run("v3").returncode == 0  # and the next export replaces it cleanly
    assert _export_version(root, publish) == "v3" and (root / "adapter" / "NOTES.md").read_text() == "mine"


def test_export_of_a_trained_model_survives_failures_and_leftovers(tmp_path, monkeypatch):
    """The real export (adapter + merged of a trained LoRA model) as LoRACallback writes it at the end of fit:
    leftovers of killed runs are gone when the next fit starts (a user's hidden folder stays), a failure while
    writing leaves the previous pair in place, a failure during the swap is finished by the next start, and a
    user's file in adapter/ survives every re-export."""
    from safetensors.torch import load_file

    from lightning_nf4 import publish

    out = tmp_path / "out"
    callback = LoRACallback(r=4, alpha=8, dropout=0.0, save_dir=str(out))
    model = CausalLM(lr=1e-2)
    trainer(tmp_path, max_steps=2, plugins=NF4Precision(compute_dtype=torch.float32), callbacks=[callback]).fit(model, token_loader(n=8))
    first = publish.read_export(out)
    assert first["step"] == 2 and first["source"] == "fit" and sorted(first["parts"]) == ["adapter", "merged"]
    assert "adapter_model.safetensors" in first["parts"]["adapter"]["files"]
    (out / "adapter" / "NOTES.md").write_text("mine")

    stale = [out / ".merged.tmp-0123456789ab", out / ".adapter.old-0123456789ab"]  # a killed run's (8B: a float model each)
    for folder in stale:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x" * 1000)
    (out / ".export.json.tmp-0123456789ab").write_text("{")
    (out / ".cache-of-mine").mkdir()

    class SeesStart(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            self.left = sorted(p for p in os.listdir(out) if p.startswith("."))

    sees = SeesStart()
    model = CausalLM(lr=1e-2)
    trainer(tmp_path, max_steps=4, plugins=NF4Precision(compute_dtype=torch.float32), callbacks=[callback, sees]).fit(model, token_loader(n=8))
    assert sees.left == [".cache-of-mine"]  # removed when the fit started, before any training
    second = publish.read_export(out)
    assert second["step"] == 4 and (out / "adapter" / "NOTES.md").read_text() == "mine"
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")

    def fail_at(stage):
        def hook(name):
            if name == stage:
                raise RuntimeError(f"stopped at {stage}")
        monkeypatch.setattr(publish, "_stage", hook)

    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.add_(1.0)  # a different adapter, so an unfinished export would show
    fail_at("written:merged")  # the merged model is written, the swap has not begun
    with pytest.raises(RuntimeError, match="stopped at written:merged"):
        callback.save_export(model, out, info={"step": 5})
    assert publish.read_export(out)["step"] == 4
    assert all(torch.equal(v, adapter[k]) for k, v in load_file(out / "adapter" / "adapter_model.safetensors").items())
    assert sorted(p for p in os.listdir(out) if p.startswith(".")) == [".cache-of-mine"]  # nothing left behind

    fail_at("moved-in:adapter")  # new adapter in place, old merged still there: no manifest now
    with pytest.raises(RuntimeError, match="stopped at moved-in:adapter"):
        callback.save_export(model, out, info={"step": 5})
    with pytest.raises(publish.ExportIncompleteError, match="export.json is missing"):
        publish.read_export(out)
    monkeypatch.setattr(publish, "_stage", lambda name: None)
    publish.recover(out)  # the next start
    assert publish.read_export(out)["step"] == 5 and (out / "adapter" / "NOTES.md").read_text() == "mine"
    assert not any(torch.equal(v, adapter[k]) for k, v in load_file(out / "adapter" / "adapter_model.safetensors").items() if ".lora_B." in k)


@pytest.mark.parametrize("stop", [dict(max_steps=3), dict(max_epochs=2)])
def test_export_json_records_the_epoch_of_the_last_step_as_its_checkpoint_does(tmp_path, stop):
    """A fit stopped by ``max_steps`` inside epoch 0 exported ``epoch: 1`` (Lightning counts the epoch it stopped
    in as done by then) while its last checkpoint said 0; the export of that checkpoint then disagreed with fit's."""
    from lightning_nf4 import publish

    out, last = tmp_path / "out", pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    callback = LoRACallback(r=4, alpha=8, dropout=0.0, save_dir=str(out))
    kw = dict(stop, max_epochs=stop.get("max_epochs", 5))
    trainer(tmp_path, enable_checkpointing=True, plugins=NF4Precision(compute_dtype=torch.float32),
            callbacks=[callback, last], **kw).fit(CausalLM(lr=1e-2), token_loader(n=16))
    saved = torch.load(last.last_model_path, weights_only=True)
    assert publish.read_export(out)["epoch"] == saved["epoch"] == (0 if "max_steps" in stop else 1)


def test_merged_written_at_the_end_of_fit_is_a_complete_hf_folder(tmp_path, model_dir, monkeypatch):
    """Through the CLI: merged/ opens with AutoTokenizer and AutoModelForCausalLM, as the export subcommand's does,
    and export.json names the step and the files of both folders."""
    import sys

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_nf4 import publish
    from lightning_nf4.cli import main

    monkeypatch.setattr(sys, "argv", ["lightning-nf4"])
    main(["fit", "--config", str(cli_config(tmp_path, model_dir))])
    merged = tmp_path / "fit-out" / "merged"
    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    reference = AutoTokenizer.from_pretrained(str(model_dir))
    assert tokenizer("def add(a, b)")["input_ids"] == reference("def add(a, b)")["input_ids"]
    AutoModelForCausalLM.from_pretrained(str(merged))
    manifest = publish.read_export(tmp_path / "fit-out")
    assert manifest["step"] == 3 and "tokenizer.json" in manifest["parts"]["merged"]["files"]


def test_read_export_refuses_an_export_whose_listed_files_changed(tmp_path):
    """export.json lists each file with its size: a listed file removed, cut short or rewritten at another size
    makes read_export fail naming it; a file of the same size, or one the manifest does not list, is accepted."""
    publish, _ = _load_publish()

    def write(folder):
        (folder / "weights.bin").write_bytes(b"w" * 64)
        (folder / "config.json").write_text("{}")

    root = tmp_path / "out"
    publish.publish(root, {"adapter": write, "merged": write}, manifest={"step": 7})
    assert publish.read_export(root)["step"] == 7
    (root / "merged" / "NOTES.md").write_text("a user's file, not listed")
    (root / "adapter" / "config.json").write_text("[]")  # same size
    assert publish.read_export(root)["step"] == 7
    weights = root / "merged" / "weights.bin"
    for altered in (b"w" * 32, b"w" * 65, None):
        if altered is None:
            weights.unlink()
        else:
            weights.write_bytes(altered)
        with pytest.raises(publish.ExportIncompleteError, match="merged/weights.bin is missing or not the 64 bytes"):
            publish.read_export(root)


def test_publish_refuses_to_replace_what_is_not_its_own(tmp_path):
    publish, _ = _load_publish()
    write = lambda text: (lambda folder: (folder / "f.txt").write_text(text))  # noqa: E731
    (tmp_path / "a" / "adapter").parent.mkdir()
    (tmp_path / "a" / "adapter").write_text("a user's file named adapter")
    with pytest.raises(FileExistsError, match="adapter exists and is not a folder"):
        publish.publish(tmp_path / "a", {"adapter": write("x")}, manifest={})
    assert (tmp_path / "a" / "adapter").read_text() == "a user's file named adapter"
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "export.json").write_text('{"mine": true}')
    with pytest.raises(FileExistsError, match="export.json exists but was not written by lightning-nf4"):
        publish.publish(tmp_path / "b", {"adapter": write("x")}, manifest={})
    assert (tmp_path / "b" / "export.json").read_text() == '{"mine": true}' and sorted(os.listdir(tmp_path / "b")) == ["export.json"]

    publish.publish(tmp_path / "c", {"adapter": write("1"), "merged": write("1")}, manifest={"step": 1})
    publish.publish(tmp_path / "c", {"adapter": write("2")})  # one folder alone: the pair is no longer one
    with pytest.raises(publish.ExportIncompleteError):
        publish.read_export(tmp_path / "c")
    assert (tmp_path / "c" / "adapter" / "f.txt").read_text() == "2" and (tmp_path / "c" / "merged" / "f.txt").read_text() == "1"


def test_resume_on_another_number_of_devices_warns_and_trains_on(tmp_path):
    """A checkpoint from two ranks resumed on one: the generator states cannot be matched to ranks, so they are
    left alone, with a warning that says the continuation is not exact (training goes on)."""
    model = CausalLM(lr=1e-2)
    t = trainer(tmp_path, max_steps=2, plugins=NF4Precision(), callbacks=[LoRACallback(r=2, alpha=4)])
    t.fit(model, shuffled_tokens(n=8))
    t.save_checkpoint(tmp_path / "one.ckpt")
    checkpoint = torch.load(tmp_path / "one.ckpt", weights_only=True)
    states = checkpoint["lightning_nf4"]["rng"]["states"]
    checkpoint["lightning_nf4"]["rng"]["states"] = {k: torch.cat([v, v]) for k, v in states.items()}  # as two ranks write it
    torch.save(checkpoint, tmp_path / "two.ckpt")
    torch.manual_seed(99)
    with pytest.warns(UserWarning, match="random-number states of 2 process.*this run has 1"):
        trainer(tmp_path, max_steps=3, plugins=NF4Precision(), callbacks=[LoRACallback(r=2, alpha=4)]).fit(
            CausalLM(lr=1e-2), shuffled_tokens(n=8), ckpt_path=str(tmp_path / "two.ckpt"))


def test_resume_at_the_end_of_an_epoch_cut_short_by_limit_train_batches_starts_the_next_epoch_at_its_first_batch(tmp_path):
    """A checkpoint written after the last batch of an epoch that ``limit_train_batches`` ended early: the loader had
    handed out fewer batches than it holds, and the resumed run skipped that many of the next epoch."""
    import lightning.pytorch as pl
    from torch.utils.data import DistributedSampler, TensorDataset

    from lightning_nf4 import LoRACallback, NF4Precision
    from lightning_nf4.data import ResumableDataLoader
    from tests.lightning_models import tiny_llama

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model, self.seen = tiny_llama(), []

        def training_step(self, batch, batch_idx):
            (ids,) = batch
            self.seen.append((self.current_epoch, ids[:, 0].tolist()))
            return self.model(input_ids=ids, labels=ids).loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    class Data(pl.LightningDataModule):
        def train_dataloader(self):
            data = TensorDataset(torch.arange(40).unsqueeze(1) * 3 % 128 + torch.zeros(40, 8, dtype=torch.long))
            sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=0)
            return ResumableDataLoader(data, batch_size=2, sampler=sampler).follow(self.trainer)

    def fit(root, ckpt=None):
        pl.seed_everything(0)
        module = Module()
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, limit_train_batches=4, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, plugins=NF4Precision(compute_dtype=torch.float32),
                             callbacks=[LoRACallback(r=4, alpha=8, dropout=0.0, target_modules=["q_proj"]),
                                        pl.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=4, save_top_k=-1, filename="{epoch}")])
        trainer.fit(module, datamodule=Data(), ckpt_path=ckpt)
        return [batch for epoch, batch in module.seen if epoch == 1]

    uninterrupted = fit(tmp_path / "full")
    assert len(uninterrupted) == 4
    assert fit(tmp_path / "resumed", str(tmp_path / "full" / "epoch=0.ckpt")) == uninterrupted
