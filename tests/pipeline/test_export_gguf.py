"""export.format=gguf on a tiny Mixtral with a LoRA adapter: the file read back with the gguf library
(names, shapes, types, metadata, every tensor against the merged model) and, where llama-cpp-python
is installed, loaded by llama.cpp itself with logits compared to our model."""

import importlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from export_failures import kill_export_midway, with_short_lm_head
from peft import PeftModel

import model.lora  # noqa: F401  (registers the expert LoRA layer with PEFT)
from model import Mixtral, MixtralConfig
from model.checkpoint import load_pretrained, save_pretrained
from model.lora import apply_lora
from pipeline.config import build
from pipeline.export import ExportRecipe, export
from pipeline.export.formats import hf_to_interleaved_rope
from pipeline.hf_tokenizer import DEFAULT_SPM_PATH, PLAIN_CHAT_TEMPLATE

# make test installs the gguf extra and sets this: there a missing library fails instead of skipping.
REQUIRED = os.environ.get("MIXTRAL_TUNE_REQUIRE_GGUF") == "1"


def _library(name: str, reason: str):
    return importlib.import_module(name) if REQUIRED else pytest.importorskip(name, reason=reason)


gguf = _library("gguf", "the gguf library (make install-gguf) writes format=gguf")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """base/ (HF checkpoint) and sft/ (LoRA on the experts, attention and router), and the merged model."""
    root = tmp_path_factory.mktemp("gguf")
    torch.manual_seed(0)
    save_pretrained(Mixtral(MixtralConfig.preset("tiny")), root / "base")
    sft = apply_lora(load_pretrained(root / "base", dtype=torch.float32), r=4, alpha=8, train_router=True)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # PEFT starts B at zero; a random adapter makes the merge visible
        for _, p in sft.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    sft.save_pretrained(root / "sft")
    manifest = {"stage": "sft", "kind": "lora", "base": {"checkpoint": str(root / "base")},
                "adapter_dir": str(root / "sft")}
    (root / "sft" / "manifest.json").write_text(json.dumps(manifest))
    merged = PeftModel.from_pretrained(
        load_pretrained(root / "base", dtype=torch.float32), str(root / "sft")
    ).merge_and_unload().eval()
    return root, merged


def _export(root: Path, out: str, gguf_type: str, **source):
    raw = {
        "source": source or {"run_dir": str(root / "sft")},
        "output_dir": str(root / out),
        "export": {"format": "gguf", "gguf_type": gguf_type, "progress_bar": False},
    }
    return export(build(ExportRecipe, raw, source="test"), log=lambda _: None)


@pytest.fixture(scope="module")
def f32_export(run):
    return _export(run[0], "export-f32", "f32")


def _native_from_gguf(reader, config: MixtralConfig) -> dict[str, torch.Tensor]:
    """The native state dict back from a GGUF file (the inverse of the export's table, written here
    from llama.cpp's names so that a wrong table entry cannot cancel itself out)."""
    t = {}
    for tensor in reader.tensors:
        data = np.array(tensor.data)
        if tensor.tensor_type == gguf.GGMLQuantizationType.BF16:
            data = torch.from_numpy(data.view(np.int16)).view(torch.bfloat16)
        t[tensor.name] = torch.as_tensor(data).float().reshape(tuple(reversed(tensor.shape.tolist())))

    def unpermute(w, heads):  # interleaved pairs -> HF rotate_half rows
        rows, cols = w.shape
        return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)

    state = {"embed_tokens.weight": t.pop("token_embd.weight"), "norm.weight": t.pop("output_norm.weight"),
             "lm_head.weight": t.pop("output.weight")}
    for i in range(config.num_hidden_layers):
        b, n = f"blk.{i}.", f"layers.{i}."
        state[n + "input_layernorm.weight"] = t.pop(b + "attn_norm.weight")
        state[n + "self_attn.q_proj.weight"] = unpermute(t.pop(b + "attn_q.weight"), config.num_attention_heads)
        state[n + "self_attn.k_proj.weight"] = unpermute(t.pop(b + "attn_k.weight"), config.num_key_value_heads)
        state[n + "self_attn.v_proj.weight"] = t.pop(b + "attn_v.weight")
        state[n + "self_attn.o_proj.weight"] = t.pop(b + "attn_output.weight")
        state[n + "post_attention_layernorm.weight"] = t.pop(b + "ffn_norm.weight")
        state[n + "moe.gate.weight"] = t.pop(b + "ffn_gate_inp.weight")
        state[n + "moe.experts.gate_up_proj"] = torch.cat(
            [t.pop(b + "ffn_gate_exps.weight"), t.pop(b + "ffn_up_exps.weight")], dim=1
        )
        state[n + "moe.experts.down_proj"] = t.pop(b + "ffn_down_exps.weight")
    assert t == {}, f"tensors the table does not know: {sorted(t)}"
    return state


