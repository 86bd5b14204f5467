"""Verification of a GGUF export by llama.cpp itself (llama-cpp-python): the file loads, llama.cpp
tokenizes like SentencePiece and renders + tokenizes the chat template like mistral-common v1, and
its logits equal our merged model's (weights rounded as the file stores them)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from model.config import MixtralConfig
from pipeline.export.recipe import VerifySection
from pipeline.export.source import Source

# llama.cpp computes in f32 with its own kernels (fused RMSNorm, RoPE tables, softmax): its f32
# logits differ from ours by ~3e-3 on the trained tiny model (largest |logit| ~13), 3.6e-4 on a
# random one. In f16 / bf16 files it also rounds the activations to the weights' type before each
# matrix product, and q8_0 rounds weights to 8 bits per 32-value block, so only the greedy choice is
# held to a bound there (measured on the random tiny model: 44/44 positions for f16, bf16 and q8_0).
# q4_k_m is reported, not bounded: 4-bit weights flip near-tied logits (41/44 on the random tiny model,
# whose logits are all within +-0.8).
F32_ATOL = 1e-2
MIN_ARGMAX_AGREEMENT = 0.95
UNBOUNDED_ARGMAX = ("q4_k_m",)


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def load_llama(path: Path, n_ctx: int = 512):
    """llama.cpp's model and context for ``path``, one CPU thread, logits kept for every position."""
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, n_threads=1, n_threads_batch=1, logits_all=True,
                 verbose=False)


def llama_cpp_logits(llm, ids: list[int]) -> np.ndarray:
    """[len(ids), vocab] float32 logits of llama.cpp for one token row (a fresh sequence)."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def rounded_reference(source: Source, stored: dict[str, torch.dtype]):
    """Our merged model in fp32 with every parameter rounded to the dtype the GGUF stores it in."""
    from pipeline.export.verify import reference_model

    reference = reference_model(source, torch.float32)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            param.copy_(param.to(stored[name]).float())
    return reference


def verify_gguf(
    path: Path, source: Source, config: MixtralConfig, stored: dict[str, torch.dtype], gguf_type: str,
    section: VerifySection, spm_path: Path,
) -> list[str]:
    """Tokenizer, chat template and logits of llama.cpp against ours; returns report lines.
    ``stored``: native parameter -> the dtype its GGUF tensors hold."""
    import sentencepiece as spm

    n_params = sum(math.prod(s) for s in _native_shapes(config).values())
    if n_params > section.max_params:
        return [f"verify: llama.cpp load and logits skipped ({n_params:,} parameters > verify.max_params)"]
    if not llama_cpp_available():
        return ["verify: llama.cpp check NOT run: llama-cpp-python is not installed (pip install llama-cpp-python)"]
    llm = load_llama(path)
    report = [f"verify: llama.cpp {_llama_cpp_version()} loads {path.name} ({n_params:,} parameters)"]

    sp = spm.SentencePieceProcessor(model_file=str(spm_path))
    rows = []
    for prompt in section.prompts:
        want = [sp.bos_id()] + sp.encode(prompt)
        got = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False)
        if got != want:
            raise RuntimeError(f"verify: llama.cpp tokenizes {prompt!r} as {got}, SentencePiece as {want}")
        rows.append(want)
    report.append(f"verify: llama.cpp tokenizes {len(rows)} prompts like SentencePiece")
    report.append(check_chat_template(llm, spm_path, section.prompts))

    reference = rounded_reference(source, stored)
    worst, agree, total = 0.0, 0, 0
    with torch.no_grad():
        for row in rows:
            ours = reference(torch.tensor([row])).logits[0].numpy()
            theirs = llama_cpp_logits(llm, row)
            worst = max(worst, float(np.abs(ours - theirs).max()))
            agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
            total += len(row)
    line = (f"verify: logits of llama.cpp ({gguf_type}) vs our merged model on {len(rows)} prompts: "
            f"max |diff| {worst:.2e}, argmax equal on {agree}/{total} positions")
    if gguf_type == "f32" and worst > F32_ATOL:
        raise RuntimeError(line + f" > {F32_ATOL}")
    if gguf_type not in UNBOUNDED_ARGMAX and agree < MIN_ARGMAX_AGREEMENT * total:
        raise RuntimeError(line + f" < {MIN_ARGMAX_AGREEMENT:.0%}")
    report.append(line)
    report.append(check_chat_answer(llm, reference, gguf_type))
    return report


def chat_prompt_ids(llm, messages: list[dict]) -> list[int]:
    """The prompt llama-cpp-python's chat completion feeds llama.cpp: the file's template, rendered and
    tokenized with special tokens."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise RuntimeError("verify: llama.cpp reads no tokenizer.chat_template from the file")
    rendered = Jinja2ChatFormatter(template=template, eos_token="</s>", bos_token="<s>")(messages=messages)
    return llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True)


def llama_cpp_greedy(llm, prompt: list[int], max_new_tokens: int, eos: int) -> list[int]:
    """llama.cpp's greedy answer, decoded token by token through its KV cache."""
    llm.reset()
    llm.eval(prompt)
    generated = []
    while len(generated) < max_new_tokens:
        generated.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        if generated[-1] == eos:
            break
        llm.eval(generated[-1:])
    return generated


def check_chat_answer(llm, reference, gguf_type: str, max_new_tokens: int = 16) -> str:
    """make chat's bundled question answered greedily by llama.cpp and by our model: equal for f32."""
    from pipeline.evaluation.generate import PROMPT, chat_messages, greedy_recomputed

    prompt = chat_prompt_ids(llm, chat_messages(PROMPT))
    eos = llm.token_eos()
    theirs = llama_cpp_greedy(llm, prompt, max_new_tokens, eos)
    ours = greedy_recomputed(reference, prompt, max_new_tokens, eos)
    pairs = zip(theirs, ours, strict=False)  # either may stop early at EOS
    same = next((k for k, (a, b) in enumerate(pairs) if a != b), min(len(theirs), len(ours)))
    line = (f"verify: greedy answer to make chat's prompt ({len(prompt)} tokens): llama.cpp ({gguf_type}) and our "
            f"model agree on {same} of {len(ours)} tokens{'' if theirs == ours else ' (then differ)'}: "
            f"{llm.detokenize(theirs).decode('utf-8', errors='replace')!r}")
    if gguf_type == "f32" and theirs != ours:
        raise RuntimeError(line + f"; ours {ours}, llama.cpp's {theirs}")
    return line


def check_chat_template(llm, spm_path: Path, prompts: list[str]) -> str:
    """The file's chat template, rendered as llama-cpp-python's chat completion renders it and tokenized
    by llama.cpp, gives mistral-common v1's ids."""
    from pipeline.export.verify import chat_conversations, mistral_common_ids

    conversations = chat_conversations(prompts)
    for conversation, want in zip(conversations, mistral_common_ids(spm_path, conversations), strict=True):
        got = chat_prompt_ids(llm, conversation)
        if got != want:
            raise RuntimeError(
                f"verify: llama.cpp's chat prompt for {conversation} is {got}, mistral-common v1's {want}"
            )
    return f"verify: chat template in llama.cpp == mistral-common v1 on {len(conversations)} conversations"


def _native_shapes(config: MixtralConfig) -> dict[str, tuple[int, ...]]:
    from pipeline.adapter_merge import meta_state

    return {k: tuple(v.shape) for k, v in meta_state(config).items()}


def _llama_cpp_version() -> str:
    import llama_cpp

    return f"(llama-cpp-python {llama_cpp.__version__})"
