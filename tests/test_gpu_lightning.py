"""The Lightning-level flows on one CUDA GPU, which the CPU tests check on the CPU only: the CLI's fit with
validation, generation and exports; exact resume with dropout drawn from the GPU's generator; fp16 with a
GradScaler; a compiled fit's resume and exports; and the loader quantizing on the GPU. Skipped without a GPU.
Each fit runs in this process: one device, no process group."""

import math
import sys

import lightning.pytorch as pl
import pytest
import torch

from lightning_nf4 import LoRACallback, NF4Linear, NF4Precision
from tests.lightning_models import CausalLM, token_loader
from tests.test_reliability import _assert_same

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def gpu_trainer(tmp_path, **kw) -> pl.Trainer:
    defaults = dict(
        accelerator="gpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, max_epochs=2, default_root_dir=str(tmp_path),
    )
    defaults.update(kw)
    return pl.Trainer(**defaults)


def test_one_gpu_cli_fit_validates_generates_and_exports(tmp_path, monkeypatch, capsys):
    """``lightning-nf4 fit`` on one GPU: CausalLMModule loads onto the GPU in configure_model, its validation metric
    and generation prompts follow the module's device, the adapters train and both exports are written."""
    import yaml

    from lightning_nf4.cli import main
    from tests.test_cli import SENTENCES, perplexities, save_tiny_llama, write_config

    monkeypatch.setattr(sys, "argv", ["lightning-nf4"])
    model_dir = save_tiny_llama(tmp_path / "model")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"{s} {t}" for s in SENTENCES for t in SENTENCES))
    data = {"class_path": "lightning_nf4.data.TextDataModule",
            "init_args": {"source": str(corpus), "block_size": 16, "batch_size": 2, "val_fraction": 0.25}}
    path = write_config(tmp_path, model_dir, data, generation_prompts=["The quick"])
    config = yaml.safe_load(path.read_text())
    config["trainer"].update(accelerator="gpu", max_steps=4, val_check_interval=2,
                             logger={"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "logs")}})
    path.write_text(yaml.safe_dump(config))

    cli = main(["fit", "--config", str(path)])
    out = capsys.readouterr().out
    assert all(math.isfinite(p) for p in perplexities(out)) and "generation: 'The quick' -> " in out
    assert cli.trainer.strategy.root_device.type == "cuda"  # (Lightning's teardown moves the module to the CPU after fit)
    q_proj = cli.model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, NF4Linear) and q_proj.lora_B["default"].weight.abs().sum() > 0
    logged = next((tmp_path / "logs").rglob("metrics.csv")).read_text()
    assert "val_perplexity" in logged.splitlines()[0]
    for name in ("adapter/adapter_model.safetensors", "merged/model.safetensors", "export.json"):
        assert (tmp_path / "fit-out" / name).is_file(), name


def test_one_gpu_resume_is_exact_with_dropout_and_a_shuffling_loader(tmp_path):
    """Default dropout draws its masks from the GPU's generator: a run stopped after two epochs and resumed from its
    checkpoint ends on the uninterrupted run's adapters, to the bit, only if that generator's state is restored."""
    from tests.test_reliability import fit_for_resume

    devices = []

    def on_gpu(*args, **kw):
        t = gpu_trainer(*args, **kw)
        devices.append(t.strategy.root_device.type)
        return t

    assert LoRACallback().dropout > 0
    straight = fit_for_resume(tmp_path, 4, make_trainer=on_gpu)
    fit_for_resume(tmp_path, 2, save=True, make_trainer=on_gpu)
    _assert_same(straight, fit_for_resume(tmp_path, 4, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), make_trainer=on_gpu))
    assert devices == ["cuda"] * 3


def test_one_gpu_resume_from_a_checkpoint_saved_just_before_a_validation_is_exact(tmp_path):
    """The validation inside fit puts back the generator states of the batch end before it, the GPU's among them
    (dropout draws there), so a resume from the checkpoint saved at that batch end is exact."""
    from tests.test_reliability import resume_before_validation

    resume_before_validation(tmp_path, gpu_trainer)


