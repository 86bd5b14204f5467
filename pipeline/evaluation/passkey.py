"""Passkey retrieval (Mohtashami & Jaggi 2023, arXiv 2305.16300), as used in the Mixtral paper.

A random 5-digit key is hidden at a chosen depth in filler text of a chosen length (in tokens); the
model must repeat it after "What is the pass key? The pass key is". The prompt is built from token
pieces (each sentence encoded once, then repeated), so lengths and depths are exact in tokens and
the key never straddles a filler sentence.

    sample = build_prompt(encode, length=1024, depth=0.25, key="52718", bos_id=1)
    correct = is_correct(tokenizer.decode(greedy_generate(model, sample.input_ids, 16, eos_id, device)), sample.key)

`passkey_grid` runs the grid of a recipe's `passkey:` section on a model. `greedy_generate` answers
with a KV cache sized once for prompt + answer: the prompt (up to 32k
tokens) is one forward that runs the LM head on its last position only, then each new token is
one forward over that token alone, with no attention mask.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from model import KVCache

if TYPE_CHECKING:
    from pipeline.evaluation.recipe import PasskeySection

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
# Instruct models: the task is the user turn, and the answer's first words are given
# (Mixtral v1 format: "[INST] " + content + " [/INST]", then the answer as its own segment).
ASK, ANSWER_PREFIX = "What is the pass key?", "The pass key is"
TEMPLATES = ("plain", "inst")


@dataclass
class PasskeyPrompt:
    input_ids: list[int]
    key: str
    depth: float          # requested: fraction of the filler before the key line
    actual_depth: float   # achieved: filler tokens before the key line / all filler tokens
    key_start: int        # index of the key line's first token in input_ids
    key_end: int          # one past its last token
    filler_tokens: int


def random_key(rng: random.Random) -> str:
    """A 5-digit key without a leading zero (so that no parser can drop it)."""
    return str(rng.randint(10000, 99999))


def build_prompt(encode: Callable[[str], list[int]], length: int, depth: float, key: str,
                 bos_id: int | None = None, template: str = "plain") -> PasskeyPrompt:
    """Intro, filler with the key line at ``depth``, question; at most ``length`` tokens in all.

    ``encode`` turns text into ids without special tokens. The filler is whole repetitions of one
    sentence group; the key line goes between repetitions, at the boundary closest to ``depth``.
    ``template`` "plain" is the paper's completion prompt; "inst" wraps the task in [INST] ... [/INST]
    and starts the answer with "The pass key is", for instruct models.
    """
    if template not in TEMPLATES:
        raise ValueError(f"passkey template must be one of {TEMPLATES}, got {template!r}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"passkey depth must be in [0, 1], got {depth}")
    if not re.fullmatch(r"\d+", key):
        raise ValueError(f"passkey must be digits, got {key!r}")
    bos = [bos_id] if bos_id is not None else []
    if template == "plain":
        head, tail = bos + encode(INTRO), encode(QUESTION)
    else:
        head, tail = bos + encode("[INST] " + INTRO), encode(ASK + " [/INST]") + encode(ANSWER_PREFIX)
    unit, key_ids = encode(FILLER), encode(KEY_LINE.format(key=key))
    fixed = len(head) + len(key_ids) + len(tail)
    repeats = (length - fixed) // len(unit)
    if repeats < 1:
        raise ValueError(f"passkey length {length} is too short: the prompt needs at least "
                         f"{fixed + len(unit)} tokens with this tokenizer; raise passkey.lengths")
    before = round(depth * repeats)
    key_start = len(head) + before * len(unit)
    ids = head + unit * before + key_ids + unit * (repeats - before) + tail
    return PasskeyPrompt(ids, key, depth, before / repeats, key_start, key_start + len(key_ids),
                         repeats * len(unit))


def parse_answer(text: str) -> str | None:
    """The first run of digits in the generated text (digits may be split by spaces), or None."""
    match = re.search(r"\d(?:[ \u2009]?\d)*", text)
    return re.sub(r"\D", "", match.group(0)) if match else None


def is_correct(text: str, key: str) -> bool:
    return parse_answer(text) == key


def run_grid(encode: Callable[[str], list[int]], generate: Callable[[list[int]], str],
             lengths: Sequence[int], depths: Sequence[float], trials: int, seed: int,
             bos_id: int | None = None, template: str = "plain") -> dict:
    """Accuracy for every (length, depth) over ``trials`` random keys; ``generate`` answers greedily.

    Returns ``{"lengths", "depths", "accuracy": [len][depth], "samples": [...]}``.
    """
    rng = random.Random(seed)
    accuracy, samples = [], []
    for length in lengths:
        row = []
        for depth in depths:
            hits = 0
            for trial in range(trials):
                prompt = build_prompt(encode, length, depth, random_key(rng), bos_id, template)
                answer = generate(prompt.input_ids)
                hit = is_correct(answer, prompt.key)
                hits += hit
                samples.append({"length": length, "depth": depth, "trial": trial, "key": prompt.key,
                                "tokens": len(prompt.input_ids), "actual_depth": prompt.actual_depth,
                                "answer": answer, "parsed": parse_answer(answer), "correct": hit})
            row.append(hits / trials)
        accuracy.append(row)
    return {"lengths": list(lengths), "depths": list(depths), "trials": trials, "template": template,
            "accuracy": accuracy, "samples": samples}


def main_process_token(token: int, device: torch.device) -> int:
    """Launched: the main process's choice on every process, so that all decode the same tokens and
    run the same forwards (collectives under EP) even if a near-tie broke differently somewhere."""
    if not dist.is_initialized():
        return token
    choice = torch.tensor([token], dtype=torch.long, device=device)
    dist.broadcast(choice, src=0)
    return int(choice)


@torch.no_grad()
def greedy_generate(model, input_ids: list[int], max_new_tokens: int, eos_id: int, device: torch.device) -> list[int]:
    """Greedy continuation of one prompt (a Mixtral): the new token ids, without the eos."""
    cache = KVCache(model.config.num_hidden_layers, max_length=len(input_ids) + max_new_tokens)
    ids = torch.tensor([input_ids], device=device)  # [1, S]
    new: list[int] = []
    for _ in range(max_new_tokens):
        # logits_to_keep=1: the prompt's [S, V] logits (2.1 GB at 32k tokens) would be read once, at the end.
        token = int(model(ids, kv_cache=cache, logits_to_keep=1).logits[0, -1].argmax())  # the step's one host read
        token = main_process_token(token, device)
        if token == eos_id:
            break
        new.append(token)
        ids = torch.tensor([[token]], device=device)  # [1, 1]
    return new


def passkey_grid(model, tokenizer, section: PasskeySection, device: torch.device) -> dict:
    """Passkey accuracy per (length, depth) with greedy answers, plus the mean over all cells."""

    def answer(ids: list[int]) -> str:
        return tokenizer.decode(greedy_generate(model, ids, section.max_new_tokens, tokenizer.eos_id, device))

    grid = run_grid(tokenizer.encode, answer, section.lengths, section.depths, section.trials, section.seed,
                       tokenizer.bos_id, section.template)
    grid["mean_accuracy"] = sum(map(sum, grid["accuracy"])) / (len(section.lengths) * len(section.depths))
    return grid
