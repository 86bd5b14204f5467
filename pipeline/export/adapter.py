"""format=adapter: our LoRA as a PEFT adapter for transformers' MixtralForCausalLM."""

from __future__ import annotations

import contextlib
import math
import re
import shutil
from collections import defaultdict
from pathlib import Path

import torch

from model.checkpoint import NAME_TABLE
from model.config import MixtralConfig
from pipeline.adapter_merge import PEFT_PREFIX, Adapter, check_adapters, meta_state
from pipeline.export.card import base_model_name
from pipeline.export.recipe import ExportRecipe, VerifySection
from pipeline.export.source import Source
from pipeline.export.verify import max_logit_difference, reference_model

# transformers 5 holds the experts fused ([E, 2F, H] gate_up_proj, [E, H, F] down_proj) and PEFT
# reaches them with target_parameters (ParamWrapper): per expert e its delta is
# scaling * B_e @ A_e with lora_A [E*r, in] (rows expert-major) and lora_B [out, r*E] (column
# j*E + e). Our separate w1/w3 LoRA (rank R each) is one rank-2R LoRA on gate_up_proj whose B_e is
# block-diagonal, so the conversion is exact. Stacked adapters (DPO trained on the SFT-merged model)
# add their deltas, so they concatenate along the rank: A = [A_1; A_2], B = [s_1 B_1 | s_2 B_2] / s_1,
# scaling s_1; rank_pattern/alpha_pattern carry each module's rank and scaling.

_LAYER = re.compile(r"^layers\.(\d+)\.")
ADAPTER_TARGET_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def transformers_name(native: str) -> str:
    """Name of a native parameter in transformers 5's MixtralForCausalLM, from model/checkpoint.py's
    NAME_TABLE: the whole-tensor rules; the fused read aliases (``mlp.gate``, ``mlp.experts.*``) are
    transformers 5's module names, the per-expert ones only its file layout, so aliases win."""
    match = _LAYER.match(native)
    layer = match[1] if match else None
    found = [
        rule
        for rule in NAME_TABLE
        if rule.piece in ("all", "stack") and rule.native.format(i=layer) == native
    ]
    if not found:
        raise ValueError(f"format=adapter: {native} has no whole-tensor name in NAME_TABLE")
    rule = min(found, key=lambda r: r.export)  # export=False (the alias) first
    return rule.hf.format(i=layer)


