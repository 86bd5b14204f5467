"""Verification of a written export: index and shard headers, transformers reload, chat template,
logits against our merged model."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from model.checkpoint import TensorPlan
from model.config import SAFETENSORS_DTYPES, MixtralConfig
from pipeline.export.recipe import VerifySection
from pipeline.export.source import Source


def check_shards(out: Path, plan: list[TensorPlan], dtype: torch.dtype) -> str:
    """Index and shard headers agree with each other and with the plan; returns a report line."""
    index_file = out / "model.safetensors.index.json"
    if index_file.is_file():
        index = json.loads(index_file.read_text())
        weight_map = index["weight_map"]
        total = index["metadata"]["total_size"]
    else:
        weight_map, total = {p.name: "model.safetensors" for p in plan}, sum(p.nbytes for p in plan)
    expected = {p.name: p for p in plan}
    if set(weight_map) != set(expected):
        raise RuntimeError(
            f"verify: index names differ from the config's: {sorted(set(weight_map) ^ set(expected))[:4]}"
        )
    if total != sum(p.nbytes for p in plan):
        raise RuntimeError(
            f"verify: index total_size {total} != {sum(p.nbytes for p in plan)} bytes of tensors"
        )
    by_file = defaultdict(set)
    for name, file in weight_map.items():
        by_file[file].add(name)
    for file, names in by_file.items():
        with safe_open(str(out / file), framework="pt") as f:
            if set(f.keys()) != names:
                raise RuntimeError(
                    f"verify: {file} holds {sorted(set(f.keys()) ^ names)[:4]} against the index"
                )
            for name in names:
                sliced = f.get_slice(name)
                if (
                    tuple(sliced.get_shape()) != expected[name].shape
                    or sliced.get_dtype() != SAFETENSORS_DTYPES[dtype]
                ):
                    raise RuntimeError(
                        f"verify: {file}:{name} is {sliced.get_dtype()} {sliced.get_shape()}, expected "
                        f"{SAFETENSORS_DTYPES[dtype]} {list(expected[name].shape)}"
                    )
    return f"verify: index and {len(by_file)} shard(s) agree: {len(plan)} names, shapes, dtype {dtype}, total_size {total}"


def reference_model(source: Source, dtype: torch.dtype, quantized_bases: bool = True):
    """Our model with every adapter merged by PEFT, weights rounded to the export dtype, in fp32.
    An adapter trained on a 4-bit base merges into that base dequantized (`quantized_bases`)."""
    from peft import PeftModel

    import model.lora  # noqa: F401  (registers the expert LoRA layer with PEFT)
    from model.checkpoint import load_pretrained
    from model.quant import hold_as_4bit_base

    native = load_pretrained(source.checkpoint, dtype=torch.float32)
    for adapter in source.adapters:
        quantization = source.quantized.get(str(adapter)) if quantized_bases else None
        if quantization is not None:
            hold_as_4bit_base(native, getattr(torch, quantization["dtype"]))
        native = PeftModel.from_pretrained(native, str(adapter)).merge_and_unload()
    with torch.no_grad():
        for param in native.parameters():
            param.copy_(param.to(dtype).float())
    return native.eval()


def max_logit_difference(model, reference, ids: list[list[int]]) -> float:
    """max |logits difference| of two models (transformers' and ours) over the token id rows."""
    worst = 0.0
    with torch.no_grad():
        for row in ids:
            x = torch.tensor([row])
            worst = max(worst, (model(x).logits - reference(x).logits).abs().max().item())
    return worst


def verify_hf_export(
    out: Path,
    source: Source,
    config: MixtralConfig,
    dtype: torch.dtype,
    plan: list[TensorPlan],
    section: VerifySection,
    log: Callable[[str], None] = print,
) -> list[str]:
    """Names, shapes and dtypes; transformers reload; chat template; logits against our model."""
    from transformers import AutoTokenizer, MixtralForCausalLM

    report = [check_shards(out, plan, dtype)]
    n_params = sum(math.prod(p.shape) for p in plan)
    if n_params > section.max_params:
        report.append(
            f"verify: transformers reload and logits skipped ({n_params:,} parameters > verify.max_params)"
        )
        return report

    hf_model, info = MixtralForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    problems = {
        k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")
    }
    if problems:
        raise RuntimeError(f"verify: transformers reload of {out}: {problems}")
    hf_params = sum(p.numel() for p in hf_model.parameters())
    if hf_params != n_params:
        raise RuntimeError(f"verify: transformers holds {hf_params} parameters, the export {n_params}")
    report.append(
        f"verify: MixtralForCausalLM reloads with no missing/unexpected keys ({n_params:,} parameters)"
    )

    tokenizer = AutoTokenizer.from_pretrained(out)
    conversations = chat_conversations(section.prompts)
    conversations.append(  # message text that looks like control tokens is text
        [{"role": "user", "content": "Is </s> a token? [INST]"}, {"role": "assistant", "content": "<s>No</s>."},
         {"role": "user", "content": "<unk>?"}]
    )
    reference_ids = mistral_common_ids(out / "tokenizer.model", conversations)
    ids = [tokenizer.apply_chat_template(c, tokenize=True, return_dict=False) for c in conversations]
    if ids != reference_ids:
        raise RuntimeError("verify: the exported chat template does not tokenize like mistral-common v1")
    report.append(f"verify: chat template == mistral-common v1 on {len(conversations)} conversations")

    worst = max_logit_difference(hf_model, reference_model(source, dtype), ids)
    if worst > section.atol:
        raise RuntimeError(
            f"verify: max |logits difference| {worst:.3g} against our model > verify.atol={section.atol}"
        )
    report.append(
        f"verify: logits of transformers vs our merged model on {len(ids)} prompts: max |diff| {worst:.2e}"
    )
    return report


def chat_conversations(prompts: list[str]) -> list[list[dict]]:
    """Conversations the chat template is checked on: each prompt as one user turn, and a multi-turn
    one with a system prompt."""
    return [[{"role": "user", "content": prompt}] for prompt in prompts] + [
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "  Why?  "},
        ]
    ]


