"""format=hf and format=consolidated: the merged weights streamed into safetensors shards (or the
one consolidated file), with their configs and tokenizer, then verified (pipeline/export/stage.py
runs it in its temporary directory).

Steps: plan every output tensor and shard from shapes alone; stream: read one native parameter, add
every adapter's LoRA delta in fp32, cast, append its HF tensors to the open shard file; tokenizer
and configs; verify (transformers reload, names/shapes/dtypes, logits against our model).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from model.checkpoint import (
    TensorPlan,
    generation_config,
    hf_plan,
    hf_tensors,
    parse_size,
    plan_shards,
    write_json,
)
from model.config import DTYPES, MixtralConfig
from pipeline.adapter_merge import Adapter, BaseReader, merged_native_params, meta_state
from pipeline.export.formats import (
    RELEASED_TRANSFORMERS_VERSION,
    consolidated_name,
    consolidated_tensor,
    params_json,
)
from pipeline.export.recipe import ExportRecipe
from pipeline.export.source import Source
from pipeline.export.verify import verify_consolidated, verify_hf_export
from pipeline.export.writer import ShardWriter, streaming_threads


def write_weights(
    recipe: ExportRecipe, source: Source, config: MixtralConfig, adapters: list[Adapter], tmp: Path, log
) -> list[str]:
    """format=hf | consolidated: plan every tensor from shapes, stream the merged weights into the
    shards, write configs and tokenizer, verify; returns report lines."""
    from pipeline.hf_tokenizer import DEFAULT_SPM_PATH, save_tokenizer_files

    dtype = DTYPES[recipe.export.dtype]
    merge_device = recipe.export.merge_on()
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
        for native, weight in merged_native_params(reader, adapters, shapes, device=merge_device):
            weight = weight.cpu()  # merged on export.merge_device, written from the host
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
