"""The Mixtral fast tokenizer and chat template, built offline from the SentencePiece model.

    tok = build_fast_tokenizer()                 # mistral_common's tokenizer.model.v1 by default
    save_tokenizer_files(out_dir)                # tokenizer.model, tokenizer.json, *_config.json

The fast tokenizer encodes exactly like SentencePiece (FORMATS.md section 1): a BPE model whose
merges are ranked by the SentencePiece piece scores, a normalizer that prepends the dummy ``▁`` and
turns spaces into ``▁``, no pre-tokenizer, and BOS added by the post-processor. transformers'
own conversion ranks merges by id (``▁▁`` merges first) and skips the dummy ``▁`` before a leading
space, so neither is used here.

The class written to tokenizer_config.json is ``PreTrainedTokenizerFast``: transformers 4.x and 5.x
both load tokenizer.json as it is under that name (checked with 4.57.6 and 5.23.0: the same ids and
chat-template ids). The alternatives each break one of them: ``TokenizersBackend`` (what 5.x saves)
does not exist in 4.x; ``LlamaTokenizer``/``LlamaTokenizerFast`` (the hub's Mixtral files) make 5.x
rebuild the pipeline from tokenizer.model and lose the leading-space rule.

The chat template reproduces mistral-common's v1 instruct encoding once the rendered string is
tokenized (see :data:`CHAT_TEMPLATE`), also for messages whose text holds "<s>", "</s>" or "<unk>".
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mistral_common
import sentencepiece as spm
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
from transformers import PreTrainedTokenizerFast

from model.checkpoint import write_json

DEFAULT_SPM_PATH = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
BOS, EOS, UNK = "<s>", "</s>", "<unk>"
SPACE = "\u2581"  # SentencePiece's visible space, "▁"
# Written by the chat template after every "<" of message text and deleted by the normalizer, so that
# "</s>" typed in a message is not matched as the EOS token (see CHAT_TEMPLATE). A Unicode
# noncharacter (U+FDD0, "for internal use"): text holding it is the one thing encoded differently
# from SentencePiece, which keeps it.
TEXT_MARK = "\ufdd0"
TOKENIZER_CLASS = "PreTrainedTokenizerFast"

# Why this template tokenizes like mistral-common's per-segment encoding:
# mistral-common encodes "[INST] {user} [/INST]" and every answer as separate SentencePiece calls,
# so each segment starts with the dummy "▁". The fast tokenizer splits the rendered string at the
# special tokens <s> and </s> and normalizes every piece on its own, so a user turn rendered right
# after <s> or </s> gets its dummy "▁" the same way. An answer follows "[/INST]" inside the same
# piece; the template writes one space before it, which the normalizer turns into the "▁" that
# SentencePiece would have prepended; two user turns in a row (a system message between them keeps
# them apart, as in mistral-common) are separated the same way. No merge crosses such a boundary
# because no vocabulary piece holds "▁" after a non-space character (checked in tests). An empty
# answer is written as nothing (SentencePiece encodes "" to no ids).
#
# Message text is text. mistral-common encodes a "</s>" typed in a message as the pieces "</", "s",
# ">", never as EOS; the fast tokenizer matches its special tokens in the rendered string first. So
# the template writes TEXT_MARK after every "<" of message content: "<\ufdd0/s>" matches no special
# token, and the normalizer (which runs on the pieces between special tokens) deletes the mark again,
# leaving the text SentencePiece sees. "[INST]" in a message needs nothing: in v1 it is plain text
# for both.
#
# Message handling follows mistral-common v1: runs of messages with the same role are joined with
# "\n\n"; system messages are collected (in order) into one prompt that is prepended to the first
# user turn; a conversation that does not start with a user turn gets an empty one; a lone
# assistant message, or a system message after an assistant turn, is an error; every assistant turn ends with </s> unless it
# is the last one and carries "prefix": true (a continuation prompt).
_MARK_TEXT = " | replace('<', '<" + TEXT_MARK + "')"
CHAT_TEMPLATE = (
    "{%- if not messages -%}{{- raise_exception('The conversation has no messages') -}}{%- endif -%}"
    "{%- set ns = namespace(turns=[], system=[], role=none, parts=[], prefix=false, seen_assistant=false) -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('Mixtral v1 supports the roles system, user and assistant, got ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' and ns.seen_assistant -%}"
    "{{- raise_exception('A system message after an assistant turn is not supported by the Mixtral v1 format') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set ns.seen_assistant = true -%}{%- endif -%}"
    "{%- if message['role'] != ns.role -%}"
    "{%- if ns.role == 'system' -%}"
    "{%- set ns.system = ns.system + ns.parts -%}"
    "{%- elif ns.role is not none -%}"
    "{%- set ns.turns = ns.turns + [{'role': ns.role, 'content': ns.parts | join('\n\n'), 'prefix': ns.prefix}] -%}"
    "{%- endif -%}"
    "{%- set ns.role = message['role'] -%}{%- set ns.parts = [] -%}{%- set ns.prefix = false -%}"
    "{%- endif -%}"
    "{%- if message['role'] != 'system' or message['content'] -%}"
    "{%- set ns.parts = ns.parts + [(message['content'] or '')" + _MARK_TEXT + "] -%}"
    "{%- endif -%}"
    "{%- if message.get('prefix') -%}{%- set ns.prefix = true -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if ns.role == 'system' -%}"
    "{%- set ns.system = ns.system + ns.parts -%}"
    "{%- elif ns.role is not none -%}"
    "{%- set ns.turns = ns.turns + [{'role': ns.role, 'content': ns.parts | join('\n\n'), 'prefix': ns.prefix}] -%}"
    "{%- endif -%}"
    "{%- if messages | length == 1 and messages[0]['role'] == 'assistant' -%}"
    "{{- raise_exception('A conversation of one message must be a user or system message') -}}"
    "{%- endif -%}"
    "{%- if not ns.turns or ns.turns[0]['role'] != 'user' -%}"
    "{%- set ns.turns = [{'role': 'user', 'content': '', 'prefix': false}] + ns.turns -%}"
    "{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for turn in ns.turns -%}"
    "{%- if turn['role'] == 'user' -%}"
    "{%- if not loop.first and loop.previtem['role'] == 'user' -%}{{- ' ' -}}{%- endif -%}"
    "{%- if loop.first and ns.system -%}"
    "{{- '[INST] ' + (ns.system | join('\n\n')) + '\n\n' + turn['content'] + ' [/INST]' -}}"
    "{%- else -%}"
    "{{- '[INST] ' + turn['content'] + ' [/INST]' -}}"
    "{%- endif -%}"
    "{%- else -%}"
    "{%- if turn['content'] -%}{{- ' ' + turn['content'] -}}{%- endif -%}"
    "{%- if not (loop.last and turn['prefix']) -%}{{- eos_token -}}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# The template for llama.cpp (GGUF files): message text written as it is. llama.cpp's tokenizer has no
# step that deletes TEXT_MARK, and it matches "</s>" typed in a message as EOS whatever the template
# writes, so the mark would only add a token there.
PLAIN_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(_MARK_TEXT, "")


def spm_vocab(spm_path: str | os.PathLike = DEFAULT_SPM_PATH) -> tuple[dict[str, int], dict[str, float]]:
    """Pieces -> ids and pieces -> scores of a SentencePiece model."""
    path = Path(spm_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"SentencePiece model not found: {path} (set tokenizer.spm_path in the recipe)"
        )
    sp = spm.SentencePieceProcessor(model_file=str(path))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.get_piece_size())}
    return vocab, scores


def merges_by_score(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges ranked the way SentencePiece applies them: highest score of the merged piece first.

    Every split of a piece into two vocabulary pieces is a merge producing it. Ties (the
    whitespace-only pieces all score -1e9) go to the lower merged id, then the longer left part,
    which is what keeps runs of spaces identical to SentencePiece (checked in tests).
    """
    ranked = []
    for piece, piece_id in vocab.items():
        if piece in (BOS, EOS, UNK) or (piece.startswith("<0x") and piece.endswith(">")):
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[piece], piece_id, -len(left), left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def build_backend(spm_path: str | os.PathLike = DEFAULT_SPM_PATH) -> Tokenizer:
    """The `tokenizers` pipeline that encodes exactly like SentencePiece, BOS included."""
    vocab, scores = spm_vocab(spm_path)
    for token in (BOS, EOS, UNK):
        if token not in vocab:
            raise ValueError(
                f"{spm_path}: the SentencePiece model has no {token} piece; expected a Llama/Mistral v1 model"
            )
    bpe = models.BPE(
        vocab=vocab, merges=merges_by_score(vocab, scores), unk_token=UNK, fuse_unk=True, byte_fallback=True
    )
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Sequence(
        [normalizers.Replace(TEXT_MARK, ""), normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)]
    )
    tok.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (UNK, BOS, EOS)])
    return tok


