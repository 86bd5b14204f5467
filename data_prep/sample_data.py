"""Bundled sample data: synthetic tasks with checkable answers, small enough for a CPU demo.

    python -m data_prep.sample_data            # rewrites data_prep/data/*.jsonl (deterministic)

Tasks: 2-digit addition, string reversal, upper-casing, and format following (a JSON answer, a
one-word answer, a bulleted list). The SFT set spreads over all three SFT formats (OpenAI
messages with system prompts and multi-turn chats, ShareGPT, Alpaca) plus a held-out eval file;
the preference set pairs a "chosen" answer that follows the requested format with a "rejected"
one that does not (and is sometimes also wrong), as prompt/chosen/rejected strings and as
UltraFeedback-style message lists, plus a held-out eval file.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
SEED = 1234

SYSTEM_PROMPTS = ["You are a precise assistant.", "Answer exactly in the requested format.", "You are a helpful assistant."]
WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "rocket", "garden", "silver", "mango", "candle"]


def _word(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return rng.choice(WORDS)
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8)))


def make_task(rng: random.Random) -> dict:
    """One task: the prompt, the correct formatted answer, and a badly formatted (maybe wrong) one."""
    kind = rng.choice(["add", "reverse", "upper", "json", "bullets"])
    if kind == "add":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        wrong = a + b + rng.choice([-10, -1, 1, 10])
        bad = a + b if rng.random() < 0.5 else wrong
        return {
            "prompt": f"What is {a} + {b}? Answer with the number only.",
            "answer": str(a + b),
            "bad": f"Sure! Let me compute that. {a} plus {b} equals {bad}.",
        }
    if kind == "reverse":
        w = _word(rng)
        bad = w[::-1] if rng.random() < 0.5 else w
        return {"prompt": f"Reverse the string '{w}'. Reply with the reversed string only.", "answer": w[::-1], "bad": f"The reversed string is: \"{bad}\""}
    if kind == "upper":
        text = " ".join(_word(rng) for _ in range(rng.randint(2, 4)))
        bad = text.capitalize() if rng.random() < 0.5 else text
        return {"prompt": f"Convert to upper case: {text}", "answer": text.upper(), "bad": bad}
    if kind == "json":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        bad = a + b if rng.random() < 0.5 else a + b + 1
        return {"prompt": f"Add {a} and {b}. Reply in JSON with the key \"sum\".", "answer": json.dumps({"sum": a + b}), "bad": f"The sum is {bad}."}
    words = [_word(rng) for _ in range(rng.randint(2, 4))]
    bad = ", ".join(words if rng.random() < 0.5 else words[:-1])
    return {
        "prompt": f"List these words as a bulleted list, one per line: {', '.join(words)}",
        "answer": "\n".join(f"- {w}" for w in words),
        "bad": bad,
    }


def as_messages(rng: random.Random) -> dict:
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for _ in range(1 if rng.random() < 0.7 else 2):
        task = make_task(rng)
        messages += [{"role": "user", "content": task["prompt"]}, {"role": "assistant", "content": task["answer"]}]
    return {"messages": messages}


def as_sharegpt(rng: random.Random) -> dict:
    task = make_task(rng)
    turns = [{"from": "human", "value": task["prompt"]}, {"from": "gpt", "value": task["answer"]}]
    if rng.random() < 0.2:
        turns.insert(0, {"from": "system", "value": rng.choice(SYSTEM_PROMPTS)})
    return {"conversations": turns}


def as_alpaca(rng: random.Random) -> dict:
    task = make_task(rng)
    if task["prompt"].startswith("Convert to upper case: "):
        return {"instruction": "Convert to upper case.", "input": task["prompt"].split(": ", 1)[1], "output": task["answer"]}
    return {"instruction": task["prompt"], "input": "", "output": task["answer"]}


def as_pair(rng: random.Random) -> dict:
    task = make_task(rng)
    return {"prompt": task["prompt"], "chosen": task["answer"], "rejected": task["bad"]}


def as_ultrafeedback(rng: random.Random) -> dict:
    task = make_task(rng)
    user = {"role": "user", "content": task["prompt"]}
    return {
        "prompt": task["prompt"],
        "chosen": [user, {"role": "assistant", "content": task["answer"]}],
        "rejected": [user, {"role": "assistant", "content": task["bad"]}],
    }


# file name -> (record maker, count)
FILES = {
    "sft_messages.jsonl": (as_messages, 1200),
    "sft_sharegpt.jsonl": (as_sharegpt, 600),
    "sft_alpaca.jsonl": (as_alpaca, 600),
    "sft_eval.jsonl": (as_messages, 200),
    "dpo_pairs.jsonl": (as_pair, 800),
    "dpo_ultrafeedback.jsonl": (as_ultrafeedback, 400),
    "dpo_eval.jsonl": (as_pair, 150),
}


def generate(out_dir: Path = DATA_DIR) -> list[Path]:
    """Write every bundled file; the same bytes on every run (one seeded generator per file)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (make, count) in FILES.items():
        rng = random.Random(f"{SEED}:{name}")
        lines = [json.dumps(make(rng), ensure_ascii=False) for _ in range(count)]
        path = out_dir / name
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    for path in generate():
        print(f"{path} ({path.stat().st_size} bytes)")
