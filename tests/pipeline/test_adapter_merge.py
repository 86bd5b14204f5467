"""pipeline/adapter_merge.py: an expert-parallel rank reads and merges only its experts, from the
per-expert and the fused (transformers 5) checkpoint layouts, and gets the full merge's values."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import model.lora  # noqa: F401  (registers the expert LoRA layer with PEFT)
from model import Mixtral, MixtralConfig
from model.checkpoint import hf_tensors, save_pretrained
from model.lora import apply_lora
from pipeline.adapter_merge import BaseReader, is_expert_stack, load_merged, meta_state
from pipeline.distributed.expert_parallel import ExpertPlacement, shard_experts
from pipeline.run_record import resolve_source


def _fused_copy(per_expert: Path, out: Path, model: Mixtral) -> Path:
    """The same weights with each expert stack as one tensor (model.layers.{i}.mlp.experts.*)."""
    out.mkdir()
    shutil.copy(per_expert / "config.json", out / "config.json")
    tensors = {}
    for native, tensor in model.state_dict().items():
        if is_expert_stack(native):
            layer = native.split(".")[1]
            tensors[f"model.layers.{layer}.mlp.experts.{native.rsplit('.', 1)[1]}"] = tensor.contiguous()
        else:
            tensors.update((name, t.contiguous()) for name, t in hf_tensors({native: tensor}))
    save_file(tensors, str(out / "model.safetensors"))
    return out


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory) -> dict[str, Path]:
    """A LoRA run over a per-expert checkpoint and the same run over its fused copy."""
    root = tmp_path_factory.mktemp("adapter_merge")
    torch.manual_seed(0)
    base = Mixtral(MixtralConfig.preset("tiny"))
    save_pretrained(base, root / "base")
    _fused_copy(root / "base", root / "fused", base)
    peft_model = apply_lora(base, r=4, alpha=8, target_modules=("q_proj", "experts"), init_lora_weights=False)
    peft_model.save_pretrained(root / "adapter")
    runs = {}
    for layout in ("base", "fused"):
        run = root / f"run-{layout}"
        shutil.copytree(root / "adapter", run)
        (run / "manifest.json").write_text(json.dumps({"kind": "lora", "base": {"checkpoint": str(root / layout)}}))
        runs[layout] = run
    return runs


@pytest.mark.parametrize("layout", ["base", "fused"])
def test_a_rank_reads_only_its_experts_and_gets_the_full_reads_values(lora_runs, layout):
    checkpoint = lora_runs[layout].parent / layout
    config = MixtralConfig.from_hf(checkpoint / "config.json")
    with BaseReader(checkpoint, config) as reader:
        for native, meta in meta_state(config).items():
            if not is_expert_stack(native):
                continue
            full = reader.read(native, meta.shape).clone()
            for experts in ([4, 5, 6, 7], [1, 6]):
                part = reader.read(native, torch.Size((len(experts), *meta.shape[1:])), experts)
                assert torch.equal(part, full[experts]), (native, experts)


@pytest.mark.parametrize("layout", ["base", "fused"])
def test_an_expert_parallel_rank_holds_the_full_merges_experts(lora_runs, layout):
    source = resolve_source(lora_runs[layout])
    whole = load_merged(source, dtype=torch.float32).state_dict()
    for rank in (0, 1):
        place = ExpertPlacement(8, 2, rank)
        held = load_merged(source, dtype=torch.float32, on_meta=lambda m, p=place: shard_experts(m, p))
        assert held.expert_ids == place.expert_ids
        for name, tensor in held.state_dict().items():
            want = whole[name][place.expert_ids] if is_expert_stack(name) else whole[name]
            assert torch.equal(tensor, want), (name, rank)


def test_the_fused_and_per_expert_layouts_merge_to_the_same_model(lora_runs):
    per_expert, fused = (load_merged(resolve_source(lora_runs[k]), dtype=torch.float32).state_dict()
                         for k in ("base", "fused"))
    assert set(per_expert) == set(fused)
    assert all(torch.equal(per_expert[name], fused[name]) for name in per_expert)
