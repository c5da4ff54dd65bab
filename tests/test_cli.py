"""The ``lightning-nf4`` CLI in-process on a tiny random Llama: fit (text and instruction data), export,
predict, the shipped YAML configs, and the instruction data's errors and label masking."""

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_nf4.cli import DEFAULT_CONFIG, NF4CLI, _with_default_config, main
from lightning_nf4.data.instruction import IGNORE_INDEX, InstructionDataError, InstructionDataModule, pad_collate, read_jsonl
from lightning_nf4.models.causal_lm import CausalLMModule
from tests import isolated

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Python lists keep their items in order.",
    "def add(a, b): return a + b",
    "A dictionary maps keys to values.",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)
RECORDS = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Name a fruit.", "output": "An apple."},
    {"instruction": "Reverse the word.", "input": "dog", "output": "god"},
    {"instruction": "Say hello.", "output": "Hello!"},
    {"instruction": "Count to three.", "output": "1, 2, 3"},
    {"instruction": "Name a colour.", "output": "Blue."},
]


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def save_tiny_llama(path: Path) -> Path:
    """A tiny random Llama with its tokenizer, saved as a Hugging Face folder at ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def write_config(tmp_path: Path, model_dir: Path, data: dict, **model) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": 3, "num_sanity_val_steps": 0, "logger": False,
            "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(tmp_path / "run"),
            "plugins": {"class_path": "lightning_nf4.NF4Precision", "init_args": {"compute_dtype": "bfloat16"}},
            "callbacks": [{"class_path": "lightning_nf4.LoRACallback",
                           "init_args": {"r": 4, "alpha": 8, "dropout": 0.0, "save_dir": str(tmp_path / "fit-out")}}],
        },
        "model": {"model_name_or_path": str(model_dir), "learning_rate": 1e-2, "warmup_steps": 2, "max_new_tokens": 4, **model},
        "data": data,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def perplexities(out: str) -> tuple[float, float]:
    before = re.search(r"perplexity before: ([0-9.]+)", out)
    after = re.search(r"perplexity after: ([0-9.]+)", out)
    assert before and after, out
    return float(before.group(1)), float(after.group(1))


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-nf4"])  # pytest's own arguments would make LightningCLI warn


def test_fit_text_writes_artifacts_and_export_matches(tmp_path, model_dir, capsys):
    from safetensors.torch import load_file

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"{s} {t}" for s in SENTENCES for t in SENTENCES))
    data = {"class_path": "lightning_nf4.data.TextDataModule",
            "init_args": {"source": str(corpus), "block_size": 16, "batch_size": 4, "val_fraction": 0.25}}
    config = write_config(tmp_path, model_dir, data, generation_prompts=["The quick"])
    saved = yaml.safe_load(config.read_text())  # a layer kept in float: the export must build the base as fit did
    saved["trainer"]["plugins"]["init_args"]["skip_modules"] = ["lm_head", "down_proj"]
    config.write_text(yaml.safe_dump(saved))

    main(["fit", "--config", str(config)])
    out = capsys.readouterr().out
    before, after = perplexities(out)
    assert math.isfinite(before) and math.isfinite(after)
    assert "generation: 'The quick' ->" in out
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "merged/config.json"):
        assert (tmp_path / "fit-out" / name).is_file(), name

    (ckpt,) = (tmp_path / "run").rglob("*.ckpt")
    assert not any("base_layer" in k for k in torch.load(ckpt, weights_only=False)["state_dict"])  # adapter-only
    main(["export", "--config", str(config), "--ckpt_path", str(ckpt), "--out_dir", str(tmp_path / "export")])
    exported = load_file(tmp_path / "export" / "adapter" / "adapter_model.safetensors")
    at_fit_end = load_file(tmp_path / "fit-out" / "adapter" / "adapter_model.safetensors")
    assert exported.keys() == at_fit_end.keys()
    assert all(torch.equal(exported[k], at_fit_end[k]) for k in exported)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in exported.items())  # trained, not initial
    assert (tmp_path / "export" / "merged" / "tokenizer.json").is_file()
    merged, merged_at_fit_end = (load_file(root / "merged" / "model.safetensors") for root in (tmp_path / "export", tmp_path / "fit-out"))
    assert merged.keys() == merged_at_fit_end.keys() and all(torch.equal(merged[k], merged_at_fit_end[k]) for k in merged)


def test_a_model_folder_without_a_tokenizer_is_named_and_tokenizer_name_or_path_supplies_one(tmp_path, model_dir, capsys):
    """A model saved without its tokenizer: fit stops before loading anything, naming the folder and the option; with
    ``model.tokenizer_name_or_path`` it trains, its data module tokenizes with the same tokenizer, and the merged
    export carries it."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for file in model_dir.iterdir():
        if file.name.startswith(("model", "config", "generation_config")):
            (bare / file.name).write_bytes(file.read_bytes())
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"{s} {t}" for s in SENTENCES for t in SENTENCES))
    data = {"class_path": "lightning_nf4.data.TextDataModule",
            "init_args": {"source": str(corpus), "block_size": 16, "batch_size": 4, "val_fraction": 0.25}}
    config = write_config(tmp_path, bare, data)
    with pytest.raises(FileNotFoundError, match=rf"No tokenizer in {re.escape(str(bare))} .*--model.tokenizer_name_or_path"):
        main(["fit", "--config", str(config)])
    config = write_config(tmp_path, bare, data, tokenizer_name_or_path=str(model_dir))
    main(["fit", "--config", str(config)])
    before, after = perplexities(capsys.readouterr().out)
    assert math.isfinite(before) and after < before
    assert (tmp_path / "fit-out" / "merged" / "tokenizer.json").is_file()


