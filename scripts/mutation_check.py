#!/usr/bin/env python
"""Put deliberate bugs into a temporary copy of the package, one at a time, and see which the tests catch.

A test suite is only as good as the bugs it notices. Each entry below is a small, plausible bug written as a
text patch (exact old text -> new text) on one file of a copy of the repository in a temporary folder; the
working tree is never touched. For each bug the script first runs the chosen tests on the unpatched copy (they
must pass), then on the patched copy, and prints a table: bug, tests, caught. Run it by hand, not in CI:

    python scripts/mutation_check.py             # every bug (about 40 minutes on a 2-core machine)
    python scripts/mutation_check.py --list      # the bugs and their tests
    python scripts/mutation_check.py --only gemv-gain export-in-place

Exit status 1 when a bug goes uncaught or a patch no longer applies (the code it targets changed: update the
entry). The tests run with ``PYTHONPATH`` at the copy, and the script checks that the copy is what they import.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPIED = ("lightning_nf4", "tests", "configs", "pyproject.toml", "setup.py")


@dataclass(frozen=True)
class Mutation:
    name: str
    bug: str  # what is broken, in words
    file: str  # relative to the repository root
    edits: tuple[tuple[str, str], ...]  # (exact old text, found once in the file; new text)
    tests: tuple[str, ...]  # pytest paths or node ids, relative to the repository root
    issue_table: bool = False  # one of the bugs of issue 14's table
    env: dict = field(default_factory=dict)


_PACK_RETURN = "            return self, tensor.size(), tensor.stride(), tensor.storage_offset() - self.offset\n"
_PUBLISH_TMP = '            tmp = root / f".{name}.tmp-{ident}"\n'
_LOAD_PARTS = "        parts = {k: v.to(device) for k, v in parts.items()}\n"

MUTATIONS: list[Mutation] = [
    Mutation(
        "fallback-offset",
        "the plain-PyTorch fallback's nested-scale decode drops `+ offset` (CPU kernels enabled)",
        "lightning_nf4/kernels/reference.py",
        (("    return product + offset\n", "    return product\n"),),
        ("tests/test_format.py", "tests/test_linear.py", "tests/test_group.py", "tests/test_lora.py", "tests/test_cpu_paths.py"),
        issue_table=True,
    ),
    Mutation(
        "pack-keeps-weight",
        "`_Redequantize.pack` keeps the float weight alive (autograd stores the weight itself)",
        "lightning_nf4/layers/linear.py",
        ((_PACK_RETURN, "            return tensor\n"),),
        ("tests/test_linear.py::test_backward_saves_no_float_weight",),
        issue_table=True,
    ),
    Mutation(
        "pack-holds-weight",
        "`_Redequantize.pack` stores how to rebuild the weight but also holds on to the weight",
        "lightning_nf4/layers/linear.py",
        (
            ('    __slots__ = ("ptr", "offset", "quant", "dtype")\n', '    __slots__ = ("ptr", "offset", "quant", "dtype", "kept")\n'),
            (_PACK_RETURN, "            self.kept = tensor\n" + _PACK_RETURN),
        ),
        ("tests/test_linear.py::test_backward_saves_no_float_weight",),
    ),
    Mutation(
        "group-keeps-rounds",
        "the grouped dequantize keeps every round's buffer alive",
        "lightning_nf4/layers/group.py",
        (("        mine = None\n", "        self.__dict__.setdefault(\"_rounds\", []).append(flat)\n        mine = None\n"),),
        ("tests/test_linear.py", "tests/test_group.py"),
        issue_table=True,
    ),
    Mutation(
        "export-in-place",
        "the export writes in place (into the target folder itself, before the temporary folder and the rename)",
        "lightning_nf4/publish.py",
        ((_PUBLISH_TMP, "            (root / name).mkdir(exist_ok=True)\n            write(root / name)\n" + _PUBLISH_TMP),),
        ("tests/test_lightning.py", "tests/test_claims.py"),
        issue_table=True,
    ),
    Mutation(
        "loader-nested-1.03",
        "the loader scales `nested_absmax` by 1.03",
        "lightning_nf4/loading/keys.py",
        ((_LOAD_PARTS, _LOAD_PARTS.replace("v.to(device)", '(v * 1.03 if k == "nested_absmax" else v).to(device)')),),
        ("tests/test_loading.py::test_prequantized_bitsandbytes_checkpoint_loads_bit_exactly",),
        issue_table=True,
    ),
    Mutation(
        "loader-nested-1.10",
        "the loader scales `nested_absmax` by 1.10",
        "lightning_nf4/loading/keys.py",
        ((_LOAD_PARTS, _LOAD_PARTS.replace("v.to(device)", '(v * 1.10 if k == "nested_absmax" else v).to(device)')),),
        ("tests/test_loading.py::test_prequantized_bitsandbytes_checkpoint_loads_bit_exactly",),
        issue_table=True,
    ),
    Mutation(
        "gemv-gain",
        "a 1.5% gain error in the bf16/fp16 CPU gemv",
        "lightning_nf4/kernels/cpu.py",
        (("    return out.to(x.dtype)\n", "    return (out * (1.0 if x.dtype == torch.float32 else 1.015)).to(x.dtype)\n"),),
        ("tests/test_linear.py::test_one_token_gemv_on_cpu_matches_dequantized_matvec",),
        issue_table=True,
    ),
    Mutation(
        "resume-rng",
        "a resume with the default dropout=0.05 draws other dropout masks and shuffles (the checkpoint's RNG states are not put back)",
        "lightning_nf4/callbacks/rng.py",
        (("        restore(self._pending, trainer.strategy.root_device)\n", "        pass\n"),),
        ("tests/test_reliability.py::test_resume_at_an_epoch_boundary_is_exact_with_dropout_and_a_shuffling_loader",),
        issue_table=True,
    ),
    Mutation(
        "threaded-drops-block",
        "the C kernels' thread split skips the last block of the calling thread's share",
        "lightning_nf4/kernels/cpu.py",
        (("    fn(*args, bounds[0], bounds[1])\n", "    fn(*args, bounds[0], bounds[1] - 1)\n"),),
        ("tests/test_format.py", "tests/test_cpu_paths.py"),
    ),
    Mutation(
        "portable-bf16",
        "the portable C dequantize rounds bf16 from a value 1e-4 too large (the AVX-512 path is right)",
        "lightning_nf4/kernels/_cpu_kernels.c",
        (("#define STORE_BF16(v) f32_to_bf16(v)\n", "#define STORE_BF16(v) f32_to_bf16((v) * 1.0001f)\n"),),
        ("tests/test_format.py", "tests/test_cpu_paths.py"),
    ),
    Mutation(
        "avx512-nibble-order",
        "the AVX-512 dequantize swaps the two elements of each byte (bf16/fp16 outputs)",
        "lightning_nf4/kernels/_cpu_kernels.c",
        (("_mm512_or_si512(even, _mm512_slli_epi32(odd, 16))", "_mm512_or_si512(odd, _mm512_slli_epi32(even, 16))"),),
        ("tests/test_format.py", "tests/test_cpu_paths.py"),
    ),
    Mutation(
        "avx512-tail-overread",
        "the AVX-512 dequantize runs its 16-byte loop into a partial last block (reads past the codes' end)",
        "lightning_nf4/kernels/_cpu_kernels.c",
        (("        for (; j + 16 <= pairs; j += 16) {\n", "        for (; j < pairs; j += 16) {\n"),),
        ("tests/test_cpu_paths.py::test_c_kernels_read_nothing_past_their_tensors",),
    ),
    Mutation(
        "full-checkpoint-ignored",
        "`LoRACallback(full_checkpoint=True)` still writes adapter-only checkpoints",
        "lightning_nf4/callbacks/lora.py",
        (("        if self.full_checkpoint:\n            return\n        # every persistent buffer too", "        # every persistent buffer too"),),
        ("tests/test_claims.py::test_full_checkpoint_holds_the_whole_model",),
    ),
    Mutation(
        "merge-silent",
        "`NF4LoraLinear.merge` re-quantizes without a warning",
        "lightning_nf4/layers/lora.py",
        (("        warnings.warn(\n", "        (lambda *args, **kwargs: None)(\n"),),
        ("tests/test_claims.py::test_merge_into_the_nf4_base_requantizes_and_warns",),
    ),
    Mutation(
        "merge-keeps-base",
        "`NF4LoraLinear.merge` marks the adapter merged but leaves the base weight as it was",
        "lightning_nf4/layers/lora.py",
        (("        base._set_quant(quantize_nf4(merged", "        (lambda q: None)(quantize_nf4(merged"),),
        ("tests/test_claims.py::test_merge_into_the_nf4_base_requantizes_and_warns",),
    ),
    Mutation(
        "gguf-left-float",
        "the loader's `gguf_file=` path leaves the linears in float",
        "lightning_nf4/loading/auto.py",
        (("                convert_linears(model, **nf4.convert_kwargs(model), device=target)\n", "                pass\n"),),
        ("tests/test_loading.py::test_gguf_file_is_dequantized_by_transformers_then_quantized",),
    ),
    Mutation(
        "split-leaks",
        "the held-out split puts identical documents (pydoc's 'if' and 'else') on both sides",
        "lightning_nf4/data/text.py",
        (("    docs = list(dict.fromkeys(docs))\n", ""),),
        ("tests/test_text_data.py",),
    ),
    Mutation(
        "cli-test-metric",
        "the CLI's `test` subcommand logs its perplexity under the validation name",
        "lightning_nf4/models/causal_lm.py",
        (('        self._log_epoch("test")\n', '        self._log_epoch("val")\n'),),
        ("tests/test_cli.py::test_validate_and_test_report_the_held_out_perplexity_fit_printed",),
    ),
    Mutation(
        "xpu-no-comm-hook",
        "`XPUDDPStrategy` registers no DDP comm hook on XPU",
        "lightning_nf4/strategies/xpu_ddp.py",
        (("        _register_ddp_comm_hook(\n", "        (lambda **kwargs: None)(\n"),),
        ("tests/test_xpu.py::test_xpu_ddp_registers_the_comm_hook",),
    ),
    Mutation(
        "connector-silent",
        "a Lightning without the connector methods the XPU patch wraps gets no warning",
        "lightning_nf4/accelerators/xpu.py",
        (("        rank_zero_warn(\n            f\"lightning_nf4: this Lightning's", "        (lambda *a: None)(\n            f\"lightning_nf4: this Lightning's"),),
        ("tests/test_xpu.py::test_connector_patch_warns_when_lightnings_private_names_change",),
    ),
    Mutation(
        "needs-bitsandbytes",
        "the package imports bitsandbytes at run time",
        "lightning_nf4/__init__.py",
        (("from lightning_nf4.layers import NF4Linear\n", "from lightning_nf4.layers import NF4Linear\nimport bitsandbytes  # noqa: E402,F401\n"),),
        ("tests/test_claims.py::test_runs_without_bitsandbytes",),
    ),
    Mutation(
        "gemv-row-unclamped",
        "the Triton gemv's rows past N (a partial last program) are read unclamped, past the weight's end",
        "lightning_nf4/kernels/triton_jit.py",
        (("        r1, r2, r3 = tl.minimum(r1, N - 1), tl.minimum(r2, N - 1), tl.minimum(r3, N - 1)\n", "        pass\n"),),
        ("tests/test_triton_interpreter.py::test_triton_kernels_read_nothing_past_their_tensors",),
    ),
    Mutation(
        "dequant-tail-unmasked",
        "the Triton dequantize loads its last program's codes without the tail mask",
        "lightning_nf4/kernels/triton_jit.py",
        (("        byte = tl.load(packed_ptr + byte_idx, mask=byte_idx < (numel + 1) // 2, other=0)\n",
          "        byte = tl.load(packed_ptr + byte_idx)\n"),),
        ("tests/test_triton_interpreter.py::test_triton_kernels_read_nothing_past_their_tensors",),
    ),
    Mutation(
        "chunked-loss-counts-ignored",
        "the chunked linear cross-entropy adds the loss of ignored (-100) tokens to its sum",
        "lightning_nf4/losses.py",
        (("                total += torch.where(valid, top.squeeze(1) + norm.squeeze(1).log() - picked, 0.0).sum()\n",
          "                total += (top.squeeze(1) + norm.squeeze(1).log() - picked).sum()\n"),),
        ("tests/test_losses.py", "tests/test_edges_losses.py"),
    ),
    Mutation(
        "chunked-grad-unscaled",
        "the chunked linear cross-entropy's gradients are not scaled by the reduction (1 / counted tokens)",
        "lightning_nf4/losses.py",
        (("                weight_of_row = (valid.float() * scale).unsqueeze(1)\n",
          "                weight_of_row = valid.float().unsqueeze(1)\n"),),
        ("tests/test_losses.py", "tests/test_edges_losses.py"),
    ),
    Mutation(
        "chunked-bias-grad-dropped",
        "the chunked linear cross-entropy returns a zero gradient for the head's bias",
        "lightning_nf4/losses.py",
        (("                    grad_bias += g.float().sum(0)\n",
          "                    pass\n"),),
        ("tests/test_losses.py", "tests/test_edges_losses.py"),
    ),
    Mutation(
        "resume-forgets-skipped",
        "a resumed loader does not count the batches it skipped, so a second resume in the same epoch repeats data",
        "lightning_nf4/data/resumable.py",
        (("                next(self.inner)\n                loader._handed_out += 1\n",
          "                next(self.inner)\n"),),
        ("tests/test_reliability.py", "tests/test_lightning.py"),
    ),
    Mutation(
        "resume-finished-epoch",
        "a checkpoint taken at the end of an epoch makes the resumed run skip the whole next epoch",
        "lightning_nf4/data/resumable.py",
        (("        finished = bool(state[\"finished\"]) if \"finished\" in state else batches >= len(self)",
          "        finished = False"),),
        ("tests/test_reliability.py", "tests/test_lightning.py"),
    ),
    Mutation(
        "shard-nested-first-group",
        "a row shard of a double-quantized NF4Tensor takes the nested scales of the weight's first rows",
        "lightning_nf4/format/tensor.py",
        (("            g0, groups = block0 // nested.blocksize, -(-blocks // nested.blocksize)\n",
          "            g0, groups = 0, -(-blocks // nested.blocksize)\n"),),
        ("tests/test_edges_tensor.py", "tests/test_fsdp.py"),
    ),
    Mutation(
        "shard-unit-ignores-nested",
        "the shard unit ignores the nested scale groups, so shards may split a group of 256 blocks",
        "lightning_nf4/format/tensor.py",
        (("    unit = quant.blocksize * (quant.nested.blocksize if quant.nested is not None else 1)\n",
          "    unit = quant.blocksize\n"),),
        ("tests/test_edges_tensor.py", "tests/test_fsdp.py"),
    ),
    Mutation(
        "replicated-grads-summed",
        "`NF4FSDPStrategy(shard_adapters=False)` sums the adapters' gradients over ranks instead of averaging",
        "lightning_nf4/strategies/fsdp.py",
        (("            flat.div_(self.world_size)\n",
          "            pass\n"),),
        ("tests/test_fsdp.py",),
    ),
    Mutation(
        "sharded-resume-rank0-rows",
        "a sharded resume copies the first rows of each whole tensor into every rank's shard",
        "lightning_nf4/strategies/fsdp.py",
        (("        param.to_local().copy_(local.to_local())\n",
          "        param.to_local().copy_(value.to(param.device, param.dtype)[:param.to_local().shape[0]])\n"),),
        ("tests/test_fsdp.py",),
    ),
    Mutation(
        "fsdp-keeps-recompute-weights",
        "`NF4FSDPStrategy` leaves `low_memory_recompute` off (a layer's dequantized weights kept into its backward)",
        "lightning_nf4/strategies/fsdp.py",
        (("                apply(self.model, default=True)\n",
          "                apply(self.model, default=False)\n"),),
        ("tests/test_fsdp.py", "tests/test_recompute_memory.py"),
    ),
    Mutation(
        "manifest-not-withdrawn",
        "a publish cut short after moving one folder leaves the old export.json describing a mixed pair",
        "lightning_nf4/publish.py",
        (('        os.replace(root / MANIFEST, root / f".{MANIFEST}.old-{ident}")  # it no longer describes the folders\n',
          "        pass\n"),),
        ("tests/test_reliability.py", "tests/test_edges_export.py", "tests/test_edges_export2.py"),
    ),
    Mutation(
        "export-size-unchecked",
        "`read_export` accepts listed files whose size changed",
        "lightning_nf4/publish.py",
        (("            if not path.is_file() or path.stat().st_size != size:\n",
          "            if not path.is_file():\n"),),
        ("tests/test_reliability.py", "tests/test_edges_export.py", "tests/test_edges_export2.py"),
    ),
    Mutation(
        "blob-offset-ignored",
        "the bitsandbytes quant-state's `nested_offset` is read as 0",
        "lightning_nf4/format/bnb_state.py",
        (('        offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=absmax.device)\n',
          "        offset = torch.tensor(0.0, dtype=torch.float32, device=absmax.device)\n"),),
        ("tests/test_format.py", "tests/test_edges_format.py", "tests/test_linear.py", "tests/test_loading.py"),
    ),
    Mutation(
        "blob-nested-count-unchecked",
        "a `nested_absmax` of the wrong length loads without an error",
        "lightning_nf4/format/bnb_state.py",
        (('        expect(nested_absmax.numel() == num_nested, f"nested_absmax has {nested_absmax.numel()} entries, expected {num_nested}")\n',
          ""),),
        ("tests/test_format.py", "tests/test_edges_format.py", "tests/test_linear.py", "tests/test_loading.py"),
    ),
    Mutation(
        "blob-dtype-ignored",
        "the quant-state's `dtype` is ignored (every loaded weight claims float32 as its original dtype)",
        "lightning_nf4/format/bnb_state.py",
        (('dtype=_DTYPES[meta["dtype"]], blocksize=blocksize',
          "dtype=torch.float32, blocksize=blocksize"),),
        ("tests/test_format.py", "tests/test_edges_format.py", "tests/test_linear.py", "tests/test_loading.py"),
    ),
    Mutation(
        "merged-export-original-copy",
        "the merged export writes a `modules_to_save` module's untrained original instead of its trained copy",
        "lightning_nf4/export.py",
        (("            visit(module.modules_to_save[active] if active is not None else module.original_module, prefix)\n",
          "            visit(module.original_module, prefix)\n"),),
        ("tests/test_edges_export.py", "tests/test_edges_export2.py", "tests/test_lora.py", "tests/test_lightning.py"),
    ),
    Mutation(
        "adapter-export-every-adapter",
        "the adapter export writes every adapter's LoRA tensors under the exported adapter's names",
        "lightning_nf4/export.py",
        (('        if ".lora_" in name and tag in name:\n',
          '        if ".lora_" in name:\n'),),
        ("tests/test_edges_export.py", "tests/test_edges_export2.py", "tests/test_lora.py", "tests/test_lightning.py"),
    ),
    Mutation(
        "loss-path-per-rank",
        "under FSDP each rank decides alone whether the logits are lm_head's (one may take the plain loss while the others chunk)",
        "lightning_nf4/losses.py",
        (("        if parallel or sharded:  # the vocabulary-parallel head's ranks, or all of FSDP's\n",
          "        if parallel:\n"),),
        ("tests/test_losses.py",),
    ),
    Mutation(
        "fsdp-leftovers-stay",
        "NF4FSDPStrategy leaves what sharding does not move (a metric, loose buffers) where it was: on GPUs validation fails",
        "lightning_nf4/strategies/fsdp.py",
        (("    for name, buffer in module.named_buffers(recurse=False):\n        if not buffer.is_meta",
          "    return\n    for name, buffer in module.named_buffers(recurse=False):\n        if not buffer.is_meta"),),
        ("tests/test_fsdp.py",),
    ),
    Mutation(
        "fsdp-module-device-unset",
        "NF4FSDPStrategy does not record the root device as the LightningModule's .device (generation prompts stay on the CPU)",
        "lightning_nf4/strategies/fsdp.py",
        (("    _update_properties(module, device=device)\n", ""),),
        ("tests/test_fsdp.py",),
    ),
    Mutation(
        "fsdp-user-sharded-accepted",
        "NF4FSDPStrategy accepts a model the user sharded in configure_model (it trains in float, without NF4 or LoRA)",
        "lightning_nf4/strategies/fsdp.py",
        (("        elif self.model not in _SHARDED_HERE:\n", "        elif False:\n"),),
        ("tests/test_fsdp.py",),
    ),
    Mutation(
        "sharded-export-peft-prefix",
        "the sharded merged export names keys from the first transformers model only (a PEFT-wrapped plain module keeps PEFT's prefix)",
        "lightning_nf4/export.py",
        (('    prefix = root_prefix(module)  # the same names as ``write_merged``\n', '    prefix = find_hf_model(module)[0]\n'),),
        ("tests/test_edges_export.py", "tests/test_edges_export2.py", "tests/test_lora.py", "tests/test_lightning.py"),
    ),
    Mutation(
        "ddp-syncs-nf4",
        "`NF4Precision` no longer keeps the packed NF4 weights out of DDP's start-up broadcast",
        "lightning_nf4/plugins/precision.py",
        (("        exclude_nf4_from_ddp_sync(module)\n",
          ""),),
        ("tests/test_ddp.py", "tests/test_edges_precision.py", "tests/test_lightning.py"),
    ),
    Mutation(
        "precheck-trusts-any-global",
        "`check_checkpoint` lets through a checkpoint that needs globals outside the allowed list",
        "lightning_nf4/checkpoint_io.py",
        (('    if needs:\n        raise untrusted_error(path, pickle.UnpicklingError(f"needs {needs}"))\n',
          ""),),
        ("tests/test_safe_load.py", "tests/test_cli.py"),
    ),
    Mutation(
        "deferred-shape-unchecked",
        "the deferred (per-unit) loader copies a checkpoint tensor of another shape into a parameter",
        "lightning_nf4/loading/deferred.py",
        (("        if tuple(value.shape) != tuple(target.shape):\n",
          "        if False:\n"),),
        ("tests/test_deferred_loading.py", "tests/test_fsdp.py"),
    ),
    Mutation(
        "full-checkpoint-not-held",
        "a full checkpoint of a model built in configure_model meets the float model (Lightning restores before the injection)",
        "lightning_nf4/callbacks/lora.py",
        (("            if self.full_checkpoint:\n                self._hold_full_state(pl_module)\n", ""),),
        ("tests/test_reliability.py",),
    ),
    Mutation(
        "tied-saved-module-untrained",
        "modules_to_save sees a tied tensor under its first name only (the embeddings'), so a tied lm_head trains nothing",
        "lightning_nf4/callbacks/lora.py",
        (("            saved = [o for o in owners if within(o, self.modules_to_save)]\n",
          "            saved = [o for o in owners[:1] if within(o, self.modules_to_save)]\n"),),
        ("tests/test_reliability.py", "tests/test_lora.py"),
    ),
    Mutation(
        "modules-to-save-checked-after-quantizing",
        "a modules_to_save entry naming an NF4 layer is refused only after the model was quantized in place",
        "lightning_nf4/callbacks/lora.py",
        (("                self._check_modules_to_save(pl_module, precision.pending_conversion(pl_module))\n", ""),),
        ("tests/test_lora.py",),
    ),
    Mutation(
        "peft-lora-merged-onto-codes",
        "the merged export adds PEFT's own LoRA update to the packed NF4 codes of its base",
        "lightning_nf4/export.py",
        (("    weight = base.dequantize(torch.float32) if nf4 else base.weight.detach().float()\n",
          "    weight = base.weight.detach().float()\n"),),
        ("tests/test_reliability.py", "tests/test_edges_export.py", "tests/test_edges_export2.py"),
    ),
    Mutation(
        "saved-module-buffers-dropped",
        "a module trained in full loses its buffers (running statistics) from checkpoints and the adapter",
        "lightning_nf4/export.py",
        (("    return [(n, b) for n, b in module.named_buffers()\n", "    return [(n, b) for n, b in module.named_buffers() if False\n"),),
        ("tests/test_lora.py",),
    ),
    Mutation(
        "skip-parent-not-covering",
        "skip_modules naming a parent module leaves the linears it holds to NF4",
        "lightning_nf4/plugins/convert.py",
        (("        if within(name, skip_modules) or within(logical_name(name), skip_modules):\n",
          "        if matches(name, skip_modules) or matches(logical_name(name), skip_modules):\n"),),
        ("tests/test_edges_precision.py", "tests/test_lora.py"),
    ),
    Mutation(
        "tied-head-config-kept",
        "the merged export of LoRA on a tied lm_head keeps tie_word_embeddings: true",
        "lightning_nf4/export.py",
        (("    if not getattr(hf.config, \"tie_word_embeddings\", False):\n        return False\n    head, table",
          "    if True:\n        return False\n    head, table"),),
        ("tests/test_reliability.py",),
    ),
    Mutation(
        "loader-follows-default-device",
        "the loader reads checkpoint tensors into buffers on the caller's default device (Lightning's GPU in configure_model)",
        "lightning_nf4/loading/checkpoint.py",
        (('        buffer = torch.empty(stop - begin, dtype=torch.uint8, device="cpu")  # host memory, whatever the default device\n'
          '        with open(file, "rb") as handle:\n',
          '        buffer = torch.empty(stop - begin, dtype=torch.uint8)\n        with open(file, "rb") as handle:\n'),),
        ("tests/test_loading.py", "tests/test_deferred_loading.py"),
    ),
    Mutation(
        "loader-under-callers-device",
        "from_pretrained builds and fills the model under the caller's default device (buffers land there)",
        "lightning_nf4/loading/auto.py",
        (('        with torch.device("cpu"):\n            model, unexpected = cls._load(', '        if True:\n            model, unexpected = cls._load('),),
        ("tests/test_loading.py", "tests/test_deferred_loading.py"),
    ),
    Mutation(
        "cpu-quantize-follows-default-device",
        "the C quantize kernel writes into codes allocated on the caller's default device",
        "lightning_nf4/kernels/cpu.py",
        (('    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device="cpu")  # C writes here: never a default device\'s\n',
          '    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)\n'),),
        ("tests/test_edges_linear.py",),
    ),
    Mutation(
        "subfolder-ignored-for-weights",
        "subfolder= reads the config there but the weights from the parent folder",
        "lightning_nf4/loading/auto.py",
        (("resolve_model_path(str(pretrained_model_name_or_path)) / subfolder", "resolve_model_path(str(pretrained_model_name_or_path))"),),
        ("tests/test_loading_args.py",),
    ),
    Mutation(
        "unknown-loader-keywords-swallowed",
        "from_pretrained takes a misspelt keyword silently (quantisation_config= gives a float model)",
        "lightning_nf4/loading/auto.py",
        (("        if unused:\n", "        if False:\n"),),
        ("tests/test_loading_args.py",),
    ),
    Mutation(
        "no-transformers-key-renames",
        "checkpoint keys transformers renames for an architecture (GPT-NeoX's embed_out) are not renamed",
        "lightning_nf4/loading/keys.py",
        (("        self.renamings, self.converters = _transforms(model)", "        self.renamings, self.converters = [], _transforms(model)[1]"),),
        ("tests/test_loading.py",),
    ),
    Mutation(
        "conv1d-not-transposed",
        "a GPT-2 Conv1D weight ([in, out]) is quantized as if it were [out, in]",
        "lightning_nf4/layers/linear.py",
        (("        weight = weight.detach().t().contiguous() if transposed else weight.detach()\n", "        weight = weight.detach()\n"),),
        ("tests/test_conv1d.py",),
    ),
    Mutation(
        "dora-norm-without-cross-term",
        "DoRA's row norm leaves out the base-update cross term",
        "lightning_nf4/layers/dora.py",
        (("    squared = squared + 2 * s * (b * wa).sum(1) + s * s", "    squared = squared + s * s"),),
        ("tests/test_dora.py",),
    ),
    Mutation(
        "sharded-export-drops-lora-head",
        "the sharded merged export drops a LoRA-trained head tied to the embeddings",
        "lightning_nf4/export.py",
        (("    untie = tie and isinstance(hf.get_output_embeddings(), LoraLayer)", "    untie = False"),),
        ("tests/test_fsdp.py::test_lora_on_a_tied_head_survives_the_sharded_merged_export",),
    ),
    Mutation(
        "meta-adapters-from-global-rng",
        "a meta-built sharded model draws its adapters from the global generator, not LoRACallback's init_seed",
        "lightning_nf4/strategies/fsdp.py",
        (('            if isinstance(sub, LoraLayer) and hasattr(sub, "lora_init_seed"):', "            if False:"),),
        ("tests/test_fsdp.py::test_checkpoint_streams_into_shards_each_rank_keeping_its_rows",),
    ),
    Mutation(
        "limited-epoch-counted-unfinished",
        "an epoch ended by limit_train_batches counts as unfinished: the resumed next epoch skips its first batches",
        "lightning_nf4/data/resumable.py",
        (('                "finished": int(self._handed_out >= self._epoch_length()), **self._layout()}', '                "finished": int(self._handed_out >= len(self)), **self._layout()}'),),
        ("tests/test_reliability.py",),
    ),
    Mutation(
        "adapter-checkpoint-drops-buffers",
        "adapter-only checkpoints keep trainable weights only: BatchNorm statistics and a module's own buffers are lost on resume",
        "lightning_nf4/callbacks/lora.py",
        ((" | set(persistent_buffers(module))", ""),),
        ("tests/test_plugin_user.py",),
    ),
    Mutation(
        "trained-modules-stay-bf16",
        "trained parameters keep the dtype the model was built or cast in (bf16 under configure_model or bf16-true)",
        "lightning_nf4/callbacks/lora.py",
        (("        keep_trained_in(module, self.adapter_dtype)\n", ""),),
        ("tests/test_plugin_user.py",),
    ),
    Mutation(
        "shared-linear-split",
        "a linear shared by two parents is replaced under its first name only (two NF4 copies, two adapters)",
        "lightning_nf4/plugins/convert.py",
        (("        replace_module(model, uses[id(linear)], NF4Linear", "        replace_module(model, uses[id(linear)][:1], NF4Linear"),),
        ("tests/test_plugin_user.py",),
    ),
    Mutation(
        "alpha-unchecked",
        "a checkpoint trained with another alpha (same shapes) is exported and resumed silently",
        "lightning_nf4/callbacks/lora.py",
        (('    if "alpha" in meta and (meta["r"], meta["alpha"]) != (r, alpha):', "    if False:"),),
        ("tests/test_cli_user.py",),
    ),
    Mutation(
        "stale-weights-carried",
        "a re-export carries a re-sharded copy of the old model into the new merged/",
        "lightning_nf4/publish.py",
        (("        if _WEIGHT_FILE.fullmatch(rel):\n            continue", "        pass"),),
        ("tests/test_cli_user.py",),
    ),
    Mutation(
        "index-before-single-file",
        "the loader reads a stale shard index before model.safetensors (transformers reads the single file first)",
        "lightning_nf4/loading/checkpoint.py",
        (("        if (folder / single).is_file():\n            return [folder / single]\n        index", "        index"),),
        ("tests/test_cli_user.py",),
    ),
    Mutation(
        "merged-config-dtype",
        "the merged model's config.json keeps the training dtype, not the dtype written (merged_dtype)",
        "lightning_nf4/export.py",
        (('    config["dtype"] = str(dtype).removeprefix("torch.")\n', ""),),
        ("tests/test_cli_user.py",),
    ),
    Mutation(
        "loader-ignores-plugin-skip",
        "CausalLMModule's loader ignores NF4Precision's skip_modules (the plugin's conversion then finds nothing to do)",
        "lightning_nf4/models/causal_lm.py",
        (("            skip = list(plugin.skip_modules)\n", ""),),
        ("tests/test_cli_user.py",),
    ),
    Mutation(
        "checkpoint-crc-unchecked",
        "a checkpoint is loaded without checking its records' CRC-32 (a changed byte loads as another weight)",
        "lightning_nf4/callbacks/lora.py",
        (("            verify_archive(path)\n", "            pass\n"),),
        ("tests/test_plugin_user.py",),
    ),
    Mutation(
        "safetensors-offsets-unchecked",
        "the loader trusts a safetensors header's offsets (shifted offsets read neighbouring bytes as weights)",
        "lightning_nf4/loading/checkpoint.py",
        (("    end = _check_layout(file, header)\n", "    end = max(e['data_offsets'][1] for e in header.values())\n"),),
        ("tests/test_damaged_inputs.py",),
    ),
    Mutation(
        "nf4-values-unchecked",
        "NF4 code tables and scales are not checked (a changed quant_map or a NaN scale loads)",
        "lightning_nf4/format/bnb_state.py",
        (("    _check_values(name, code, absmax if not nested else None, stats, expect)\n", ""),),
        ("tests/test_damaged_inputs.py",),
    ),
    Mutation(
        "frozen-key-accepted",
        "an adapter checkpoint that trained a module this callback freezes is loaded into the frozen module",
        "lightning_nf4/callbacks/lora.py",
        ((" or (isinstance(params[k], nn.Parameter) and not params[k].requires_grad)", ""),),
        ("tests/test_plugin_user.py",),
    ),
    Mutation(
        "validation-draws-kept",
        "a validation inside fit leaves its generator draws: a resume from a checkpoint saved just before it differs",
        "lightning_nf4/callbacks/lora.py",
        (("        self._rng.hold_during_validation(trainer)", "        pass"),),
        ("tests/test_reliability.py::test_resume_mid_epoch_from_a_checkpoint_saved_just_before_a_validation",),
    ),
    Mutation(
        "variant-ignored",
        "from_pretrained(variant=...) reads the plain weights instead of the variant's",
        "lightning_nf4/loading/auto.py",
        (("checkpoint_files(path, source.use_safetensors, source.variant)", "checkpoint_files(path, source.use_safetensors, None)"),),
        ("tests/test_loading_args.py",),
    ),
    Mutation(
        "export-epoch-ahead",
        "export.json records Lightning's epoch count at fit's end, one ahead of the checkpoint's epoch",
        "lightning_nf4/callbacks/lora.py",
        (('"epoch": self._trained_epoch(trainer)', '"epoch": trainer.current_epoch'),),
        ("tests/test_reliability.py::test_export_json_records_the_epoch_of_the_last_step_as_its_checkpoint_does",),
    ),
    Mutation(
        "full-checkpoint-strict",
        "under full_checkpoint=True Lightning loads strictly, so an earlier run's adapter-only checkpoint cannot resume",
        "lightning_nf4/callbacks/lora.py",
        (("                    state.update({k: v for k, v in module.state_dict().items() if k not in trained})\n",
          "                    pass\n"),),
        ("tests/test_reliability.py::test_an_adapter_only_checkpoint_resumes_under_full_checkpoint",),
    ),
    Mutation(
        "generation-prompts-raw",
        "generation_prompts reach an instruction-tuned model without the data's prompt template",
        "lightning_nf4/models/causal_lm.py",
        (('inputs = datamodule.generation_batch(prompts) if hasattr(datamodule, "generation_batch") else prompts', "inputs = prompts"),),
        ("tests/test_cli_user.py::test_generation_prompts_of_instruction_data_are_put_in_its_template",),
    ),
    Mutation(
        "scaler-fresh-each-fit",
        "NF4Precision(float16) builds a new GradScaler at every fit, losing the scale the last fit reached",
        "lightning_nf4/plugins/precision.py",
        ((' and getattr(self.scaler, "_device", None) != device.type:', ":"),),
        ("tests/test_lightning.py::test_the_fp16_grad_scaler_keeps_its_scale_from_one_fit_to_the_next",),
    ),
    Mutation(
        "restore-skips-adapters",
        "load_from_checkpoint builds and injects the module but never loads an adapter-only checkpoint's weights",
        "lightning_nf4/callbacks/restore.py",
        (("        lora._apply_state(module, state)", "        pass"),),
        ("tests/test_load_from_checkpoint.py",),
    ),
    Mutation(
        "restore-default-precision",
        "load_from_checkpoint quantizes with NF4Precision's defaults instead of the recorded compute dtype and block size",
        "lightning_nf4/callbacks/restore.py",
        (('        precision = NF4Precision(**settings["precision"])', "        precision = NF4Precision()"),),
        ("tests/test_load_from_checkpoint.py",),
    ),
    Mutation(
        "kbit-prep-without-flag",
        "prepare_model_for_kbit_training calls PEFT's without the 4-bit flag: gradient checkpointing stays off",
        "lightning_nf4/loading/training.py",
        (("    model.is_loaded_in_4bit = True\n", ""),),
        ("tests/test_loading_args.py",),
    ),
    Mutation(
        "merged-update-twice",
        "a float export after merge_adapter adds the merged adapters' update again on top of the merged base",
        "lightning_nf4/layers/lora.py",
        (("            if name in self.merged_adapters:\n                continue\n", ""),),
        ("tests/test_peft_workflows.py",),
    ),
    Mutation(
        "lora-bias-unmerged",
        "merging and exports leave lora_bias out of the merged bias",
        "lightning_nf4/export.py",
        (("            bias = _merged_bias(module)\n", "            bias = base.bias\n"),),
        ("tests/test_peft_workflows.py",),
    ),
    Mutation(
        "tied-head-quantized",
        "the loader keeps only lm_head in float, quantizing tied output heads of other names",
        "lightning_nf4/loading/config.py",
        (("        return tuple(dict.fromkeys([*self.skip_modules, *defaults, *fp32, *kept_in_float_by_model(model)]))", "        return self.skip_modules"),),
        ("tests/test_loading_args.py",),
    ),
    Mutation(
        "half-true-rounds-adapters",
        "under bf16-true the whole-model cast rounds the trained adapters (restored or trained) to half",
        "lightning_nf4/callbacks/lora.py",
        (("            if name in trained and param.data is not trained[name]:", "            if False:"),),
        ("tests/test_plugin_user.py",),
    ),
    Mutation(
        "ema-accepted",
        "LoRACallback lets Lightning's EMAWeightAveraging average the NF4 codes",
        "lightning_nf4/callbacks/lora.py",
        (("        _refuse_weight_averaging(trainer)\n", ""),),
        ("tests/test_plugin_user.py",),
    ),
    Mutation(
        "out-proj-targeted",
        "all-linear puts LoRA on nn.MultiheadAttention's out_proj, which the attention never calls",
        "lightning_nf4/callbacks/lora.py",
        (("            if id(sub) in read_directly:", "            if False:"),),
        ("tests/test_plugin_user.py",),
    ),
    Mutation(
        "injected-not-compiled",
        "compile=True compiles nothing on a model that carries its adapters already",
        "lightning_nf4/callbacks/lora.py",
        (("            self.inject(pl_module)  # injected already", "            pass  # injected already"),),
        ("tests/test_compile.py::test_compile_applies_to_a_model_that_carries_its_adapters_already",),
    ),
    Mutation(
        "cast-kept-before-injection",
        "the half-precision cast keeps every parameter of a model not injected yet, so bf16-true leaves it float32",
        "lightning_nf4/callbacks/lora.py",
        (("if injected and p.requires_grad and p.is_floating_point()}", "if p.requires_grad and p.is_floating_point()}"),),
        ("tests/test_plugin_user.py::test_a_whole_model_cast_still_casts_a_model_built_in_configure_model",),
    ),
    Mutation(
        "full-checkpoint-not-strict",
        "full_checkpoint loads non-strictly, so a strategy restoring after setup loads a checkpoint that does not fit in part",
        "lightning_nf4/callbacks/lora.py",
        (("        if not self.full_checkpoint:\n            pl_module.strict_loading = False",
          "        if True:\n            pl_module.strict_loading = False"),),
        ("tests/test_plugin_user.py::test_a_strategy_restoring_after_setup_still_refuses_a_full_checkpoint_that_does_not_fit",),
    ),
    Mutation(
        "restore-hook-sees-no-state",
        "load_from_checkpoint gives the module's on_load_checkpoint a checkpoint without its state dict",
        "lightning_nf4/callbacks/restore.py",
        (("    module.on_load_checkpoint(checkpoint)\n", '    module.on_load_checkpoint({**checkpoint, "state_dict": {}})\n'),),
        ("tests/test_load_from_checkpoint.py",),
    ),
    Mutation(
        "loader-dtype-default",
        "from_pretrained without dtype takes the compute dtype, not transformers 5's checkpoint dtype",
        "lightning_nf4/loading/auto.py",
        (('    return "auto" if int(transformers.__version__.split(".")[0]) >= 5 else torch.get_default_dtype()\n', "    return None\n"),),
        ("tests/test_loading_parity.py::test_without_dtype_the_float_parts_keep_the_checkpoints_dtype",),
    ),
    Mutation(
        "loader-tie-always",
        "the streaming loader ties a config-tied pair whatever the checkpoint holds",
        "lightning_nf4/loading/auto.py",
        (('    if "missing_keys" in inspect.signature(tie).parameters and hasattr(model, "all_tied_weights_keys"):\n', "    if False:\n"),),
        ("tests/test_loading_parity.py::test_a_tied_config_over_two_different_checkpoint_tensors_loads_them_untied",
         "tests/test_loading_parity.py::test_a_tied_pair_stored_only_as_the_head_loads_tied_from_it"),
    ),
    Mutation(
        "deferred-tie-always",
        "the deferred loader keeps a config-tied pair tied when the checkpoint holds two different tensors",
        "lightning_nf4/loading/deferred.py",
        (("    _untie_differing(model, deferred)\n", ""),),
        ("tests/test_loading_parity.py::test_a_tied_config_over_two_different_checkpoint_tensors_loads_them_untied",),
    ),
    Mutation(
        "deferred-tie-one-way",
        "the deferred loader reads a tied parameter only under its own name",
        "lightning_nf4/loading/deferred.py",
        (("        raw = next((self.tensors[k] for k in (key, *self.tied.get(key, ())) if k in self.tensors), None)\n",
          "        raw = self.tensors.get(key)\n"),),
        ("tests/test_loading_parity.py::test_a_tied_pair_stored_only_as_the_head_loads_tied_from_it",),
    ),
    Mutation(
        "prequantized-skip-default",
        "a pre-quantized checkpoint without a skip list keeps only lm_head float",
        "lightning_nf4/loading/config.py",
        (("        listed_only=prequantized and skip is not None,\n", "        listed_only=prequantized,\n"),),
        ("tests/test_loading_parity.py::test_a_prequantized_checkpoint_keeps_an_output_head_of_any_name_float",),
    ),
    Mutation(
        "loader-non-persistent-buffers",
        "the loader fills non-persistent buffers from the checkpoint",
        "lightning_nf4/layers/group.py",
        (("        if buffer is not None and name not in sub._non_persistent_buffers_set\n", "        if buffer is not None\n"),),
        ("tests/test_loading_parity.py::test_a_non_persistent_buffer_in_the_checkpoint_is_ignored",),
    ),
    Mutation(
        "compiled-partial-block",
        "compiled code fuses the plain dequantize for a weight ending in a partial block (inductor reads garbage scales)",
        "lightning_nf4/kernels/ops.py",
        (('    if COMPILED_DEQUANTIZE == "fused" and numel % blocksize == 0 and _traced(packed):\n',
          '    if COMPILED_DEQUANTIZE == "fused" and _traced(packed):\n'),),
        ("tests/test_compile.py::test_a_compiled_layer_whose_weight_ends_in_a_partial_block_is_exact",
         "tests/test_compile.py::test_compiled_dequantize_is_fused_and_exact"),
    ),
    Mutation(
        "quant-setter-scales-only",
        "`layer.quant = q` keeps the old codes under q's scales",
        "lightning_nf4/layers/linear.py",
        (("        self._set_quant(value)\n", "        self._quant = value\n"),),
        ("tests/test_edges_linear.py::test_setting_quant_replaces_codes_and_scales_together",),
    ),
    Mutation(
        "replaced-codes-read",
        "a weight replaced by other codes or floats is read with the layer's scales",
        "lightning_nf4/layers/linear.py",
        (("            _check_replacement(quant, weight)\n", ""),),
        ("tests/test_edges_linear.py::test_a_weight_replaced_by_other_codes_or_floats_is_refused_not_misread",),
    ),
    Mutation(
        "kernel-reads-any-codes",
        "the device kernels read codes of any dtype and length by pointer",
        "lightning_nf4/kernels/ops.py",
        (("        check_codes(packed, absmax, blocksize, numel, nested_absmax, nested_blocksize)\n        return kernel(packed, absmax, code, blocksize, numel, dtype,",
          "        return kernel(packed, absmax, code, blocksize, numel, dtype,"),),
        ("tests/test_edges_linear.py::test_a_weight_replaced_by_other_codes_or_floats_is_refused_not_misread",),
    ),
    Mutation(
        "new-zeros-offset",
        "NF4Tensor.new_zeros keeps the nested offset: zeros read as -offset",
        "lightning_nf4/format/tensor.py",
        (("                         offset=torch.zeros_like(nested.offset, device=device))", "                         offset=nested.offset.to(device))"),),
        ("tests/test_edges_tensor.py::test_new_zeros_reads_as_zeros",),
    ),
    Mutation(
        "view-dequantize-shape",
        "a view of an NF4Tensor dequantizes in the weight's shape, not its own",
        "lightning_nf4/format/tensor.py",
        (("        return weight.transpose(-2, -1) if self.transposed else weight.view(self.shape)\n",
          "        return weight.transpose(-2, -1) if self.transposed else weight\n"),),
        ("tests/test_edges_tensor.py::test_a_view_dequantizes_in_its_own_shape",),
    ),
    Mutation(
        "load-drops-nf4-tensor-form",
        "loading a state dict turns an NF4Tensor-form layer back into packed bytes",
        "lightning_nf4/layers/linear.py",
        (('        if isinstance(self._parameters.get("weight"), NF4Tensor):\n            self.weight = nn.Parameter(NF4Tensor(quant), requires_grad=False)\n',
          '        if False:\n            self.weight = nn.Parameter(NF4Tensor(quant), requires_grad=False)\n'),),
        ("tests/test_edges_tensor.py::test_a_layer_in_the_nf4_tensor_form_loads_its_own_keep_vars_state_and_keeps_the_form",),
    ),
    Mutation(
        "functorch-direct-kernel",
        "under torch.func the eager fast path hands storage-less wrappers to the C kernels",
        "lightning_nf4/kernels/ops.py",
        (("    if type(tensor) in _PLAIN and not torch.compiler.is_compiling() and not in_functorch():\n",
          "    if type(tensor) in _PLAIN and not torch.compiler.is_compiling():\n"),),
        ("tests/test_edges_linear.py::test_torch_func_transforms_run_through_the_ops",),
    ),
    Mutation(
        "deferred-tie-reads-whole",
        "the deferred loader reads both tensors of a tied pair whole to compare them",
        "lightning_nf4/loading/deferred.py",
        (("        if deferred.index.same_values(deferred.tensors[first], deferred.tensors[name]):\n",
          "        if torch.equal(deferred.index.read(deferred.tensors[first]), deferred.index.read(deferred.tensors[name])):\n"),),
        ("tests/test_loading_parity.py::test_the_deferred_tie_check_reads_no_tensor_whole",),
    ),
    Mutation(
        "nf4-tensor-data-keeps-layout",
        "`param.data = other` on an NF4Tensor keeps the old codes and scales",
        "lightning_nf4/format/tensor.py",
        (("        torch._C.TensorBase.data.__set__(self, value)\n        self.quant = value.quant\n",
          "        torch._C.TensorBase.data.__set__(self, value)\n"),),
        ("tests/test_edges_tensor.py::test_data_assignment_moves_the_layout_or_is_refused",),
    ),
    Mutation(
        "fsdp-checkpoint-drops-buffers",
        "nf4_fsdp's consolidated checkpoint state holds the trainable parameters only, not the persistent buffers",
        "lightning_nf4/strategies/fsdp.py",
        (("    for name, buffer in persistent_buffers(module).items():\n        out[name] = buffer.detach().cpu()\n", ""),),
        ("tests/test_fsdp.py::test_the_consolidated_state_holds_persistent_buffers_and_loads_them_back",),
    ),
    Mutation(
        "fsdp-loads-full-base",
        "nf4_fsdp copies a full checkpoint's packed NF4 base into the sharded weights (a size mismatch naming nothing)",
        "lightning_nf4/strategies/fsdp.py",
        (("    base = [n for n in state if n in params and _is_nf4_weight(params[n])]\n", "    base = []\n"),),
        ("tests/test_fsdp.py::test_a_full_checkpoint_is_refused_by_nf4_fsdp_with_the_way_out",),
    ),
    Mutation(
        "rng-no-second-iterator",
        "an epoch-end checkpoint's generator states are not put back when Lightning makes the next epoch's iterator again",
        "lightning_nf4/callbacks/rng.py",
        (("        if not self._again_before_batch and self._pending is not None and _iterator_made_again(trainer):\n",
          "        if False:\n"),),
        ("tests/test_reliability.py::test_resume_from_an_epoch_end_checkpoint_with_validation",),
    ),
    Mutation(
        "export-drops-own-config",
        "the adapter export of a PEFT-wrapped model ignores the model's own LoraConfig (rsLoRA, rank pattern, dropout)",
        "lightning_nf4/export.py",
        (("    own = own_lora_config(root, adapter_name)\n", "    own = None\n"),),
        ("tests/test_own_peft_models.py::test_the_adapter_of_a_peft_wrapped_model_loads_as_trained",),
    ),
    Mutation(
        "export-drops-peft-modules-to-save",
        "the adapter export leaves out the modules PEFT's own modules_to_save wrapped",
        "lightning_nf4/callbacks/lora.py",
        (("            self._saved_modules = list(dict.fromkeys([*self.modules_to_save, *_wrapped_to_save(module)]))\n", ""),),
        ("tests/test_own_peft_models.py::test_the_adapter_of_a_peft_wrapped_model_loads_as_trained",),
    ),
    Mutation(
        "own-peft-unexported-accepted",
        "a PEFT-wrapped model's bias/lora_bias/trainable tokens/layer replication train and are silently left out of the adapter",
        "lightning_nf4/callbacks/lora.py",
        (("            if unexported:\n                raise ValueError(", "            if unexported and False:\n                raise ValueError("),),
        ("tests/test_own_peft_models.py::test_what_the_adapter_folder_cannot_hold_is_refused_before_training",),
    ),
    Mutation(
        "own-peft-other-adapter",
        "a PEFT-wrapped model running another adapter than LoRACallback's exports the untrained one",
        "lightning_nf4/callbacks/lora.py",
        (("        if active and active != [self.adapter_name]:\n", "        if False:\n"),),
        ("tests/test_own_peft_models.py::test_what_the_adapter_folder_cannot_hold_is_refused_before_training",),
    ),
    Mutation(
        "cli-export-detached",
        "the CLI's export builds the model without the trainer, so NF4Precision's skip_modules are ignored",
        "lightning_nf4/cli.py",
        (("        model.trainer = self  # as in fit", "        pass  # as in fit"),),
        ("tests/test_cli.py::test_fit_text_writes_artifacts_and_export_matches",),
    ),
    Mutation(
        "perplexity-rank-share",
        "under DDP the held-out perplexity reads only this rank's share of a loader Lightning gave a DistributedSampler",
        "lightning_nf4/models/causal_lm.py",
        (("            loader = _update_dataloader(loader, SequentialSampler(loader.dataset))\n", "            pass\n"),),
        ("tests/test_cli.py::test_the_held_out_perplexity_covers_the_whole_set_under_ddp",),
    ),
    Mutation(
        "scaler-dropped",
        "NF4Precision accepts a GradScaler with bf16 compute and drops it",
        "lightning_nf4/plugins/precision.py",
        (("        if scaler is not None and compute_dtype != torch.float16:\n", "        if False:\n"),),
        ("tests/test_edges_precision.py::test_a_grad_scaler_without_float16_compute_is_refused",),
    ),
    Mutation(
        "accumulation-save-silent",
        "a checkpoint saved inside a gradient-accumulation window gives no warning",
        "lightning_nf4/callbacks/lora.py",
        (("    return 0 if progress.is_last_batch else progress.current.ready % trainer.accumulate_grad_batches\n", "    return 0\n"),),
        ("tests/test_reliability.py::test_a_checkpoint_saved_inside_an_accumulation_window_says_its_resume_is_not_exact",),
    ),
    Mutation(
        "to-float-layout",
        "NF4Linear.to_float gives a Conv1D its weight in [out, in] instead of its own [in, out] layout",
        "lightning_nf4/layers/linear.py",
        (("        weight = nn.Parameter(self.float_layout(self.dequantize(dtype)).contiguous())\n",
          "        weight = nn.Parameter(self.dequantize(dtype).contiguous())\n"),),
        ("tests/test_loading_parity.py::test_dequantize_model_gives_back_the_float_model_as_transformers_dequantize_does",),
    ),
    Mutation(
        "save-weights-only-advice",
        "load_from_checkpoint of a save_weights_only checkpoint sends the user to Lightning's own load_from_checkpoint",
        "lightning_nf4/callbacks/restore.py",
        (("        if not any(\".lora_\" in key for key in state):", "        if True:"),),
        ("tests/test_plugin_user.py::test_a_weights_only_checkpoint_that_does_not_fit_is_refused",),
    ),
    Mutation(
        "device-index-unchecked",
        "a device named with an index is taken as available without checking that kind's devices (one shared check)",
        "lightning_nf4/devices.py",
        (("    if index < count:\n", "    if index < count or device.index:\n"),),
        ("tests/test_reliability.py::test_precision_on_a_missing_device_says_so",),
    ),
    Mutation(
        "fabric-fp32-inputs-cast",
        "NF4FabricPrecision(compute_dtype=torch.float32) casts Fabric's inputs to bfloat16 as Fabric's bf16-mixed does",
        "lightning_nf4/plugins/fabric.py",
        (("        if self.compute_dtype == torch.float32:\n            return data\n", ""),),
        ("tests/test_fabric.py",),
    ),
    Mutation(
        "export-drops-lora-only-biases",
        "a PEFT-wrapped model's bias=\"lora_only\" biases trained but left out of the adapter folder",
        "lightning_nf4/export.py",
        (('    if bias == "lora_only":\n', '    if bias == "lora_only_":\n'),),
        ("tests/test_own_peft_models.py",),
    ),
    Mutation(
        'instr-overlong-kept',
        'InstructionDataModule keeps examples whose prompt fills max_length (no response token left: a loss over no tokens)',
        'lightning_nf4/data/instruction.py',
        (('        kept = [e for e in encoded if any(label != IGNORE_INDEX for label in e["labels"][1:])]\n',
          '        kept = encoded\n'),),
        ("tests/test_edges_data.py",),
    ),
    Mutation(
        'instr-input-type-unchecked',
        "read_jsonl accepts a non-string 'input' (a number or list is formatted into the prompt silently)",
        'lightning_nf4/data/instruction.py',
        (('        for key in ("instruction", "input", "output"):\n            if key in record',
          '        for key in ("instruction", "output"):\n            if key in record'),),
        ("tests/test_edges_data.py",),
    ),
    Mutation(
        'instr-split-seed-ignored',
        "InstructionDataModule's held-out split ignores its seed (always seed 0)",
        'lightning_nf4/data/instruction.py',
        (('random.Random(self.seed).shuffle(distinct)',
          'random.Random(0).shuffle(distinct)'),),
        ("tests/test_edges_data.py",),
    ),
    Mutation(
        'instr-slow-tokenizer-mask',
        "with a tokenizer without offsets (a Python tokenizer) the prompt's last token is learnt as a response token",
        'lightning_nf4/data/instruction.py',
        (('if a != b), len(prompt_ids))',
          'if a != b), len(prompt_ids) - 1)'),),
        ("tests/test_edges_data.py",),
    ),
    Mutation(
        'instr-truncate-from-left',
        'max_length cuts labels from the end but input ids from the start: labels misaligned with their ids',
        'lightning_nf4/data/instruction.py',
        (('return {"input_ids": ids[: self.max_length], "labels": labels[: self.max_length]}',
          'return {"input_ids": ids[: self.max_length], "labels": labels[-self.max_length:]}'),),
        ("tests/test_edges_data.py",),
    ),
    Mutation(
        'instr-chat-prompt-bos',
        "with use_chat_template, generation/predict prompts get the tokenizer's special tokens on top of the template's (a second BOS)",
        'lightning_nf4/data/instruction.py',
        (('        return self.tokenizer(prompt, add_special_tokens=not self.use_chat_template)["input_ids"]',
          '        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]'),),
        ("tests/test_edges_data.py",),
    ),
    Mutation(
        'pack-no-eos',
        'pack joins documents without EOS between them',
        'lightning_nf4/data/text.py',
        (('            flat.append(eos)\n',
          '            pass\n'),),
        ("tests/test_edges_data.py",),
    ),
    Mutation(
        'pack-limit-early',
        'pack stops one block early under max_blocks (the cap is checked against limit - block_size)',
        'lightning_nf4/data/text.py',
        (('        if limit is not None and len(flat) >= limit:\n',
          '        if limit is not None and len(flat) >= limit - block_size:\n'),),
        ("tests/test_edges_data.py",),
    ),
    Mutation(
        'text-val-fraction-one',
        'split_documents accepts val_fraction=1.0',
        'lightning_nf4/data/text.py',
        (('    if not 0.0 < val_fraction < 1.0:\n',
          '    if not 0.0 < val_fraction <= 1.0:\n'),),
        ("tests/test_edges_data.py",),
    ),
    Mutation(
        'text-pad-token-unset',
        'load_tokenizer gives a tokenizer without a pad token none (EOS is not used as pad)',
        'lightning_nf4/data/text.py',
        (('        tokenizer.pad_token = tokenizer.eos_token\n',
          '        pass\n'),),
        ("tests/test_edges_data.py",),
    ),
    Mutation(
        'text-single-paragraph-lines',
        'a text file of one paragraph is not split into lines (one document: the split then fails)',
        'lightning_nf4/data/text.py',
        (('    return docs if len(docs) >= 2 else',
          '    return docs if len(docs) >= 1 else'),),
        ("tests/test_edges_data.py",),
    ),
    Mutation(
        'text-split-seed-ignored',
        "TextDataModule's document split ignores its seed (always seed 0)",
        'lightning_nf4/data/text.py',
        (('split_documents(read_documents(self.source), self.val_fraction, self.seed)',
          'split_documents(read_documents(self.source), self.val_fraction, 0)'),),
        ("tests/test_edges_data.py",),
    ),
    Mutation(
        'left-pad-mask-right',
        "left_pad_collate's attention mask marks the first positions (the padding) instead of the prompt's",
        'lightning_nf4/data/text.py',
        (('                mask[row, width - len(prompt):] = 1\n',
          '                mask[row, :len(prompt)] = 1\n'),),
        ("tests/test_edges_data.py",),
    ),
    Mutation(
        'loader-rank-zero',
        "make_loader gives every rank rank 0's share of the training data (DistributedSampler rank=0)",
        'lightning_nf4/data/resumable.py',
        (('num_replicas=world, rank=rank,',
          'num_replicas=world, rank=0,'),),
        ("tests/test_edges_data.py",),
    ),
    Mutation(
        'loader-seed-ignored',
        "make_loader's training order ignores the seed (DistributedSampler's default seed 0)",
        'lightning_nf4/data/resumable.py',
        (('rank=rank, shuffle=True, seed=seed)',
          'rank=rank, shuffle=True)'),),
        ("tests/test_edges_data.py",),
    ),
    Mutation(
        'loader-eval-shuffled',
        'the evaluation loaders (validation, test) shuffle',
        'lightning_nf4/data/resumable.py',
        (('        return DataLoader(dataset, shuffle=False, generator=generator, **kwargs)',
          '        return DataLoader(dataset, shuffle=True, generator=generator, **kwargs)'),),
        ("tests/test_edges_data.py",),
    ),
    Mutation(
        'config-double-quant-default',
        "a dict quantization_config without bnb_4bit_use_double_quant double-quantizes (BitsAndBytesConfig's default is False)",
        'lightning_nf4/loading/config.py',
        (('double_quant=bool(settings.get("bnb_4bit_use_double_quant", False)),',
          'double_quant=bool(settings.get("bnb_4bit_use_double_quant", True)),'),),
        ("tests/test_edges_loading_and_cli.py",),
    ),
    Mutation(
        'kbit-gc-forced',
        'prepare_model_for_kbit_training turns gradient checkpointing on even with use_gradient_checkpointing=False',
        'lightning_nf4/loading/training.py',
        (('        return prepare(model, use_gradient_checkpointing=use_gradient_checkpointing,',
          '        return prepare(model, use_gradient_checkpointing=True,'),),
        ("tests/test_edges_loading_and_cli.py",),
    ),
    Mutation(
        'kbit-gc-kwargs-dropped',
        'prepare_model_for_kbit_training drops gradient_checkpointing_kwargs (use_reentrant=False is not applied)',
        'lightning_nf4/loading/training.py',
        (('                       gradient_checkpointing_kwargs=gradient_checkpointing_kwargs, **kwargs)',
          '                       gradient_checkpointing_kwargs=None, **kwargs)'),),
        ("tests/test_edges_loading_and_cli.py",),
    ),
    Mutation(
        'packaged-version-unchecked',
        "a packaged model's distribution is used whatever version is installed",
        'lightning_nf4/loading/packaged.py',
        (('    if version != spec.version:\n',
          '    if False:\n'),),
        ("tests/test_edges_loading_and_cli.py",),
    ),
    Mutation(
        'rng-gauss-restored-as-zero',
        "restore puts back a cached Gaussian of 0.0 where Python's generator had none (the next random.gauss() is 0)",
        'lightning_nf4/callbacks/rng.py',
        (('        (3, tuple(states["python"].tolist()), gauss if has_gauss else None),\n',
          '        (3, tuple(states["python"].tolist()), gauss),\n'),),
        ("tests/test_edges_loading_and_cli.py",),
    ),
    Mutation(
        'non-lightning-accepted',
        "load_checkpoint accepts a torch.save'd dict without 'state_dict' (a bare model state dict) as a Lightning checkpoint",
        'lightning_nf4/checkpoint_io.py',
        (('if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:',
          'if not isinstance(checkpoint, dict):'),),
        ("tests/test_edges_loading_and_cli.py",),
    ),
    Mutation(
        'vp-head-split-unchecked',
        'vocabulary_tables shards an output head whose rows do not split evenly across the ranks (only the input table is checked)',
        'lightning_nf4/strategies/vocab_parallel.py',
        (('    if embeddings.weight.shape[0] % world or head.weight.shape[0] % world:',
          '    if embeddings.weight.shape[0] % world:'),),
        ("tests/test_edges_loading_and_cli.py",),
    ),
    Mutation(
        'cli-full-ckpt-state-unloaded',
        "the CLI's export of a full checkpoint never loads its state dict (exports untrained adapters)",
        'lightning_nf4/cli.py',
        (('        if not checkpoint.get(_CKPT_KEY, {}).get("adapter_only"):\n',
          '        if False:\n'),),
        ("tests/test_edges_loading_and_cli.py",),
    ),
    Mutation(
        'cli-last-oldest',
        'export --ckpt_path last takes the oldest of several last*.ckpt files',
        'lightning_nf4/cli.py',
        (('        return max(found, key=os.path.getmtime)',
          '        return min(found, key=os.path.getmtime)'),),
        ("tests/test_edges_loading_and_cli.py",),
    ),
    Mutation(
        'cli-config-base-always',
        "the config's base model replaces the checkpoint's even when the checkpoint's still exists",
        'lightning_nf4/cli.py',
        (('        if saved != given and _model_exists(given) and not _model_exists(saved):',
          '        if saved != given and _model_exists(given):'),),
        ("tests/test_edges_loading_and_cli.py",),
    ),
    Mutation(
        'prec-device-given-ignored',
        "NF4Precision(device=...) is ignored: it quantizes and autocasts on the trainer's root device",
        'lightning_nf4/plugins/precision.py',
        (('        if self._device_given:\n            return torch.device(self.device)\n',
          ''),),
        ("tests/test_edges_loading_and_cli.py",),
    ),
    Mutation(
        "config-dict-quant-type-nf4",
        "a dict quantization_config without bnb_4bit_quant_type is read as NF4, where BitsAndBytesConfig reads FP4",
        "lightning_nf4/loading/config.py",
        (('    if settings.get("load_in_4bit") and "bnb_4bit_quant_type" not in settings:', '    if False:'),),
        ("tests/test_edges_loading_and_cli.py",),
    ),
    Mutation(
        "code-table-shared",
        "`code_table()` hands out the cached CPU table itself: a weight's table changed in place changes every later one",
        "lightning_nf4/format/codebooks.py",
        (("    return _code_cpu(quant_type).to(device=device, copy=True)\n", "    return _code_cpu(quant_type).to(device=device)\n"),),
        ("tests/test_edges_kernels.py::test_code_tables_are_fresh_tensors_that_a_state_dict_may_change",),
    ),
    Mutation(
        "code-table-fp4-as-nf4",
        "`code_table(\"fp4\")` silently returns the NF4 table",
        "lightning_nf4/format/codebooks.py",
        (('    if quant_type == "nf4":\n        return torch.tensor(NF4_CODE', '    if quant_type in ("nf4", "fp4"):\n        return torch.tensor(NF4_CODE'),),
        ("tests/test_edges_kernels.py::test_a_code_table_of_another_quant_type_is_refused",),
    ),
    Mutation(
        "offload-min-bytes-exclusive",
        "an activation of exactly `min_bytes` stays on the device (`>` for `>=`)",
        "lightning_nf4/layers/offload.py",
        (("return tensor.numel() * tensor.element_size() >= self.min_bytes", "return tensor.numel() * tensor.element_size() > self.min_bytes"),),
        ("tests/test_edges_layers.py::test_an_activation_of_exactly_min_bytes_moves",),
    ),
    Mutation(
        "offload-parameter-views",
        "a contiguous view of a trained parameter (a row slice) is offloaded as an activation",
        "lightning_nf4/layers/offload.py",
        (("        if tensor._is_view() and isinstance(tensor._base, nn.Parameter):\n            return False\n", ""),),
        ("tests/test_edges_layers.py::test_a_contiguous_view_of_a_trained_parameter_stays",),
    ),
    Mutation(
        "dora-merge-norm-on-merged",
        "merging a second DoRA adapter takes its norm on the weight merged so far, not the base (merged != forward)",
        "lightning_nf4/layers/dora.py",
        (("    norm = weight_norm(layer, adapter, base_weight)\n", "    norm = weight_norm(layer, adapter, merged)\n"),),
        ("tests/test_edges_layers.py::test_two_active_dora_adapters_merge_to_the_weight_the_forward_computes",),
    ),
    Mutation(
        "dora-eval-base-of-dropped",
        "DoRA in eval with a dropout module recomputes the base output instead of rescaling the output so far",
        "lightning_nf4/layers/dora.py",
        (("    if isinstance(layer.lora_dropout[adapter], nn.Identity) or not layer.training:\n",
          "    if isinstance(layer.lora_dropout[adapter], nn.Identity):\n"),),
        ("tests/test_edges_layers.py::test_two_active_dora_adapters_merge_to_the_weight_the_forward_computes",),
    ),
    Mutation(
        "group-round-any-dtype",
        "a group hands a member the round's weight in another dtype than the one it asked for",
        "lightning_nf4/layers/group.py",
        (("if w is not None and w.dtype == dtype:", "if w is not None:"),),
        ("tests/test_edges_layers.py::test_members_with_other_compute_dtypes_get_their_weight_in_their_own_dtype",),
    ),
    Mutation(
        "group-mixed-blocksizes",
        "a group dequantizes members of different block sizes in one call, with the first member's block size",
        "lightning_nf4/layers/group.py",
        (("q.device != first.device or q.blocksize != first.blocksize or q.double_quant", "q.device != first.device or q.double_quant"),),
        ("tests/test_edges_layers.py::test_members_with_other_blocksizes_get_their_own_weights",),
    ),
    Mutation(
        "group-max-members-exclusive",
        "a block of exactly max_members (8) NF4 layers is left ungrouped",
        "lightning_nf4/layers/group.py",
        (("if 1 < len(members) <= max_members:", "if 1 < len(members) < max_members:"),),
        ("tests/test_edges_layers.py::test_a_block_of_exactly_max_members_is_grouped_and_regrouping_drops_old_groups",),
    ),
    Mutation(
        "group-regroup-keeps-old",
        "calling group_nf4_layers again keeps the old groups of blocks that no longer qualify",
        "lightning_nf4/layers/group.py",
        (("            layer._group = None\n", "            pass\n"),),
        ("tests/test_edges_layers.py::test_a_block_of_exactly_max_members_is_grouped_and_regrouping_drops_old_groups",),
    ),
    Mutation(
        "repeated-blocks-ignore-no-split",
        "`repeated_blocks` ignores `_no_split_modules` and takes the outermost ModuleList elements",
        "lightning_nf4/layers/group.py",
        (("    found = find_by_class(module, sorted(names)) if names else []\n", "    found = []\n"),),
        ("tests/test_edges_layers.py::test_auto_blocks_are_the_no_split_classes_not_the_list_elements",),
    ),
    Mutation(
        "triton-group-any-numel",
        "the Triton group kernel takes members whose numel is not a multiple of 64 (its compiler hints then lie)",
        "lightning_nf4/kernels/triton_kernels.py",
        (("0 < len(packed) <= GROUP_MAX_MEMBERS and all(n % 64 == 0 for n in numels)", "0 < len(packed) <= GROUP_MAX_MEMBERS"),),
        ("tests/test_edges_kernels.py::test_the_group_kernel_takes_only_numels_in_multiples_of_64",),
    ),
    Mutation(
        "triton-quantize-grid-floor",
        "the Triton 4-bit quantize launches floor(blocks / rows) programs: the last partial program's blocks are never written",
        "lightning_nf4/kernels/triton_kernels.py",
        (("    grid = (-(-num_blocks // rows),)\n", "    grid = (num_blocks // rows,)\n"),),
        ("tests/test_edges_kernels.py::test_triton_quantize_and_launch_caches_under_the_interpreter",),
    ),
    Mutation(
        "triton-8bit-grid-floor",
        "the Triton 8-bit (nested scale) quantize launches floor(blocks / rows) programs",
        "lightning_nf4/kernels/triton_kernels.py",
        (("kernels.quantize_8bit_kernel[(-(-num_blocks // rows),)]", "kernels.quantize_8bit_kernel[(max(1, num_blocks // rows),)]"),),
        ("tests/test_edges_kernels.py::test_triton_quantize_and_launch_caches_under_the_interpreter",),
    ),
    Mutation(
        "triton-gemv-x-odd-offset",
        "a prepared bf16/fp16 gemv views an x at an odd element offset as int32 without copying it (error)",
        "lightning_nf4/kernels/triton_kernels.py",
        (("            x = (x if x.storage_offset() % 2 == 0 else x.clone()).view(torch.int32)\n        return x",
          "            x = x.view(torch.int32)\n        return x"),),
        ("tests/test_edges_kernels.py::test_triton_quantize_and_launch_caches_under_the_interpreter",),
    ),
    Mutation(
        "triton-group-table-key-no-numels",
        "the Triton group launch's table cache is keyed by addresses only: tensors at reused addresses with other sizes get a stale table",
        "lightning_nf4/kernels/triton_kernels.py",
        (("    key = (device, addresses, tuple(numels))\n", "    key = (device, addresses)\n"),),
        ("tests/test_edges_kernels.py::test_triton_quantize_and_launch_caches_under_the_interpreter",),
    ),
    Mutation(
        "triton-gemv-shape-key-no-dtype",
        "the gemv op's per-shape launch cache ignores the input dtype: a bf16 call's x-pairing is reused for fp16/fp32",
        "lightning_nf4/kernels/triton_kernels.py",
        (("key = (out_features, in_features, blocksize, nested, dtype, shuffle, setting)", "key = (out_features, in_features, blocksize, nested, shuffle, setting)"),),
        ("tests/test_edges_kernels.py::test_triton_quantize_and_launch_caches_under_the_interpreter",),
    ),
    Mutation(
        "cpu-quantize-non-contiguous",
        "the C quantize reads a non-contiguous weight (a transposed one) in storage order",
        "lightning_nf4/kernels/cpu.py",
        (("    weight = weight.contiguous()\n    n = weight.numel()\n", "    n = weight.numel()\n"),),
        ("tests/test_edges_kernels.py::test_a_non_contiguous_weight_quantizes_as_its_contiguous_copy",),
    ),
    Mutation(
        "cpu-strided-scales",
        "the C dequantize reads a strided absmax as if it were contiguous",
        "lightning_nf4/kernels/cpu.py",
        (("    keep = [packed.contiguous(), absmax.contiguous(), code.float().contiguous()]", "    keep = [packed.contiguous(), absmax, code.float().contiguous()]"),),
        ("tests/test_edges_kernels.py::test_strided_scales_dequantize_as_contiguous_ones",),
    ),
    Mutation(
        "fallback-ties-round-up",
        "the plain-PyTorch quantize rounds a value on a midpoint of the NF4 table up (bitsandbytes rounds it down)",
        "lightning_nf4/kernels/reference.py",
        (("q = torch.bucketize(scaled, midpoints(code)).to(torch.uint8)", "q = torch.bucketize(scaled, midpoints(code), right=True).to(torch.uint8)"),),
        ("tests/test_edges_kernels.py::test_the_fallback_quantizes_ties_and_a_partial_last_block_as_bitsandbytes",),
    ),
    Mutation(
        "fallback-tail-by-reciprocal",
        "the plain-PyTorch quantize normalises the partial last block by x * (1 / absmax), not x / absmax as bitsandbytes",
        "lightning_nf4/kernels/reference.py",
        (("scaled = torch.cat([scaled, flat[full:] / tail_max.clamp(min=1e-38)])", "scaled = torch.cat([scaled, flat[full:] * (1.0 / tail_max.clamp(min=1e-38))])"),),
        ("tests/test_edges_kernels.py::test_the_fallback_quantizes_ties_and_a_partial_last_block_as_bitsandbytes",),
    ),
    Mutation(
        "compile-empty-blocks",
        "`compile={\"blocks\": []}` passes the option check",
        "lightning_nf4/plugins/compile.py",
        (("(isinstance(blocks, Sequence) and blocks and all(", "(isinstance(blocks, Sequence) and all("),),
        ("tests/test_edges_layers.py::test_compile_options_are_checked_and_copied",),
    ),
    Mutation(
        "compile-option-not-copied",
        "`compile_option` returns the caller's mapping itself: a change after the check reaches the callback unchecked",
        "lightning_nf4/plugins/compile.py",
        (("    return dict(value)\n", "    return value\n"),),
        ("tests/test_edges_layers.py::test_compile_options_are_checked_and_copied",),
    ),
    Mutation(
        "compile-named-blocks-inner-too",
        "named compile blocks include blocks nested inside other named blocks (compiled twice)",
        "lightning_nf4/plugins/compile.py",
        (("    found = find_by_class(module, wanted)  # a block inside another is compiled with it\n",
          "    found = [m for m in module.modules() if any(type(m).__name__ == c if isinstance(c, str) else isinstance(m, c) for c in wanted)]\n"),),
        ("tests/test_edges_layers.py::test_named_blocks_inside_named_blocks_are_compiled_with_them",),
    ),
    Mutation(
        "dora-reset-float-base",
        "`reset_magnitudes` on PEFT's DoRA over a float base calls the base's dequantize (AttributeError)",
        "lightning_nf4/layers/dora.py",
        (('    float_weight = None if hasattr(base, "dequantize") else base.weight.detach()\n', "    float_weight = None\n"),),
        ("tests/test_edges_layers.py::test_reset_magnitudes_on_peft_dora_over_a_float_base",),
    ),
    Mutation(
        "nf4-tensor-clone-shares",
        "`NF4Tensor.clone()` shares the codes and scales with the original",
        "lightning_nf4/format/tensor.py",
        (("    return t._alias(_map_tensors(t.quant, torch.clone), shape=t.shape)\n", "    return t._alias(t.quant, shape=t.shape)\n"),),
        ("tests/test_edges_layers.py::test_a_clone_of_an_nf4_tensor_owns_its_bytes",),
    ),
    Mutation(
        "loss-labels-count-only",
        "`linear_cross_entropy` checks only the labels' count, so labels [T, B] for hidden [B, T, H] are taken",
        "lightning_nf4/losses.py",
        (("    if tuple(labels.shape) != tuple(hidden.shape[:-1]):\n        raise", "    if labels.numel() != hidden[..., 0].numel():\n        raise"),),
        ("tests/test_edges_layers.py::test_labels_of_another_shape_with_the_same_count_are_refused",),
    ),
    Mutation(
        "loss-head-check-loose",
        "the head check's tolerance is 10x looser: logits 10% off lm_head(hidden) take the chunked path (wrong loss)",
        "lightning_nf4/losses.py",
        (("matches = here = bool(torch.allclose(ours, theirs, rtol=2e-2, atol=tol))", "matches = here = bool(torch.allclose(ours, theirs, rtol=2e-1, atol=10 * tol))"),),
        ("tests/test_edges_layers.py::test_logits_ten_percent_off_the_head_take_the_plain_path",),
    ),
    Mutation(
        "loaded-nf4-keeps-compute-dtype",
        "NF4 layers that came quantized keep the loader's compute dtype under a plugin with another compute_dtype",
        "lightning_nf4/plugins/precision.py",
        (("        self._adopt_compute_dtype(loaded, stacked)\n", ""),),
        ("tests/test_fabric.py::test_a_model_loaded_in_nf4_computes_in_the_plugins_dtype",),
    ),
    Mutation(
        "fabric-trains-in-compute-dtype",
        "NF4FabricPrecision leaves trainable tensors built under fabric.init_module() in the compute dtype",
        "lightning_nf4/plugins/fabric.py",
        (("        cast = keep_trained_in(module, torch.float32)", "        cast = 0"),),
        ("tests/test_fabric.py::test_fabric_init_module_keeps_what_trains_in_float32",),
    ),
    Mutation(
        "fabric-optimizer-unchecked",
        "an optimizer holding the weights NF4FabricPrecision quantized steps without a word",
        "lightning_nf4/plugins/fabric.py",
        (("            self._check_optimizer(optimizer)\n", ""),),
        ("tests/test_fabric.py::test_fabric_refuses_an_optimizer_that_holds_the_quantized_weights",),
    ),
    Mutation(
        "plugin-pickles-weakrefs",
        "the precision plugins pickle their weak record of replaced weights, so ddp_spawn cannot send them",
        "lightning_nf4/plugins/precision.py",
        (('        state["_replaced"] = None  # weak', '        pass  # weak'),),
        ("tests/test_fabric.py::test_the_plugins_pickle_after_converting_a_model",),
    ),
    Mutation(
        'moe-expert-off-by-one',
        'indexing a stacked NF4 weight returns the expert before the one asked for',
        'lightning_nf4/format/tensor.py',
        (('    return NF4Tensor(expert_slice(t.quant, int(index)), dtype=t.dtype, transposed=t.transposed)', '    return NF4Tensor(expert_slice(t.quant, int(index) - 1), dtype=t.dtype, transposed=t.transposed)'),),
        ('tests/test_moe.py::test_each_expert_reads_as_its_part_of_the_whole_weight',),
    ),
    Mutation(
        'moe-expert-scales-shifted',
        "an expert that starts inside a group of nested scales reads its neighbour's scales",
        'lightning_nf4/format/tensor.py',
        (('    skip = first - g0 * nested.blocksize\n', '    skip = first - g0 * nested.blocksize + 1\n'),),
        ('tests/test_moe.py::test_each_expert_reads_as_its_part_of_the_whole_weight',),
    ),
    Mutation(
        'moe-transpose-ignored',
        'a transposed NF4 weight dequantizes untransposed',
        'lightning_nf4/format/tensor.py',
        (('        return weight.transpose(-2, -1) if self.transposed else weight.view(self.shape)', '        return weight.view(self.shape)'),),
        ('tests/test_moe.py::test_matmuls_on_the_stacked_weight_equal_those_on_its_float_form',),
    ),
    Mutation(
        'moe-baddbmm-missing',
        "PEFT's target_parameters update (a baddbmm on the NF4 experts) is not supported",
        'lightning_nf4/format/tensor.py',
        (('aten.bmm.default, aten.baddbmm.default,', 'aten.bmm.default,'),),
        ('tests/test_moe.py::test_peft_lora_on_nf4_experts_with_target_parameters',),
    ),
    Mutation(
        'moe-state-dict-unhooked',
        'NF4 expert weights save as tensor subclasses, not bitsandbytes keys',
        'lightning_nf4/layers/experts.py',
        (('    _hook_state_dict(module)\n', ''),),
        ('tests/test_moe.py::test_state_dict_holds_bitsandbytes_keys_and_loads_back',),
    ),
    Mutation(
        'moe-ddp-syncs-experts',
        'DDP broadcasts the NF4 expert weights (not kept out of its sync)',
        'lightning_nf4/plugins/convert.py',
        ((' | {name for name, _ in nf4_expert_weights(module)}', ''),),
        ('tests/test_moe.py::test_moe_under_ddp_and_fsdp2_matches_one_process',),
    ),
    Mutation(
        'moe-export-packed',
        'the merged export writes the NF4 expert weights as they are instead of dequantized',
        'lightning_nf4/export.py',
        (('            if isinstance(param, NF4Tensor):  # a stacked expert weight', '            if False:  # a stacked expert weight'),),
        ('tests/test_moe.py::test_moe_under_ddp_and_fsdp2_matches_one_process',),
    ),
    Mutation(
        'moe-param-wrapper-refused',
        "PEFT's target_parameters LoRA on experts about to be quantized is refused like one on a linear",
        'lightning_nf4/plugins/convert.py',
        ((' and convertible_kind(layer.get_base_layer()):', ':'),),
        ('tests/test_moe.py::test_peft_wrapped_experts_are_converted_under_their_lora',),
    ),
    Mutation(
        'moe-fabric-replaced-unrecorded',
        'NF4FabricPrecision does not record the float experts it replaced, so a stale optimizer keeps them',
        'lightning_nf4/plugins/precision.py',
        (('        self._replaced.update((id(getattr(owner, attr)), getattr(owner, attr)) for _, owner, attr in experts)\n', ''),),
        ('tests/test_moe.py::test_fabric_trains_peft_lora_on_nf4_experts',),
    ),
    Mutation(
        'moe-experts-skipped',
        'NF4Precision converts linears only and leaves the experts in float',
        'lightning_nf4/plugins/precision.py',
        (('            count_experts = convert_experts(module, **kwargs)', '            count_experts = 0'),),
        ('tests/test_moe.py::test_trainer_quantizes_experts_and_trains_lora_around_them', 'tests/test_moe.py::test_conversion_reports_and_shrinks_the_experts',),
    ),
    Mutation(
        "moe-experts-keep-their-dtype",
        "NF4 expert weights quantized for bf16 keep dequantizing to bf16 under a float32 plugin",
        "lightning_nf4/plugins/precision.py",
        (("                param.data = NF4Tensor(param.quant, dtype=self.compute_dtype, transposed=param.transposed)", "                pass"),),
        ("tests/test_moe.py::test_experts_quantized_earlier_compute_in_the_plugins_dtype",),
    ),
    Mutation(
        'moe-fp32-activations',
        'NF4 experts dequantize to bf16 whatever the activations, so float32 inputs outside autocast fail',
        'lightning_nf4/format/tensor.py',
        (('        dtype = next((a.dtype for a in values if isinstance(a, Tensor) and not isinstance(a, NF4Tensor) and a.is_floating_point()), None)', '        dtype = None'),),
        ('tests/test_moe.py::test_float32_activations_outside_autocast_run_against_bf16_experts',),
    ),
    Mutation(
        'moe-odd-expert-sliced',
        'an expert that does not hold whole blocks is sliced anyway (the eager loop fails on such models)',
        'lightning_nf4/format/tensor.py',
        (('    if math.prod(t.quant.shape[1:]) % t.quant.blocksize:\n        return t.dequantize(t.quant.dtype)[index]\n', ''),),
        ('tests/test_moe.py::test_experts_without_whole_blocks_read_from_the_whole_weight',),
    ),
    Mutation(
        'moe-param-path-skip-ignored',
        'skip_modules naming one stacked weight (experts.down_proj) is ignored',
        'lightning_nf4/plugins/convert.py',
        ((' if not matches(logical_name(f"{name}.{p}" if name else p), skip_modules)]', ']'),),
        ('tests/test_moe.py::test_one_stacked_weight_is_skipped_by_its_path',),
    ),
    Mutation(
        'moe-target-parameters-unmerged',
        "the merged export leaves out PEFT's target_parameters updates on the experts",
        'lightning_nf4/export.py',
        (('    return (value + delta.to(value.device)).to(dtype or (param.quant.dtype if nf4 else param.dtype)).contiguous()', '    return value.to(dtype or (param.quant.dtype if nf4 else param.dtype)).contiguous()'),),
        ('tests/test_moe.py::test_target_parameters_lora_merges_into_the_export_and_its_adapter_is_peft_s',),
    ),
    Mutation(
        'keep-in-fp32-ignored',
        'NF4Precision quantizes the modules a transformers model keeps in float32',
        'lightning_nf4/plugins/precision.py',
        (('        return (*self.skip_modules, *kept_in_float_by_model(module))', '        return tuple(self.skip_modules)'),),
        ('tests/test_moe.py::test_modules_a_model_keeps_in_float32_stay_float',),
    ),
    Mutation(
        "moe-load-parts-swapped",
        "the streaming MoE loader puts each expert's gate rows where its up rows go (Concatenate order lost)",
        "lightning_nf4/loading/experts.py",
        (("        first_row = piece.expert * self.shape[1] + piece.part * self.rows\n",
          "        first_row = piece.expert * self.shape[1] + (piece.parts - 1 - piece.part) * self.rows\n"),),
        ("tests/test_moe_loading.py",),
    ),
    Mutation(
        "moe-load-stacks-in-float",
        "the MoE loader builds every stacked expert weight whole in float before quantizing it (the memory streaming saves)",
        "lightning_nf4/loading/experts.py",
        (("        self._blockwise = bool(blocksize) and (self.rows * cols) % blocksize == 0\n", "        self._blockwise = False\n"),),
        ("tests/test_moe_loading.py",),
    ),
    Mutation(
        "moe-load-experts-left-float",
        "from_pretrained with a BitsAndBytesConfig leaves stacked MoE experts in float (no NF4 placeholders)",
        "lightning_nf4/loading/auto.py",
        (("            _expert_placeholders(model, nf4)\n", "            pass\n"),),
        ("tests/test_moe_loading.py",),
    ),
    Mutation(
        "moe-meta-ignores-pieces",
        "the meta path maps no per-expert checkpoint tensor to its stacked weight",
        "lightning_nf4/loading/deferred.py",
        (("            deferred.pieces.setdefault(piece.target, {})[piece] = raw\n", "            pass\n"),),
        ("tests/test_moe_loading.py",),
    ),
    Mutation(
        "moe-load-skip-ignored",
        "the loader quantizes experts that llm_int8_skip_modules (or _keep_in_fp32_modules) keeps in float",
        "lightning_nf4/loading/config.py",
        (("            for name in (module_name, f\"{module_name}.{attr}\") if kept_by_transformers(name, patterns)\n",
          "            for name in (module_name, f\"{module_name}.{attr}\") if False\n"),),
        ("tests/test_moe_loading.py",),
    ),
    Mutation(
        "moe-save-splits-nf4",
        "save_pretrained of a model with NF4 experts reverses transformers' expert conversions on the packed codes (it fails)",
        "lightning_nf4/plugins/convert.py",
        (("        hf._weight_conversions = [t for t in conversions if not (isinstance(t, WeightConverter) and _builds_any(t, names))]\n",
          "        hf._weight_conversions = list(conversions)\n"),),
        ("tests/test_moe_loading.py",),
    ),
    Mutation(
        "moe-stacked-nf4-parts-unread",
        "the loader does not recognise a stacked NF4 expert weight's bitsandbytes parts (absmax, quant state...)",
        "lightning_nf4/loading/experts.py",
        (("            return key[:-len(suffix) - 1], suffix\n", "            return None\n"),),
        ("tests/test_moe_loading.py",),
    ),
    Mutation(
        "dequantized-moe-saves-stacked",
        "a dequantized MoE model keeps the conversions dropped for its NF4 experts, so it saves stacked, not per expert",
        "lightning_nf4/plugins/convert.py",
        (("        dequantize_experts(module, dtype)\n    restore_weight_conversions(model)\n", "        dequantize_experts(module, dtype)\n"),),
        ("tests/test_moe_loading.py",),
    ),
    Mutation(
        "merged-export-moe-stacked",
        "the merged export of a model with NF4 experts writes its float experts stacked, not in the checkpoint's per-expert layout",
        "lightning_nf4/export.py",
        (("        with _float_config(hf.config, untie=_head_untied(hf, state)), saving_experts_per_expert(hf):\n",
          "        with _float_config(hf.config, untie=_head_untied(hf, state)):\n"),),
        ("tests/test_moe_loading.py::test_the_merged_export_of_nf4_experts_is_written_per_expert",),
    ),
    Mutation(
        "not-marked-quantized",
        "converted models do not carry config._is_quantized, so Jamba's mixer reads the packed codes of dt_proj",
        "lightning_nf4/plugins/convert.py",
        (("            config._is_quantized = True\n", "            pass\n"),),
        ("tests/test_moe_loading.py::test_jamba_calls_its_nf4_dt_proj_as_on_a_bitsandbytes_model",),
    ),
    Mutation(
        "loader-quantizes-fp32-modules",
        "the loader reads _keep_in_fp32_modules as raw patterns only, so LongcatFlash's router (classifier.weight) is quantized",
        "lightning_nf4/loading/config.py",
        (("        return tuple(dict.fromkeys([*self.skip_modules, *defaults, *fp32, *kept_in_float_by_model(model)]))\n",
          "        return tuple(dict.fromkeys([*self.skip_modules, *defaults, *fp32]))\n"),),
        ("tests/test_moe_loading.py::test_longcat_flash_keeps_its_router_float_on_the_loader_as_under_the_plugin",),
    ),
    Mutation(
        "rename-without-fallback",
        "a checkpoint key that a rename turns into no model key is not tried under its own name (DeepSeek-V4's model.norm)",
        "lightning_nf4/loading/keys.py",
        (("        candidates = (renamed, dotted + renamed, renamed.removeprefix(dotted), key, dotted + key, key.removeprefix(dotted))\n",
          "        candidates = (renamed, dotted + renamed, renamed.removeprefix(dotted))\n"),),
        ("tests/test_moe_loading.py::test_a_key_that_a_rename_does_not_fit_loads_under_its_own_name",),
    ),
    Mutation(
        "meta-expert-count-unchecked",
        "the meta path takes checkpoint experts beyond the config's count and reports the weights missing instead",
        "lightning_nf4/loading/deferred.py",
        (("            check_expert(piece, model.get_parameter(piece.target).shape, raw)\n", ""),),
        ("tests/test_moe_loading.py::test_the_meta_path_names_a_config_with_fewer_experts_than_the_checkpoint",),
    ),
    Mutation(
        "odd-expert-in-compute-dtype",
        "an expert without whole blocks comes dequantized in the compute dtype, so float32 activations outside autocast fail",
        "lightning_nf4/format/tensor.py",
        (("        return t.dequantize(t.quant.dtype)[index]\n", "        return t.dequantize()[index]\n"),),
        ("tests/test_moe.py::test_experts_without_whole_blocks_read_from_the_whole_weight",),
    ),
    Mutation(
        "fabric-optimizer-holds-nf4-experts",
        "Fabric lets an optimizer made over every parameter hold the frozen NF4 expert stacks",
        "lightning_nf4/plugins/fabric.py",
        (("                if self._replaced.get(id(p)) is p or isinstance(p, NF4Tensor)]\n", "                if self._replaced.get(id(p)) is p]\n"),),
        ("tests/test_moe.py::test_fabric_trains_peft_lora_on_nf4_experts",),
    ),
    Mutation(
        "peft-wrapper-reads-saved-conversions",
        "the saved-conversions record is looked up through PEFT's attribute forwarding (dequantize_model of a PeftModel fails)",
        "lightning_nf4/plugins/convert.py",
        (("        if _SAVED_CONVERSIONS in vars(hf):  # its own: PEFT's wrappers forward attribute reads to the model they wrap\n",
          "        if hasattr(hf, _SAVED_CONVERSIONS):\n"),),
        ("tests/test_moe_loading.py::test_dequantize_model_of_a_peft_model_with_expert_lora_is_refused_or_done_cleanly",),
    ),
    Mutation(
        "meta-model-not-read-outside-fsdp",
        "a model loaded with device='meta' is left on meta outside nf4_fsdp (the strategy's move fails)",
        "lightning_nf4/plugins/precision.py",
        (("        self._read_deferred(module, device)\n", ""),),
        ("tests/test_moe_loading.py::test_a_meta_loaded_model_trains_under_one_process_as_if_loaded_on_the_device",
         "tests/test_moe_loading.py::test_fabric_reads_a_meta_loaded_model_with_its_peft_adapters"),
    ),
    Mutation(
        "meta-peft-init-ignored",
        "adapters of a PEFT model filled from meta are drawn with PEFT's default init whatever init_lora_weights says",
        "lightning_nf4/strategies/fsdp.py",
        (("                    init_adapter(sub, adapter, (inits or {}).get(adapter, True))\n", "                    sub.reset_lora_parameters(adapter, True)\n"),),
        ("tests/test_moe_loading.py::test_fabric_reads_a_meta_loaded_model_with_its_peft_adapters",
         "tests/test_moe_loading.py::test_peft_inits_on_a_meta_loaded_model_are_drawn_or_refused"),
    ),
    Mutation(
        "loaded-quantization-unsaid",
        "NF4Precision(double_quant=False) on a model loaded with double quantization changes nothing and says nothing",
        "lightning_nf4/plugins/precision.py",
        (("        if other and not self.__dict__.get(\"_noted_loaded\"):\n", "        if False:\n"),),
        ("tests/test_moe_loading.py::test_a_plugin_setting_that_cannot_change_loaded_weights_is_said",),
    ),
    Mutation(
        "experts-to-empty-float",
        "`empty_like` on an NF4 expert weight ignores the device (Module.to_empty): a float tensor of garbage in its place",
        "lightning_nf4/format/tensor.py",
        (("    if device is not None and dtype in (None, t.dtype):\n", "    if False:\n"),),
        ("tests/test_moe.py::test_to_empty_keeps_nf4_experts_for_load_state_dict_to_fill",),
    ),
    Mutation(
        "sharded-export-stacked-experts",
        "the sharded merged export writes each unit as the model holds it (no conversions reversed: experts stacked)",
        "lightning_nf4/export.py",
        (("                    state = layout(state)\n", "                    pass\n"),),
        ("tests/test_moe.py::test_moe_under_ddp_and_fsdp2_matches_one_process",),
    ),
    Mutation(
        "sharded-export-fsdp-class-conversions",
        "the sharded merged export asks transformers for the conversions of FSDP2's class (none: taken for custom code)",
        "lightning_nf4/export.py",
        (("    if \"_weight_conversions\" in vars(hf) or not isinstance(hf, FSDPModule):\n", "    if True:\n"),),
        ("tests/test_moe.py::test_moe_under_ddp_and_fsdp2_matches_one_process",),
    ),
    Mutation(
        "embedding-rows-float32",
        "an embedding trained in float32 in a bf16 model hands the model float32 rows (no cast back)",
        "lightning_nf4/plugins/convert.py",
        (("            sub.register_forward_hook(_rows_in_held_dtype)\n", "            pass\n"),),
        ("tests/test_reliability.py::test_a_bf16_model_trains_a_table_in_full_on_the_cpu_and_exports_in_bf16",),
    ),
    Mutation(
        "export-trained-float32",
        "the merged export writes what trained in its training dtype (float32 beside bf16)",
        "lightning_nf4/export.py",
        (("        target = dtype or (held if param.requires_grad and held is not None else param.dtype)\n", "        target = dtype or param.dtype\n"),),
        ("tests/test_reliability.py::test_a_bf16_model_trains_a_table_in_full_on_the_cpu_and_exports_in_bf16",),
    ),
    Mutation(
        "index-weight-map-unchecked",
        "a shard index's weight_map is used without checking it is a non-empty mapping",
        "lightning_nf4/loading/checkpoint.py",
        (("    if not isinstance(weight_map, dict) or not weight_map:\n", "    if weight_map is None:\n"),),
        ("tests/test_edges_checkpoint.py",),
    ),
    Mutation(
        "index-shard-outside-folder",
        "a shard index may name files outside the model folder",
        "lightning_nf4/loading/checkpoint.py",
        (("not n or not (folder / n).resolve().is_relative_to(folder)]", "not n]"),),
        ("tests/test_edges_checkpoint.py",),
    ),
    Mutation(
        "bin-untrusted-called-corrupted",
        "a .bin whose pickle asks for more than tensors is reported as truncated or corrupted",
        "lightning_nf4/loading/checkpoint.py",
        (('        if "Weights only load failed" not in str(err):\n', "        if True:\n"),),
        ("tests/test_safe_load.py",),
    ),
    Mutation(
        "integer-weight-called-missing",
        "an integer weight of a layer to quantize is reported as a missing quant state",
        "lightning_nf4/loading/auto.py",
        (("    if not prequantized:  # a lone weight", "    if False:  # a lone weight"),),
        ("tests/test_loading.py::test_an_integer_weight_of_a_layer_to_quantize_is_named_as_such",),
    ),
    Mutation(
        "tokenizer-option-ignored",
        "CausalLMModule loads the tokenizer from model_name_or_path whatever tokenizer_name_or_path says",
        "lightning_nf4/models/causal_lm.py",
        (('        self.tokenizer = load_tokenizer(self.hparams.get("tokenizer_name_or_path") or self.hparams.model_name_or_path)\n',
          "        self.tokenizer = load_tokenizer(self.hparams.model_name_or_path)\n"),),
        ("tests/test_cli.py::test_a_model_folder_without_a_tokenizer_is_named_and_tokenizer_name_or_path_supplies_one",),
    ),
    Mutation(
        "peft-linears-not-adopted",
        "PEFT's LoRA layers over a base the plugin quantized stay PEFT's (whose merge adds to the packed codes)",
        "lightning_nf4/plugins/precision.py",
        (("        adopt_peft_linears(module)\n", ""),),
        ("tests/test_fabric.py::test_peft_merge_and_unload_after_setup_requantizes_the_nf4_base",),
    ),
    Mutation(
        "experts-compiled-before-2-13",
        "compile_blocks leaves NF4 experts inside the compiled graph where the compiler cannot trace them",
        "lightning_nf4/plugins/compile.py",
        (("            if not COMPILER_TRACES_NF4_EXPERTS:\n", "            if False:\n"),),
        ("tests/test_moe.py::test_before_torch_2_13_nf4_experts_run_eagerly_inside_compiled_layers",),
    ),
    Mutation(
        "restore-meta-not-read",
        "load_from_checkpoint moves a meta-loaded model before reading it",
        "lightning_nf4/callbacks/restore.py",
        (("    read_deferred(module, device)  # a model loaded", "    pass  # a model loaded"),),
        ("tests/test_load_from_checkpoint.py::test_a_module_that_loads_its_model_on_meta_comes_back",),
    ),
    Mutation(
        "restore-weights-only-adapters-refused",
        "load_from_checkpoint refuses a record-less checkpoint of trained weights only (nf4_fsdp's save_weights_only)",
        "lightning_nf4/callbacks/restore.py",
        (('        if not any(".lora_" in key for key in state):\n',
          '        if not (any(".lora_" in key for key in state) and any(".base_layer." in key for key in state)):\n'),),
        ("tests/test_load_from_checkpoint.py::test_checkpoints_it_cannot_rebuild_from_are_named",),
    ),
    Mutation(
        "sharded-export-no-architectures",
        "nf4_fsdp's merged config.json records no architectures for a model built from a config",
        "lightning_nf4/export.py",
        (("            with _float_config(hf.config, untie=untie, architectures=[unsharded_class(hf).__name__]):\n",
          "            with _float_config(hf.config, untie=untie):\n"),),
        ("tests/test_moe.py::test_moe_under_ddp_and_fsdp2_matches_one_process",),
    ),
    Mutation(
        "tied-linear-quantized",
        "a linear whose weight is tied to an embedding (under a name other than lm_head) is quantized, the tie cut",
        "lightning_nf4/plugins/convert.py",
        (("        if len(owners.get(id(module.weight), ())) > 1:  # tied", "        if False:  # tied"),),
        ("tests/test_reliability.py::test_a_linear_tied_to_the_embeddings_stays_float_and_tied_under_any_name",),
    ),
    Mutation(
        "trained-module-buffers-left",
        "a module trained in full keeps its float buffers in the dtype it was built in (BatchNorm: mixed dtypes)",
        "lightning_nf4/plugins/convert.py",
        (("        if own and all(id(p) in held for p in own):  # a module trained", "        if False:  # a module trained"),),
        ("tests/test_reliability.py::test_a_batchnorm_trained_in_full_keeps_its_running_statistics_in_its_weights_dtype",),
    ),
    Mutation(
        "dequantize-shared-once",
        "dequantize_model replaces a shared NF4 layer under its first name only",
        "lightning_nf4/plugins/convert.py",
        (("        replace_module(model, uses[id(layer)], layer.to_float(dtype))", "        replace_module(model, uses[id(layer)][:1], layer.to_float(dtype))"),),
        ("tests/test_edges_convert.py::test_dequantize_model_replaces_a_shared_layer_under_every_name_and_keeps_it_shared",),
    ),
    Mutation(
        "linear-float64-accepted",
        "NF4Linear accepts a float64 dtype (it fails later, at state_dict)",
        "lightning_nf4/layers/linear.py",
        (('        _check_compute_dtype(dtype, "dtype (what the weight is quantized from and the bias is kept in)")\n', ""),),
        ("tests/test_edges_linear.py::test_constructor_arguments_it_cannot_hold_are_named_with_the_fix",),
    ),
    Mutation(
        "transposed-view-allowed",
        "a transposed NF4Tensor takes any view of its element count (its dequantized shape then disagrees)",
        "lightning_nf4/format/tensor.py",
        (("    if t.transposed and list(shape) != list(t.shape):\n", "    if False:\n"),),
        ("tests/test_moe.py::test_a_transposed_stacked_weight_refuses_views_that_would_misplace_its_elements",),
    ),
    Mutation(
        "reset-parameters-plain-form-only",
        "NF4Linear.reset_parameters reads the plain form's scales (None in the NF4Tensor form)",
        "lightning_nf4/layers/linear.py",
        (("dtype=self.quant.dtype, device=device)  # either form", "dtype=self._quant.dtype, device=device)  # either form"),),
        ("tests/test_edges_linear.py::test_reset_parameters_draws_a_new_weight_in_the_nf4_tensor_form_too",),
    ),
    Mutation(
        "expand-any-size",
        "NF4Tensor's expand returns the weight for any size (an expand that would copy gives a tensor of the wrong shape)",
        "lightning_nf4/format/tensor.py",
        (("    if len(size) != t.dim() or any(s not in (-1, d) for s, d in zip(size, t.shape)):\n", "    if False:\n"),),
        ("tests/test_moe.py::test_the_matmul_operator_reads_a_stacked_weight_through_its_batch_dims",),
    ),
]


def copy_repository(dest: Path) -> None:
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", ".pytest_cache"))
        elif src.exists():
            shutil.copy2(src, dest / name)


def build_c_kernels(copy: Path) -> None:
    """Compile the copy's C kernels in place (a mutation of the C file needs its own library)."""
    done = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=copy, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"building the C kernels failed:\n{done.stderr[-3000:]}")