def test_one_gpu_load_from_checkpoint_rebuilds_the_trained_module_on_the_gpu(tmp_path):
    """``lightning_nf4.load_from_checkpoint(..., map_location="cuda")``: quantized on the GPU with the recorded settings,
    the same bytes and adapters as the module trained there, and the same logits."""
    from lightning_nf4 import load_from_checkpoint

    model = CausalLM(lr=1e-2)
    last = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    gpu_trainer(tmp_path, max_steps=3, plugins=NF4Precision(), enable_checkpointing=True,
                callbacks=[LoRACallback(r=4, alpha=8), last]).fit(model, token_loader(n=16))
    loaded = load_from_checkpoint(CausalLM, last.last_model_path, map_location="cuda")
    model.cuda().eval(), loaded.eval()
    trained, rebuilt = model.state_dict(), loaded.state_dict()
    assert trained.keys() == rebuilt.keys() and all(torch.equal(trained[k], rebuilt[k]) for k in trained)
    assert all(v.device.type == "cuda" for v in rebuilt.values())
    ids = next(iter(token_loader(n=4)))[0].cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.equal(model(ids), loaded(ids))


def test_one_gpu_fp16_trains_with_a_grad_scaler(tmp_path):
    """``compute_dtype=torch.float16`` brings Lightning's GradScaler on the GPU; the loss falls and stays finite."""
    from torch.amp import GradScaler

    losses = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    model = CausalLM(lr=1e-2)
    t = gpu_trainer(tmp_path, max_epochs=6, plugins=NF4Precision(compute_dtype=torch.float16),
                    callbacks=[LoRACallback(r=4, alpha=8, dropout=0.0), Record()])
    t.fit(model, token_loader(n=16))
    assert isinstance(t.precision_plugin.scaler, GradScaler) and t.precision_plugin.scaler.get_scale() > 0
    assert all(math.isfinite(x) for x in losses) and sum(losses[-4:]) < 0.9 * sum(losses[:4]), losses


def test_one_gpu_compiled_fit_resumes_exactly_and_exports_like_eager(tmp_path):
    """``LoRACallback(compile=True)`` on the GPU (inductor's own fused dequantize): it trains like eager, resumes to
    the bit, and its exports carry no compiled names. In float32, as on the CPU (tests/test_compile.py): in bf16 the
    two round apart and AdamW magnifies that element by element (8% of an adapter's norm after eight steps, seen on
    an H200), which would hide a real difference."""
    from safetensors.torch import load_file

    from tests.compile_worker import run

    def fit(name, compile, resume=""):
        torch._dynamo.reset()
        run(tmp_path / name, "auto", 1, 4, compile=compile, resume=resume, accelerator="gpu")
        return torch.load(tmp_path / name / "rank0.pt")

    eager, compiled = fit("eager", False), fit("compiled", True)
    assert compiled["compiled"] == ["LlamaDecoderLayer"] * 2 and compiled["graph_breaks"] == 0
    for name, value in compiled["trainable"].items():
        assert not torch.equal(value, torch.zeros_like(value)) or "lora_B" not in name, name  # it trained
        torch.testing.assert_close(value, eager["trainable"][name], atol=1e-4, rtol=1e-3)  # as on the CPU
    resumed = fit("resumed", True, str(next((tmp_path / "compiled" / "ckpt").glob("epoch=0-*.ckpt"))))
    _assert_same(compiled["trainable"], resumed["trainable"])
    for part in ("adapter/adapter_model.safetensors", "merged/model.safetensors"):
        a, b = load_file(tmp_path / "compiled" / "export" / part), load_file(tmp_path / "eager" / "export" / part)
        assert a.keys() == b.keys() and not any("_orig_mod" in k for k in a), part


@pytest.mark.parametrize("double_quant", [False, True])
def test_one_gpu_loader_quantizes_like_the_cpu(tmp_path, double_quant):
    """``AutoModelForCausalLM.from_pretrained(..., device="cuda")`` quantizes each linear on the GPU as it arrives:
    the same codes as on the CPU (and the same scales up to the double quantization's mean, whose last bit follows
    the device's reduction order), and logits equal to bf16 rounding."""
    from transformers import BitsAndBytesConfig

    from lightning_nf4 import AutoModelForCausalLM
    from tests.test_cli import save_tiny_llama

    folder = save_tiny_llama(tmp_path / "model")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    on_gpu = AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=config, device="cuda")
    on_cpu = AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=config, device="cpu")
    gpu_layers = {n: m for n, m in on_gpu.named_modules() if isinstance(m, NF4Linear)}
    cpu_layers = {n: m for n, m in on_cpu.named_modules() if isinstance(m, NF4Linear)}
    assert gpu_layers.keys() == cpu_layers.keys() and len(gpu_layers) == 14
    for name, layer in gpu_layers.items():
        assert layer.weight.device.type == "cuda"
        assert torch.equal(layer.quant.packed.cpu(), cpu_layers[name].quant.packed), name
        if not double_quant:
            assert torch.equal(layer.quant.absmax.cpu(), cpu_layers[name].quant.absmax), name
        torch.testing.assert_close(layer.dequantize().cpu(), cpu_layers[name].dequantize(), atol=1e-3, rtol=1e-2)
    ids = torch.arange(1, 17).unsqueeze(0)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        gpu_logits = on_gpu(input_ids=ids.cuda()).logits.float().cpu()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cpu_logits = on_cpu(input_ids=ids).logits.float()
    torch.testing.assert_close(gpu_logits, cpu_logits, atol=5e-2, rtol=5e-2)


