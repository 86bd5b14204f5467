"""DPO end to end: prep rejects unusable pairs; SFT -> prep -> DPO on the tiny recipe learns the preference."""

import json
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from pipeline import prep

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes/tiny/dpo.yaml"


def test_pair_with_identical_completions_is_rejected_in_prep_not_trained(tmp_path):
    pairs = [
        {"prompt": "Convert to upper case: red fox", "chosen": "RED FOX", "rejected": "red fox"},
        {"prompt": "What is 2 + 2? Answer with the number only.", "chosen": "4", "rejected": "4"},
        {"prompt": "Reverse the string 'abc'.", "chosen": "cba", "rejected": "The reversed string is abc"},
    ]
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    out = tmp_path / "data"
    assert prep.main(
        [
            str(RECIPE),
            f"data.output_dir={out}",
            "data.sources=[{path: " + str(src) + "}]",
            "data.eval_fraction=0",
        ]
    ) == 0

    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in rejects] == ["chosen_equals_rejected"]
    train = datasets.load_from_disk(str(out / "train"))
    assert len(train) == 2
    for row in train:
        assert row["chosen_input_ids"] != row["rejected_input_ids"]


def _run(args, cwd):
    proc = subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.e2e
@pytest.mark.slow
def test_tiny_dpo_raises_held_out_reward_accuracy(tmp_path):
    sft, data, dpo = tmp_path / "sft", tmp_path / "data_dpo", tmp_path / "dpo"
    quiet = ["tracking.report_to=none", "tracking.progress_bar=false"]
    _run(["pipeline.prep", "recipes/tiny/sft.yaml", f"data.output_dir={tmp_path}/data_sft"], ROOT)
    _run(
        [
            "pipeline.sft",
            "recipes/tiny/sft.yaml",
            f"data.output_dir={tmp_path}/data_sft",
            f"output_dir={sft}",
            "train.max_steps=10",
            "train.save_every=null",
            "train.eval_every=null",
            *quiet,
        ],
        ROOT,
    )
    _run(["pipeline.prep", str(RECIPE), f"data.output_dir={data}"], ROOT)
    _run(
        [
            "pipeline.dpo",
            str(RECIPE),
            f"data.output_dir={data}",
            f"model.sft_dir={sft}",
            f"output_dir={dpo}",
            # Measured (129 held-out pairs, recipe lr 3e-4): accuracy 0.87 at step 12, 0.86 at 18.
            "train.max_steps=16",
            "train.eval_every=8",
            "train.resume=never",
            *quiet,
        ],
        ROOT,
    )

    logs = [json.loads(line) for line in (dpo / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in logs if "eval_rewards/accuracies" in m]
    assert len(evals) >= 2, logs[-1]
    first, last = evals[0], evals[-1]
    # Before any update the policy is the reference: every margin is 0 and no pair counts as won.
    assert last["eval_rewards/accuracies"] > 0.75, last
    assert last["eval_rewards/margins"] > first["eval_rewards/margins"] > 0, (first, last)
    assert last["eval_loss"] < 0.6931, last  # below log 2, the loss at margin 0
    assert all(
        key in last
        for key in (
            "eval_logps/chosen",
            "eval_logps/rejected",
            "eval_aux_loss",
            "rewards/chosen",
            "rewards/rejected",
            "aux_loss",
        )
    )

    manifest = json.loads((dpo / "manifest.json").read_text())
    assert manifest["stage"] == "dpo" and manifest["kind"] == "lora"
    assert manifest["base"]["checkpoint"] == str(sft.resolve())
    assert manifest["reference"] == "the SFT model (this adapter disabled)"
    assert (dpo / "adapter_model.safetensors").is_file()
    # The tiny recipe scores the reference on the fly (cheaper for a short run, measured); the
    # precomputed cache is tested against it in test_dpo.py.
    assert not (data / "ref_logps").exists()
