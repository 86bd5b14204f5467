"""Export a fine-tuned Mixtral in the Mixtral-8x7B-Instruct-v0.1 layout, verified.

    python -m pipeline.export recipes/tiny/export.yaml [key=value ...]          # make export
    python -m pipeline.export recipes/tiny/export.yaml source.run_dir=outputs/tiny/sft \\
        export.dtype=float32 export.format=consolidated output_dir=outputs/tiny/export-mistral

Input (``source``): a stage output dir with ``manifest.json`` (SFT/DPO, LoRA or full; chains of
LoRA stages are followed back to the base checkpoint), or an HF checkpoint dir, plus optional extra
PEFT adapter dirs. Output (``output_dir``), by ``export.format``:

    hf            config.json  generation_config.json  model-0000k-of-0000n.safetensors
                  model.safetensors.index.json  tokenizer.model  tokenizer.json
                  tokenizer_config.json  special_tokens_map.json  README.md
    consolidated  params.json  consolidated.safetensors  tokenizer.model  README.md
                  (mistral-inference names, q/k rows permuted back to interleaved RoPE pairs)
    adapter       adapter_config.json  adapter_model.safetensors  tokenizer files  README.md
                  (PEFT LoRA for transformers' MixtralForCausalLM: `PeftModel.from_pretrained(
                  MixtralForCausalLM.from_pretrained(base), output_dir)`; see `adapter_export`)
    gguf          model-<export.gguf_type>.gguf  tokenizer.model  README.md
                  (llama.cpp, architecture "llama"; see pipeline/export/gguf.py)

Steps: 1. resolve the source to a base checkpoint and the adapters to merge; 2. plan every output
tensor and shard from shapes alone; 3. stream: read one native parameter, add every adapter's LoRA
delta in fp32, cast, append its HF tensors to the open shard file; 4. tokenizer, configs, model
card; 5. verify (transformers reload, names/shapes/dtypes, logits against our model); 6. rename the
temporary dir into place. Peak memory is about one native parameter in fp32 plus two of the largest
output tensors (the write thread's buffers), never a shard or the model, so an 8x7B export needs a
few GB. Reading, merging and converting overlap the writes and fsyncs (see ShardWriter).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from model.checkpoint import (
    TensorPlan,
    generation_config,
    hf_plan,
    hf_tensors,
    make_readable,
    new_temp_dir,
    parse_size,
    plan_shards,
    publish_dir,
    write_json,
)
from model.config import DTYPES, MixtralConfig
from pipeline.config import build, load_recipe_dict, save_recipe, to_dict
from pipeline.export.adapter import write_adapter
from pipeline.export.card import model_card, portable
from pipeline.export.formats import (
    RELEASED_TRANSFORMERS_VERSION,
    consolidated_name,
    consolidated_tensor,
    params_json,
)
from pipeline.export.gguf import write_gguf
from pipeline.export.merge import Adapter, merged_native_params, meta_state
from pipeline.export.recipe import ExportRecipe
from pipeline.export.source import BaseReader, Source, source_from_recipe
from pipeline.export.verify import verify_consolidated, verify_hf_export
from pipeline.export.writer import ShardWriter, streaming_threads
from pipeline.rundir import check_ownable, replaced_output
from pipeline.stage import stage_main


def check_output_dir(out: Path, overwrite: bool) -> None:
    """A new or empty ``out``, or (with ``overwrite``) an earlier export: nothing else is replaced."""
    check_ownable(out, "export")  # holds only names an export writes, or is refused whatever overwrite says
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"output_dir {out} holds an earlier export; pass export.overwrite=true to replace it (or choose "
            "another output_dir)"
        )


def export(recipe: ExportRecipe, log: Callable[[str], None] = print) -> Path:
    """The export stage in pipeline/stage.py's order; returns the output dir."""
    started = time.perf_counter()
    out = Path(recipe.output_dir)
    # Startup check: a new or empty output_dir, or (export.overwrite) an earlier export's.
    check_output_dir(out, recipe.export.overwrite)
    # One export of an output at a time; every .<name>.tmp-* / .old-* next to it is what a killed
    # export left (up to a whole model's size): gone before this one starts.
    with replaced_output(out) as stale:
        if stale:
            log(f"export: removed what an interrupted export of {out} left: {', '.join(stale)}")
        # The work, into a temporary dir that is renamed into place once verified.
        report = _export_locked(recipe, out, log)
    log(f"export: wrote {out} in {time.perf_counter() - started:.1f}s")
    for line in report:
        log(f"  {line}")
    return out


