"""`python -m pipeline.eval` launched on 2 CPU processes (gloo) with expert parallelism 2 vs one process.

Each process holds 4 of the 8 experts of every layer, so every forward is a collective: the held-out
batches are dealt out (5 batches: one process runs a repeat that it drops), routing text and passkey
prompts run on both. Two models: an HF checkpoint, and a LoRA run over it (its adapter's expert
tensors cut to each process's experts before the fp32 merge). The launched eval must give the
one-process numbers: loss and perplexity per source, routing statistics, routing text, passkey
answers. W&B on (offline), as the recipe has it.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
import torch
from launching import ROOT, accelerate_launch, run_command
from test_eval import TINY_RECIPE, tiny_model, write_eval_data

from model.checkpoint import save_pretrained

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def _lora_run(root: Path, base: Path) -> Path:
    from model.lora import apply_lora

    peft_model = apply_lora(tiny_model(1), r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj", "experts"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.05)  # B starts at zero: make the adapter change the model
    run = root / "sft"
    peft_model.save_pretrained(run)
    (run / "manifest.json").write_text(json.dumps({"kind": "lora", "base": {"checkpoint": str(base)}}))
    return run


@pytest.fixture(scope="module")
def evals(tmp_path_factory) -> dict[str, dict]:
    from pipeline.eval import load_recipe, run

    root = tmp_path_factory.mktemp("parallel_eval")
    data = write_eval_data(root)
    save_pretrained(tiny_model(1), root / "base")
    sft = _lora_run(root, root / "base")
    args = [str(TINY_RECIPE), f"data.dir={data}", f"data.routing_dirs=[{data.parent / 'train'}]",
            "data.batch_size=1", f"models={{base: {root / 'base'}, sft: {sft}}}", "passkey.lengths=[128]",
            "passkey.depths=[0.0,1.0]", "passkey.trials=1", "passkey.max_new_tokens=6",
            "routing.text_samples=2", "routing.text_tokens=40"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.chdir(ROOT):
            run(load_recipe(args[0], [*args[1:], f"output_dir={root / 'one'}", "tracking.report_to=none"]))
    finally:
        torch.set_num_threads(threads)
    run_command([*accelerate_launch("cpu_ddp.yaml"), "-m", "pipeline.eval", *args, f"output_dir={root / 'ep2'}",
                 "parallel.expert_parallel_size=2", "parallel.backend=gloo"])
    return {name: json.loads((root / name / "eval.json").read_text()) for name in ("one", "ep2")}


def _close(got, want, where: str, tol: float = 1e-9) -> None:
    """Nested lists / dicts of numbers equal within `tol` (relative), other leaves exactly."""
    if isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for key in want:
            _close(got[key], want[key], f"{where}.{key}", tol)
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _close(g, w, f"{where}[{i}]", tol)
    elif isinstance(want, float) and not math.isnan(want):
        assert abs(got - want) <= tol * max(1.0, abs(want)), f"{where}: {got} vs {want}"
    else:
        assert got == want or (isinstance(want, float) and math.isnan(got)), f"{where}: {got} vs {want}"


def test_launched_eval_ran_expert_parallel(evals):
    assert evals["ep2"]["processes"] == 2 and evals["ep2"]["expert_parallel_size"] == 2
    assert evals["one"]["processes"] == 1


@pytest.mark.parametrize("model", ["base", "sft"])
def test_launched_eval_gives_the_one_process_loss_per_source(evals, model):
    # Same batches, same padding; only the order of the float64 sums over processes differs.
    _close(evals["ep2"]["models"][model]["loss"], evals["one"]["models"][model]["loss"], "loss", tol=1e-6)


@pytest.mark.parametrize("model", ["base", "sft"])
def test_launched_eval_gives_the_one_process_routing_statistics(evals, model):
    _close(evals["ep2"]["models"][model]["routing"], evals["one"]["models"][model]["routing"], "routing")
    _close(evals["ep2"]["routing_text"][model], evals["one"]["routing_text"][model], "routing_text")


@pytest.mark.parametrize("model", ["base", "sft"])
def test_launched_eval_gives_the_one_process_passkey_answers(evals, model):
    got, want = evals["ep2"]["models"][model]["passkey"], evals["one"]["models"][model]["passkey"]
    assert [s["answer"] for s in got["samples"]] == [s["answer"] for s in want["samples"]]
    assert got == want


def test_launched_eval_gives_the_one_process_routing_shift(evals):
    _close(evals["ep2"]["routing_shift"], evals["one"]["routing_shift"], "routing_shift")
    # The adapter changed the model: the comparison is not between two copies of one model.
    assert evals["one"]["models"]["sft"]["loss"]["all"]["loss"] != evals["one"]["models"]["base"]["loss"]["all"]["loss"]
