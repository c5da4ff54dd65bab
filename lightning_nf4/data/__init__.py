"""Lightning data modules for causal-LM fine-tuning: packed plain text and instruction JSONL."""

from lightning_nf4.data.instruction import InstructionDataModule, InstructionDataError
from lightning_nf4.data.resumable import ResumableDataLoader
from lightning_nf4.data.text import TextDataModule, load_tokenizer, resolve_name_or_path

__all__ = [
    "InstructionDataError", "InstructionDataModule", "ResumableDataLoader", "TextDataModule", "load_tokenizer", "resolve_name_or_path",
]
