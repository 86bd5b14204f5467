"""The SFT stage end to end on the tiny recipe and the bundled data (real subprocesses, W&B offline).

One reference run (LoRA with dropout, grad accumulation, eval, checkpoints, W&B offline, secrets in
the environment) is shared by the tests that inspect its output.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from model.checkpoint import load_pretrained
from pipeline.recipe import SFTRecipe
from pipeline.sft import SFTStage, load_recipe
from pipeline.training.model_setup import build_model
from pipeline.training.tasks import SFTTask
from pipeline.training.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes/tiny/sft.yaml"
HF_SECRET = "hf_dummySecretValue_1234567890"
WANDB_SECRET = "wandb_dummy_key_0123456789abcdef0123456789"
STEPS = 6


def overrides(tmp: Path, out: str, **extra) -> list[str]:
    items = {
        "data.output_dir": str(tmp / "data"),
        "output_dir": str(tmp / out),
        "train.max_steps": STEPS,
        "train.micro_batch_size": 2,
        "train.grad_accum_steps": 2,
        "train.warmup_steps": 1,
        "train.save_every": 2,
        "train.eval_every": 3,
        "train.eval_max_batches": 2,
        "train.log_every": 1,
        "lora.enabled": True,  # the tiny recipe fine-tunes fully; these tests cover the adapter path
        "train.lr": 1e-2,
        "lora.dropout": 0.1,  # exercises the RNG state on resume
        "tracking.progress_bar": False,
        **extra,
    }
    return [f"{k}={v}" for k, v in items.items()]


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                "OMP_NUM_THREADS": "1", "HF_TOKEN": HF_SECRET}, **extra)
    return env


def sft_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "pipeline.sft", str(RECIPE), *args]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("sft")
    env = clean_env()
    subprocess.run([sys.executable, "-m", "pipeline.prep", str(RECIPE), f"data.output_dir={tmp / 'data'}"],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    return tmp


@pytest.fixture(scope="module")
def reference(work) -> tuple[Path, subprocess.CompletedProcess]:
    """Uninterrupted run: W&B on with no API key (so offline), a secret in the env and in the tags."""
    env = clean_env(WANDB_CONFIG_DIR=str(work / "wandb_cfg"), WANDB_CACHE_DIR=str(work / "wandb_cache"),
                    WANDB_DATA_DIR=str(work / "wandb_data"))
    args = overrides(work, "ref", **{"tracking.report_to": "wandb", "tracking.tags": f"[tiny,{HF_SECRET}]"})
    proc = subprocess.run(sft_cmd(args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work / "ref", proc


@pytest.mark.e2e
def test_loss_falls_and_outputs_exist(reference):
    out, proc = reference
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in rows]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.05, losses
    for key in ("aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_s", "trained_tokens",
                "expert_load/layer0/expert0", "expert_load/dead_experts"):
        assert key in rows[0], key
    assert "eval_loss" in rows[2] and "eval_loss" in rows[-1]
    assert rows[-1]["trained_tokens"] > rows[0]["trained_tokens"] > 0
    # W&B: offline run under the output dir, announced once with the sync command
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert proc.stdout.count("wandb sync") == 1
    assert f"output in {out}" in proc.stdout
    for name in ("adapter_config.json", "adapter_model.safetensors", "recipe.yaml", "manifest.json",
                 "base/config.json"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "lora" and manifest["steps"] == STEPS
    assert manifest["final_metrics"]["loss"] == rows[-1]["loss"]
    assert manifest["data"]["train_rows"] > 0 and manifest["data"]["train_fingerprint"]
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-000004", "step-000006"]


@pytest.mark.e2e
def test_no_secret_in_outputs_or_logs(reference):
    out, proc = reference
    assert HF_SECRET not in proc.stdout + proc.stderr
    for path in out.rglob("*"):
        if path.is_file():
            assert HF_SECRET.encode() not in path.read_bytes(), path
    assert "<redacted>" in (out / "recipe.yaml").read_text()


def trained_models(out: Path):
    """(base + adapter from disk as a PeftModel, the same merged into a plain Mixtral)."""
    from peft import PeftModel

    import model.lora  # noqa: F401  (registers the expert LoRA layer with PEFT)

    peft_model = PeftModel.from_pretrained(load_pretrained(out / "base"), out).eval()
    merged = PeftModel.from_pretrained(load_pretrained(out / "base"), out).merge_and_unload().eval()
    return peft_model, merged


@pytest.mark.e2e
def test_adapter_loads_back_and_merges(reference, work):
    out, _ = reference
    recipe = load_recipe(str(out / "recipe.yaml"), [])
    peft_model, merged = trained_models(out)
    # the adapter did train: its B matrices are no longer zero
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n or "lora_gate_up_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)

    # reloaded adapter reproduces the eval loss logged at the last step
    _, eval_set = SFTStage(recipe).load_data()
    task = SFTTask(aux_coef=0.0, z_coef=0.0, logits_chunk_size=recipe.model.logits_chunk_size)
    mbs = recipe.train.micro_batch_size
    total = units = 0.0
    with torch.no_grad():
        for b in range(recipe.train.eval_max_batches):
            batch = task.collate([eval_set[i] for i in range(b * mbs, (b + 1) * mbs)])
            total += float(task.forward(peft_model, batch).loss_sum)
            units += task.count_units(batch)
    assert total / units == pytest.approx(read_metrics(out / "metrics.jsonl")[-1]["eval_loss"], abs=1e-5)

    # merged weights give the adapter model's outputs
    batch = task.collate([eval_set[0], eval_set[1]])
    kwargs = {k: batch[k] for k in ("input_ids", "position_ids", "document_ids")}
    with torch.no_grad():
        torch.testing.assert_close(merged(**kwargs).logits, peft_model(**kwargs).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.e2e
def test_lora_gives_gradients_only_to_adapters(work, tmp_path):
    recipe = load_recipe(str(RECIPE), overrides(work, "unused"))
    model = build_model(recipe, tmp_path, is_main=False)
    train, _ = SFTStage(recipe).load_data()
    task = SFTTask(aux_coef=0.02, z_coef=0.001, logits_chunk_size=None)
    out = task.forward(model, task.collate([train[0], train[1]]))
    (out.loss_sum + out.extra).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trainable and with_grad == trainable
    assert all(".lora_" in n for n in trainable), sorted(trainable)[:5]
    # both attention and expert adapters are there
    assert any("q_proj.lora_A" in n for n in trainable) and any("experts.lora_down_B" in n for n in trainable)


@pytest.mark.e2e
@pytest.mark.slow
def test_sigkill_and_resume_logs_the_same_losses(reference, work):
    ref_rows = read_metrics(reference[0] / "metrics.jsonl")
    out = work / "killed"
    # W&B offline with a (dummy) API key set: the key must not leak either
    env = clean_env(WANDB_MODE="offline", WANDB_API_KEY=WANDB_SECRET, WANDB_CONFIG_DIR=str(work / "wandb_cfg"),
                    WANDB_CACHE_DIR=str(work / "wandb_cache"), WANDB_DATA_DIR=str(work / "wandb_data"))
    args = overrides(work, "killed", **{"tracking.report_to": "wandb"})
    proc = subprocess.Popen(sft_cmd(args), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    metrics = out / "metrics.jsonl"
    # kill once the step-2 checkpoint is complete and step 3 has been logged, i.e. mid-way
    while time.time() < deadline and proc.poll() is None:
        if (out / "checkpoints/step-000002").is_dir() and metrics.exists() and len(read_metrics(metrics)) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    first_log = proc.communicate()[0].decode()
    assert not (out / "manifest.json").exists()

    # (The tiny recipe starts over on every run: overwrite_output_dir would win over resume=auto.)
    resumed = subprocess.run(sft_cmd([*args, "train.resume=auto", "train.overwrite_output_dir=false"]), cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    rows = read_metrics(metrics)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for ours, ref in zip(rows, ref_rows, strict=True):
        for key in ("loss", "aux_loss", "grad_norm", "lr"):
            assert ours[key] == pytest.approx(ref[key], abs=1e-6), (ours["step"], key)
        if "eval_loss" in ref:
            assert ours["eval_loss"] == pytest.approx(ref["eval_loss"], abs=1e-6)

    everything = first_log + resumed.stdout + resumed.stderr
    assert WANDB_SECRET not in everything and HF_SECRET not in everything
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert WANDB_SECRET.encode() not in data and HF_SECRET.encode() not in data, path


@pytest.mark.e2e
def test_misspelled_key_fails_with_a_suggestion():
    proc = subprocess.run(sft_cmd(["train.lrr=1e-5"]), cwd=ROOT, env=clean_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown key 'train.lrr'; did you mean 'train.lr'?" in proc.stderr


def test_recipes_build():
    for path in ("recipes/tiny/sft.yaml", "recipes/mixtral-8x7b/sft_lora.yaml", "recipes/mixtral-8x7b/sft_full.yaml"):
        recipe = load_recipe(str(ROOT / path), [])
        assert isinstance(recipe, SFTRecipe)
    full = load_recipe(str(ROOT / "recipes/mixtral-8x7b/sft_full.yaml"), [])
    assert not full.lora.enabled and full.model.router_aux_loss_coef == pytest.approx(0.02)


QUICK = {"train.max_steps": 2, "train.save_every": "null", "train.eval_every": 1, "tracking.report_to": "none",
         "lora.dropout": 0.0}


@pytest.mark.e2e
def test_a_failed_start_does_not_block_the_fixed_rerun(work, capsys):
    from pipeline.sft import main

    out = work / "failed_start"
    # (The tiny recipe sets train.resume: never.) Fails after the run dir is claimed and recipe.yaml written: the data dir was never prepared.
    rc = main([str(RECIPE), *overrides(work, "failed_start", **QUICK, **{"data.output_dir": str(work / "nodata")})])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("error:") == 1 and "holds no prepared data" in err, err
    assert (out / "recipe.yaml").is_file()
    rc = main([str(RECIPE), *overrides(work, "failed_start", **QUICK, **{"train.overwrite_output_dir": "false"})])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "stopped before its first checkpoint" in captured.out and (out / "manifest.json").is_file()


@pytest.mark.e2e
def test_overwrite_starts_over_even_with_resume_auto(work, capsys):
    from pipeline.sft import main

    out = work / "again"
    assert main([str(RECIPE), *overrides(work, "again", **{**QUICK, "train.eval_every": "null"})]) == 0
    (out / "notes.md").write_text("mine")
    first = json.loads((out / "manifest.json").read_text())
    capsys.readouterr()
    rc = main([str(RECIPE), *overrides(work, "again", **QUICK, **{
        "train.resume": "auto", "train.overwrite_output_dir": "true", "train.lr": 5e-3})])
    stdout = capsys.readouterr().out
    assert rc == 0 and "train.overwrite_output_dir=true: starting over" in stdout and "resumed from" not in stdout
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]  # trained again, from step 1
    assert json.loads((out / "manifest.json").read_text())["final_metrics"] != first["final_metrics"]
    assert (out / "notes.md").read_text() == "mine"
    assert "lr: 0.005" in (out / "recipe.yaml").read_text()


@pytest.mark.e2e
def test_no_eval_rows_means_training_without_eval_said_once(work, capsys):
    from pipeline import prep
    from pipeline.sft import main

    data = work / "data_no_eval"
    # The simplest recipe: one source, eval_fraction 0 (the default), so the eval split is empty.
    assert prep.main([str(RECIPE), f"data.output_dir={data}", "data.sources=[{path: data_prep/data/sft_messages.jsonl}]"]) == 0
    capsys.readouterr()
    rc = main([str(RECIPE), *overrides(work, "no_eval", **QUICK, **{
        "data.output_dir": str(data), "data.sources": "[{path: data_prep/data/sft_messages.jsonl}]"})])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.out.count("no eval rows") == 1 and "training without eval" in captured.out
    assert all("eval_loss" not in row for row in read_metrics(work / "no_eval" / "metrics.jsonl"))


@pytest.mark.e2e
def test_prepared_data_of_another_data_section_is_refused(work, capsys):
    from pipeline.sft import main

    rc = main([str(RECIPE), *overrides(work, "mismatch", **QUICK, **{"data.max_seq_len": 512})])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "was prepared from a different data section (prepared -> recipe: data.max_seq_len: 256 -> 512)" in err


@pytest.mark.parametrize(("parallel", "message"), [
    (["parallel.expert_parallel_size=3", "parallel.zero_stage=2"],
     "parallel.expert_parallel_size=3 must divide the number of experts (8); choose one of [1, 2, 4, 8]"),
    (["parallel.zero_stage=2"], "parallel.zero_stage=2 runs DeepSpeed, which needs a launcher"),
])
def test_parallel_sizes_are_checked_before_anything_distributed(tmp_path, capsys, parallel, message):
    from pipeline.sft import main

    rc = main([str(RECIPE), f"output_dir={tmp_path / 'out'}", *parallel])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"error: {message}" + err.split(message, 1)[1] and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.e2e
def test_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(work, capsys):
    from pipeline.sft import main

    out = work / "diverged"
    # lr 1e30: the first update blows the adapters up, the second step's loss is not finite
    rc = main([str(RECIPE), *overrides(work, "diverged", **{
        "train.lr": 1e30, "train.warmup_steps": 0, "train.save_every": 1, "train.eval_every": "null",
        "lora.dropout": 0.0, "tracking.report_to": "none"})])
    err = capsys.readouterr().err
    assert rc == 3
    assert "step 2: loss is nan" in err or "step 2: loss is inf" in err, err
    assert "the last good checkpoint is" in err and "step-000001" in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000001"]
    assert not (out / "manifest.json").exists()
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1]


@pytest.mark.e2e
def test_full_finetuning_with_frozen_router_saves_a_loadable_model(work):
    from pipeline.sft import main

    out = work / "full"
    rc = main([str(RECIPE), *overrides(work, "full", **{
        "lora.enabled": "false", "model.freeze_router": "true", "train.max_steps": 2, "train.lr": 1e-3,
        "train.save_every": "null", "train.eval_every": "null", "tracking.report_to": "none"})])
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "full" and manifest["model_dir"] == str(out.resolve())
    tuned, base = load_pretrained(out), load_pretrained(out / "base")
    tuned_params, base_params = dict(tuned.named_parameters()), dict(base.named_parameters())
    for name, param in tuned_params.items():
        if ".moe.gate." in name:
            assert torch.equal(param, base_params[name]), name
    assert not torch.equal(tuned_params["layers.0.self_attn.q_proj.weight"], base_params["layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(tuned_params["layers.0.moe.experts.down_proj"], base_params["layers.0.moe.experts.down_proj"])


@pytest.mark.e2e
@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_give_the_single_process_losses(work):
    """2 processes x micro-batch 1 (gloo DDP) == 1 x micro-batch 2: the loss is a mean over the GLOBAL batch's tokens.

    Router losses are off: the aux loss of a batch is not the mean of its halves' aux losses.
    """
    common = {"train.micro_batch_size": 1, "train.grad_accum_steps": 2, "train.max_steps": 3,
              "train.save_every": "null", "train.eval_every": "null", "lora.dropout": 0.0,
              "model.router_aux_loss_coef": 0.0, "model.router_z_loss_coef": 0.0, "tracking.report_to": "none"}
    single = subprocess.run(sft_cmd(overrides(work, "single", **{**common, "train.micro_batch_size": 2})),
                            cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=900)
    assert single.returncode == 0, single.stderr[-3000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # torchrun: accelerate's MULTI_CPU config (use_cpu) starts a single process without mpirun.
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
              "-m", "pipeline.sft", str(RECIPE), *overrides(work, "ddp", **common)]
    ddp = subprocess.run(launch, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=900)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 process(es)" in ddp.stdout
    ours, ref = read_metrics(work / "ddp/metrics.jsonl"), read_metrics(work / "single/metrics.jsonl")
    assert [r["trained_tokens"] for r in ours] == [r["trained_tokens"] for r in ref]
    for a, b in zip(ours, ref, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), a["step"]