def build_fast_tokenizer(spm_path: str | os.PathLike = DEFAULT_SPM_PATH) -> PreTrainedTokenizerFast:
    """The Mixtral tokenizer as a transformers fast tokenizer with the v1 chat template."""
    return PreTrainedTokenizerFast(
        tokenizer_object=build_backend(spm_path),
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer_files(
    out_dir: str | os.PathLike, spm_path: str | os.PathLike = DEFAULT_SPM_PATH
) -> list[str]:
    """Write tokenizer.model, tokenizer.json, tokenizer_config.json and special_tokens_map.json.

    Returns the file names written. Reload with ``AutoTokenizer.from_pretrained(out_dir)``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_fast_tokenizer(spm_path)
    tok.save_pretrained(out_dir)
    # transformers 5 writes the class it loaded as (TokenizersBackend, unknown to 4.x); see the
    # module docstring for why this one.
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = TOKENIZER_CLASS
    config["add_bos_token"] = True
    config["add_eos_token"] = False
    # transformers >= 4.43 reads chat_template.jinja; older loaders (and the hub's Mixtral files)
    # keep the template in tokenizer_config.json. Both hold the same text.
    config["chat_template"] = CHAT_TEMPLATE
    write_json(config_path, config)
    write_json(out_dir / "special_tokens_map.json", {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK})
    shutil.copyfile(spm_path, out_dir / "tokenizer.model")
    written = {"tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    # save_pretrained may also write chat_template.jinja; keep whatever it wrote in the list.
    return sorted(written | {p.name for p in out_dir.iterdir() if p.name.startswith("chat_template")})
