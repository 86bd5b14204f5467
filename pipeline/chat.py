"""Greedy answer from an exported model, through transformers (make chat).

    python -m pipeline.chat outputs/tiny/export
    python -m pipeline.chat outputs/tiny/export --prompt "Name three prime numbers." --max-new-tokens 64

Loads the export with ``AutoTokenizer`` and ``MixtralForCausalLM`` exactly as a user would, renders
the bundled conversation with the exported chat template and decodes greedily with the KV cache
(``generate(do_sample=False, use_cache=True)``). The tiny demo model is trained for a few steps on a
small dataset, so its answer shows that the pipeline runs end to end, not that the model is good.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

SYSTEM_PROMPT = "You are a helpful assistant. Answer briefly."
PROMPT = "Explain what a mixture-of-experts language model is in one sentence."


def load(export_dir: str | Path):
    from transformers import AutoTokenizer, MixtralForCausalLM

    export_dir = Path(export_dir)
    if not (export_dir / "config.json").is_file() or not (export_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{export_dir}: not an HF export (config.json and tokenizer.json expected); run `make export` first"
        )
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    model = MixtralForCausalLM.from_pretrained(export_dir, dtype="auto").eval()
    return tokenizer, model


def answer(
    tokenizer, model, messages: list[dict], max_new_tokens: int = 48
) -> tuple[list[int], list[int], str]:
    """(prompt ids, generated ids, decoded answer) for a greedy, KV-cached generation."""
    prompt = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=False
    )
    input_ids = torch.tensor([prompt])
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
    generated = out[0, input_ids.shape[1] :].tolist()
    return prompt, generated, tokenizer.decode(generated, skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export_dir")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--system", default=SYSTEM_PROMPT, help="system prompt ('' for none)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args(argv)
    try:
        tokenizer, model = load(args.export_dir)
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
