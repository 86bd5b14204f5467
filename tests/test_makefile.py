"""The Makefile's stage targets run what their RECIPE and ARGS say (make -n: printed, not run)."""

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def planned(*args: str) -> list[str]:
    proc = subprocess.run(["make", "-n", "--no-print-directory", *args, "INSTALL_STAMP="], cwd=REPO,
                          capture_output=True, text=True, check=True)
    return [line.strip() for line in proc.stdout.splitlines() if "-m pipeline." in line]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this host")
def test_make_sft_and_dpo_prepare_the_recipe_they_train_on():
    args = "ARGS=data.max_seq_len=128 train.lr=1e-3"
    assert planned("sft", "RECIPE=my/sft.yaml", args) == [
        ".venv/bin/python -m pipeline.prep my/sft.yaml data.max_seq_len=128 train.lr=1e-3",
        ".venv/bin/python -m pipeline.sft my/sft.yaml data.max_seq_len=128 train.lr=1e-3",
    ]
    assert planned("dpo", "RECIPE=my/dpo.yaml") == [
        ".venv/bin/python -m pipeline.prep my/dpo.yaml", ".venv/bin/python -m pipeline.dpo my/dpo.yaml"]
    assert planned("sft")[0] == ".venv/bin/python -m pipeline.prep recipes/tiny/sft.yaml"
