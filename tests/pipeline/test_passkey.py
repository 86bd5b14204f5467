import random
import re
from pathlib import Path

import mistral_common
import pytest
import sentencepiece as spm

from pipeline.evaluation.passkey import (
    FILLER,
    INTRO,
    KEY_LINE,
    QUESTION,
    build_prompt,
    is_correct,
    parse_answer,
    random_key,
    run_grid,
)

# The Mixtral tokenizer that ships inside mistral-common (see shared/FORMATS.md).
SPM = spm.SentencePieceProcessor(model_file=str(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"))


def encode(text):
    return SPM.encode(text)


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.77, 1.0])
@pytest.mark.parametrize("length", [300, 1000, 4096])
def test_key_line_sits_at_the_stated_depth(length, depth):
    prompt = build_prompt(encode, length, depth, "52718", bos_id=1)
    unit = len(encode(FILLER))
    repeats = prompt.filler_tokens // unit
    ids = prompt.input_ids
    assert ids[0] == 1
    assert length - unit < len(ids) <= length
    # The key line is exactly where the prompt says, and nowhere else.
    assert SPM.decode(ids[prompt.key_start:prompt.key_end]) == KEY_LINE.format(key="52718")
    assert SPM.decode(ids).count("52718") == 2
    # Filler before the key / all filler, in tokens, is the achievable depth closest to the request.
    head = 1 + len(encode(INTRO))
    before = prompt.key_start - head
    assert before % unit == 0
    assert prompt.actual_depth == before / prompt.filler_tokens
    assert abs(prompt.actual_depth - depth) <= 0.5 / repeats + 1e-12  # a tie may round either way
    assert ids[head:prompt.key_start] == encode(FILLER) * (before // unit)
    assert ids[prompt.key_end:] == encode(FILLER) * (repeats - before // unit) + encode(QUESTION)


def test_depth_extremes_touch_intro_and_question():
    first = build_prompt(encode, 500, 0.0, "11111")
    last = build_prompt(encode, 500, 1.0, "11111")
    assert first.key_start == len(encode(INTRO))
    assert last.key_end == len(last.input_ids) - len(encode(QUESTION))
    assert SPM.decode(last.input_ids).endswith("The pass key is")


def test_too_short_or_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="too short"):
        build_prompt(encode, 50, 0.5, "12345")
    with pytest.raises(ValueError, match="depth"):
        build_prompt(encode, 500, 1.5, "12345")
    with pytest.raises(ValueError, match="digits"):
        build_prompt(encode, 500, 0.5, "12a45")


def test_random_keys_are_five_digits():
    rng = random.Random(0)
    keys = [random_key(rng) for _ in range(200)]
    assert all(re.fullmatch(r"[1-9]\d{4}", k) for k in keys)
    assert len(set(keys)) > 190


@pytest.mark.parametrize("text,parsed", [
    (" 52718.", "52718"),
    ("52718 is the pass key", "52718"),
    (" 5 2 7 1 8</s>", "52718"),
    ("\n\nThe pass key is 52718. Remember it.", "52718"),
    (" 527189", "527189"),
    (" five two", None),
    ("", None),
])
def test_parse_answer(text, parsed):
    assert parse_answer(text) == parsed


def test_is_correct_needs_the_whole_key():
    assert is_correct(" 52718. Remember", "52718")
    assert not is_correct(" 5271", "52718")
    assert not is_correct(" 527189", "52718")
    assert not is_correct(" 12345 52718", "52718")  # the first number counts, not any number


def test_grid_accuracy_bookkeeping():
    # An oracle that reads the key from its prompt, but only when the key is in the first half.
    def generate(ids):
        text = SPM.decode(ids)
        key = re.search(r"pass key is (\d+)", text).group(1)
        return " " + key if text.index(key) < len(text) / 2 else " 00000"

    result = run_grid(encode, generate, lengths=[300, 600], depths=[0.0, 0.3, 1.0], trials=3, seed=0)
    assert result["accuracy"] == [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]
    assert len(result["samples"]) == 2 * 3 * 3
    assert all(s["correct"] == (s["parsed"] == s["key"]) for s in result["samples"])
    again = run_grid(encode, generate, lengths=[300, 600], depths=[0.0, 0.3, 1.0], trials=3, seed=0)
    assert [s["key"] for s in again["samples"]] == [s["key"] for s in result["samples"]]


@pytest.mark.parametrize("depth", [0.0, 0.4, 1.0])
def test_inst_template_is_the_mixtral_v1_encoding_of_the_same_chat(depth):
    # The token-built prompt equals data_prep's v1 encoding (tested against mistral-common) of one
    # user message holding the same text, followed by the answer prefix "The pass key is".
    from data_prep import encode_messages, load_tokenizer

    tok = load_tokenizer()
    prompt = build_prompt(tok.encode, 400, depth, "70411", bos_id=tok.bos_id, template="inst")
    repeats = prompt.filler_tokens // len(tok.encode(FILLER))
    before = round(depth * repeats)
    text = " ".join([INTRO] + [FILLER] * before + [KEY_LINE.format(key="70411")] + [FILLER] * (repeats - before)
                    + ["What is the pass key?"])
    chat = encode_messages([{"role": "user", "content": text}, {"role": "assistant", "content": "The pass key is"}], tok)
    assert prompt.input_ids == chat["input_ids"][:-1]  # all but the answer's EOS
    assert tok.decode(prompt.input_ids[prompt.key_start:prompt.key_end]) == KEY_LINE.format(key="70411")


def test_unknown_template_is_refused():
    with pytest.raises(ValueError, match="template"):
        build_prompt(encode, 500, 0.5, "12345", template="chatml")


def test_greedy_generate_prefills_the_last_logits_only_and_decodes_without_a_mask():
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    from model import Mixtral, MixtralConfig
    from pipeline.evaluation.passkey import greedy_generate

    torch.manual_seed(0)
    cfg = MixtralConfig.preset("tiny")
    cfg.vocab_size = 300
    model = Mixtral(cfg).eval()
    prompt = torch.randint(3, 300, (40,)).tolist()
    head_positions = []
    model.lm_head.register_forward_hook(lambda module, args, out: head_positions.append(args[0].shape[1]))

    class AttentionCalls(TorchFunctionMode):
        masks = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is F.scaled_dot_product_attention:
                self.masks.append(kwargs.get("attn_mask"))
            return func(*args, **kwargs)

    with AttentionCalls() as calls:
        new = greedy_generate(model, prompt, 5, eos_id=-1, device=torch.device("cpu"))
    # The continuation a full forward over prompt + answer gives, token by token.
    with torch.no_grad():
        logits = model(torch.tensor([prompt + new])).logits[0]
    assert new == [int(logits[len(prompt) - 1 + i].argmax()) for i in range(5)]
    assert head_positions[:5] == [1] * 5  # the prompt's forward too: one position through the LM head
    assert len(calls.masks) == 5 * cfg.num_hidden_layers and all(mask is None for mask in calls.masks)
