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

from model.checkpoint import make_readable, new_temp_dir, publish_dir
from model.config import MixtralConfig
from pipeline.adapter_merge import open_adapters
from pipeline.config import build, load_recipe_dict, save_recipe, to_dict
from pipeline.export.adapter import write_adapter
from pipeline.export.card import model_card, portable
from pipeline.export.gguf import write_gguf
from pipeline.export.recipe import ExportRecipe
from pipeline.export.source import source_from_recipe
from pipeline.export.weights import write_weights
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
    adapters = open_adapters(source)
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
            report = write_weights(recipe, source, config, adapters, tmp, log)
        save_recipe(portable(to_dict(recipe)), tmp / "recipe.yaml")
        (tmp / "README.md").write_text(model_card(recipe, source, config, report))
        make_readable(tmp)
        check_output_dir(out, recipe.export.overwrite)  # again: something may have appeared meanwhile
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def load_recipe(path: str, overrides: list[str]) -> ExportRecipe:
    return build(ExportRecipe, load_recipe_dict(path, overrides), source=str(path))


def main(argv: list[str] | None = None) -> int:
    return stage_main(argv, __doc__.split("\n\n")[1], load_recipe, export, errors=(FileExistsError, ValueError))
