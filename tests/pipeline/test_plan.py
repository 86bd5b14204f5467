"""pipeline/plan/: parameter counts from the meta model, the activation model against what autograd
really saves, a plan for every launch command in the shipped recipes' headers, the command line's
exit codes, and the predicted peak against the measured one on CPU (bench/bench_plan.py's cases)."""

from __future__ import annotations

import importlib.util
import re
import sys

import pytest
import torch
from recipe_headers import ROOT, pairing_params, preset_of

from model import MixtralConfig
from pipeline.plan import GB, plan
from pipeline.plan.activations import LayerShape, layer_saved
from pipeline.plan.cli import main
from pipeline.plan.train_step import NF4_BYTES
from pipeline.preflight import LaunchSpec, load_stage_recipe

MIXTRAL = MixtralConfig.preset("mixtral-8x7b")
VERDICT = re.compile(r"^plan: (fits|does not fit): peak [\d,.]+ GB per (GPU|process) of [\d,]+ GB; "
                     r"host [\d,.]+ GB per node")


def test_parameter_counts_of_mixtral_8x7b_come_from_the_meta_model():
    recipe = load_stage_recipe(ROOT / "recipes/mixtral-8x7b/sft_lora.yaml")
    result = plan(recipe, LaunchSpec.from_config_file(ROOT / "recipes/accelerate/zero2_ep8.yaml"),
                  model_config=MIXTRAL)
    assert result.counts.total == 46_702_792_704
    assert round(result.counts.active / 1e9, 2) == 12.88
    assert result.counts.trainable == 240_123_904  # LoRA r=16 on q/k/v/o and every expert's w1/w2/w3
    # rank 0 under EP 8: the dense weights and one expert per layer
    assert result.counts.local == 46_702_792_704 - 7 * 32 * 3 * 4096 * 14336 + 240_123_904 - 7 * 32 * 884_736


def test_zero2_offload_keeps_deepspeeds_20_bytes_per_parameter_on_the_host():
    recipe = load_stage_recipe(ROOT / "recipes/mixtral-8x7b/sft_full.yaml",
                               ["parallel.zero_stage=2", "parallel.expert_parallel_size=8",
                                "parallel.offload_params=false", "model.logits_chunk_size=2048"])
    one = plan(recipe, LaunchSpec.from_config_file(ROOT / "recipes/accelerate/zero2_ep8_offload.yaml"),
               model_config=MIXTRAL)
    training = next(m for m in one.moments if m.name == "loss backward (logits chunk)")
    # 8 ranks x (their expert partition + 1/8 of the dense weights) = all 46.7B parameters x 20 B
    assert training.host_per_node(8) == pytest.approx(46_702_792_704 * 20, rel=1e-3)
    two = plan(recipe, LaunchSpec.from_config_file(ROOT / "recipes/accelerate/multinode_zero2_ep8_offload.yaml"),
               model_config=MIXTRAL)
    training = next(m for m in two.moments if m.name == "loss backward (logits chunk)")
    assert training.host_per_node(8) == pytest.approx(46_702_792_704 * 20 / 2, rel=1e-3)


def _saved_by_autograd(preset: str, lora: bool, dropout: float, rows: int, seq: int) -> int:
    """Bytes of the tensors one decoder layer's forward saves for backward (CPU, fp32), without the
    parameters and the tensors made before the layer ran (its input, cos/sin, the layout)."""
    from model import Mixtral
    from model.attention import batch_layout, rope_cos_sin

    config = MixtralConfig.preset(preset)
    torch.manual_seed(0)
    model = Mixtral(config)
    if lora:
        from model.lora import apply_lora

        model.requires_grad_(False)
        model = apply_lora(model, 16, 32, dropout, ["q_proj", "k_proj", "v_proj", "o_proj", "experts"])
    layer = (model.get_base_model() if lora else model).layers[0]
    h = torch.randn(rows, seq, config.hidden_size, requires_grad=True)
    documents = torch.zeros(rows, seq, dtype=torch.long)
    cos, sin = rope_cos_sin(torch.arange(seq).expand(rows, seq), config.head_dim, config.rope_theta, h.dtype)
    layout = batch_layout(rows, seq, h.device, document_ids=documents)  # the CPU's per-document SDPA
    attention = layout.attention
    before = {t.untyped_storage().data_ptr() for t in [h, cos, sin, *layer.parameters()]}
    before |= {t.untyped_storage().data_ptr() for bucket in attention.buckets for t in bucket}
    before.add(attention.inverse.untyped_storage().data_ptr())
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in before:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(h, cos, sin, layout)
    return sum(saved.values())


