"""Prep stage: raw chats / preference pairs -> tokenized train/ and eval/ datasets.

    python -m pipeline.prep recipes/tiny/sft.yaml [data.max_seq_len=1024 data.num_proc=2 ...]

Reads the recipe's `data:` section only (the other sections belong to other stages) and writes
`data.output_dir` (train/, eval/, manifest.json, report.md, rejects.jsonl). An unchanged re-run is
a no-op that says so; pass `--force` to redo the work anyway. `data.output_dir` must be new, empty
or written by prep (pipeline/rundir.py); a source with no usable record stops the stage. Exit
status 2 for every such error, with one line saying what is wrong.
"""

from __future__ import annotations

import sys

from data_prep.prepare import PrepError
from pipeline.config import RecipeError, parse_cli
from pipeline.prep_data import prepare_recipe_data

USAGE = "usage: python -m pipeline.prep RECIPE.yaml [--force] [data.key=value ...]"


def main(argv: list[str] | None = None) -> dict:
    # 1. Command line: recipe, overrides, and --force (redo even when up to date).
    argv = list(sys.argv[1:] if argv is None else argv)
    force = "--force" in argv
    argv = [a for a in argv if a != "--force"]
    path, overrides = parse_cli(argv, usage=USAGE)

    # 2. The recipe's data section only, prepared (pipeline/prep_data.py; skipped when up to date).
    return prepare_recipe_data(path, overrides, force=force)


if __name__ == "__main__":
    try:
        main()
    except (RecipeError, PrepError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