def _field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize("gguf_type", ["f32", "f16", "bf16"])
def test_gguf_holds_the_merged_model_in_llama_cpp_names_and_types(run, f32_export, gguf_type):
    root, merged = run
    out = f32_export if gguf_type == "f32" else _export(root, f"export-{gguf_type}", gguf_type)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["README.md", "recipe.yaml", "tokenizer.model", f"model-{gguf_type}.gguf"]
    )
    reader = gguf.GGUFReader(out / f"model-{gguf_type}.gguf")
    config = merged.config
    matrix_type = {"f32": "F32", "f16": "F16", "bf16": "BF16"}[gguf_type]
    for tensor in reader.tensors:
        keeps_f32 = tensor.name.endswith(("_norm.weight", "ffn_gate_inp.weight"))
        assert tensor.tensor_type.name == ("F32" if keeps_f32 else matrix_type), tensor.name
    expert = reader.get_tensor(next(i for i, t in enumerate(reader.tensors) if t.name == "blk.0.ffn_gate_exps.weight"))
    # ggml lists dimensions innermost first: [hidden, ffn, experts]
    assert expert.shape.tolist() == [config.hidden_size, config.intermediate_size, config.num_local_experts]

    got = _native_from_gguf(reader, config)
    want = {k: v.detach() for k, v in merged.state_dict().items()}
    assert set(got) == set(want)
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[gguf_type]
    for name, value in want.items():
        cast = value if value.dim() == 1 or name.endswith("moe.gate.weight") else value.to(dtype).float()
        assert torch.equal(got[name], cast), name
    # The adapter changed every kind of tensor it targets.
    base = load_pretrained(root / "base", dtype=torch.float32).state_dict()
    for name in ("layers.0.self_attn.q_proj.weight", "layers.0.moe.experts.gate_up_proj", "layers.1.moe.gate.weight"):
        assert not torch.equal(base[name], want[name]), name


def test_gguf_metadata_is_the_tokenizer_template_and_hyper_parameters(run, f32_export):
    config = run[1].config
    reader = gguf.GGUFReader(f32_export / "model-f32.gguf")
    assert _field(reader, "general.architecture") == "llama"
    expected = {
        "llama.block_count": config.num_hidden_layers,
        "llama.context_length": config.max_position_embeddings,
        "llama.embedding_length": config.hidden_size,
        "llama.feed_forward_length": config.intermediate_size,
        "llama.attention.head_count": config.num_attention_heads,
        "llama.attention.head_count_kv": config.num_key_value_heads,
        "llama.rope.dimension_count": config.head_dim,
        "llama.expert_count": config.num_local_experts,
        "llama.expert_used_count": config.num_experts_per_tok,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.model": "llama",
        "tokenizer.chat_template": PLAIN_CHAT_TEMPLATE,
    }
    assert {k: _field(reader, k) for k in expected} == expected
    assert _field(reader, "llama.rope.freq_base") == pytest.approx(config.rope_theta)
    assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(config.rms_norm_eps)
    sp = spm.SentencePieceProcessor(model_file=str(DEFAULT_SPM_PATH))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    scores = _field(reader, "tokenizer.ggml.scores")
    types = _field(reader, "tokenizer.ggml.token_type")
    assert tokens == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert scores == pytest.approx([sp.get_score(i) for i in range(sp.get_piece_size())])
    assert types[:3] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    assert types[3:259] == [gguf.TokenType.BYTE] * 256 and set(types[259:]) == {gguf.TokenType.NORMAL}
    card = (f32_export / "README.md").read_text()
    assert "model-f32.gguf" in card and "GGUF type `f32`" in card


def test_an_error_in_the_middle_of_a_gguf_export_leaves_nothing(run, tmp_path):
    root, _ = run
    broken = with_short_lm_head(root / "base", tmp_path / "broken")
    with pytest.raises(ValueError, match=r"lm_head.weight has shape .* config.json implies"):
        _export(tmp_path, "o", "f16", checkpoint=str(broken))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]  # no output, no temporary dir