@pytest.mark.parametrize("preset, lora, dropout, rows, seq", [
    ("tiny", False, 0.0, 4, 256),  # full fine-tuning, 256 rows per expert: torch._grouped_mm
    ("tiny", True, 0.0, 4, 256),
    ("bench-small", True, 0.05, 1, 512),  # LoRA dropout: CPU dropout keeps a noise tensor
    ("bench-small", False, 0.0, 1, 512),  # few rows per expert: the per-expert BLAS path
])
def test_layer_activation_model_matches_what_autograd_saves(preset, lora, dropout, rows, seq):
    config = MixtralConfig.preset(preset)
    shape = LayerShape(
        T=rows * seq, H=config.hidden_size, nh=config.num_attention_heads, nkv=config.num_key_value_heads,
        D=config.head_dim, E=config.num_local_experts, K=config.num_experts_per_tok, F=config.intermediate_size,
        s=4, M=rows * seq * config.num_experts_per_tok, ep=False, cuda=False, trained_base=not lora,
        lora_attention=("q_proj", "k_proj", "v_proj", "o_proj") if lora else (), lora_experts=lora, r=16,
        dropout=dropout > 0)
    predicted = sum(b for _, b in layer_saved(shape))
    assert predicted == pytest.approx(_saved_by_autograd(preset, lora, dropout, rows, seq), rel=0.03)


@pytest.mark.parametrize("pairing", pairing_params())
def test_every_header_launch_has_a_plan(pairing):
    path, stage, config, overrides = pairing
    launch = LaunchSpec.from_config_file(ROOT / config) if config else LaunchSpec.single()
    recipe = load_stage_recipe(path, overrides, stage=stage)
    result = plan(recipe, launch, model_config=MixtralConfig.preset(preset_of(path)),
                  device="cpu" if launch.use_cpu or path.parent.name == "tiny" else "cuda")
    assert VERDICT.match(result.render().splitlines()[-1])
    # at least the weights as held: 2 B a parameter, 4-bit ones (model.quantization) NF4_BYTES
    held = NF4_BYTES if getattr(getattr(recipe, "model", None), "quantization", None) else 2
    assert result.peak_gpu > result.counts.local * held or result.setup.zero == 3


def test_the_command_line_says_fits_does_not_fit_or_invalid(capsys):
    recipe = str(ROOT / "recipes/mixtral-8x7b/sft_lora.yaml")
    config = str(ROOT / "recipes/accelerate/zero2_ep8.yaml")
    assert main([recipe, "--config_file", config, "--model-preset", "mixtral-8x7b"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert VERDICT.match(last) and last.startswith("plan: fits:")
    assert main([recipe, "--config_file", config, "--model-preset", "mixtral-8x7b", "--gpu-memory-gb", "16"]) == 1
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("plan: does not fit:")
    # LoRA with EP 8 under a ZeRO-3 launch: the launch check refuses it, as the real launch would
    zero3 = str(ROOT / "recipes/accelerate/zero3.yaml")
    assert main([recipe, "--config_file", zero3, "--model-preset", "mixtral-8x7b"]) == 2
    assert "launches DeepSpeed with parallel.zero_stage=3" in capsys.readouterr().err


def test_zero3_lora_never_holds_the_whole_model_in_a_process():
    recipe = load_stage_recipe(ROOT / "recipes/mixtral-8x7b/sft_lora.yaml",
                               ["parallel.zero_stage=3", "parallel.expert_parallel_size=1",
                                "model.logits_chunk_size=null"])
    launch = LaunchSpec.from_config_file(ROOT / "recipes/accelerate/zero3.yaml")
    result = plan(recipe, launch, model_config=MIXTRAL)
    assert result.fits and result.peak_host < 10 * GB  # each process reads only its partitions
    whole = result.counts.total * 2  # bf16
    loading = [m for m in result.moments if m.phase in ("load", "prepare")]
    assert loading and all(m.gpu() < whole / 4 and m.host_per_node(8) < whole / 4 for m in loading)


# ------------------------------------------------------------------------------------------------
# Predicted vs measured on CPU
# ------------------------------------------------------------------------------------------------


def _bench():
    spec = importlib.util.spec_from_file_location("bench_plan", ROOT / "bench/bench_plan.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


BENCH = _bench()


@pytest.fixture(scope="module")
def long_rows(tmp_path_factory):
    work = tmp_path_factory.mktemp("plan-data")
    return BENCH.write_long_data(work)


@pytest.mark.parametrize("case", [
    pytest.param(case, id=case.name, marks=[pytest.mark.multiprocess] if case.config else [])
    for case in BENCH.TEST_CASES
])
def test_predicted_peak_is_within_20_percent_of_the_measured_one(case, long_rows, tmp_path):
    row = BENCH.compare(case, long_rows, tmp_path)
    assert row["predicted"] == pytest.approx(row["measured"], rel=0.2)
    for phase, (predicted, measured) in row["phases"].items():
        if measured:
            assert predicted == pytest.approx(measured, rel=0.2), phase
