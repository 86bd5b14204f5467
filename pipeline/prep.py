"""Prep stage: raw chats / preference pairs -> tokenized train/ and eval/ datasets.

    python -m pipeline.prep recipes/tiny/sft.yaml [data.max_seq_len=1024 data.num_proc=2 ...]

Reads the recipe's `data:` section only (the other sections belong to other stages) and writes
`data.output_dir` (train/, eval/, manifest.json, report.md, rejects.jsonl). An unchanged re-run is
a no-op that says so; pass `--force` to redo the work anyway. `data.output_dir` must be new, empty
or written by prep (pipeline/rundir.py); a source with no usable record stops the stage. Exit
status 2 for every such error, with one line saying what is wrong.
"""

from __future__ import annotations

import functools
import sys

from data_prep.config import DataConfig
from data_prep.prepare import PrepError, prepare
from pipeline.config import RecipeError, build, load_recipe_dict, parse_cli
from pipeline.rundir import check_ownable, owned_output

USAGE = "usage: python -m pipeline.prep RECIPE.yaml [--force] [data.key=value ...]"


def main(argv: list[str] | None = None) -> dict:
    # 1. Command line: recipe, overrides, and --force (redo even when up to date).
    argv = list(sys.argv[1:] if argv is None else argv)
    force = "--force" in argv
    argv = [a for a in argv if a != "--force"]
    path, overrides = parse_cli(argv, usage=USAGE)

    # 2. Recipe: only the data section is built and checked here.
    raw = load_recipe_dict(path, overrides)
    if "data" not in raw:
        raise RecipeError(f"{path}: no `data:` section; the prep stage needs one (see recipes/tiny/sft.yaml)")
    data = build(DataConfig, raw["data"], source=str(path), prefix="data")

    # 3. Run (skips when the output's fingerprint matches); refuse a directory prep may not write
    #    before the work, then own and lock it while writing.
    check_ownable(data.output_dir, "prep", key="data.output_dir")
    return prepare(data, force=force, own_output=functools.partial(owned_output, stage="prep", key="data.output_dir"))


if __name__ == "__main__":
    try:
        main()
    except (RecipeError, PrepError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
