import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import Mixtral, MixtralConfig
from model.checkpoint import (
    NAME_TABLE,
    hf_tensors,
    hf_to_native,
    load_pretrained,
    load_weights,
    parse_size,
    save_pretrained,
)

# Fields of Mixtral-8x7B-Instruct-v0.1's config.json (shared/FORMATS.md section 3).
INSTRUCT_CONFIG = {
    "architectures": ["MixtralForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mixtral",
    "num_attention_heads": 32,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "output_router_logits": False,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.02,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 32000,
}


def test_preset_8x7b_to_hf_is_the_instruct_config():
    assert MixtralConfig.preset("mixtral-8x7b").to_hf() == INSTRUCT_CONFIG
    assert MixtralConfig.from_hf(INSTRUCT_CONFIG) == MixtralConfig.preset("mixtral-8x7b")


def test_from_hf_reads_transformers5_fields(tmp_path):
    v5 = {k: v for k, v in INSTRUCT_CONFIG.items() if k not in ("rope_theta", "torch_dtype")}
    v5.update(rope_parameters={"rope_theta": 12345.0, "rope_type": "default"}, dtype="float32", head_dim=None)
    (tmp_path / "config.json").write_text(json.dumps(v5))
    cfg = MixtralConfig.from_hf(tmp_path)
    assert cfg.rope_theta == 12345.0 and cfg.torch_dtype == "float32" and cfg.head_dim == 128


def test_config_has_no_model_type_attribute():
    assert not hasattr(MixtralConfig.preset("tiny"), "model_type")


@pytest.mark.parametrize(
    "field,value",
    [
        ("num_key_value_heads", 3),
        ("num_experts_per_tok", 9),
        ("hidden_size", 0),
        ("tie_word_embeddings", True),
    ],
)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        MixtralConfig(**{field: value})


def test_unknown_preset():
    with pytest.raises(ValueError, match="tiny-odd"):
        MixtralConfig.preset("huge")


def test_presets_build():
    for name in ("tiny", "tiny-odd", "bench-small"):
        cfg = MixtralConfig.preset(name)
        assert cfg.vocab_size == 32000 and cfg.head_dim * cfg.num_attention_heads == cfg.hidden_size
    odd = MixtralConfig.preset("tiny-odd")
    assert odd.num_local_experts == 6 and odd.num_key_value_heads < odd.num_attention_heads


def test_name_table_round_trip():
    for rule in NAME_TABLE:
        hf_name = rule.hf.format(i=3, e=5)
        target = hf_to_native(hf_name)
        assert target.native == rule.native.format(i=3) and target.piece == rule.piece
    with pytest.raises(ValueError, match="unknown tensor name 'model.layers.0.mlp.w9'"):
        hf_to_native("model.layers.0.mlp.w9")


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500KiB") == 500 * 1024 and parse_size(7) == 7
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("lots")


@pytest.fixture
def saved(tmp_path):
    cfg = MixtralConfig.preset("tiny")
    cfg.vocab_size = 64
    torch.manual_seed(0)
    model = Mixtral(cfg)
    save_pretrained(model, tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def test_save_layout_and_dtype(saved, tmp_path):
    model, path = saved
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    names = list(load_file(path / "model.safetensors"))
    assert "model.layers.1.block_sparse_moe.experts.7.w3.weight" in names
    assert len(names) == 3 + 2 * (7 + 3 * 8)
    save_pretrained(model, tmp_path / "bf16", dtype=torch.bfloat16, max_shard_size="100KB")
    index = json.loads((tmp_path / "bf16" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() for _, t in hf_tensors(model)) * 2
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = load_pretrained(tmp_path / "bf16")
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    torch.testing.assert_close(loaded.lm_head.weight.float(), model.lm_head.weight.to(torch.bfloat16).float())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_saved_checkpoint_has_the_umasks_modes(saved):
    _, path = saved  # written by a process with the usual umask 022 (mkdtemp: 0700, safetensors: 0600)
    mask = os.umask(0o022)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o777 & ~mask
    assert {f.name: f.stat().st_mode & 0o777 for f in path.iterdir()} == dict.fromkeys(
        ["config.json", "generation_config.json", "model.safetensors"], 0o666 & ~mask)


def test_load_weights_fills_the_experts_the_model_holds(saved):
    # A model holding experts [6, 2] (in that order) reads only those: the other experts' tensors
    # may be absent from the checkpoint.
    model, path = saved
    _rewrite(path, lambda t: [t.pop(n) for n in list(t) if ".experts." in n and not any(
        f".experts.{e}." in n for e in (6, 2))])
    part = Mixtral(model.config, device="meta")
    for layer in part.layers:
        experts = layer.moe.experts
        experts.gate_up_proj = torch.nn.Parameter(experts.gate_up_proj[:2])
        experts.down_proj = torch.nn.Parameter(experts.down_proj[:2])
    part.expert_ids = [6, 2]
    part = part.to_empty(device="cpu")
    load_weights(part, path)
    want = model.layers[1].moe.experts.gate_up_proj[[6, 2]]
    assert torch.equal(part.layers[1].moe.experts.gate_up_proj, want)
    assert torch.equal(part.layers[0].moe.gate.weight, model.layers[0].moe.gate.weight)
    names = [n for n, _ in hf_tensors(part) if ".experts." in n and n.startswith("model.layers.0.")]
    assert sorted(names) == sorted(
        f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight" for e in (6, 2) for w in ("w1", "w2", "w3")
    )
    with pytest.raises(ValueError, match=r"missing .*experts\.0\.w1"):
        load_pretrained(path)  # all experts: the dropped ones are missing


def _rewrite(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop("model.layers.1.block_sparse_moe.experts.3.w2.weight"),
         r"missing 1 tensor.*'model.layers.1.block_sparse_moe.experts.3.w2.weight'"),
        (lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}),
         r"unknown tensor name 'model.layers.0.extra.weight' in .*model.safetensors"),
        (lambda t: t.update({"model.norm.weight": torch.ones(65)}),
         r"model.norm.weight has shape \[65\].*\[64\]"),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_a_tensor_that_does_not_fit_is_named(saved, edit, message):
    _, path = saved
    _rewrite(path, edit)
    with pytest.raises(ValueError, match=message):
        load_pretrained(path)


def test_pickle_only_directory_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(INSTRUCT_CONFIG))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="pickle"):
        load_pretrained(tmp_path)