def test_export_takes_last_as_fit_does(tmp_path, model_dir, capsys):
    """``export --ckpt_path last`` finds the newest last checkpoint of the config's ModelCheckpoint, as fit and validate
    do (it failed: 'checkpoint last does not exist'); other Lightning names say what to pass instead."""
    from safetensors.torch import load_file

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"{s} {t}" for s in SENTENCES for t in SENTENCES))
    data = {"class_path": "lightning_nf4.data.TextDataModule", "init_args": {"source": str(corpus), "block_size": 16, "batch_size": 4}}
    config = write_config(tmp_path, model_dir, data)
    saved = yaml.safe_load(config.read_text())
    saved["trainer"]["callbacks"].append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                          "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True}})
    config.write_text(yaml.safe_dump(saved))
    with pytest.raises(FileNotFoundError, match="no last checkpoint.*save_last=True"):
        main(["export", "--config", str(config), "--ckpt_path", "last", "--out_dir", str(tmp_path / "none")])
    main(["fit", "--config", str(config)])
    main(["export", "--config", str(config), "--ckpt_path", "last", "--out_dir", str(tmp_path / "from-last")])
    main(["export", "--config", str(config), "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"), "--out_dir", str(tmp_path / "from-file")])
    a = load_file(tmp_path / "from-last" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "from-file" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "last.ckpt" in json.loads((tmp_path / "from-last" / "export.json").read_text())["source"]
    with pytest.raises(ValueError, match="'best': Lightning resolves that name only inside fit"):
        main(["export", "--config", str(config), "--ckpt_path", "best", "--out_dir", str(tmp_path / "best")])


_PERPLEXITY_RUN = """
import sys, torch, lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset
from lightning_nf4 import NF4Precision, LoRACallback
from lightning_nf4.models.causal_lm import CausalLMModule

class Blocks(Dataset):
    ids = torch.randint(3, 200, (6, 16), generator=torch.Generator().manual_seed(0))
    def __len__(self):
        return len(self.ids)
    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i], "attention_mask": torch.ones(16, dtype=torch.long)}

devices = int(sys.argv[2])
module = CausalLMModule(sys.argv[1], compute_dtype="float32", loss="plain")
trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     plugins=NF4Precision(compute_dtype=torch.float32), callbacks=[LoRACallback(r=4, alpha=8, dropout=0.0)])
trainer.fit(module, DataLoader(Blocks(), batch_size=2), DataLoader(Blocks(), batch_size=2))
print(f"rank {trainer.global_rank} after fit: {module.held_out_perplexity()}", flush=True)
"""


@pytest.mark.timeout(400)  # two runs, each stopped at 180 s
def test_the_held_out_perplexity_covers_the_whole_set_under_ddp(tmp_path, model_dir):
    """Validation loaders given to fit get Lightning's DistributedSampler under DDP: each rank computed the perplexity
    of its own half (rank 0's was printed), and the ranks disagreed. Subprocesses with timeouts (DDP re-runs the script)."""
    from tests import isolated

    script = tmp_path / "perplexity_run.py"
    script.write_text(_PERPLEXITY_RUN)
    out = {}
    for devices in (1, 2):
        done = isolated.run([sys.executable, str(script), str(model_dir), str(devices)], capture_output=True, text=True,
                            timeout=180, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        out[devices] = done.stdout
    before = {devices: re.search(r"perplexity before: ([0-9.]+) \(held-out, (\d+) tokens", text).groups() for devices, text in out.items()}
    assert before[2] == before[1] and int(before[1][1]) == 6 * 15  # the base model over every block, in both
    after = dict(re.findall(r"rank (\d) after fit: (\([^)]*\))", out[2]))  # the ranks' lines may run together
    assert sorted(after) == ["0", "1"] and after["0"] == after["1"], out[2]  # the same value on every rank
    assert after["0"].endswith(", 90)"), after


def test_fit_instruction_then_predict(tmp_path, model_dir, capsys):
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    data = {"class_path": "lightning_nf4.data.InstructionDataModule",
            "init_args": {"train_file": str(jsonl), "batch_size": 2, "val_fraction": 0.34, "max_length": 96,
                          "prompt_template": "Q: {instruction}\n{input}\nA: ", "prompt_template_no_input": "Q: {instruction}\nA: "}}
    config = write_config(tmp_path, model_dir, data)

    main(["fit", "--config", str(config), "--trainer.max_steps", "2"])
    before, after = perplexities(capsys.readouterr().out)
    assert 1.0 < after < before < math.inf, (before, after)  # two steps at lr 1e-2 lower the held-out perplexity
    (ckpt,) = (tmp_path / "run").rglob("*.ckpt")
    cli = main(["predict", "--config", str(config), "--ckpt_path", str(ckpt)])
    predictions = [text for batch in cli.trainer.predict_loop.predictions for text in batch]
    assert len(predictions) == 2 and all(isinstance(p, str) for p in predictions)
    printed = capsys.readouterr().out  # LightningCLI drops predict's return value: the continuations are printed
    assert all(f"prediction {i}: {text!r}" in printed for i, text in enumerate(predictions))


def test_validate_and_test_report_the_held_out_perplexity_fit_printed(tmp_path, model_dir, capsys):
    """``validate`` and ``test`` on the held-out set: without a checkpoint they give the perplexity fit printed
    before training (LoRA starts as the identity), with fit's checkpoint the one it printed after."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"{s} {t}" for s in SENTENCES for t in SENTENCES))
    data = {"class_path": "lightning_nf4.data.TextDataModule",
            "init_args": {"source": str(corpus), "block_size": 16, "batch_size": 4, "val_fraction": 0.25}}
    config = write_config(tmp_path, model_dir, data)
    main(["fit", "--config", str(config), "--trainer.max_steps", "2"])
    before, after = perplexities(capsys.readouterr().out)
    assert after < before
    (ckpt,) = (tmp_path / "run").rglob("*.ckpt")
    for subcommand, metric in (("validate", "val_perplexity"), ("test", "test_perplexity")):
        for ckpt_args, expected in (([], before), (["--ckpt_path", str(ckpt)], after)):
            cli = main([subcommand, "--config", str(config), *ckpt_args])
            got = float(cli.trainer.callback_metrics[metric])
            assert got == pytest.approx(expected, rel=1e-4, abs=1e-4), (subcommand, ckpt_args, got, expected)


def test_a_datamodule_without_validation_data_trains_and_says_so(tmp_path, model_dir, capsys):
    """CausalLMModule with a datamodule that defines no val_dataloader: the held-out perplexity is reported as
    n/a, not a crash in Lightning's default val_dataloader (it raised at the start of fit)."""
    import lightning.pytorch as pl

    from lightning_nf4 import LoRACallback, NF4Precision
    from lightning_nf4.models import CausalLMModule

    class TrainOnly(pl.LightningDataModule):
        def train_dataloader(self):
            sample = {"input_ids": torch.arange(16), "labels": torch.arange(16)}
            return torch.utils.data.DataLoader([sample] * 4, batch_size=2)

    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, plugins=NF4Precision(compute_dtype=torch.float32), callbacks=[LoRACallback(r=4, alpha=8)])
    trainer.fit(CausalLMModule(str(model_dir), compute_dtype="float32"), datamodule=TrainOnly())
    assert "perplexity before: n/a (no validation data)" in capsys.readouterr().out
    assert trainer.global_step == 1


@pytest.mark.timeout(660)  # its subprocess stops at 600 s
def test_console_script_exits_zero_after_a_run(tmp_path, model_dir, monkeypatch):
    """``lightning-nf4 fit ...`` as the shell runs it: the entry point's return value is the exit status."""
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "lightning-nf4"]
    assert script.value == "lightning_nf4.cli:run"
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"{s} {t}" for s in SENTENCES for t in SENTENCES))
    data = {"class_path": "lightning_nf4.data.TextDataModule",
            "init_args": {"source": str(corpus), "block_size": 16, "batch_size": 4, "val_fraction": 0.25}}
    config = write_config(tmp_path, model_dir, data)
    code = f"import sys; sys.argv = ['lightning-nf4', 'fit', '--config', {str(config)!r}, '--trainer.max_steps', '1']; " \
           f"from {script.module} import {script.attr}; sys.exit({script.attr}())"
    done = isolated.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]