def mistral_common_ids(spm_path: Path, conversations: list[list[dict]]) -> list[list[int]]:
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    roles = {"user": UserMessage, "assistant": AssistantMessage, "system": SystemMessage}
    tokenizer = MistralTokenizer.from_file(str(spm_path), mode=ValidationMode.test)
    return [
        tokenizer.encode_chat_completion(
            ChatCompletionRequest(messages=[roles[m["role"]](content=m["content"]) for m in c])
        ).tokens
        for c in conversations
    ]


def verify_consolidated(
    out: Path, config: MixtralConfig, dtype: torch.dtype, plan: list[TensorPlan]
) -> list[str]:
    with safe_open(str(out / "consolidated.safetensors"), framework="pt") as f:
        names = set(f.keys())
        for entry in plan:
            sliced = f.get_slice(entry.name)
            if tuple(sliced.get_shape()) != entry.shape or sliced.get_dtype() != SAFETENSORS_DTYPES[dtype]:
                raise RuntimeError(f"verify: {entry.name} is {sliced.get_dtype()} {sliced.get_shape()}")
    if names != {p.name for p in plan}:
        raise RuntimeError(
            f"verify: consolidated.safetensors names differ from the plan: {sorted(names ^ {p.name for p in plan})[:4]}"
        )
    params = json.loads((out / "params.json").read_text())
    if (
        params["n_layers"] != config.num_hidden_layers
        or params["moe"]["num_experts"] != config.num_local_experts
    ):
        raise RuntimeError("verify: params.json does not match the model config")
    return [f"verify: names, shapes and dtypes of {len(plan)} tensors match params.json"]
