"""Mixtral Instruct v1 encoding, built per segment (shared/FORMATS.md section 2).

    ids = [BOS] + for each user turn:      sp("[INST] " + content + " [/INST]")
                + for each assistant turn: sp(content) + [EOS]

Each segment is encoded on its own (so each gets SentencePiece's dummy "▁"), which is what
mistral-common's ``InstructTokenizerV1`` does; building the ids per segment also gives the loss
mask for free (answers and their EOS carry labels, everything else is -100). The structure rules
are mistral-common's (finetuning mode): system messages are joined with "\\n\\n" and prepended to
the first user turn; adjacent messages with the same role are merged with "\\n\\n"; a conversation
that starts with an answer gets an empty user turn first; a system message after an answer is an
error. The texts of many conversations go to the tokenizer in one batched call.
"""

from __future__ import annotations

from data_prep.formats import Preference, RecordError
from data_prep.tokenizer import Tokenizer
from model.labels import IGNORE_INDEX


def normalize_turns(messages: list[dict], *, require_answer: bool = True) -> list[tuple[str, str]]:
    """Validated messages -> (role, text) turns starting with a user turn, the system prompt folded
    into the first user turn, as mistral-common's v1 normalizer does. Roles usually alternate, but
    two user turns separated by a system message stay two turns.
    """
    if not messages:
        raise RecordError("invalid_structure", "the conversation has no messages")
    if len(messages) == 1 and messages[0]["role"] == "assistant":
        raise RecordError("invalid_structure", "a conversation of a single assistant message has no prompt")
    previous = None
    for i, message in enumerate(messages):
        if message["role"] == "system" and previous == "assistant":
            raise RecordError("system_after_assistant", f"message {i} is a system message after an assistant turn")
        previous = message["role"]
    if require_answer and messages[-1]["role"] != "assistant":
        raise RecordError("no_final_answer", f"the conversation ends with a {messages[-1]['role']} message, not an answer")

    system = [m["content"] for m in messages if m["role"] == "system" and m["content"]]
    # Runs of the same role merge only when adjacent: a system message between two user messages
    # keeps them as two [INST] turns (mistral-common aggregates role runs before dropping system).
    runs: list[tuple[str, list[str]]] = []
    for message in messages:
        if runs and runs[-1][0] == message["role"]:
            runs[-1][1].append(message["content"])
        else:
            runs.append((message["role"], [message["content"]]))
    turns: list[str] = []
    roles: list[str] = []
    for role, texts in runs:
        if role != "system":
            roles.append(role)
            turns.append("\n\n".join(texts))
    if not roles or roles[0] != "user":
        roles.insert(0, "user")
        turns.insert(0, "")
    if system:
        turns[0] = "\n\n".join(system) + "\n\n" + turns[0]
    return list(zip(roles, turns, strict=True))


def segment_texts(turns: list[tuple[str, str]]) -> list[str]:
    """The text of each segment the tokenizer sees (user turns wrapped in [INST] ... [/INST])."""
    return [f"[INST] {text} [/INST]" if role == "user" else text for role, text in turns]


def _assemble(turns, segment_ids, tokenizer: Tokenizer, last_answer_only: bool) -> dict:
    input_ids = [tokenizer.bos_id]
    labels = [IGNORE_INDEX]
    last_answer = max((i for i, (role, _) in enumerate(turns) if role == "assistant"), default=-1)
    for i, ((role, _), ids) in enumerate(zip(turns, segment_ids, strict=True)):
        if role == "user":
            input_ids += ids
            labels += [IGNORE_INDEX] * len(ids)
        else:
            answer = ids + [tokenizer.eos_id]
            input_ids += answer
            labels += answer if (i == last_answer or not last_answer_only) else [IGNORE_INDEX] * len(answer)
    return {"input_ids": input_ids, "labels": labels}


def encode_conversations(
    conversations: list[list[tuple[str, str]]], tokenizer: Tokenizer, *, last_answer_only: bool = False
) -> list[dict]:
    """Normalized turn lists -> ``{"input_ids", "labels"}`` each, with one tokenizer call for all."""
    texts = [text for turns in conversations for text in segment_texts(turns)]
    flat = tokenizer.encode_batch(texts)
    out, pos = [], 0
    for turns in conversations:
        out.append(_assemble(turns, flat[pos : pos + len(turns)], tokenizer, last_answer_only))
        pos += len(turns)
    return out


def encode_messages(messages: list[dict], tokenizer: Tokenizer, *, last_answer_only: bool = False) -> dict:
    """One conversation (OpenAI-style messages ending with an answer) -> input_ids and labels,
    equal to mistral-common's ``encode_chat_completion`` in finetuning mode."""
    from data_prep.formats import _messages

    turns = normalize_turns(_messages(messages, "messages"))
    return encode_conversations([turns], tokenizer, last_answer_only=last_answer_only)[0]


def encode_preferences(pairs: list[Preference], tokenizer: Tokenizer) -> list[dict]:
    """Preference pairs -> prompt ids and the two completions (answer ids + EOS), one tokenizer call.

    ``prompt + chosen`` equals mistral-common's encoding of ``prompt messages + [chosen answer]``.
    """
    prompts = [normalize_turns(p.prompt, require_answer=False) for p in pairs]
    texts = []
    for turns, pair in zip(prompts, pairs, strict=True):
        texts += segment_texts(turns)
        texts += [pair.chosen, pair.rejected]
    flat = tokenizer.encode_batch(texts)
    out, pos = [], 0
    for turns in prompts:
        prompt = _assemble(turns, flat[pos : pos + len(turns)], tokenizer, last_answer_only=False)["input_ids"]
        pos += len(turns)
        chosen, rejected = flat[pos] + [tokenizer.eos_id], flat[pos + 1] + [tokenizer.eos_id]
        pos += 2
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


def truncate_sft(example: dict, max_len: int) -> dict | None:
    """Keep the start; None when no label is left (nothing to learn from)."""
    ids, labels = example["input_ids"][:max_len], example["labels"][:max_len]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": ids, "labels": labels}


def truncate_pair(pair: dict, max_len: int, prompt_budget: int) -> dict | None:
    """Fit ``prompt + longest completion`` into ``max_len``.

    The prompt keeps its BOS and its end (the latest turns matter most) and is cut only as far as
    needed, never below ``prompt_budget`` tokens; then both completions keep their start.
    None when a completion would be left empty.
    """
    prompt, chosen, rejected = pair["prompt"], pair["chosen"], pair["rejected"]
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest <= max_len:
        return pair
    keep = min(len(prompt), max(prompt_budget, max_len - longest))
    if keep < len(prompt):
        prompt = prompt[:1] + prompt[len(prompt) - (keep - 1) :]
    room = max_len - len(prompt)
    if room <= 0:
        return None
    return {"prompt": prompt, "chosen": chosen[:room], "rejected": rejected[:room]}