def test_shipped_configs_parse():
    class ParseOnly(NF4CLI):
        def instantiate_classes(self) -> None:  # GPU configs must parse on a CPU machine
            pass

    configs = sorted(DEFAULT_CONFIG.parent.glob("*.yaml"))
    assert {p.name for p in configs} >= {"smollm2-pydoc.yaml", "llama3-8b-gpu.yaml", "ddp-2gpu.yaml"}
    for path in configs:
        cli = ParseOnly(CausalLMModule, None, subclass_mode_data=True, run=False, auto_configure_optimizers=False, args=["--config", str(path)])
        assert cli.config.trainer.plugins.class_path.endswith("NF4Precision"), path
    assert _with_default_config(["fit"]) == ["fit", "--config", str(DEFAULT_CONFIG)]
    assert _with_default_config(["fit", "-c", "x.yaml"]) == ["fit", "-c", "x.yaml"]


# -- instruction data -------------------------------------------------------------------------------
def test_instruction_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_jsonl(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n\n{not json\n")
    with pytest.raises(InstructionDataError, match=r"line 3: not valid JSON"):
        read_jsonl(bad)
    bad.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"instruction": "x"}) + "\n")
    with pytest.raises(InstructionDataError, match=r"line 2: missing key\(s\) \['output'\]"):
        read_jsonl(bad)
    bad.write_text(json.dumps({"instruction": "x", "output": 3}) + "\n")
    with pytest.raises(InstructionDataError, match=r"line 1: 'output' must be a string"):
        read_jsonl(bad)


