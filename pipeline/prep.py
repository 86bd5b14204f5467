"""Prep stage: raw chats / preference pairs -> tokenized train/ and eval/ datasets.

    python -m pipeline.prep recipes/tiny/sft.yaml [--force] [data.max_seq_len=1024 data.num_proc=2 ...]

Reads the recipe's `data:` section only (the other sections belong to other stages) and writes
`data.output_dir` (train/, eval/, manifest.json, report.md, rejects.jsonl). An unchanged re-run is
a no-op that says so; pass `--force` to redo the work anyway. `data.output_dir` must be new, empty
or written by prep (pipeline/rundir.py); a source with no usable record stops the stage. Exit
status 2 for every such error, with one line saying what is wrong.
"""

from __future__ import annotations

from pipeline.prep_data import load_data_section as load_recipe
from pipeline.prep_data import prepare_data as run
from pipeline.stage import stage_main

__all__ = ["load_recipe", "main", "run"]


def main(argv: list[str] | None = None) -> int:
    """The prep stage's command line (pipeline/stage.py); the work is pipeline/prep_data.py's."""
    return stage_main(argv, __doc__.split("\n\n")[1], load_recipe, run, errors=(ValueError,), flags=("--force",))


if __name__ == "__main__":
    raise SystemExit(main())
