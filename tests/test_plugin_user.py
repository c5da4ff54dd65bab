"""What a Lightning user of the plugin and the callback meets outside the causal-LM path: buffers that training
changes, trained modules built in the compute dtype, whole-model checkpoints, shared layers, and settings that
would fail late or be read otherwise than PEFT and transformers read them. Small fits on the CPU."""

import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_nf4 import LoRACallback, NF4Linear, NF4Precision, load_from_checkpoint
from lightning_nf4.plugins.convert import convert_linears


def _data(n: int = 32, width: int = 32, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, width, generator=g), torch.randn(n, 1, generator=g)), batch_size=8)


def _trainer(**kwargs) -> pl.Trainer:
    options = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False)
    return pl.Trainer(**{**options, **kwargs})


class Net(pl.LightningModule):
    """A regressor with a BatchNorm and a buffer of its own, both changed by training."""

    def __init__(self, build_in_configure: bool = False, trained_norm: bool = False):
        super().__init__()
        self.build_in_configure = build_in_configure
        self.net = None
        if not build_in_configure:
            self._build()

    def _build(self) -> None:
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, 1))
        self.register_buffer("steps_seen", torch.zeros(()))

    def configure_model(self) -> None:
        if self.net is None:
            self._build()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.steps_seen += 1
        x, y = batch
        return nn.functional.mse_loss(self(x).float(), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val", nn.functional.mse_loss(self(x).float(), y))

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def test_adapter_only_checkpoints_keep_the_buffers_training_changes(tmp_path):
    """BatchNorm's running statistics and a module's own buffer change in training though no weight of theirs is
    trained; an adapter-only checkpoint that dropped them restored another model (another validation loss)."""
    model = Net()
    trainer = _trainer(max_epochs=2, enable_checkpointing=True, plugins=NF4Precision(compute_dtype=torch.float32),
                       callbacks=[LoRACallback(r=4, dropout=0.0), ModelCheckpoint(dirpath=tmp_path, save_last=True)])
    with pytest.warns(UserWarning, match="keep running statistics"):
        trainer.fit(model, _data())
    trained = trainer.validate(model, _data(seed=1), verbose=False)[0]["val"]
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert "net.1.running_var" in state and "steps_seen" in state and not any("base_layer.weight" in k for k in state)

    fresh = Net()
    result = _trainer(plugins=NF4Precision(compute_dtype=torch.float32), callbacks=[LoRACallback(r=4, dropout=0.0)]).validate(
        fresh, _data(seed=1), ckpt_path=tmp_path / "last.ckpt", verbose=False)
    assert fresh.steps_seen.item() == model.steps_seen.item() == 8
    assert torch.equal(fresh.net[1].running_var, model.net[1].running_var)
    assert result[0]["val"] == pytest.approx(trained, abs=1e-6)


@pytest.mark.parametrize("where", ["configure_model", "bf16-true"])
def test_trained_modules_are_kept_in_adapter_dtype(where):
    """A model built in ``configure_model`` is built in the compute dtype (bf16), and ``precision="bf16-true"`` casts
    the model after injection: the trained parameters (LoRA and ``modules_to_save``) must still be float32, or
    AdamW's small steps vanish (a bf16 LayerNorm weight did not move at all in 24 steps)."""
    model = Net(build_in_configure=where == "configure_model")
    kwargs = dict(precision="bf16-true") if where == "bf16-true" else dict(plugins=NF4Precision())
    trainer = _trainer(max_steps=3, **kwargs)
    trainer.callbacks.append(LoRACallback(r=4, dropout=0.0, modules_to_save=["net.2"]))
    before = None if where == "configure_model" else model.net[2].weight.detach().clone()
    trainer.fit(model, _data())
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any(".lora_" in n for n in trained) and any(n.startswith("net.2.") for n in trained)
    assert {p.dtype for p in trained.values()} == {torch.float32}
    if before is not None:
        assert not torch.equal(model.net[2].weight.detach().float(), before.float())


def test_a_weights_only_checkpoint_that_does_not_fit_is_refused(tmp_path):
    """Lightning skips callbacks' hooks for weights-only saves, so such a checkpoint holds the whole model and no
    adapter-only tag; loaded into a model with other LoRA targets it must fail, not load half."""
    trainer = _trainer(max_epochs=1, enable_checkpointing=True, plugins=NF4Precision(compute_dtype=torch.float32),
                       callbacks=[LoRACallback(r=4), ModelCheckpoint(dirpath=tmp_path, filename="w", save_weights_only=True)])
    trainer.fit(Net(), _data())
    assert any("base_layer.weight" in k for k in torch.load(tmp_path / "w.ckpt", weights_only=True)["state_dict"])
    same = _trainer(plugins=NF4Precision(compute_dtype=torch.float32), callbacks=[LoRACallback(r=4)])
    same.validate(Net(), _data(), ckpt_path=tmp_path / "w.ckpt", verbose=False)  # the same settings load
    other = _trainer(plugins=NF4Precision(compute_dtype=torch.float32), callbacks=[LoRACallback(r=4, target_modules=["net.0"])])
    with pytest.raises(RuntimeError, match="does not fit this model.*unexpected.*net.4.lora_A"):
        other.validate(Net(), _data(), ckpt_path=tmp_path / "w.ckpt", verbose=False)
    # without a Trainer: such a checkpoint records no settings, so they are asked for (the advice was Lightning's own
    # load_from_checkpoint, which cannot read its NF4 base), then it loads as the trained model
    with pytest.raises(ValueError, match=r"holds LoRA weights but no LoRACallback record.*Pass lora=LoRACallback"):
        load_from_checkpoint(Net, tmp_path / "w.ckpt")
    loaded = load_from_checkpoint(Net, tmp_path / "w.ckpt", lora=LoRACallback(r=4), precision=NF4Precision(compute_dtype=torch.float32))
    saved = torch.load(tmp_path / "w.ckpt", weights_only=True)["state_dict"]
    assert saved.keys() == loaded.state_dict().keys() and all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items())


