"""GGUF metadata: the Mixtral hyper-parameters as llama.cpp's "llama" architecture reads them, the
SentencePiece vocabulary (pieces, scores, token types, BOS/EOS/UNK) and the chat template."""

from __future__ import annotations

from pathlib import Path

from model.config import MixtralConfig
from pipeline.export.gguf import GGUF_TYPES


def spm_vocab_metadata(spm_path: Path, vocab_size: int) -> tuple[list[bytes], list[float], list[int], dict]:
    """Tokens, scores and llama.cpp token types of a SentencePiece model, padded to ``vocab_size``
    with unused [PAD{i}] entries (an embedding larger than the tokenizer); the special token ids."""
    import gguf
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_path))
    n = sp.get_piece_size()
    if n > vocab_size:
        raise ValueError(
            f"{spm_path}: the tokenizer has {n} pieces, the model's vocab_size is {vocab_size}; "
            "tokenizer.spm_path must be the tokenizer the model was trained with"
        )
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for i in range(n):
        tokens[i] = sp.id_to_piece(i).encode("utf-8")
        scores[i] = sp.get_score(i)
        if sp.is_unknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            kind = gguf.TokenType.CONTROL
        elif sp.is_unused(i):
            kind = gguf.TokenType.UNUSED
        elif sp.is_byte(i):
            kind = gguf.TokenType.BYTE
        else:
            kind = gguf.TokenType.NORMAL
        types[i] = int(kind)
    special = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id()}
    missing = [k for k, v in special.items() if v < 0]
    if missing:
        raise ValueError(f"{spm_path}: the tokenizer defines no {'/'.join(missing)} token; Mixtral needs them")
    return tokens, scores, types, special


def add_metadata(writer, config: MixtralConfig, gguf_type: str, name: str, spm_path: Path) -> None:
    """Hyper-parameters, file type, tokenizer and chat template, as llama.cpp reads them for "llama"."""
    import gguf

    from pipeline.hf_tokenizer import PLAIN_CHAT_TEMPLATE

    if config.sliding_window is not None and config.sliding_window < config.max_position_embeddings:
        raise ValueError(
            f"export.format=gguf: sliding_window={config.sliding_window} is not expressible for llama.cpp's "
            "llama architecture (Mixtral-8x7B uses full attention: sliding_window null)"
        )
    writer.add_name(name)
    writer.add_file_type(int(gguf.LlamaFileType[GGUF_TYPES[gguf_type][2]]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(float(config.rope_theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_expert_count(config.num_local_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)

    tokens, scores, types, special = spm_vocab_metadata(spm_path, config.vocab_size)
    writer.add_tokenizer_model("llama")  # SentencePiece BPE with byte fallback
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(special["bos"])
    writer.add_eos_token_id(special["eos"])
    writer.add_unk_token_id(special["unk"])
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(PLAIN_CHAT_TEMPLATE)
