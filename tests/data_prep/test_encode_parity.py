"""Our per-segment v1 encoding against mistral-common's encode_chat_completion (finetuning mode)."""

import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from data_prep import (
    IGNORE_INDEX,
    Preference,
    RecordError,
    default_tokenizer_path,
    encode_messages,
    load_tokenizer,
)
from data_prep.encode import encode_preferences, truncate_pair


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def reference():
    return MistralTokenizer.from_file(str(default_tokenizer_path()), mode=ValidationMode.finetuning)


def mc_ids(reference, messages):
    return reference.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def s(text):
    return {"role": "system", "content": text}


CONVERSATIONS = {
    "single turn": [u("Explain Machine Learning to me in a nutshell."), a("Machine learning learns from data.")],
    "multi turn": [u("Hi"), a("Hello!"), u("What is 2+2?"), a("4"), u("And 3+3?"), a("6")],
    "system prompt": [s("You are a concise assistant."), u("Explain gravity."), a("Mass attracts mass.")],
    "two system prompts": [s("Rule one."), s("Rule two."), u("Go"), a("Ok")],
    "system after user": [u("a"), s("Be brief."), a("b")],
    "system between users": [u("first"), s("S"), u("second"), a("answer")],
    "same-role users": [u("part one"), u("part two"), a("joined")],
    "same-role assistants": [u("q"), a("one"), a("two")],
    "assistant first": [a("I start."), u("Then you."), a("Then me.")],
    "system then assistant first": [s("sys"), a("I start."), u("q"), a("r")],
    "system only prompt": [s("sys"), a("answer")],
    "unicode": [u("Ünïcödé ✓ 日本語 😀 — ½"), a("Привет, мир! 你好 🌍")],
    "code and tabs": [u("def f(x):\n\treturn x  # tab\n"), a("```python\nprint('hi')\n```")],
    "whitespace runs": [u("Hello    world  \n\n\n  x"), a("a  b   c    d")],
    "leading and trailing spaces": [u("  leading"), a(" trailing  ")],
    "whitespace only": [u(" "), a("   ")],
    "literal control strings": [u("What does [INST] mean? And [/INST]?"), a("It is text: </s> <s> <unk> [INST]")],
    "digits": [u("12345678901234567890"), a("3.14159e-10")],
    "newlines only": [u("\n"), a("\n\n")],
    "long multi turn with system": [s("S1")] + [m for i in range(6) for m in (u(f"question {i}?"), a(f"answer {i}."))],
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_ids_equal_mistral_common(tok, reference, name):
    messages = CONVERSATIONS[name]
    assert encode_messages(messages, tok)["input_ids"] == mc_ids(reference, messages)


def test_labels_cover_answers_and_eos_only(tok):
    messages = [s("sys"), u("What is 2+2?"), a("4"), u("And 3+3?"), a("six")]
    out = encode_messages(messages, tok)
    sp = tok.encode
    prompt1 = [1] + sp("[INST] sys\n\nWhat is 2+2? [/INST]")
    answer1 = sp("4") + [2]
    prompt2 = sp("[INST] And 3+3? [/INST]")
    answer2 = sp("six") + [2]
    assert out["input_ids"] == prompt1 + answer1 + prompt2 + answer2
    masked = lambda ids: [IGNORE_INDEX] * len(ids)  # noqa: E731
    assert out["labels"] == masked(prompt1) + answer1 + masked(prompt2) + answer2
    last_only = encode_messages(messages, tok, last_answer_only=True)
    assert last_only["input_ids"] == out["input_ids"]
    assert last_only["labels"] == masked(prompt1) + masked(answer1) + masked(prompt2) + answer2


def test_known_ids_from_formats_md(tok):
    out = encode_messages([u("Explain Machine Learning to me in a nutshell."), a("x")], tok)
    head = [1, 733, 16289, 28793, 13702, 426, 13253, 17504, 298, 528, 297, 264, 21204, 13436, 28723, 733, 28748, 16289, 28793]
    assert out["input_ids"][: len(head)] == head


@pytest.mark.parametrize(
    "messages, reason",
    [
        ([u("q"), a("r"), s("late system"), a("x")], "system_after_assistant"),
        ([u("q")], "no_final_answer"),
        ([u("q"), a("r"), u("dangling")], "no_final_answer"),
        ([a("only an answer")], "invalid_structure"),
        ([{"role": "tool", "content": "x"}, a("r")], "unknown_role"),
        ([u(""), a("r")], "empty_content"),
        ([u(["not", "text"]), a("r")], "non_string_content"),
        ([{"role": "user"}, a("r")], "missing_field"),
        ([], "invalid_structure"),
    ],
)
def test_invalid_conversations_name_the_reason(tok, reference, messages, reason):
    with pytest.raises(RecordError) as err:
        encode_messages(messages, tok)
    assert err.value.reason == reason


@pytest.mark.parametrize(
    "messages",
    [[u("q"), a("r"), s("late"), a("x")], [u("q")], [a("only an answer")]],
)
def test_structures_we_reject_mistral_common_rejects_too(reference, messages):
    with pytest.raises(Exception):  # noqa: B017 - mistral-common raises several exception types
        mc_ids(reference, messages)


def test_preference_pairs_equal_mistral_common(tok, reference):
    pairs = [
        Preference([u("What is 2+2?")], "4", "Four, I think."),
        Preference([s("sys"), u("q1"), a("r1"), u("q2")], "  spaced  ", "</s> literal"),
    ]
    for pair, enc in zip(pairs, encode_preferences(pairs, tok), strict=True):
        assert enc["prompt"] + enc["chosen"] == mc_ids(reference, pair.prompt + [a(pair.chosen)])
        assert enc["prompt"] + enc["rejected"] == mc_ids(reference, pair.prompt + [a(pair.rejected)])
        assert enc["chosen"][-1] == tok.eos_id and enc["prompt"][0] == tok.bos_id


def test_dpo_truncation_keeps_prompt_end_and_answer_starts():
    pair = {"prompt": [1] + list(range(100, 120)), "chosen": list(range(200, 215)), "rejected": list(range(300, 305))}
    # prompt 21 + longest answer 15 = 36 > 24: the prompt is cut only as far as needed (to 24 - 15 = 9
    # tokens: BOS + its last 8), so both answers stay whole.
    out = truncate_pair(pair, max_len=24, prompt_budget=8)
    assert out["prompt"] == [1] + list(range(112, 120))
    assert out["chosen"] == list(range(200, 215))
    assert out["rejected"] == list(range(300, 305))
    # A long answer: the prompt is cut to its budget (BOS + last 7), the answers keep their start.
    long = {"prompt": [1] + list(range(100, 120)), "chosen": list(range(200, 260)), "rejected": [7, 8]}
    out = truncate_pair(long, max_len=24, prompt_budget=8)
    assert out["prompt"] == [1] + list(range(113, 120))
    assert out["chosen"] == list(range(200, 216))
    assert out["rejected"] == [7, 8]
    # Short enough already: untouched.
    assert truncate_pair(pair, max_len=64, prompt_budget=8) is pair
