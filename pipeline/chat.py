"""Greedy answer from an exported model, through transformers (make chat).

    python -m pipeline.chat outputs/tiny/export
    python -m pipeline.chat outputs/tiny/export --prompt "Name three prime numbers." --max-new-tokens 64
    python -m pipeline.chat outputs/tiny/export-adapter --base outputs/tiny/sft/base   # an adapter export
    python -m pipeline.chat /runs/mixtral-8x7b-export          # 8 GPUs: the layers split over them

Loads the export with ``AutoTokenizer`` and ``MixtralForCausalLM`` exactly as a user would (an
``export.format=adapter`` export: its base, then ``PeftModel.from_pretrained``), renders
the bundled conversation with the exported chat template and decodes greedily with the KV cache
(``generate(do_sample=False, use_cache=True)``). The tiny demo model is trained for a few steps on a
small dataset, so its answer shows that the pipeline runs end to end, not that the model is good.

Where the weights go: ``--device-map auto`` (the default) is transformers' / accelerate's
``device_map="auto"``: the decoder layers are split over the visible GPUs in order, filling each
before the next (then the CPU, then disk), and the hidden states move from one GPU to the next
during each forward. Mixtral-8x7B in bf16 (93.4 GB) takes ~12 GB on each of 8 x 80 GB GPUs, plus a
small KV cache per GPU; one GPU computes at a time, which is what one greedy conversation needs (a
launched, expert-parallel generation is what pipeline.eval does for passkey). On a CPU-only host
everything stays on the CPU. ``--device-map none`` loads the whole model on the CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

# A task from the bundled data, so the tiny demo model is asked something it was trained on.
SYSTEM_PROMPT = "Answer exactly in the requested format."
PROMPT = "What is 23 + 51? Answer with the number only."


def load(export_dir: str | Path, base: str | Path | None = None, device_map: str | dict | None = None,
         max_memory: dict | None = None, offload_folder: str | Path | None = None):
    """(tokenizer, model) of a merged export, or of an adapter export on its base: ``base``, else the
    name the export gives (``base_model_name_or_path``: a hub id or a directory name, never a path
    of the training machine).

    ``device_map`` / ``max_memory`` / ``offload_folder``: as transformers' ``from_pretrained`` takes
    them (``"auto"``: split over the GPUs, see the module docstring); None: all on the CPU.
    """
    import json

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export_dir")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--system", default=SYSTEM_PROMPT, help="system prompt ('' for none)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--base", default=None, help="adapter exports: the base checkpoint dir")
    parser.add_argument("--device-map", choices=["auto", "none"], default="auto",
                        help="auto: split the layers over the GPUs (transformers' device_map); none: the CPU")
    args = parser.parse_args(argv)
    try:
        tokenizer, model = load(args.export_dir, args.base,
                                device_map=None if args.device_map == "none" else "auto")
    except FileNotFoundError as err:
        print(f"chat: error: {err}", file=sys.stderr)
        return 1
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}
    ]
    _, generated, text = answer(tokenizer, model, messages, args.max_new_tokens)
    print(f"[system] {args.system}" if args.system else "", file=sys.stderr)
    print(f"[user] {args.prompt}")
    print(f"[assistant] {text}")
    print(f"({len(generated)} tokens, greedy, KV cache)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