def test_rope_rows_in_the_gguf_are_the_consolidated_order(run, f32_export):
    # llama.cpp's "llama" RoPE and mistral-inference rotate the same interleaved pairs.
    root, merged = run
    reader = gguf.GGUFReader(f32_export / "model-f32.gguf")
    k = next(t for t in reader.tensors if t.name == "blk.1.attn_k.weight")
    want = hf_to_interleaved_rope(merged.state_dict()["layers.1.self_attn.k_proj.weight"],
                                  merged.config.num_key_value_heads)
    assert torch.equal(torch.as_tensor(np.array(k.data)), want)


PROMPT = [1, 733, 16289, 28793, 13702, 426, 13253, 17504, 298, 733, 28748, 16289, 28793, 5, 99]


def _llama_cpp():
    return _library("llama_cpp", "llama-cpp-python (make install-gguf) is not installed: llama.cpp's own check")


def test_llama_cpp_loads_the_f32_export_with_our_logits(run, f32_export):
    _llama_cpp()
    from pipeline.export.gguf_verify import llama_cpp_logits, load_llama

    _, merged = run
    llm = load_llama(f32_export / "model-f32.gguf")
    theirs = llama_cpp_logits(llm, PROMPT)
    with torch.no_grad():
        ours = merged(torch.tensor([PROMPT])).logits[0].numpy()
    assert np.abs(ours - theirs).max() < 1e-2
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()
    # The export's own verification ran llama.cpp too and wrote its numbers into the model card.
    card = (f32_export / "README.md").read_text()
    assert "verify: logits of llama.cpp (f32) vs our merged model" in card
    assert "llama-cpp-python 0.3" in card
    assert "verify: chat template in llama.cpp == mistral-common v1 on 4 conversations" in card
    assert "llama.cpp (f32) and our model agree on 16 of 16 tokens" in card  # make chat's prompt, greedy


def test_q8_0_is_quantized_by_llama_cpp_and_keeps_the_greedy_choice(run):
    _llama_cpp()
    from pipeline.export.gguf_verify import llama_cpp_logits, load_llama

    root, merged = run
    out = _export(root, "export-q8_0", "q8_0")
    # The f16 file llama.cpp quantized from is gone; nothing else was added.
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model-q8_0.gguf", "recipe.yaml", "tokenizer.model"]
    reader = gguf.GGUFReader(out / "model-q8_0.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_gate_exps.weight"] == "Q8_0" and types["blk.1.attn_q.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert _field(reader, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert _field(reader, "tokenizer.chat_template") == PLAIN_CHAT_TEMPLATE  # metadata survives quantization
    theirs = llama_cpp_logits(load_llama(out / "model-q8_0.gguf"), PROMPT)
    with torch.no_grad():
        ours = merged(torch.tensor([PROMPT])).logits[0].numpy()
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.95
    assert "verify: logits of llama.cpp (q8_0)" in (out / "README.md").read_text()


def test_quantized_types_without_llama_cpp_are_a_clear_error(monkeypatch, run, tmp_path):

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    with pytest.raises(ValueError, match="gguf_type=q4_k_m is quantized by llama.cpp's own quantizer"):
        _export(tmp_path, "o", "q4_k_m", run_dir=str(run[0] / "sft"))
    assert list(tmp_path.iterdir()) == []


def test_llama_cpp_agrees_on_an_uneven_model(tmp_path):
    # 6 experts, 3 layers, hidden 48, 6 heads over 2 kv heads, rope theta 1e4: no size that happens to
    # match llama.cpp's defaults. The export's own llama.cpp check (f32 atol 1e-2, greedy answer equal)
    # passes or raises.
    _llama_cpp()
    torch.manual_seed(3)
    save_pretrained(Mixtral(MixtralConfig.preset("tiny-odd")), tmp_path / "base")
    out = _export(tmp_path, "out", "f32", checkpoint=str(tmp_path / "base"))
    card = (out / "README.md").read_text()
    assert "verify: logits of llama.cpp (f32) vs our merged model" in card
    reader = gguf.GGUFReader(out / "model-f32.gguf")
    assert _field(reader, "llama.expert_count") == 6 and _field(reader, "llama.block_count") == 3


@pytest.mark.slow
def test_a_killed_gguf_export_leaves_no_output(run, tmp_path):
    root, _ = run
    # Killed once the file exists in the temporary dir: its tensors are being written (or verified).
    out = kill_export_midway(tmp_path, root / "sft", "{format: gguf, gguf_type: f32, progress_bar: false}",
                             partial="model-f32.gguf")
    assert not out.exists()
    # The next export of that output removes what the killed one left, and succeeds.
    _export(tmp_path, "killed", "f16", run_dir=str(root / "sft"))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".killed")) in ([], [".killed.lock"])