def lora_factors(parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One adapter's LoRA on one parameter as per-expert factors, unscaled: A [E, r, in], B [E, out, r]
    (E = 1 for a linear layer), so that delta[e] = scale * B[e] @ A[e]."""
    if "A" in parts:
        return parts["A"][None], parts["B"][None]  # [1, r, in], [1, out, r]
    if "down_A" in parts:
        return parts["down_A"], parts["down_B"]  # [E, R, F], [E, H, R]
    a, b = parts["gate_up_A"], parts["gate_up_B"]  # [E, 2R, H], [E, 2F, R]
    n_experts, two_ffn, r = b.shape
    ffn = two_ffn // 2
    block = b.new_zeros(n_experts, two_ffn, 2 * r)  # [E, 2F, 2R]: w1 rows see A_w1, w3 rows A_w3
    block[:, :ffn, :r] = b[:, :ffn]
    block[:, ffn:, r:] = b[:, ffn:]
    return a, block


def to_peft_param_layout(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert A [E, r, in], B [E, out, r] -> ParamWrapper's lora_A [E*r, in], lora_B [out, r*E]."""
    n_experts, r, fan_in = a.shape
    lora_a = a.reshape(n_experts * r, fan_in)  # row e*r + j
    lora_b = b.permute(1, 2, 0).reshape(b.shape[1], r * n_experts)  # [out, r, E] -> column j*E + e
    return lora_a, lora_b


def _module_kind(hf_module: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``self_attn.q_proj``: the key rank/alpha patterns use."""
    return re.sub(r"^model\.layers\.\d+\.", "", hf_module)


def peft_adapter(
    adapters: list[Adapter], shapes: dict[str, torch.Tensor], base: str
) -> tuple[dict[str, torch.Tensor], dict]:
    """The stacked adapters as one PEFT adapter for transformers' Mixtral: (tensors, LoraConfig kwargs)."""
    if not adapters:
        raise ValueError(
            "export.format=adapter needs a LoRA source (a LoRA stage dir or source.adapters); "
            "this source is a full model: use format=hf"
        )
    check_adapters(adapters, shapes)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, set[tuple[int, float]]] = defaultdict(set)
    saved_modules = set()
    for native in shapes:
        owners = [a for a in adapters if native in a.natives()]
        if not owners:
            continue
        hf = transformers_name(native)
        if any(native in a.replacements for a in owners):
            if any(native in a.deltas for a in owners):
                raise ValueError(
                    f"format=adapter: {native} is both fully trained and LoRA-adapted across "
                    f"{[str(a.dir) for a in owners]}; PEFT cannot hold both: export format=hf"
                )
            last = [a for a in owners if native in a.replacements][-1]
            tensors[PEFT_PREFIX + hf] = last.replacement(native)
            saved_modules.add(_module_kind(hf.rpartition(".")[0]))
            continue
        factors = [(*lora_factors(a.lora_parts(native)), a.scale) for a in owners]
        scale = factors[0][2]
        a = torch.cat([f[0] for f in factors], dim=1)  # [E, r_total, in]
        b = torch.cat([f[1] * (f[2] / scale) for f in factors], dim=2)  # [E, out, r_total]
        if native.endswith("experts.gate_up_proj") or native.endswith("experts.down_proj"):
            lora_a, lora_b = to_peft_param_layout(a, b)
            # PEFT wraps a module's targeted parameters in registration order: gate_up_proj (registered
            # first in MixtralExperts) is the inner ParamWrapper, saved under base_layer.
            module = hf.rpartition(".")[0] + (".base_layer" if native.endswith("gate_up_proj") else "")
            kind = _module_kind(hf)
        else:
            lora_a, lora_b = a[0], b[0]
            module = hf.removesuffix(".weight")
            kind = _module_kind(module)
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = lora_a.contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = lora_b.contiguous()
        r = a.shape[1]
        ranks[kind].add((r, scale * r))  # alpha = scale * r keeps PEFT's alpha / r == scale
    mixed = {k: sorted(v) for k, v in ranks.items() if len(v) > 1}
    if mixed:
        raise ValueError(f"format=adapter: ranks/scalings differ across layers for {mixed}; export format=hf")
    per_kind = {k: next(iter(v)) for k, v in ranks.items()}
    counts = defaultdict(int)
    for value in per_kind.values():
        counts[value] += 1
    r, alpha = max(counts, key=counts.get)
    # PEFT 0.21 warns that a target_parameters key in rank_pattern "did not match any targeted module":
    # its check looks at module names only; the rank does apply (the verification loads the shapes).
    config = {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {k: v[0] for k, v in per_kind.items() if v[0] != r},
        "alpha_pattern": {k: v[1] for k, v in per_kind.items() if v[1] != alpha},
        "target_modules": sorted(k for k in per_kind if k not in ADAPTER_TARGET_PARAMETERS),
        "target_parameters": [k for k in ADAPTER_TARGET_PARAMETERS if k in per_kind],
        "modules_to_save": sorted(saved_modules) or None,
        "lora_dropout": 0.0,  # ParamWrapper refuses dropout: it cannot factor x out of B A dropout(x)
        "use_rslora": False,  # the scaling is in alpha_pattern, whatever each source adapter used
        "bias": "none",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
    }
    return tensors, config


def write_adapter(
    recipe: ExportRecipe, source: Source, adapters: list[Adapter], config: MixtralConfig, tmp: Path, log
) -> list[str]:
    from peft import LoraConfig
    from safetensors.torch import save_file

    from pipeline.hf_tokenizer import DEFAULT_SPM_PATH, save_tokenizer_files

    if recipe.export.dtype != "float32":
        log(
            f"export: format=adapter writes the LoRA factors in float32 (export.dtype={recipe.export.dtype} "
            "is for merged weights)"
        )
    tensors, kwargs = peft_adapter(adapters, meta_state(config), base_model_name(recipe, source))
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    LoraConfig(**kwargs).save_pretrained(str(tmp))
    spm_path = Path(recipe.tokenizer.spm_path) if recipe.tokenizer.spm_path else DEFAULT_SPM_PATH
    shutil.copyfile(spm_path, tmp / "tokenizer.model")
    save_tokenizer_files(tmp, spm_path)
    n = sum(t.numel() for t in tensors.values())
    report = [
        f"adapter: {len(tensors)} tensors, {n:,} parameters (r={kwargs['r']}, rank_pattern "
        f"{kwargs['rank_pattern']}, alpha_pattern {kwargs['alpha_pattern']})"
    ]
    report += [f"adapter: {a.dir} trained on a {a.base_quantization['type']} (4-bit) base in "
               f"{a.base_quantization['dtype']}: load the base that way under it (QLoRA), or export format hf "
               "(merged into the dequantized base)" for a in adapters if a.base_quantization]
    if recipe.verify.enabled:
        report += verify_adapter_export(tmp, source, config, tensors, recipe.verify)
    return report


def verify_adapter_export(
    out: Path, source: Source, config: MixtralConfig, tensors: dict[str, torch.Tensor], section: VerifySection
) -> list[str]:
    """PeftModel.from_pretrained onto transformers' Mixtral: every tensor lands, logits equal ours."""
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoTokenizer, MixtralForCausalLM

    n_params = sum(math.prod(t.shape) for t in meta_state(config).values())
    if n_params > section.max_params:
        return [f"verify: PEFT reload and logits skipped ({n_params:,} parameters > verify.max_params)"]
    base = MixtralForCausalLM.from_pretrained(source.checkpoint, dtype=torch.float32)
    with _target_parameter_patterns_apply():
        peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    loaded = get_peft_model_state_dict(peft_model, save_embedding_layers=False)  # no hub look-up of the base name
    if set(loaded) != set(tensors):
        raise RuntimeError(
            f"verify: PEFT holds {sorted(set(loaded) ^ set(tensors))[:4]} against the exported adapter"
        )
    for name, tensor in tensors.items():
        if not torch.equal(loaded[name].float(), tensor):
            raise RuntimeError(f"verify: PEFT loaded {name} with different values than exported")
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=True, return_dict=False)
        for p in section.prompts
    ]
    # The adapter as transformers applies it, onto the full-precision base it is given (a QLoRA
    # adapter's own base was 4-bit: the model card says so; export.format=hf merges into that).
    worst = max_logit_difference(peft_model, reference_model(source, torch.float32, quantized_bases=False), ids)
    if worst > section.atol:
        raise RuntimeError(
            f"verify: max |logits difference| {worst:.3g} of PEFT on transformers vs our merged model > "
            f"verify.atol={section.atol}"
        )
    return [
        f"verify: PeftModel.from_pretrained onto MixtralForCausalLM loads all {len(tensors)} tensors",
        f"verify: logits of transformers + PEFT vs our merged model on {len(ids)} prompts: max |diff| {worst:.2e}",
    ]


@contextlib.contextmanager
def _target_parameter_patterns_apply():
    """PEFT 0.21 warns that rank_pattern/alpha_pattern keys of target_parameters "did not match any
    targeted module and were ignored": its check looks at module names only, and the ranks do apply
    (the verification below loads every tensor with its shape). Only that warning, for only those
    keys, is dropped; any other is passed on."""
    import ast
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        text = str(w.message)
        match = re.search(r"_pattern keys did not match any targeted module and were ignored: (\[.*\])", text)
        if match and set(ast.literal_eval(match.group(1))) <= set(ADAPTER_TARGET_PARAMETERS):
            continue
        if "`is_gradient_checkpointing` is deprecated" in text:  # PEFT calling transformers 5's old name
            continue
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
