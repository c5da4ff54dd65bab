"""What a CLI and export user meets around a run: the merged model's recorded dtype, checkpoints from another
alpha, smoke runs, a base model that moved, the plugin's settings under ``CausalLMModule``, and export folders
that held other files before. In-process runs on a tiny random Llama, as in ``test_cli``."""

import json
import shutil
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from safetensors.torch import save_file

from lightning_nf4 import NF4Precision, publish
from lightning_nf4.checkpoint_io import check_checkpoint
from lightning_nf4.cli import _with_default_config, main
from lightning_nf4.data.text import TextDataModule
from lightning_nf4.loading.checkpoint import checkpoint_files
from lightning_nf4.models.causal_lm import CausalLMModule
from tests.test_cli import SENTENCES, save_tiny_llama, write_config


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-nf4"])


def _config(tmp_path: Path, base: Path, model: dict = {}, **lora) -> Path:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"{s} {t}" for s in SENTENCES for t in SENTENCES))
    data = {"class_path": "lightning_nf4.data.TextDataModule", "init_args": {"source": str(corpus), "block_size": 16, "batch_size": 4}}
    config = write_config(tmp_path, base, data, **model)
    saved = yaml.safe_load(config.read_text())
    saved["trainer"]["callbacks"][0]["init_args"].update(lora)
    saved["trainer"]["callbacks"].append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                          "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True}})
    config.write_text(yaml.safe_dump(saved))
    return config


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> tuple[Path, Path]:
    """One fit with gradient checkpointing (which turns the KV cache off) whose merged model is written in float32,
    from a base model in its own folder: (config, base)."""
    tmp_path = tmp_path_factory.mktemp("fitted")
    base = save_tiny_llama(tmp_path / "base")
    config = _config(tmp_path, base, model={"gradient_checkpointing": True}, merged_dtype="float32")
    main(["fit", "--config", str(config)])
    return config, base


def test_the_merged_model_records_the_dtype_it_is_written_in(fitted):
    """``merged_dtype=float32`` wrote float32 tensors under a config that said bfloat16, so transformers loaded them
    in bf16; and the training run's ``use_cache: false`` went into the inference model."""
    from transformers import AutoModelForCausalLM

    merged = fitted[0].parent / "fit-out" / "merged"
    config = json.loads((merged / "config.json").read_text())
    assert config["dtype"] == "float32" and config["use_cache"] is True
    assert AutoModelForCausalLM.from_pretrained(merged).dtype == torch.float32


def test_a_checkpoint_of_another_alpha_is_refused(fitted, tmp_path):
    """Same shapes, another scaling: the export (and a resume) took the checkpoint with the callback's alpha silently."""
    config, _ = fitted
    other = yaml.safe_load(config.read_text())
    other["trainer"]["callbacks"][0]["init_args"]["alpha"] = 32
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    with pytest.raises(ValueError, match=r"trained with r=4, alpha=8.*give LoRACallback\(r=4, alpha=8"):
        main(["export", "--config", str(tmp_path / "other.yaml"), "--ckpt_path", str(config.parent / "ckpt" / "last.ckpt"),
              "--out_dir", str(tmp_path / "out")])


def test_a_fast_dev_run_leaves_the_export_alone(fitted):
    config, _ = fitted
    manifest = config.parent / "fit-out" / "export.json"
    before = manifest.read_text()
    main(["fit", "--config", str(config), "--trainer.fast_dev_run", "true"])
    assert manifest.read_text() == before


def test_export_finds_a_base_model_that_moved(tmp_path):
    """The checkpoint's hyperparameters name the base model's old folder and LightningCLI puts them over the command
    line: the new folder given there was replaced by the old one, which no longer exists."""
    base = save_tiny_llama(tmp_path / "base")
    config = _config(tmp_path, base)
    main(["fit", "--config", str(config)])
    base.rename(tmp_path / "moved")
    with pytest.warns(UserWarning, match="names the base model .* which is not there"):
        main(["export", "--config", str(config), "--model.model_name_or_path", str(tmp_path / "moved"),
              "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"), "--out_dir", str(tmp_path / "export")])
    assert publish.read_export(tmp_path / "export")["step"] == 3


