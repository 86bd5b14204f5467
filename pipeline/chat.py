"""Greedy answer from an exported model, through transformers (make chat).

    python -m pipeline.chat outputs/tiny/export
    python -m pipeline.chat outputs/tiny/export --prompt "Name three prime numbers." --max-new-tokens 64
    python -m pipeline.chat outputs/tiny/export-adapter --base outputs/tiny/sft/base   # an adapter export
    python -m pipeline.chat /runs/mixtral-8x7b-export          # 8 GPUs: the layers split over them

Loads the export exactly as a user would and decodes the bundled question greedily with the KV
cache (pipeline/evaluation/generate.py). The tiny demo model is trained for a few steps on a small
dataset, so its answer shows that the pipeline runs end to end, not that the model is good.
``--device-map auto`` (the default) splits the decoder layers over the visible GPUs (transformers'
``device_map="auto"``; Mixtral-8x7B in bf16 takes ~12 GB on each of 8 x 80 GB GPUs); ``none`` loads
the whole model on the CPU. Exit status 1, with one line, when the directory is not an export.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.evaluation.generate import PROMPT, SYSTEM_PROMPT, answer, chat_messages, load


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
    _, generated, text = answer(tokenizer, model, chat_messages(args.prompt, args.system), args.max_new_tokens)
    print(f"[system] {args.system}" if args.system else "", file=sys.stderr)
    print(f"[user] {args.prompt}")
    print(f"[assistant] {text}")
    print(f"({len(generated)} tokens, greedy, KV cache)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
