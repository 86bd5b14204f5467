"""Exports that fail part-way, for the safetensors and GGUF export tests: what either must leave
behind is nothing (no output dir, no temporary dir)."""

from __future__ import annotations

import sys
from pathlib import Path

from launching import kill_midway
from safetensors import safe_open
from safetensors.torch import save_file


def kill_export_midway(tmp_path: Path, run_dir: Path, export_section: str, partial: str) -> Path:
    """`python -m pipeline.export` of `run_dir` into tmp_path/killed with `export: {export_section}`,
    SIGKILLed once `partial` (a glob) exists in its temporary dir; the output dir it was to write."""
    out, recipe = tmp_path / "killed", tmp_path / "export.yaml"
    recipe.write_text(f"source: {{run_dir: {run_dir}}}\noutput_dir: {out}\nexport: {export_section}\n")
    kill_midway([sys.executable, "-m", "pipeline.export", str(recipe)],
                started=lambda: any(tmp_path.glob(f".killed.tmp-*/{partial}")))
    return out


def with_short_lm_head(checkpoint: Path, copy: Path) -> Path:
    """A copy of a one-file HF checkpoint whose lm_head.weight lacks its last row: lm_head is the last
    tensor an export reads, so the export fails after it has written (and fsynced) the rest."""
    copy.mkdir()
    (copy / "config.json").write_text((checkpoint / "config.json").read_text())
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["lm_head.weight"] = tensors["lm_head.weight"][:-1].clone()
    save_file(tensors, str(copy / "model.safetensors"))
    return copy
