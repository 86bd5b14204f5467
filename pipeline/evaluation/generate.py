"""Greedy answers from an exported model, as a user loads it (pipeline.chat, the GGUF check in
pipeline/export/gguf_verify.py), and from our native model as the reference they are held to.

    tokenizer, model = load("outputs/tiny/export")
    prompt_ids, answer_ids, text = answer(tokenizer, model, chat_messages(PROMPT, SYSTEM_PROMPT))

``load`` reads the export with ``AutoTokenizer`` and ``MixtralForCausalLM`` (an ``export.format=adapter``
export: its base, then ``PeftModel.from_pretrained``); ``answer`` renders the conversation with the
exported chat template and decodes greedily with the KV cache (``generate(do_sample=False,
use_cache=True)``).

Where the weights go: ``device_map="auto"`` is transformers' / accelerate's: the decoder layers are
split over the visible GPUs in order, filling each before the next (then the CPU, then disk), and
the hidden states move from one GPU to the next during each forward. Mixtral-8x7B in bf16 (93.4 GB)
takes ~12 GB on each of 8 x 80 GB GPUs, plus a small KV cache per GPU; one GPU computes at a time,
which is what one greedy conversation needs (a launched, expert-parallel generation is what
pipeline.eval does for passkey). On a CPU-only host everything stays on the CPU; ``device_map=None``
loads the whole model on the CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# A task from the bundled data, so the tiny demo model is asked something it was trained on.
SYSTEM_PROMPT = "Answer exactly in the requested format."
PROMPT = "What is 23 + 51? Answer with the number only."


def chat_messages(prompt: str, system: str | None = SYSTEM_PROMPT) -> list[dict]:
    """One user turn, after a system prompt unless ``system`` is empty or None."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def load(export_dir: str | Path, base: str | Path | None = None, device_map: str | dict | None = None,
         max_memory: dict | None = None, offload_folder: str | Path | None = None):
    """(tokenizer, model) of a merged export, or of an adapter export on its base: ``base``, else the
    name the export gives (``base_model_name_or_path``: a hub id or a directory name, never a path
    of the training machine).

    ``device_map`` / ``max_memory`` / ``offload_folder``: as transformers' ``from_pretrained`` takes
    them (``"auto"``: split over the GPUs, see the module docstring); None: all on the CPU.
    """
    from transformers import AutoTokenizer, MixtralForCausalLM

    placement = {} if device_map is None else {
        "device_map": device_map, "max_memory": max_memory,
        "offload_folder": None if offload_folder is None else str(offload_folder)}

    export_dir = Path(export_dir)
    adapter_config = export_dir / "adapter_config.json"
    if not (export_dir / "tokenizer.json").is_file() or not (
        (export_dir / "config.json").is_file() or adapter_config.is_file()
    ):
        raise FileNotFoundError(
            f"{export_dir}: not an export (tokenizer.json and config.json or adapter_config.json expected); "
            "run `make export` first"
        )
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    if not adapter_config.is_file():
        return tokenizer, MixtralForCausalLM.from_pretrained(export_dir, dtype="auto", **placement).eval()
    from peft import PeftModel

    named = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
    base = base or named
    if not base or not ((Path(base) / "config.json").is_file() or str(base).count("/") == 1):
        raise FileNotFoundError(
            f"{adapter_config}: the base model {named!r} is neither a checkpoint dir here nor a hub id; "
            "pass its directory with --base"
        )
    model = MixtralForCausalLM.from_pretrained(base, dtype="auto", **placement)
    return tokenizer, PeftModel.from_pretrained(model, str(export_dir)).eval()


def answer(
    tokenizer, model, messages: list[dict], max_new_tokens: int = 48
) -> tuple[list[int], list[int], str]:
    """(prompt ids, generated ids, decoded answer) for a greedy, KV-cached generation."""
    prompt = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=False
    )
    # On the first layer's device (the embedding's): with a device map the model spans several. An
    # embedding offloaded to disk (meta here) gets its inputs moved by accelerate's hook.
    device = model.get_input_embeddings().weight.device
    input_ids = torch.tensor([prompt], device="cpu" if device.type == "meta" else device)
    with torch.no_grad():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.eos_token_id,
        )
    generated = out[0, input_ids.shape[1] :].tolist()  # [new tokens]
    return prompt, generated, tokenizer.decode(generated, skip_special_tokens=True)


def greedy_recomputed(model, prompt: list[int], max_new_tokens: int, eos: int) -> list[int]:
    """A native model's greedy answer, the whole sequence recomputed for each token (no cache to
    trust): the reference a cached or foreign decoder (transformers, llama.cpp) is held to."""
    ids = list(prompt)
    with torch.no_grad():
        while len(ids) - len(prompt) < max_new_tokens:
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            if ids[-1] == eos:
                break
    return ids[len(prompt):]
