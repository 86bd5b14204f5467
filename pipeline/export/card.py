"""The model card (README.md) and the shipped files' portable paths."""

from __future__ import annotations

import json
import os
from pathlib import Path

from model.config import MixtralConfig
from pipeline.export.recipe import ExportRecipe
from pipeline.export.source import Source


def portable(value):
    """``value`` with every absolute path of this machine cut to its last component: shipped files
    (model card, recipe.yaml) must not carry the training machine's directory layout."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v) for v in value]
    if isinstance(value, (str, Path)) and os.path.isabs(str(value)):
        return Path(value).name or str(value)
    return str(value) if isinstance(value, Path) else value


def base_model_name(recipe: ExportRecipe, source: Source) -> str:
    """How shipped files name the base: export.base_model_name, else the base dir's own name."""
    return recipe.export.base_model_name or source.checkpoint.resolve().name


def model_card(recipe: ExportRecipe, source: Source, config: MixtralConfig, report: list[str]) -> str:
    lines = [
        f"# {recipe.model_name}",
        "",
        "Mixtral (sparse mixture of experts, 8 SwiGLU experts per layer, top-2)",
    ]
    lines += [
        "fine-tuned with this repository's pipeline (SFT -> DPO -> export), "
        + ("as one llama.cpp GGUF file." if recipe.export.format == "gguf" else "in the layout of"),
        *([] if recipe.export.format == "gguf" else ["mistralai/Mixtral-8x7B-Instruct-v0.1."]),
        "",
        "## Base model",
        "",
        f"- checkpoint: `{base_model_name(recipe, source)}`",
        f"- size: {config.num_hidden_layers} layers, hidden {config.hidden_size}, {config.num_local_experts} experts "
        f"(top-{config.num_experts_per_tok}), ffn {config.intermediate_size}, vocab {config.vocab_size}",
        f"- merged adapters (in order): {', '.join(f'`{portable(a)}`' for a in source.adapters) or 'none'}",
        f"- export: format `{recipe.export.format}`, "
        + (
            f"GGUF type `{recipe.export.gguf_type}`"
            if recipe.export.format == "gguf"
            else f"dtype `{recipe.export.dtype}`"
        )
        + " (LoRA merged in float32)",
        "",
        "## Training stages",
        "",
    ]
    if not source.manifests:
        lines.append("No stage manifests: exported directly from a checkpoint.")
    for manifest in source.manifests:
        stage = manifest.get("stage", "?")
        lines.append(f"### {stage} ({manifest.get('kind', '?')})")
        lines.append("")
        data = manifest.get("data")
        if data:
            lines.append(f"- data: `{json.dumps(portable(data), ensure_ascii=False)[:500]}`")
        if manifest.get("recipe"):
            lines.append(f"- recipe: `{manifest['recipe']}` (in the stage output dir)")
        if manifest.get("lora"):
            lines.append(f"- LoRA: `{json.dumps(manifest['lora'])}`")
        if manifest.get("steps") is not None:
            lines.append(f"- steps: {manifest['steps']}")
        metrics = manifest.get("final_metrics") or {}
        if metrics:
            lines += ["", "| metric | value |", "|---|---|"]
            lines += [
                f"| {k} | {v:.6g} |" if isinstance(v, (int, float)) else f"| {k} | {v} |"
                for k, v in metrics.items()
            ]
        lines.append("")
    lines += _gguf_use(recipe) if recipe.export.format == "gguf" else _transformers_use(recipe, source)
    lines += [
        "## Export verification",
        "",
        *[f"- {line}" for line in report],
        "",
    ]
    return "\n".join(lines)


def _gguf_use(recipe: ExportRecipe) -> list[str]:
    from pipeline.export.gguf import gguf_file_name

    name = gguf_file_name(recipe.export.gguf_type)
    return [
        "## Use",
        "",
        f"`{name}` is a llama.cpp GGUF file (architecture `llama`, {recipe.export.gguf_type}; norms and router",
        "float32) holding the tokenizer and the Mixtral v1 chat template:",
        "",
        "```",
        f"llama-cli -m {name} -cnv",
        "```",
        "",
        "```python",
        "from llama_cpp import Llama",
        f'llm = Llama(model_path="{name}", n_ctx=4096)',
        'print(llm.create_chat_completion([{"role": "user", "content": "Hi!"}], max_tokens=64, temperature=0))',
        "```",
        "",
    ]


def _transformers_use(recipe: ExportRecipe, source: Source) -> list[str]:
    return [
        "## Use",
        "",
        "```python",
        "from transformers import AutoTokenizer, MixtralForCausalLM",
        "tok = AutoTokenizer.from_pretrained(path)",
        *(
            [
                "from peft import PeftModel",
                f'base = MixtralForCausalLM.from_pretrained("{base_model_name(recipe, source)}", dtype="auto")',
                "model = PeftModel.from_pretrained(base, path)  # or .merge_and_unload()",
            ]
            if recipe.export.format == "adapter"
            else ['model = MixtralForCausalLM.from_pretrained(path, dtype="auto")']
        ),
        'ids = tok.apply_chat_template([{"role": "user", "content": "Hi!"}], return_tensors="pt", return_dict=False)',
        "out = model.generate(ids, max_new_tokens=64, do_sample=False)",
        "print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))",
        "```",
        "",
        "or `python -m pipeline.chat PATH` (merged exports). The chat template reproduces mistral-common's v1 instruct",
        "encoding token for token (system prompt prepended to the first user turn); the fast",
        "tokenizer encodes like the SentencePiece `tokenizer.model`. Encode raw training text with",
        "`split_special_tokens=True` so that a literal `</s>` in text stays text.",
        "",
    ]