def environment(copy: Path, extra: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(copy) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)
    env.pop("LIGHTNING_NF4_DISABLE_CPU_KERNELS", None)
    env.update(extra)
    return env


def check_imports_the_copy(copy: Path) -> None:
    code = "import lightning_nf4, tests; print(lightning_nf4.__file__); print(tests.__file__)"
    done = subprocess.run([sys.executable, "-c", code], cwd=copy, env=environment(copy, {}), capture_output=True, text=True)
    paths = done.stdout.split()
    if done.returncode != 0 or len(paths) != 2 or not all(Path(p).resolve().is_relative_to(copy.resolve()) for p in paths):
        sys.exit(f"the copy in {copy} is not what Python imports there: {done.stdout or done.stderr}")


def run_tests(copy: Path, tests: tuple[str, ...], env: dict, first_failure: bool) -> tuple[int, str]:
    """pytest's exit status and what to report: the first failed test, or the summary line."""
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", *tests]
    if first_failure:
        args.append("-x")
    done = subprocess.run(args, cwd=copy, env=environment(copy, env), capture_output=True, text=True, timeout=1800)
    out = done.stdout + done.stderr
    failed = re.findall(r"^FAILED (\S+)", out, flags=re.M)
    summary = next((line.strip("= ") for line in reversed(out.splitlines()) if re.search(r"\d+ (passed|failed|error)", line)), out[-300:])
    return done.returncode, (failed[0] if failed else summary)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these bugs only")
    parser.add_argument("--list", action="store_true", help="print the bugs and their tests, run nothing")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    unknown = set(args.only or ()) - {m.name for m in MUTATIONS}
    if unknown:
        sys.exit(f"unknown bug names {sorted(unknown)}; known: {[m.name for m in MUTATIONS]}")
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.bug}\n    {m.file}; tests: {' '.join(m.tests)}")
        return 0

    rows: list[tuple[Mutation, str]] = []
    with tempfile.TemporaryDirectory(prefix="nf4-mutations-") as tmp:
        copy = Path(tmp)
        copy_repository(copy)
        check_imports_the_copy(copy)
        baseline: dict[tuple, tuple[int, str]] = {}
        for m in chosen:
            start = time.perf_counter()
            path = copy / m.file
            original = path.read_text()
            counts = [original.count(old) for old, _ in m.edits]
            if counts != [1] * len(m.edits):
                rows.append((m, f"PATCH DOES NOT APPLY (matches per edit: {counts}): update the entry"))
                continue
            mutated = original
            for old, new in m.edits:
                mutated = mutated.replace(old, new)
            key = (m.tests, tuple(sorted(m.env.items())))
            if key not in baseline:
                baseline[key] = run_tests(copy, m.tests, m.env, first_failure=False)
            if baseline[key][0] != 0:
                rows.append((m, f"BASELINE FAILS without the bug: {baseline[key][1]}"))
                continue
            libraries = {p: p.read_bytes() for p in (copy / "lightning_nf4" / "kernels").glob("_cpu_kernels*.so")}
            path.write_text(mutated)
            try:
                if m.file.endswith(".c"):
                    if not libraries:
                        rows.append((m, "SKIPPED: the C kernels are not built in this checkout"))
                        continue
                    build_c_kernels(copy)
                status, what = run_tests(copy, m.tests, m.env, first_failure=True)
            finally:
                path.write_text(original)
                for library, data in libraries.items():
                    library.write_bytes(data)
            verdict = f"yes: {what}" if status == 1 else (f"NO: {what}" if status == 0 else f"ERROR (pytest exit {status}): {what}")
            rows.append((m, verdict))
            print(f"[{time.perf_counter() - start:5.0f} s] {m.name}: {verdict}", file=sys.stderr, flush=True)

    print("| bug | tests | caught |")
    print("|---|---|---|")
    for m, verdict in rows:
        mark = " (issue 14 table)" if m.issue_table else ""
        print(f"| {m.bug}{mark} | {', '.join(t.removeprefix('tests/') for t in m.tests)} | {verdict} |")
    return 0 if all(v.startswith("yes") for _, v in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
