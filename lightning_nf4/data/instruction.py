"""``InstructionDataModule``: instruction/response pairs from JSONL, loss on the response only.

Prompt tokens get the label -100, so the model learns to answer rather than to repeat the instructions
(the usual supervised fine-tuning setup); bad input fails early with the file and line that caused it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_nf4.data.resumable import make_loader
from lightning_nf4.data.text import HeldOutDataModule, left_pad_collate, load_tokenizer, tokenizer_source

IGNORE_INDEX = -100

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


class InstructionDataError(ValueError):
    """An instruction file that cannot be used; the message names the file and line."""


def read_jsonl(path: str | Path) -> list[dict[str, str]]:
    """Records with string ``instruction``, ``output`` and optional ``input``; blank lines are skipped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Instruction file {str(path)!r} does not exist.")
    records = []
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines: JSON strings may hold U+2028
    except UnicodeDecodeError as err:
        raise InstructionDataError(f"{path} is not UTF-8 text ({err}); save it as UTF-8.") from err
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InstructionDataError(f"{path}, line {number}: not valid JSON ({err.msg}).") from err
        if not isinstance(record, dict):
            raise InstructionDataError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}.")
        missing = [key for key in ("instruction", "output") if key not in record]
        if missing:
            raise InstructionDataError(f"{path}, line {number}: missing key(s) {missing}; each line needs 'instruction' and 'output' (and optionally 'input').")
        for key in ("instruction", "input", "output"):
            if key in record and not isinstance(record[key], str):
                raise InstructionDataError(f"{path}, line {number}: {key!r} must be a string, got {type(record[key]).__name__}.")
        records.append({"instruction": record["instruction"], "input": record.get("input", ""), "output": record["output"]})
    if not records:
        raise InstructionDataError(f"{path} holds no records.")
    return records


def _key(record: dict[str, str]) -> tuple[str, str, str]:
    return record["instruction"], record["input"], record["output"]


