"""Prep stage: raw chats / preference pairs -> tokenized train/ and eval/ datasets.

    python -m pipeline.prep recipes/tiny/sft.yaml [--force] [data.max_seq_len=1024 data.num_proc=2 ...]

Reads the recipe's `data:` section only (the other sections belong to other stages) and writes
`data.output_dir` (train/, eval/, manifest.json, report.md, rejects.jsonl). An unchanged re-run is
a no-op that says so; pass `--force` to redo the work anyway. `data.output_dir` must be new, empty
or written by prep (pipeline/rundir.py); a source with no usable record stops the stage. Exit
status 2 for every such error, with one line saying what is wrong.
"""

from __future__ import annotations

import functools

from data_prep.config import DataConfig
from data_prep.prepare import prepare
from pipeline.config import RecipeError, build, load_recipe_dict
from pipeline.rundir import check_ownable, owned_output
from pipeline.stage import stage_main

KEY = "data.output_dir"


def load_recipe(path: str, overrides: list[str]) -> DataConfig:
    """The recipe's data section only, built and checked."""
    raw = load_recipe_dict(path, overrides)
    if "data" not in raw:
        raise RecipeError(f"{path}: no `data:` section; the prep stage needs one (see recipes/tiny/sft.yaml)")
    return build(DataConfig, raw["data"], source=str(path), prefix="data")


def run(data: DataConfig, *, force: bool = False) -> dict:
    """The stage in pipeline/stage.py's order; returns the manifest. Startup check: a directory prep
    may not write is refused before the work. ``prepare`` then stops if the output's fingerprint
    matches (unless ``force``), encodes, and claims and locks the directory while it writes."""
    check_ownable(data.output_dir, "prep", key=KEY)
    return prepare(data, force=force, own_output=functools.partial(owned_output, stage="prep", key=KEY))


def main(argv: list[str] | None = None) -> int:
    return stage_main(argv, __doc__.split("\n\n")[1], load_recipe, run, errors=(ValueError,), flags=("--force",))


if __name__ == "__main__":
    raise SystemExit(main())