def _export_locked(recipe: ExportRecipe, out: Path, log: Callable[[str], None]) -> list[str]:
    # 1. Source.
    source = source_from_recipe(recipe.source)
    config = MixtralConfig.from_hf(source.checkpoint / "config.json")
    adapters = [Adapter.open(a) for a in source.adapters]
    for adapter in adapters:
        adapter.base_quantization = source.quantized.get(str(adapter.dir))
    log(f"export: base {source.checkpoint}, {len(adapters)} adapter(s): {[str(a.dir) for a in adapters]}"
        + "".join(f"; {a.dir} trained on a {a.base_quantization['type']} base, merged into it dequantized"
                  for a in adapters if a.base_quantization))

    tmp = new_temp_dir(out)
    try:
        if recipe.export.format == "adapter":
            report = write_adapter(recipe, source, adapters, config, tmp, log)
        elif recipe.export.format == "gguf":
            report = write_gguf(recipe, source, config, adapters, tmp, log)
        else:
            report = _write_weights(recipe, source, config, adapters, tmp, log)
        save_recipe(portable(to_dict(recipe)), tmp / "recipe.yaml")
        (tmp / "README.md").write_text(model_card(recipe, source, config, report))
        make_readable(tmp)
        check_output_dir(out, recipe.export.overwrite)  # again: something may have appeared meanwhile
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _write_weights(
    recipe: ExportRecipe, source: Source, config: MixtralConfig, adapters: list[Adapter], tmp: Path, log
) -> list[str]:
    from pipeline.hf_tokenizer import DEFAULT_SPM_PATH, save_tokenizer_files

    dtype = DTYPES[recipe.export.dtype]
    shapes = meta_state(config)
    reader = BaseReader(source.checkpoint, config)
    spm_path = Path(recipe.tokenizer.spm_path) if recipe.tokenizer.spm_path else DEFAULT_SPM_PATH
    consolidated = recipe.export.format == "consolidated"

    # 2. Plan every tensor from shapes alone.
    plan = hf_plan(shapes, dtype)
    if consolidated:
        plan = [TensorPlan(consolidated_name(p.name), p.shape, p.nbytes) for p in plan]
        shards = [plan]
        writer = ShardWriter(tmp, shards, dtype, prefix="consolidated")
    else:
        shards = plan_shards(plan, parse_size(recipe.export.max_shard_size))
        writer = ShardWriter(tmp, shards, dtype)
    total = sum(p.nbytes for p in plan)
    log(f"export: {len(plan)} tensors, {total / 1e9:.3f} GB {recipe.export.dtype} in {len(shards)} file(s)")

    # 3. Stream: one native parameter at a time.
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="export", disable=not recipe.export.progress_bar)
    with reader, writer, torch.no_grad(), streaming_threads():
        for native, weight in merged_native_params(reader, adapters, shapes):
            for hf_name, tensor in hf_tensors({native: weight}):
                name, tensor = (
                    consolidated_tensor(hf_name, tensor, config) if consolidated else (hf_name, tensor)
                )
                writer.write(name, tensor)
                bar.update(tensor.numel() * dtype.itemsize)
            del weight
        index = writer.finish()
    bar.close()

    # 4. Configs and tokenizer.
    shutil.copyfile(spm_path, tmp / "tokenizer.model")
    if consolidated:
        write_json(tmp / "params.json", params_json(config))
        report = [f"consolidated.safetensors: {len(plan)} tensors, {total} bytes"]
        if recipe.verify.enabled:
            report += verify_consolidated(tmp, config, dtype, plan)
        return report
    hf_config = config.to_hf()
    hf_config["torch_dtype"] = recipe.export.dtype
    write_json(tmp / "config.json", hf_config)
    write_json(tmp / "generation_config.json", generation_config(config, RELEASED_TRANSFORMERS_VERSION))
    if len(shards) > 1:
        write_json(tmp / "model.safetensors.index.json", index)
    save_tokenizer_files(tmp, spm_path)

    # 5. Verify.
    report = [f"{len(plan)} tensors, {total} bytes in {len(shards)} shard(s)"]
    if recipe.verify.enabled:
        report += verify_hf_export(tmp, source, config, dtype, plan, recipe.verify, log=log)
    return report


def load_recipe(path: str, overrides: list[str]) -> ExportRecipe:
    return build(ExportRecipe, load_recipe_dict(path, overrides), source=str(path))


def main(argv: list[str] | None = None) -> int:
    return stage_main(argv, __doc__.split("\n\n")[1], load_recipe, export, errors=(FileExistsError, ValueError))