def test_fit_without_lora_is_refused(tmp_path):
    """Without LoRACallback the loader's float parts (embeddings, norms, lm_head) trained in full, silently."""
    base = save_tiny_llama(tmp_path / "base")
    config = _config(tmp_path, base)
    saved = yaml.safe_load(config.read_text())
    saved["trainer"]["callbacks"] = saved["trainer"]["callbacks"][1:]
    config.write_text(yaml.safe_dump(saved))
    with pytest.raises(RuntimeError, match="trains LoRA adapters and the model has none"):
        main(["fit", "--config", str(config)])


@pytest.mark.parametrize("form", [["-c", "x.yaml"], ["-c=x.yaml"], ["-cx.yaml"], ["--config", "x.yaml"], ["--config=x.yaml"]])
def test_every_form_of_the_config_option_keeps_the_default_config_out(form):
    assert _with_default_config(["fit", *form]) == ["fit", *form]


def test_the_plugin_settings_reach_the_loader(tmp_path):
    """``CausalLMModule``'s loader quantizes, so NF4Precision's later conversion found nothing: its ``skip_modules``
    were ignored (the advice to skip a module for modules_to_save did not work), and another ``double_quant`` too."""
    from lightning_nf4 import NF4Linear

    base = save_tiny_llama(tmp_path / "base")
    module = CausalLMModule(str(base))
    module._trainer = pl.Trainer(accelerator="cpu", logger=False, plugins=NF4Precision(skip_modules=("lm_head", "down_proj")))
    module.configure_model()
    assert type(module.model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert isinstance(module.model.model.layers[0].mlp.up_proj, NF4Linear)
    other = CausalLMModule(str(base))
    other._trainer = pl.Trainer(accelerator="cpu", logger=False, plugins=NF4Precision(double_quant=False))
    with pytest.raises(ValueError, match="double_quant=False.*Set both alike"):
        other.configure_model()


def test_a_block_size_beyond_the_model_s_positions_is_said(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    module = CausalLMModule("a folder")
    module.model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                num_attention_heads=2, max_position_embeddings=8))
    with pytest.warns(UserWarning, match="block_size=16 is longer than the 8 positions"):
        module._check_context(TextDataModule(source="x", block_size=16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module._check_context(TextDataModule(source="x", block_size=8))


def test_an_adapter_file_given_as_checkpoint_is_named_as_such(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="is a safetensors file .* not a Lightning checkpoint"):
        check_checkpoint(tmp_path / "adapter_model.safetensors")


def test_a_re_export_carries_no_stale_weights_and_withdraws_a_part_it_no_longer_writes(tmp_path):
    """A re-sharded copy of the old model left in ``merged/`` came into the new ``merged/`` (loaders then picked either
    model); an export without ``merged/`` left the old one beside the new adapter. Files of the user's stay."""

    def writer(tag):
        def write(folder):
            (folder / "model.safetensors").write_text(tag)
        return write

    root = tmp_path / "out"
    publish.publish(root, {"adapter": writer("a1"), "merged": writer("m1")}, manifest={"step": 1})
    for stale in ("model-00001-of-00002.safetensors", "model.safetensors.index.json"):
        (root / "merged" / stale).write_text("old")
    (root / "merged" / "NOTES.md").write_text("mine")
    publish.publish(root, {"adapter": writer("a2"), "merged": writer("m2")}, manifest={"step": 2})
    assert sorted(p.name for p in (root / "merged").iterdir()) == ["NOTES.md", "model.safetensors"]
    publish.publish(root, {"adapter": writer("a3")}, manifest={"step": 3})
    assert sorted(p.name for p in (root / "merged").iterdir()) == ["NOTES.md"]  # the old model went, the note stayed
    assert list(publish.read_export(root)["parts"]) == ["adapter"]
    shutil.rmtree(root / "merged")
    publish.publish(root, {"adapter": writer("a4")}, manifest={"step": 4})
    assert not (root / "merged").exists()


def test_a_single_weight_file_wins_over_a_stale_index_as_in_transformers(tmp_path):
    """transformers reads ``model.safetensors`` before an index; a folder saved sharded, then whole, keeps the old
    index (transformers removes the shards, not the index), which this loader read first and refused."""
    save_file({"w": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-00001-of-00002.safetensors"}}))
    assert checkpoint_files(tmp_path) == [tmp_path / "model.safetensors"]


def test_export_of_a_full_checkpoint_with_another_alpha_is_refused(tmp_path):
    """The export loaded a full checkpoint strictly and never compared its r and alpha: same shapes, another scaling."""
    base = save_tiny_llama(tmp_path / "base")
    config = _config(tmp_path, base, full_checkpoint=True)
    main(["fit", "--config", str(config)])
    other = yaml.safe_load(config.read_text())
    other["trainer"]["callbacks"][0]["init_args"]["alpha"] = 32
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    with pytest.raises(ValueError, match=r"trained with r=4, alpha=8"):
        main(["export", "--config", str(tmp_path / "other.yaml"), "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"),
              "--out_dir", str(tmp_path / "out")])


@pytest.mark.timeout(660)  # two subprocesses, each stopped at 300 s
def test_predict_under_ddp_prints_every_prompt_once_in_order(fitted):
    """Lightning deals the prompts out to the processes; only the first process's share was printed, renumbered
    from 0. Two gloo processes must print what one does. Subprocesses with timeouts (DDP re-runs the module)."""
    from tests import isolated

    config, _ = fitted
    command = [sys.executable, "-m", "lightning_nf4.cli", "predict", "--config", str(config),
               "--ckpt_path", str(config.parent / "ckpt" / "last.ckpt"), "--trainer.max_steps", "-1",
               "--data.predict_prompts", json.dumps(["The quick", "A lazy", "Over the", "The dog", "Brown"])]
    lines = {}
    for name, extra in (("one", []), ("ddp", ["--trainer.strategy", "ddp", "--trainer.devices", "2"])):
        done = isolated.run([*command, *extra], capture_output=True, text=True, timeout=300, cwd=config.parent)
        assert done.returncode == 0, done.stderr[-3000:]
        lines[name] = [line for line in done.stdout.splitlines() if line.startswith("prediction ")]
    assert len(lines["one"]) > 2 and lines["ddp"] == lines["one"]


def sentencepiece_style_tokenizer():
    """A Llama-2/Mistral-style tokenizer (Metaspace, a word boundary put before the first word of a text), small."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.test_cli import SENTENCES

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(SENTENCES * 4, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _instruction_module(tmp_path, records, tokenizer=None, **kwargs):
    from lightning_nf4.data.instruction import InstructionDataModule
    from tests.test_cli import tiny_tokenizer

    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    module = InstructionDataModule(str(path), prompt_template="Q: {instruction}\n{input}\nA:", prompt_template_no_input="Q: {instruction}\nA:\n", **kwargs)
    module.tokenizer = tokenizer or tiny_tokenizer()
    return module


@pytest.mark.parametrize("output", [" The fox.", "The fox.", "  indented", "\n\nTwo lines"])
def test_an_instruction_example_is_the_whole_text_tokenized_at_once(tmp_path, output):
    """The response was tokenized on its own and appended: with a SentencePiece-style tokenizer every response then
    began with a word-boundary token the whole text does not have after the prompt, ids the model never sees there."""
    tokenizer = sentencepiece_style_tokenizer()
    module = _instruction_module(tmp_path, [{"instruction": "Name it.", "output": output}], tokenizer=tokenizer)
    record = {"instruction": "Name it.", "input": "", "output": output}
    prompt, response = module.prompt_and_response(record)
    example = module.encode(record)
    whole = tokenizer(prompt + response)["input_ids"]
    prompt_ids = tokenizer(prompt)["input_ids"]
    assert example["input_ids"] == whole and whole[: len(prompt_ids)] == prompt_ids  # no token spans the boundary here
    assert example["labels"] == [-100] * len(prompt_ids) + whole[len(prompt_ids):]  # the prompt masked, the rest learnt


def test_instruction_records_held_out_are_not_trained_on(tmp_path):
    records = [{"instruction": f"Task {i % 4}.", "output": f"Answer {i % 4}."} for i in range(12)]  # each record thrice
    module = _instruction_module(tmp_path, records, val_fraction=0.25)
    module.setup("fit")
    held = {tuple(r.values()) for r in module.val_records}
    assert held and len(module.val_set) == len(held)
    trained = {module.tokenizer.decode(e["input_ids"]) for e in module.train_set}
    assert not any(module.tokenizer.decode(module.encode(r)["input_ids"]) in trained for r in module.val_records)
    assert len(module.train_set) == 12 - 3 * len(held)  # the copies of trained records all stay


def test_instruction_settings_and_files_that_cannot_work_are_named(tmp_path):
    from lightning_nf4.data.instruction import InstructionDataError

    records = [{"instruction": "A.", "output": "B."}, {"instruction": "C.", "output": "D."}]
    for fraction in (0.0, 1.0, -3):
        with pytest.raises(InstructionDataError, match="val_fraction must be in"):
            _instruction_module(tmp_path, records, val_fraction=fraction)
    module = _instruction_module(tmp_path, records)
    (tmp_path / "train.jsonl").write_bytes('{"instruction": "caf\xe9", "output": "x"}\n'.encode("latin-1"))
    with pytest.raises(InstructionDataError, match="train.jsonl is not UTF-8 text"):
        module.setup("fit")
    odd = _instruction_module(tmp_path, records)
    odd.prompt_template_no_input = "Question: {question}\n"
    with pytest.raises(InstructionDataError, match="names 'question'.*\\{instruction\\}"):
        odd.encode({"instruction": "A.", "input": "", "output": "B."})


def test_generate_runs_in_eval_mode_whatever_the_module_s_mode(tmp_path):
    """``build`` leaves the model training (as Lightning wants it), so a direct ``generate`` ran with LoRA dropout on:
    another continuation at every call. It now generates in eval mode and puts the mode back."""
    from lightning_nf4 import LoRACallback

    module = CausalLMModule(str(save_tiny_llama(tmp_path / "base")), max_new_tokens=6, compute_dtype="float32")
    module.build()
    LoRACallback(r=4, dropout=0.9).inject(module)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 2.0)  # trained adapters, so that dropping their input changes the output
    module.train()
    first = module.generate(["The quick brown", "A lazy dog"])
    assert all(module.generate(["The quick brown", "A lazy dog"]) == first for _ in range(3))
    assert module.training and module.model.training
    module.eval()
    assert module.generate(["The quick brown", "A lazy dog"]) == first


def test_generation_prompts_of_instruction_data_are_put_in_its_template(tmp_path, capsys):
    """With ``InstructionDataModule`` the model learns to answer prompts in the data's template; fit's
    ``generation_prompts`` went to it as raw text, so the printed continuations showed a model it was never trained as."""
    from tests.test_cli import RECORDS

    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    data = {"class_path": "lightning_nf4.data.InstructionDataModule",
            "init_args": {"train_file": str(jsonl), "batch_size": 2, "val_fraction": 0.34, "max_length": 96,
                          "prompt_template": "Q: {instruction}\n{input}\nA: ", "prompt_template_no_input": "Q: {instruction}\nA: "}}
    config = write_config(tmp_path, save_tiny_llama(tmp_path / "base"), data, generation_prompts=["Name a fruit."], max_new_tokens=6)
    cli = main(["fit", "--config", str(config), "--trainer.max_steps", "2"])
    printed = capsys.readouterr().out
    batch = cli.datamodule.generation_batch(["Name a fruit."])
    assert cli.datamodule.tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True) == "Q: Name a fruit.\nA: "
    templated, raw = cli.model.generate(batch)[0], cli.model.generate(["Name a fruit."])[0]
    assert templated != raw  # so the printed line tells the two apart
    assert f"generation: 'Name a fruit.' -> {templated!r}" in printed
