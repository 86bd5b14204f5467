"""pipeline.chat and pipeline/evaluation/generate.py: greedy, KV-cached generation through transformers
equals our model's greedy decoding."""

import pytest
import torch

from model import Mixtral, MixtralConfig
from model.checkpoint import load_pretrained, save_pretrained
from pipeline.chat import main
from pipeline.config import build
from pipeline.evaluation.generate import answer, greedy_recomputed, load
from pipeline.export import ExportRecipe, export


def export_tiny(tmp_path):
    """A random tiny Mixtral (seed 0) exported in fp32 without verification; its directory."""
    torch.manual_seed(0)
    save_pretrained(Mixtral(MixtralConfig.preset("tiny")), tmp_path / "base")
    raw = {
        "source": {"checkpoint": str(tmp_path / "base")},
        "output_dir": str(tmp_path / "export"),
        "export": {"dtype": "float32", "progress_bar": False},
        "verify": {"enabled": False},
    }
    return export(build(ExportRecipe, raw, source="test"), log=lambda _: None)


def test_chat_generates_what_our_model_decodes_greedily(tmp_path, capsys):
    out = export_tiny(tmp_path)

    tokenizer, model = load(out)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."}]
    prompt, generated, text = answer(tokenizer, model, messages, max_new_tokens=8)
    assert prompt[:4] == [1, 733, 16289, 28793] and prompt[-4:] == [733, 28748, 16289, 28793]

    # Reference: our model, no cache, the whole sequence recomputed for every new token.
    native = load_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    assert generated == greedy_recomputed(native, prompt, 8, eos=2)
    assert text == tokenizer.decode(generated, skip_special_tokens=True)

    assert main([str(out), "--prompt", "Hi", "--max-new-tokens", "3"]) == 0
    assert "[assistant]" in capsys.readouterr().out
    assert main([str(tmp_path / "missing")]) == 1


def test_chat_loads_an_adapter_export_onto_its_base(tmp_path):
    from peft import PeftModel

    from model.lora import apply_lora

    torch.manual_seed(0)
    save_pretrained(Mixtral(MixtralConfig.preset("tiny")), tmp_path / "base")
    lora = apply_lora(load_pretrained(tmp_path / "base", dtype=torch.float32), r=2, alpha=4)
    with torch.no_grad():
        for p in lora.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)  # B starts at zero: make the adapter matter
    lora.save_pretrained(tmp_path / "lora")
    raw = {
        "source": {"checkpoint": str(tmp_path / "base"), "adapters": [str(tmp_path / "lora")]},
        "output_dir": str(tmp_path / "export"),
        "export": {"format": "adapter", "progress_bar": False},
        "verify": {"enabled": False},
    }
    out = export(build(ExportRecipe, raw, source="test"), log=lambda _: None)

    with pytest.raises(FileNotFoundError, match="the base model 'base' is neither a checkpoint dir here nor a hub id"):
        load(out)  # the export names its base, it does not point at this machine's directories
    tokenizer, model = load(out, base=tmp_path / "base")
    assert isinstance(model, PeftModel)
    prompt, generated, _ = answer(tokenizer, model, [{"role": "user", "content": "Hi"}], max_new_tokens=6)
    native = PeftModel.from_pretrained(
        load_pretrained(tmp_path / "base", dtype=torch.float32), str(tmp_path / "lora")
    ).merge_and_unload()
    assert generated == greedy_recomputed(native, prompt, 6, eos=2)


def test_chat_over_a_model_split_across_devices_gives_the_same_answer(tmp_path):
    # 8 x 80 GB: `--device-map auto` splits the layers over the GPUs and accelerate's hooks move the
    # hidden states between them. A CPU host has one device, so the same hooks are exercised by a
    # map over the CPU and the disk (weights of layer 1 and lm_head loaded for each forward).
    out = export_tiny(tmp_path)
    messages = [{"role": "user", "content": "Name a prime."}]
    tokenizer, whole = load(out)
    _, want, _ = answer(tokenizer, whole, messages, max_new_tokens=8)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"}
    tokenizer, split = load(out, device_map=device_map, offload_folder=tmp_path / "offload")
    assert set(split.hf_device_map.values()) == {"cpu", "disk"}
    _, got, _ = answer(tokenizer, split, messages, max_new_tokens=8)
    assert got == want and len(want) > 0