def test_a_full_checkpoint_of_a_model_with_its_own_peft_adapters_resumes(tmp_path):
    """Adapters from the user's own ``get_peft_model``: the callback converts before Lightning restores, so a full
    checkpoint's NF4 keys meet NF4 layers (they met float ones, and the strict load failed)."""

    class Peft(Net):
        def _build(self):
            super()._build()
            self.net = get_peft_model(self.net, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "4"])).base_model.model

    def run(epochs, ckpt=None):
        model = Peft()
        trainer = _trainer(max_epochs=epochs, enable_checkpointing=True, plugins=NF4Precision(compute_dtype=torch.float32),
                           callbacks=[LoRACallback(r=4, alpha=8, full_checkpoint=True), ModelCheckpoint(dirpath=tmp_path, save_last=True)])
        trainer.fit(model, _data(), ckpt_path=ckpt)
        return model

    run(1)
    resumed = run(2, tmp_path / "last.ckpt")
    assert isinstance(resumed.net[0].base_layer, NF4Linear) and resumed.steps_seen.item() == 8


def test_a_layer_shared_by_two_parents_stays_one_layer():
    """One ``nn.Linear`` under two names is converted once and stays shared (it became two NF4 copies, each with
    adapters of its own); LoRA then applies under its first name only, as PEFT does, and says so."""

    class Shared(Net):
        def _build(self):
            super()._build()
            self.again = nn.Sequential(self.net[0])

    model = Shared()
    assert convert_linears(model, compute_dtype=torch.float32) == 2
    assert isinstance(model.net[0], NF4Linear) and model.again[0] is model.net[0]
    callback = LoRACallback(r=4)
    with pytest.warns(UserWarning, match="is the same layer as"):
        callback.inject(model)
    assert model.net[0].base_layer is model.again[0]


def test_skip_modules_given_as_one_name_is_that_name():
    """``skip_modules="head"`` was split into characters and matched nothing: the layer was quantized."""
    model = Net()
    model.head = nn.Linear(1, 1)
    NF4Precision(compute_dtype=torch.float32, skip_modules="head").convert_module(model)
    assert type(model.head) is nn.Linear and isinstance(model.net[0], NF4Linear)


