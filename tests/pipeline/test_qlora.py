"""QLoRA end to end on the tiny recipe: `model.quantization=nf4` SFT trains, export merges into the
dequantized base and verifies (hf and adapter formats), DPO trains on the 4-bit SFT model with the
adapters-disabled reference; ZeRO-2 + expert parallelism (2 processes) trains what one process
trains; the pairings that cannot work are refused with what to use instead."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from launching import ROOT, accelerate_launch, assert_finished_with_wandb, run_command

from pipeline.config import RecipeError, build
from pipeline.export import ExportRecipe, export
from pipeline.preflight import LaunchSpec, PreflightError, preflight
from pipeline.training.tracking import read_metrics

pytest.importorskip("bitsandbytes")

SFT, DPO = ROOT / "recipes/tiny/sft.yaml", ROOT / "recipes/tiny/dpo.yaml"
QLORA = ["model.quantization=nf4", "lora.enabled=true"]
# The same rows as the launched run below (micro-batch 1 x 2 processes = 1 x 2 accumulation steps).
COMMON = ["train.max_steps=6", "train.micro_batch_size=1", "train.warmup_steps=1", "train.lr=1e-2",
          "train.eval_max_batches=1", "tracking.progress_bar=false"]


@pytest.fixture(scope="module")
def sft(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("qlora")
    run_command([sys.executable, "-m", "pipeline.prep", str(SFT), f"data.output_dir={tmp / 'data'}"])
    out = tmp / "sft"
    run_command([sys.executable, "-m", "pipeline.sft", str(SFT), f"data.output_dir={tmp / 'data'}",
                 f"output_dir={out}", *QLORA, *COMMON, "train.grad_accum_steps=2"])  # W&B on (offline)
    return tmp, out


def _export(tmp: Path, run_dir: Path, name: str, **section) -> Path:
    raw = {"source": {"run_dir": str(run_dir)}, "output_dir": str(tmp / name),
           "export": {"progress_bar": False, "dtype": "float32", **section}}
    return export(build(ExportRecipe, raw, source="test"), log=lambda _: None)


def _qlora_model(run_dir: Path):
    """The trained model as the stage held it: the 4-bit base with the adapter on top."""
    from peft import PeftModel

    import model.lora  # noqa: F401  (registers the expert LoRA layer with PEFT)
    from model.checkpoint import load_pretrained

    return PeftModel.from_pretrained(load_pretrained(run_dir / "base", quantization="nf4"), run_dir).eval()


def test_qlora_sft_trains_and_the_export_is_the_trained_model(sft):
    tmp, out = sft
    assert_finished_with_wandb(out)
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl")]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.05, losses
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "lora" and manifest["quantization"] == {"type": "nf4", "dtype": "float32"}

    merged = _export(tmp, out, "export")  # verifies (transformers reload, logits vs our merge)
    report = (merged / "README.md").read_text()
    assert "max |diff|" in report
    from model.checkpoint import load_pretrained

    exported = load_pretrained(merged).eval()
    trained = _qlora_model(out)
    ids = torch.randint(0, exported.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    from pipeline.evaluation.models import load_model_dir

    with torch.no_grad():
        ours, theirs = exported(ids).logits, trained(ids).logits
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
        # eval reads the run dir the same way (merged into the 4-bit base's numbers): the export's bytes
        evaluated, written = load_model_dir(out).eval(), exported.state_dict()
        assert all(torch.equal(evaluated.state_dict()[n].view(torch.uint8), t.view(torch.uint8)) for n, t in written.items())
        torch.testing.assert_close(evaluated(ids).logits, theirs, rtol=0, atol=1e-4)
        # which is not the adapter on the full-precision base: the export holds the 4-bit base's numbers.
        from peft import PeftModel

        on_full_base = PeftModel.from_pretrained(load_pretrained(out / "base"), out).eval()
        assert (on_full_base(ids).logits - ours).abs().max() > 1e-3

    adapter = _export(tmp, out, "export-adapter", format="adapter")
    assert "trained on a nf4 (4-bit) base" in (adapter / "README.md").read_text()
    assert (adapter / "adapter_model.safetensors").is_file()


def test_dpo_on_the_4bit_sft_model_uses_the_disabled_adapters_as_reference(sft):
    tmp, sft_out = sft
    run_command([sys.executable, "-m", "pipeline.prep", str(DPO), f"data.output_dir={tmp / 'data_dpo'}"])
    out = tmp / "dpo"
    stdout = run_command([sys.executable, "-m", "pipeline.dpo", str(DPO), f"data.output_dir={tmp / 'data_dpo'}",
                          f"model.sft_dir={sft_out}", f"output_dir={out}", "model.quantization=nf4",
                          "train.max_steps=3", "train.micro_batch_size=2", "tracking.report_to=none",
                          "tracking.progress_bar=false", "train.eval_max_batches=1", "train.log_every=1"])
    assert "reference: adapters disabled" in stdout
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[0]["step"] == 1
    # Step 1: the fresh adapter (B = 0) is the reference itself, so every pair's loss is log 2.
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization"] == {"type": "nf4", "dtype": "float32"}
    # The chain base -> 4-bit + SFT delta -> 4-bit again + DPO delta, merged and verified.
    merged = _export(tmp, out, "export-dpo")
    from model.checkpoint import load_pretrained

    exported = load_pretrained(merged).eval()
    trained = _dpo_model(sft_out, out)
    ids = torch.randint(0, exported.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, trained(ids).logits, rtol=0, atol=1e-4)


def _dpo_model(sft_out: Path, dpo_out: Path):
    from peft import PeftModel

    from model import Mixtral
    from pipeline.distributed.sharded_load import checkpoint_loader
    from pipeline.dpo import load_sft_model

    sft_model = load_sft_model(sft_out, load=checkpoint_loader(torch.float32, None, None, "nf4"))
    assert sft_model.quantization == "nf4" and isinstance(sft_model, Mixtral)
    return PeftModel.from_pretrained(sft_model, dpo_out).eval()


def _recipe(path: Path, *overrides: str):
    from pipeline.preflight import load_stage_recipe

    return load_stage_recipe(path, list(overrides))


def test_what_a_4bit_base_cannot_do_is_refused_with_what_to_use(sft, tmp_path):
    with pytest.raises((RecipeError, ValueError), match="set lora.enabled=true"):
        _recipe(SFT, "model.quantization=nf4", "lora.enabled=false")
    with pytest.raises((RecipeError, ValueError), match="model.compile=false"):
        _recipe(SFT, *QLORA, "model.compile=true")
    zero3 = _recipe(SFT, *QLORA, "parallel.zero_stage=3", "model.logits_chunk_size=null",
                    f"output_dir={tmp_path / 'z3'}")
    with pytest.raises(PreflightError, match="parallel.zero_stage=2"):
        preflight(zero3, LaunchSpec.from_config_file(ROOT / "recipes/accelerate/cpu_zero3.yaml"))
    _, sft_out = sft
    dpo = _recipe(DPO, f"model.sft_dir={sft_out}", f"output_dir={tmp_path / 'dpo'}")
    with pytest.raises(PreflightError, match="model.quantization=nf4 and model.dtype=float32"):
        preflight(dpo, LaunchSpec.single())


@pytest.mark.multiprocess
@pytest.mark.slow
def test_zero2_expert_parallel_qlora_trains_what_one_process_trains(sft):
    """Each rank quantizes only its 4 experts; the first step (same weights everywhere) gives the
    one-process loss and gradient norm, and the second step's loss stays with it (the schedule
    differs after step 2: 2 of the reference's 6 steps)."""
    tmp, reference = sft
    out = tmp / "z2ep2"
    run_command([*accelerate_launch("cpu_zero2_ep2.yaml"), "-m", "pipeline.sft", str(SFT),
                 f"data.output_dir={tmp / 'data'}", f"output_dir={out}", *QLORA, *COMMON,
                 "parallel.backend=gloo", "parallel.zero_stage=2", "parallel.expert_parallel_size=2",
                 "train.max_steps=2", "tracking.report_to=none"])  # the fixture's run has W&B on
    ours, theirs = read_metrics(out / "metrics.jsonl"), read_metrics(reference / "metrics.jsonl")
    assert ours[0]["loss"] == pytest.approx(theirs[0]["loss"], abs=1e-5)
    assert ours[0]["grad_norm"] == pytest.approx(theirs[0]["grad_norm"], rel=1e-4)
    assert ours[1]["loss"] == pytest.approx(theirs[1]["loss"], abs=5e-3)
    # The gathered adapter holds every expert, like the one-process run's.
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        name = next(k for k in f.keys() if k.endswith("experts.lora_down_A"))
        assert f.get_slice(name).get_shape()[0] == 8