def pad_collate(pad_id: int) -> Any:
    """Right-padded batch: pad id in ``input_ids``, 0 in ``attention_mask``, -100 in ``labels``."""

    def collate(examples: list[dict[str, list[int]]]) -> dict[str, Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[row, :n] = torch.tensor(e["input_ids"])
            labels[row, :n] = torch.tensor(e["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


class InstructionDataModule(HeldOutDataModule):
    """Supervised fine-tuning data: ``{"instruction", "input"?, "output"}`` per JSONL line.

    Args:
        train_file: JSONL file. Without ``val_file``, ``val_fraction`` of it is held out (seeded).
        tokenizer_name_or_path: defaults to the model's (``CausalLMModule``'s tokenizer, else its ``model_name_or_path``).
        prompt_template, prompt_template_no_input: ``str.format`` templates (Alpaca by default).
        use_chat_template: build prompts with the tokenizer's chat template instead.
        max_length: examples are cut to this many tokens; ones left without a response token are dropped.
    """

    def __init__(
        self,
        train_file: str,
        val_file: Optional[str] = None,
        tokenizer_name_or_path: Optional[str] = None,
        val_fraction: float = 0.1,
        prompt_template: str = ALPACA_PROMPT,
        prompt_template_no_input: str = ALPACA_PROMPT_NO_INPUT,
        use_chat_template: bool = False,
        max_length: int = 512,
        batch_size: int = 4,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if val_file is None and not 0.0 < val_fraction < 1.0:
            raise InstructionDataError(f"val_fraction must be in (0, 1) to hold records out of train_file, got {val_fraction}; or pass val_file.")
        self.train_file, self.val_file = train_file, val_file
        self.tokenizer_name_or_path = tokenizer_name_or_path
        self.val_fraction, self.seed = val_fraction, seed
        self.prompt_template, self.prompt_template_no_input = prompt_template, prompt_template_no_input
        self.use_chat_template = use_chat_template
        self.max_length, self.batch_size, self.num_workers = max_length, batch_size, num_workers
        self.tokenizer: Any = None
        self.train_set: Optional[list[dict[str, list[int]]]] = None
        self.val_set: Optional[list[dict[str, list[int]]]] = None
        self.val_records: list[dict[str, str]] = []

    # -- formatting ---------------------------------------------------------------------------
    def prompt_and_response(self, record: dict[str, str]) -> tuple[str, str]:
        """The prompt text and the response text that follows it (EOS or end-of-turn included)."""
        if not self.use_chat_template:
            template = self.prompt_template if record["input"] else self.prompt_template_no_input
            try:
                prompt = template.format(**record)
            except (KeyError, IndexError) as err:
                raise InstructionDataError(
                    f"The prompt template names {err}, which records do not have: a template may use {{instruction}}, "
                    "{input} and {output} (write {{ and }} for literal braces)."
                ) from err
            return prompt, record["output"] + (self.tokenizer.eos_token or "")
        if not getattr(self.tokenizer, "chat_template", None):
            raise InstructionDataError("use_chat_template=True, but the tokenizer has no chat template.")
        user = record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")
        messages = [{"role": "user", "content": user}]
        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = self.tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": record["output"]}], tokenize=False)
        if not full.startswith(prompt):
            raise InstructionDataError("The chat template does not render the prompt as a prefix of the full conversation; use the Alpaca template.")
        return prompt, full[len(prompt):]

    def prompt_ids(self, record: dict[str, str]) -> list[int]:
        prompt, _ = self.prompt_and_response(record)
        return self.tokenizer(prompt, add_special_tokens=not self.use_chat_template)["input_ids"]

    def generation_batch(self, instructions: list[str]) -> dict[str, Tensor]:
        """Instructions as the model was trained to read them: each in the prompt template (or chat template), token
        ids padded on the left for ``generate``."""
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(tokenizer_source(self, self.tokenizer_name_or_path))
        records = [{"instruction": text, "input": "", "output": ""} for text in instructions]
        return left_pad_collate(self.tokenizer.pad_token_id or 0)([self.prompt_ids(r) for r in records])

    def encode(self, record: dict[str, str]) -> dict[str, list[int]]:
        """Token ids of the whole text and labels -100 on every token that starts inside the prompt. The whole text is
        tokenized at once: a response tokenized alone starts as a new text (a SentencePiece tokenizer puts a word
        boundary before it, byte-level BPE splits leading whitespace otherwise), ids the model never sees after a prompt."""
        prompt, response = self.prompt_and_response(record)
        special = not self.use_chat_template
        if getattr(self.tokenizer, "is_fast", False):
            full = self.tokenizer(prompt + response, add_special_tokens=special, return_offsets_mapping=True)
            ids = full["input_ids"]
            # the first token that starts in the response (tokens a post-processor adds have empty spans: not one)
            masked = next((i for i, (start, end) in enumerate(full["offset_mapping"]) if start >= len(prompt) and end > start), len(ids))
        else:  # no offsets: the prompt's own tokens, as far as the whole text begins with them
            ids = self.tokenizer(prompt + response, add_special_tokens=special)["input_ids"]
            prompt_ids = self.tokenizer(prompt, add_special_tokens=special)["input_ids"]
            masked = next((i for i, (a, b) in enumerate(zip(ids, prompt_ids)) if a != b), len(prompt_ids))
        masked = min(masked, len(ids))
        labels = [IGNORE_INDEX] * masked + ids[masked:]
        return {"input_ids": ids[: self.max_length], "labels": labels[: self.max_length]}

    def _encode_all(self, records: list[dict[str, str]], name: str) -> list[dict[str, list[int]]]:
        encoded = [self.encode(r) for r in records]
        kept = [e for e in encoded if any(label != IGNORE_INDEX for label in e["labels"][1:])]
        if len(kept) < len(encoded):
            rank_zero_warn(f"InstructionDataModule: dropped {len(encoded) - len(kept)} {name} example(s) whose prompt fills max_length={self.max_length}.")
        if not kept:
            raise InstructionDataError(f"No {name} example has a response token within max_length={self.max_length}.")
        return kept

    # -- Lightning hooks ----------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(tokenizer_source(self, self.tokenizer_name_or_path))
        if self.train_set is not None:
            return
        train = read_jsonl(self.train_file)
        if self.val_file is not None:
            val = read_jsonl(self.val_file)
        else:
            # identical records go to the same side (a held-out one must not be trained on); copies stay in training
            distinct = list(dict.fromkeys(_key(r) for r in train))
            if len(distinct) < 2:
                raise InstructionDataError(f"{self.train_file} needs at least 2 distinct records to hold one out (or pass val_file).")
            random.Random(self.seed).shuffle(distinct)
            n_val = min(len(distinct) - 1, max(1, round(len(distinct) * self.val_fraction)))
            held = set(distinct[:n_val])
            val = [dict(zip(("instruction", "input", "output"), key)) for key in distinct[:n_val]]
            train = [r for r in train if _key(r) not in held]
        self.train_set, self.val_set = self._encode_all(train, "training"), self._encode_all(val, "validation")
        self.val_records = val

    def _loader(self, dataset: list, shuffle: bool) -> DataLoader:
        return make_loader(dataset, shuffle=shuffle, seed=self.seed, trainer=self.trainer, batch_size=self.batch_size,
                           num_workers=self.num_workers, collate_fn=pad_collate(self.tokenizer.pad_token_id or 0),
                           persistent_workers=self.num_workers > 0)

    def predict_dataloader(self) -> DataLoader:
        """The held-out prompts, to compare generations with their reference outputs."""
        prompts = [self.prompt_ids(r) for r in self.val_records]
        return DataLoader(prompts, batch_size=self.batch_size, collate_fn=left_pad_collate(self.tokenizer.pad_token_id or 0))