@pytest.mark.parametrize("entry", ["out", "dropout", "default"])
def test_modules_to_save_that_peft_would_match_in_its_own_parts_is_refused(entry):
    """PEFT picks ``modules_to_save`` by a string suffix of every module name, its ``lora_dropout`` included, and then
    fails to load the adapter (a TypeError); refused at setup, before training."""
    model = Net()
    model.net.add_module(entry, nn.Linear(1, 1))
    with pytest.raises(ValueError, match="suffix of PEFT's own LoRA module names"):
        _trainer(max_steps=1, plugins=NF4Precision(skip_modules=("lm_head", entry)),
                 callbacks=[LoRACallback(r=4, modules_to_save=[entry])]).fit(model, _data())


def test_targets_that_are_not_linear_layers_are_refused():
    """PEFT puts LoRA on embeddings and convolutions; this callback does not, and ignored them silently."""

    class WithEmbedding(Net):
        def _build(self):
            super()._build()
            self.emb = nn.Embedding(10, 32)

    with pytest.raises(ValueError, match=r"also names \[\('emb', 'Embedding'\)\].*linear layers only"):
        LoRACallback(r=4, target_modules=["emb", "net.0"]).inject(WithEmbedding())


def test_a_peft_style_regex_target_gets_a_hint():
    with pytest.raises(ValueError, match=r"write 're:\.\*\\\.0'"):
        LoRACallback(r=4, target_modules=r".*\.0").inject(Net())


def test_an_unusable_save_dir_fails_before_training(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    model = Net()
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        _trainer(max_steps=5, plugins=NF4Precision(), callbacks=[LoRACallback(r=4, save_dir=str(tmp_path / "file" / "run"))]).fit(model, _data())
    assert model.steps_seen.item() == 0


def test_a_no_grad_call_with_the_wrong_width_gets_the_shape_error():
    """An input whose element count equals ``in_features`` but whose last dimension does not went down the 1-token
    path and failed in a reshape; it must fail as ``nn.Linear`` does."""
    layer = NF4Linear.from_linear(nn.Linear(64, 16), compute_dtype=torch.float32)
    with torch.no_grad(), pytest.raises(RuntimeError, match="cannot be multiplied"):
        layer(torch.randn(4, 16))


def test_an_adapter_checkpoint_that_trained_a_module_this_callback_freezes_is_refused(tmp_path):
    """A checkpoint of a run with ``modules_to_save=["net.2"]`` resumed or exported without it: its trained LayerNorm
    loaded into a frozen module, and the export's adapter (without it) and merged model (with it) disagreed."""
    trainer = _trainer(max_steps=2, enable_checkpointing=True, plugins=NF4Precision(compute_dtype=torch.float32),
                       callbacks=[LoRACallback(r=4, modules_to_save=["net.2"]), ModelCheckpoint(dirpath=tmp_path, save_last=True)])
    trainer.fit(Net(), _data())
    other = _trainer(plugins=NF4Precision(compute_dtype=torch.float32), callbacks=[LoRACallback(r=4)])
    with pytest.raises(RuntimeError, match=r"unexpected \['net.2.bias', 'net.2.weight'\].*modules_to_save"):
        other.validate(Net(), _data(), ckpt_path=tmp_path / "last.ckpt", verbose=False)


def test_a_damaged_checkpoint_is_refused_when_fit_resumes_from_it(tmp_path):
    """Lightning's own ``torch.load`` checks no checksum: a changed byte in a trained tensor resumed silently."""
    from tests.test_damaged_inputs import _flip_a_data_byte

    trainer = _trainer(max_steps=2, enable_checkpointing=True, plugins=NF4Precision(compute_dtype=torch.float32),
                       callbacks=[LoRACallback(r=4), ModelCheckpoint(dirpath=tmp_path, save_last=True)])
    trainer.fit(Net(), _data())
    _flip_a_data_byte(tmp_path / "last.ckpt")
    again = _trainer(max_steps=4, plugins=NF4Precision(compute_dtype=torch.float32), callbacks=[LoRACallback(r=4)])
    with pytest.raises(ValueError, match="does not match its checksum"):
        again.fit(Net(), _data(), ckpt_path=tmp_path / "last.ckpt")


@pytest.mark.parametrize("damage", ["manifest", "part"])
def test_an_export_folder_the_export_would_refuse_fails_before_training(tmp_path, damage):
    """A damaged ``export.json``, or a file where ``adapter/`` goes: the export at the end refused them, after training."""
    save = tmp_path / "save"
    save.mkdir()
    (save / ("export.json" if damage == "manifest" else "adapter")).write_text("{ damaged")
    model = Net()
    with pytest.raises(FileExistsError, match="export.json exists but was not written|is not a folder"):
        _trainer(max_steps=5, plugins=NF4Precision(), callbacks=[LoRACallback(r=4, save_dir=str(save))]).fit(model, _data())
    assert model.steps_seen.item() == 0


def test_resuming_inside_an_epoch_with_another_batch_size_is_said():
    """The loader's state is a count of batches; in batches of another size it skips or repeats samples, silently."""
    from torch.utils.data import DistributedSampler

    from lightning_nf4.data.resumable import ResumableDataLoader

    data = TensorDataset(torch.arange(48))
    before = ResumableDataLoader(data, batch_size=8, sampler=DistributedSampler(data, num_replicas=1, rank=0))
    iterator = iter(before)
    next(iterator), next(iterator)
    state = before.state_dict()
    same = ResumableDataLoader(data, batch_size=8, sampler=DistributedSampler(data, num_replicas=1, rank=0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.load_state_dict(state)
    assert [b[0][0].item() for b in same] == [b[0][0].item() for b in before][2:]  # the same batches, from the third
    other = ResumableDataLoader(data, batch_size=16, sampler=DistributedSampler(data, num_replicas=1, rank=0))
    with pytest.warns(UserWarning, match=r"another batch_size \(8 -> 16\).*skips or repeats samples"):
        other.load_state_dict(state)


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_a_whole_model_cast_does_not_round_restored_or_trained_adapters(tmp_path, precision):
    """Lightning's true half precisions cast the whole model after a checkpoint is restored: the float32 adapters were
    rounded to bf16/fp16 and cast back, so a resumed run drifted from the uninterrupted one (3e-3 here), and every
    ``validate`` after fit rounded the trained adapters again."""
    from tests.lightning_models import CausalLM, token_loader
    from tests.test_reliability import _assert_same, _trainable

    class Validated(CausalLM):
        def validation_step(self, batch, batch_idx):
            self.log("val_loss", self.model(input_ids=batch[0], labels=batch[0]).loss)

    def run(max_epochs, ckpt_path=None, save=False):
        pl.seed_everything(0)
        model = Validated(lr=1e-2)
        callbacks = [LoRACallback(r=4, alpha=8, dropout=0.0)]
        if save:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True))
        trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                             max_epochs=max_epochs, precision=precision, callbacks=callbacks, enable_checkpointing=save,
                             default_root_dir=str(tmp_path))
        trainer.fit(model, token_loader(n=8), ckpt_path=ckpt_path)
        return trainer, model

    trainer, model = run(4)
    straight = _trainable(model)
    assert all(p.dtype == torch.float32 for p in straight.values())
    trainer.validate(model, token_loader(n=4), verbose=False)
    _assert_same(straight, _trainable(model))  # validate casts the model again, and leaves the adapters as they were
    run(2, save=True)
    _assert_same(straight, _trainable(run(4, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))[1]))


