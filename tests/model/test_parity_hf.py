"""Parity with transformers' MixtralForCausalLM on the same weights (fp32)."""

import json

import pytest
import torch
import transformers
from safetensors import safe_open

from model import MixtralConfig
from model.checkpoint import hf_tensors, load_pretrained, save_pretrained

CONFIGS = {
    "tiny": MixtralConfig.preset("tiny"),
    "tiny-odd": MixtralConfig.preset("tiny-odd"),
    "top1-wide-head": MixtralConfig(
        vocab_size=320,
        hidden_size=40,
        intermediate_size=56,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=24,
        num_local_experts=4,
        num_experts_per_tok=1,
        rope_theta=500.0,
        rms_norm_eps=1e-6,
        torch_dtype="float32",
    ),
    "top-all": MixtralConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_local_experts=3,
        num_experts_per_tok=3,
        sliding_window=5,
        torch_dtype="float32",
    ),
}


def _hf_model(cfg: MixtralConfig, seed: int):
    hf_cfg = transformers.MixtralConfig(**{**cfg.to_hf(), "initializer_range": 0.1})
    torch.manual_seed(seed)
    model = transformers.MixtralForCausalLM._from_config(
        hf_cfg, attn_implementation="eager", dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    name = request.param
    hf = _hf_model(CONFIGS[name], seed=len(name))
    path = tmp_path_factory.mktemp(name) / "hf"
    hf.save_pretrained(path)
    return name, hf, path, load_pretrained(path, dtype=torch.float32).eval()


def _batch(vocab, B=3, S=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, S), generator=g)


def test_logits_and_aux_loss(pair):
    _, hf, _, ours = pair
    ids = _batch(hf.config.vocab_size)
    with torch.no_grad():
        ref = hf(ids, output_router_logits=True)
        out = ours(ids, output_router_logits=True)
    assert (out.logits - ref.logits).abs().max() <= 1e-4
    assert (out.aux_loss - ref.aux_loss).abs() <= 1e-5
    for a, b in zip(out.router_logits, ref.router_logits, strict=True):
        assert (a - b).abs().max() <= 1e-5


@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_and_aux_loss_with_padding(pair, side):
    _, hf, _, ours = pair
    ids = _batch(hf.config.vocab_size, seed=1)
    mask = torch.ones_like(ids)
    lengths = [11, 7, 4]
    for b, n in enumerate(lengths):
        if side == "left":
            mask[b, : 11 - n] = 0
        else:
            mask[b, n:] = 0
    # HF's default positions ignore padding; give both models the same explicit positions.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=positions, output_router_logits=True)
        out = ours(ids, document_ids=mask - 1, position_ids=positions)  # padding: document id -1
    real = mask.bool()
    assert (out.logits[real] - ref.logits[real]).abs().max() <= 1e-4
    assert (out.aux_loss - ref.aux_loss).abs() <= 1e-5


def test_loss_matches_hf(pair):
    _, hf, _, ours = pair
    ids = _batch(hf.config.vocab_size, seed=2)
    labels = ids.clone()
    labels[:, :4] = -100
    with torch.no_grad():
        ref = hf(ids, labels=labels)
        out = ours(ids, labels=labels)
    assert (out.loss - ref.loss).abs() <= 1e-5
    assert out.num_label_tokens.item() == 3 * (11 - 4)


def test_round_trip_same_tensors_and_names(pair, tmp_path):
    name, _, path, ours = pair
    out = tmp_path / "ours"
    save_pretrained(ours, out, max_shard_size=20_000 if name == "tiny-odd" else "5GB")

    def read(directory):
        index = directory / "model.safetensors.index.json"
        files = (
            set(json.loads(index.read_text())["weight_map"].values())
            if index.exists()
            else {"model.safetensors"}
        )
        tensors = {}
        for f in files:
            with safe_open(str(directory / f), "pt") as sf:
                tensors.update({k: sf.get_tensor(k) for k in sf.keys()})
        return tensors

    theirs, mine = read(path), read(out)
    assert sorted(theirs) == sorted(mine)
    for key in theirs:
        assert torch.equal(theirs[key], mine[key]), key
    if name == "tiny-odd":
        assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    config = json.loads((out / "config.json").read_text())
    assert MixtralConfig.from_hf(config) == MixtralConfig.from_hf(path / "config.json")
    assert transformers.MixtralForCausalLM.from_pretrained(out) is not None
    assert [k for k, _ in hf_tensors(ours)] == [k for k, _ in hf_tensors(load_pretrained(out))]


def test_fused_checkpoint_loads(pair, tmp_path):
    _, hf, _, ours = pair
    hf.save_pretrained(tmp_path, save_original_format=False)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as sf:
        assert any(k.endswith("mlp.experts.gate_up_proj") for k in sf.keys())
    fused = load_pretrained(tmp_path)
    for (n1, t1), (n2, t2) in zip(ours.state_dict().items(), fused.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(t1, t2), n1