@pytest.mark.parametrize("chat", [False, True])
def test_labels_mask_the_prompt(chat):
    dm = InstructionDataModule(train_file="unused.jsonl", use_chat_template=chat)
    dm.tokenizer = tokenizer = tiny_tokenizer()
    record = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    prompt, response = dm.prompt_and_response(record)
    prompt_ids = tokenizer(prompt, add_special_tokens=not chat)["input_ids"]
    example = dm.encode(record)
    n = len(prompt_ids)
    assert example["input_ids"][:n] == prompt_ids
    assert example["labels"][:n] == [IGNORE_INDEX] * n
    assert example["labels"][n:] == example["input_ids"][n:] and len(example["labels"]) > n
    assert tokenizer.decode(example["labels"][n:]).startswith("5")
    assert tokenizer.eos_token_id in example["labels"][n:]  # the model learns to stop

    short = dm.encode({"instruction": "Hi.", "input": "", "output": "Yo"})
    batch = pad_collate(tokenizer.pad_token_id)([example, short])
    width = len(example["input_ids"])
    assert batch["labels"].shape == (2, width)
    assert (batch["labels"][1, len(short["labels"]):] == IGNORE_INDEX).all()
    assert (batch["input_ids"][1, len(short["input_ids"]):] == tokenizer.pad_token_id).all()
    assert batch["attention_mask"][1].sum() == len(short["input_ids"])


PLAIN_CLI = """
import sys, torch
from lightning.pytorch.cli import LightningCLI
from tests.lightning_models import Regressor
cli = LightningCLI(Regressor, run=False, args=["--config", sys.argv[1]])
plugin = cli.trainer.precision_plugin
lora = next(c for c in cli.trainer.callbacks if type(c).__name__ == "LoRACallback")
assert "lightning_nf4.cli" not in sys.modules  # the package CLI's own dtype reading is not in play
print(plugin.compute_dtype, lora.adapter_dtype, lora.merged_dtype)
"""


def test_a_plain_lightning_cli_reads_dtype_names_for_the_plugin_and_callback(tmp_path):
    """A user's own ``LightningCLI`` (not lightning-nf4's): ``compute_dtype: bfloat16`` was refused by jsonargparse
    ("Expected a dot import path string"); the plugin and callback take dtype names, as transformers does."""
    from tests import isolated

    config = {"trainer": {"accelerator": "cpu", "logger": False,
                          "plugins": {"class_path": "lightning_nf4.NF4Precision", "init_args": {"compute_dtype": "bfloat16"}},
                          "callbacks": [{"class_path": "lightning_nf4.LoRACallback",
                                         "init_args": {"r": 4, "alpha": 8, "adapter_dtype": "float32", "merged_dtype": "float16"}}]}}
    (tmp_path / "cli.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "plain_cli.py").write_text(PLAIN_CLI)
    root = Path(__file__).resolve().parent.parent
    done = isolated.run([sys.executable, str(tmp_path / "plain_cli.py"), str(tmp_path / "cli.yaml")], timeout=240,
                        capture_output=True, text=True, cwd=root, env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-3:] == ["torch.bfloat16", "torch.float32", "torch.float16"]