@pytest.mark.parametrize("ema_first", [True, False])
def test_lightnings_weight_averaging_is_refused_before_anything_changes(tmp_path, ema_first):
    """``EMAWeightAveraging`` averaged the NF4 codes as numbers (322 of 1024 bytes of a layer changed in 6 steps),
    wrote the whole averaged model into adapter-only checkpoints (which then could not be loaded) and, listed first,
    copied the float model before the conversion (a bare size-mismatch error at the first update)."""
    from lightning.pytorch.callbacks import EMAWeightAveraging

    from tests.lightning_models import CausalLM, token_loader

    model = CausalLM()
    callbacks = [LoRACallback(r=4, alpha=8), EMAWeightAveraging(decay=0.9)]
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, max_steps=2, default_root_dir=str(tmp_path), plugins=NF4Precision(),
                         callbacks=callbacks[::-1] if ema_first else callbacks)
    with pytest.raises(ValueError, match="EMAWeightAveraging averages every parameter.*does not work with LoRACallback"):
        trainer.fit(model, token_loader(n=8))
    assert not any(isinstance(m, NF4Linear) for m in model.modules())  # refused before the conversion


class Encoder(pl.LightningModule):
    """A model on torch's own ``nn.TransformerEncoderLayer`` (batch_first: its eval fast path applies)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(32, 64), nn.Unflatten(1, (4, 16)),
                                 nn.TransformerEncoderLayer(16, 2, dim_feedforward=64, dropout=0.0, batch_first=True),
                                 nn.Flatten(), nn.Linear(64, 1))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.mse_loss(self(batch[0]).float(), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.mse_loss(self(batch[0]).float(), batch[1]))

    def predict_step(self, batch, batch_idx):
        return self(batch[0]).float()

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=0.05)


@pytest.mark.parametrize("nf4", [True, False])
def test_torch_transformer_layers_run_their_nf4_and_lora_layers_in_eval(nf4):
    """In eval without grad, torch's encoder-layer fast path reads ``linear1.weight`` itself: the packed codes (fit failed
    in its sanity validation with a dtype error) or the base weight without the adapter (predictions of another model).
    ``out_proj`` took LoRA that never applied (nn.MultiheadAttention reads its weight): ``all-linear`` now leaves it."""
    model = Encoder()
    # float32 compute: autocast (which turns the fast path off by itself) stays off
    trainer = _trainer(max_epochs=3, plugins=NF4Precision(compute_dtype=torch.float32) if nf4 else None,
                       callbacks=[LoRACallback(r=4, alpha=8, dropout=0.0)])
    trainer.fit(model, _data(), _data(seed=1))  # with a sanity validation in eval mode
    layer = model.net[2]
    assert not hasattr(layer.self_attn.out_proj, "lora_A") and layer.linear1.lora_B["default"].weight.abs().max() > 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 1.0)  # adapters that matter, so that skipping them shows
    predicted = torch.cat(trainer.predict(model, _data()))
    assert torch.backends.mha.get_fastpath_enabled()  # put back after each call
    model.train()  # the training path calls every layer
    with torch.no_grad():
        called = torch.cat([model(x).float() for x, _ in _data()])
    torch.testing.assert_close(predicted, called, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"out_proj of nn.MultiheadAttention, which reads its weight directly"):
        LoRACallback(target_modules=["out_proj"]).inject(Encoder())


class BuiltLater(pl.LightningModule):
    """Linears, a norm and a head built in ``configure_model``, in float32 whatever the default dtype."""

    def configure_model(self):
        if hasattr(self, "net"):
            return
        torch.manual_seed(0)
        f32 = dict(dtype=torch.float32)
        self.net = nn.Sequential(nn.Linear(32, 64, **f32), nn.ReLU(), nn.LayerNorm(64, **f32), nn.Linear(64, 1, **f32))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.mse_loss(self(batch[0]).float(), batch[1])

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)


def test_a_whole_model_cast_still_casts_a_model_built_in_configure_model():
    """Keeping trained weights through the cast must not keep a model that has no adapters yet (built in
    configure_model, injected after the cast): all its parameters require grad then, and bf16-true left them float32."""
    model = BuiltLater()
    _trainer(max_steps=2, precision="bf16-true", callbacks=[LoRACallback(r=4, alpha=8, dropout=0.0)]).fit(model, _data())
    frozen = {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and set(frozen.values()) == {torch.bfloat16}, frozen
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


def test_a_strategy_restoring_after_setup_still_refuses_a_full_checkpoint_that_does_not_fit(tmp_path):
    """FSDP-like strategies restore after the conversion, when the callback's restore check is gone: a full
    checkpoint missing this model's keys must still fail (Lightning's strict load), not load in part."""
    from lightning.pytorch.strategies import SingleDeviceStrategy

    class RestoresAfterSetup(SingleDeviceStrategy):
        @property
        def restore_checkpoint_after_setup(self) -> bool:
            return True

    class Extra(Net):
        def __init__(self):
            super().__init__()
            self.head2 = nn.Linear(4, 4)

    def trainer(**kw):
        return _trainer(strategy=RestoresAfterSetup(device=torch.device("cpu")), default_root_dir=str(tmp_path), **kw)

    last = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(max_steps=2, enable_checkpointing=True, callbacks=[LoRACallback(r=4, alpha=8, full_checkpoint=True), last]).fit(Net(), _data())
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"head2"):
        trainer(callbacks=[LoRACallback(r=4, alpha=8, full_checkpoint=True)]).validate(Extra(), _data(), ckpt_path=last.last_model_path)
