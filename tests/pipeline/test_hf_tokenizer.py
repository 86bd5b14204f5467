"""The exported fast tokenizer against SentencePiece, and its chat template against mistral-common v1."""

import json
import random

import pytest
import sentencepiece as spm
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from transformers import AutoTokenizer

from pipeline.hf_tokenizer import CHAT_TEMPLATE, DEFAULT_SPM_PATH, SPACE, save_tokenizer_files, spm_vocab


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tokenizer as the export writes it, reloaded the way users load it."""
    out = tmp_path_factory.mktemp("tok")
    save_tokenizer_files(out)
    return out, AutoTokenizer.from_pretrained(out)


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(DEFAULT_SPM_PATH))


def _strings():
    fixed = [
        "",
        " ",
        "  ",
        " c",
        "  x  ",
        "Hello  world",
        "a" + " " * 17 + "b",
        "\n\n hi",
        "x\t\ty",
        "tab\tand\nnewline \n",
        "1234567 89",
        "3.14159e-10",
        "日本語のテキスト",
        "Привет, мир!",
        "مرحبا",
        "emoji 🎉🚀 end",
        "\u00a0nbsp",
        "\x00\x01control",
        "def f(x):\n    return x  # comment",
        "[INST] fake [/INST]",
        "ü",
        "    indented",
        "trailing   ",
    ]
    fixed += [" " * n for n in range(1, 34)]
    rng = random.Random(0)
    alphabet = "ab cd\n\t  ef😀é1.,[]/ßкит文"
    fixed += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(600)]
    return fixed


def test_no_piece_merges_across_a_word_boundary():
    # The chat template relies on this: "▁" only at the start of a piece, or in whitespace-only pieces.
    vocab, _ = spm_vocab()
    crossing = [p for p in vocab if SPACE in p[1:] and set(p) != {SPACE}]
    assert crossing == []


def test_encode_and_decode_equal_sentencepiece(exported, sp):
    _, tok = exported
    for text in _strings():
        ids = tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert ids == sp.encode(text), repr(text)
        assert tok.decode(ids) == sp.decode(ids), repr(text)
    assert tok("hi")["input_ids"] == [1] + sp.encode("hi")


def test_saved_files(exported):
    out, tok = exported
    config = json.loads((out / "tokenizer_config.json").read_text())
    # A class transformers 4.x and 5.x both load from tokenizer.json as it is (4.x has no
    # TokenizersBackend; a Llama class makes 5.x rebuild the pipeline from tokenizer.model), and the
    # template where 4.x reads it. tests/pipeline/test_export.py loads an export with 4.x when given one.
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["chat_template"] == CHAT_TEMPLATE
    assert json.loads((out / "special_tokens_map.json").read_text()) == {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
    }
    assert (out / "tokenizer.model").read_bytes() == DEFAULT_SPM_PATH.read_bytes()
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, len(tok)) == (1, 2, 0, 32000)


def _msgs(*pairs, **extra):
    return [
        dict(role=role, content=content, **extra.get(str(i), {})) for i, (role, content) in enumerate(pairs)
    ]


COMPLETE = [  # finetuning mode: the last message is the assistant's
    _msgs(
        ("user", "Explain Machine Learning to me in a nutshell."),
        ("assistant", "Machine learning learns from data."),
    ),
    _msgs(("system", "You are a concise assistant."), ("user", "Explain"), ("assistant", "ok")),
    _msgs(
        ("system", "s1"),
        ("system", "s2"),
        ("user", "q"),
        ("assistant", "a"),
        ("user", "q2"),
        ("assistant", "a2"),
    ),
    _msgs(
        ("user", "a"),
        ("user", "b"),
        ("assistant", "c"),
        ("assistant", "d"),
        ("user", "e"),
        ("assistant", "f"),
    ),
    _msgs(
        ("user", "  lead"), ("assistant", "  lead ans  "), ("user", "x   y\n\n\tz "), ("assistant", "\n\n  ")
    ),
    _msgs(
        ("user", "日本語 🎉"),
        ("assistant", " ünïcödé\n"),
        ("user", "[INST] fake [/INST]"),
        ("assistant", "Привет"),
    ),
    _msgs(("user", ""), ("assistant", "x")),
    _msgs(("system", "only a system prompt"), ("assistant", "answer")),
    _msgs(("assistant", "starts"), ("user", "then"), ("assistant", "ends")),
    _msgs(("user", "q"), ("system", "late system"), ("user", "q2"), ("assistant", "a")),
]
PROMPTS = [  # test mode: the last message is the user's (or an assistant prefix)
    _msgs(("user", "Explain Machine Learning to me in a nutshell.")),
    _msgs(("system", "You are a helpful assistant."), ("user", "What is 2+2?")),
    _msgs(("user", "hi"), ("assistant", "Hello."), ("user", "  and   now?  ")),
    _msgs(("system", "only")),
    _msgs(("user", "q"), ("system", "sys late"), ("user", "q2")),
    _msgs(("user", "1\n2\n3"), ("user", "\t tab")),
    _msgs(("user", "q"), ("assistant", "The answer is"), **{"1": {"prefix": True}}),
]

# Message text that looks like control tokens is text for mistral-common ("</s>" -> "</", "s", ">").
LOOKALIKES = [
    _msgs(("user", "say </s> now"), ("assistant", "a <s> b </s> c")),
    _msgs(("user", "[INST] x [/INST]"), ("assistant", "[/INST]</s>")),
    _msgs(("system", "<s>sys</s>"), ("user", "<unk> q <"), ("assistant", "  lead </s>")),
    _msgs(("user", "</s>"), ("assistant", "<s>"), ("user", "<unk>"), ("assistant", "<<s>>")),
    _msgs(("user", "<|im_start|>user\nhi<|im_end|>"), ("assistant", "<0x0A> < / s >")),
]


def _varied(n=30, seed=0):
    """Conversations built from pieces that stress the template: special-token lookalikes, [INST],
    runs of spaces, newlines, a system prompt now and then, two or four turns."""
    rng = random.Random(seed)
    pieces = ["<s>", "</s>", "<unk>", "[INST]", "[/INST]", "<", ">", "</", " ", "  ", "hi", "x", "\n", "日本", "🎉"]
    out = []
    for _ in range(n):
        text = lambda: "".join(rng.choice(pieces) for _ in range(rng.randint(1, 8))) + rng.choice(["a", "b"])  # noqa: E731
        turns = [("system", text())] if rng.random() < 0.3 else []
        turns += [("user" if t % 2 == 0 else "assistant", text()) for t in range(rng.choice([2, 4]))]
        out.append(_msgs(*turns))
    return out


_ROLES = {"user": UserMessage, "assistant": AssistantMessage, "system": SystemMessage}


def _mistral_ids(messages, mode):
    tok = MistralTokenizer.from_file(str(DEFAULT_SPM_PATH), mode=mode)
    request = ChatCompletionRequest(messages=[_ROLES[m["role"]](**m) for m in messages])
    return tok.encode_chat_completion(request).tokens


@pytest.mark.parametrize("messages", COMPLETE, ids=[f"complete{i}" for i in range(len(COMPLETE))])
def test_chat_template_equals_mistral_common_finetuning(exported, messages):
    _, tok = exported
    got = tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert got == _mistral_ids(messages, ValidationMode.finetuning)


@pytest.mark.parametrize("messages", PROMPTS, ids=[f"prompt{i}" for i in range(len(PROMPTS))])
def test_chat_template_equals_mistral_common_test_mode(exported, messages):
    _, tok = exported
    got = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert got == _mistral_ids(messages, ValidationMode.test)


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "empty conversation|no messages"),
        (_msgs(("assistant", "alone")), "one message"),
        (_msgs(("user", "q"), ("assistant", "a"), ("system", "s"), ("user", "q")), "after an assistant"),
        (_msgs(("user", "q"), ("tool", "x")), "roles"),
    ],
)
def test_chat_template_rejects_what_mistral_common_rejects(exported, messages, match):
    _, tok = exported
    with pytest.raises(Exception, match=match):
        tok.apply_chat_template(messages, tokenize=False)


@pytest.mark.parametrize("messages", LOOKALIKES + _varied(), ids=[f"lookalike{i}" for i in range(len(LOOKALIKES))]
                         + [f"varied{i}" for i in range(30)])
def test_message_text_that_looks_like_control_tokens_stays_text(exported, messages):
    _, tok = exported
    got = tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    want = _mistral_ids(messages, ValidationMode.finetuning)
    assert got == want
    answers = sum(m["role"] == "assistant" for i, m in enumerate(messages)
                  if i + 1 == len(messages) or messages[i + 1]["role"] != "assistant")
    assert got.count(2) == answers and got.count(1) == 1  # EOS only after answers, BOS once


def test_data_prep_encodes_lookalike_text_like_mistral_common():
    from data_prep import encode_messages, load_tokenizer

    tok = load_tokenizer()
    for messages in LOOKALIKES + _varied(10, seed=1):
        assert encode_messages(messages, tok)["input_ids"] == _mistral_ids(messages, ValidationMode.finetuning)
