"""The export stage as a package: a fine-tuned Mixtral written in the Mixtral-8x7B-Instruct-v0.1
layout (hf), mistral-inference's (consolidated) or as a PEFT adapter, verified.

    python -m pipeline.export recipes/tiny/export.yaml [key=value ...]          # make export

Modules, in the order the stage uses them (stage.py holds the order and the CLI):
    recipe    ExportRecipe and its sections
    source    the recipe's source: a base checkpoint + adapters (run dirs: run_record.resolve_source)
    writer    the threaded streaming shard writer (the shard plan and index are model/checkpoint.py's)
    weights   format=hf / consolidated: the merged weights streamed into shards, configs, tokenizer, verified
    formats   the consolidated layout (names, RoPE row order, params.json)
    adapter   format=adapter: our LoRA as a PEFT adapter for transformers, and its verification
    gguf      format=gguf: one llama.cpp GGUF file (names from NAME_TABLE's gguf column)
    verify    checks of a written hf / consolidated export
    card      the model card (README.md) and portable paths

The merge itself (base + adapters in float32, one parameter at a time) is pipeline/adapter_merge.py,
shared with eval, which evaluates what this writes.
"""

from model.checkpoint import TensorPlan, plan_shards
from pipeline.export.formats import hf_to_interleaved_rope
from pipeline.export.recipe import ExportRecipe, ExportSection, SourceSection, TokenizerSection, VerifySection
from pipeline.export.source import Source, resolve_source, source_from_recipe
from pipeline.export.stage import export, main
from pipeline.export.writer import ShardWriter

__all__ = [
    "ExportRecipe",
    "ExportSection",
    "ShardWriter",
    "Source",
    "SourceSection",
    "TensorPlan",
    "TokenizerSection",
    "VerifySection",
    "export",
    "hf_to_interleaved_rope",
    "main",
    "plan_shards",
    "resolve_source",
    "source_from_recipe",
]