def test_one_gpu_qdora_matches_the_cpu_and_exports(tmp_path):
    """QDoRA on the GPU (row norms from the Triton dequantize): the same adapters and magnitudes as the same fit on the
    CPU to float32 rounding, and a merged export that computes the trained model."""
    import transformers

    from tests.lightning_models import tiny_llama

    def fit(accelerator, out):
        torch.manual_seed(0)
        module = CausalLM(tiny_llama(), lr=1e-2)
        callback = LoRACallback(r=4, alpha=8, dropout=0.0, use_dora=True, save_dir=str(out))
        trainer = gpu_trainer(tmp_path, accelerator=accelerator, max_epochs=1, plugins=NF4Precision(compute_dtype=torch.float32),
                              callbacks=[callback])
        trainer.fit(module, token_loader())
        return module

    gpu, cpu = fit("gpu", tmp_path / "gpu"), fit("cpu", tmp_path / "cpu")
    trained = {n: p.detach().cpu() for n, p in gpu.named_parameters() if p.requires_grad}
    assert sum("lora_magnitude_vector" in n for n in trained) == 14
    for name, param in cpu.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(trained[name], param.detach(), atol=1e-4, rtol=1e-3, msg=name)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "gpu" / "merged", dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 30, 2, 77, 3, 8]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, gpu.model.cpu().eval()(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_one_gpu_fabric_quantizes_on_the_gpu_and_follows_a_cpu_run():
    """``Fabric(accelerator="cuda", plugins=NF4FabricPrecision())`` with a model built on the CPU quantizes on the GPU
    (as the CPU does, byte for byte) and trains. Fabric on the CPU of a GPU host: the plugin follows it (autocast and
    weights on the CPU); a ``device`` given that Fabric does not run on is named at the first forward."""
    import lightning as L

    from lightning_nf4 import NF4FabricPrecision, quantize_nf4
    from lightning_nf4.plugins import NF4PrecisionError
    from tests.test_fabric import _data, _dtypes_seen, _fit, _peft_mlp

    model = _peft_mlp()
    expected = quantize_nf4(model.get_submodule("base_model.model.up").base_layer.weight.detach(), 64, True).packed
    fabric = L.Fabric(accelerator="cuda", devices=1, plugins=NF4FabricPrecision(skip_modules=("head",)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = fabric.setup(model, optimizer)
    layer = model.get_submodule("base_model.model.up").base_layer
    assert isinstance(layer, NF4Linear) and layer.weight.device.type == "cuda"
    assert torch.equal(layer.weight.cpu(), expected)
    x, y = (t.cuda() for t in _data())
    assert _dtypes_seen(model, x) == (torch.bfloat16, torch.bfloat16)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses

    precision = NF4FabricPrecision(compute_dtype=torch.float16, skip_modules=("head",))  # a default scaler, rebound
    cpu_fabric = L.Fabric(accelerator="cpu", devices=1, plugins=precision)
    cpu_model = _peft_mlp()
    cpu_optimizer = torch.optim.AdamW([p for p in cpu_model.parameters() if p.requires_grad], lr=1e-2)
    cpu_model, cpu_optimizer = cpu_fabric.setup(cpu_model, cpu_optimizer)
    assert cpu_model.get_submodule("base_model.model.up").base_layer.weight.device.type == "cpu"
    losses = _fit(cpu_fabric, cpu_model, cpu_optimizer, steps=10)
    assert losses[-1] < losses[0] and precision.device == "cpu" and precision.scaler._device == "cpu"
    assert _dtypes_seen(cpu_model, _data()[0]) == (torch.float16, torch.float16)

    named = L.Fabric(accelerator="cpu", devices=1, plugins=NF4FabricPrecision(device="cuda", skip_modules=("head",)))
    named_model = named.setup_module(_peft_mlp())
    with pytest.raises(NF4PrecisionError, match=r"runs this model on cpu, but NF4FabricPrecision was given device='cuda'"):
        named_model(_data()[0])
