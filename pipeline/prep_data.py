"""A recipe's `data:` section prepared: what the prep stage (pipeline.prep) runs, and what eval runs
when its held-out split is missing (`data.prep_recipe`), so that no stage imports another."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

from data_prep.config import DataConfig
from data_prep.prepare import prepare
from pipeline.config import RecipeError, build, load_recipe_dict
from pipeline.rundir import check_ownable, owned_output

KEY = "data.output_dir"


def load_data_section(path: str | os.PathLike, overrides: Sequence[str] = ()) -> DataConfig:
    """The recipe at ``path``'s data section only (the other sections belong to other stages and are
    not read), built and checked."""
    raw = load_recipe_dict(path, list(overrides))
    if "data" not in raw:
        raise RecipeError(f"{path}: no `data:` section; the prep stage needs one (see recipes/tiny/sft.yaml)")
    return build(DataConfig, raw["data"], source=str(path), prefix="data")


def prepare_data(data: DataConfig, *, force: bool = False) -> dict:
    """The prep stage in pipeline/stage.py's order; returns prep's manifest. Startup check:
    `data.output_dir` must be new, empty or written by prep (pipeline/rundir.py), refused before any
    work; ``prepare`` then stops if the output's fingerprint matches (an unchanged re-run is a no-op
    unless ``force``), encodes, and claims and locks the directory while it writes."""
    check_ownable(data.output_dir, "prep", key=KEY)
    return prepare(data, force=force, own_output=functools.partial(owned_output, stage="prep", key=KEY))


def prepare_recipe_data(path: str | os.PathLike, overrides: Sequence[str] = (), *, force: bool = False) -> dict:
    """`load_data_section` then `prepare_data`: the recipe file's data prepared."""
    return prepare_data(load_data_section(path, overrides), force=force)
