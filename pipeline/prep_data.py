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


def prepare_recipe_data(path: str | os.PathLike, overrides: Sequence[str] = (), *, force: bool = False) -> dict:
    """Prepare the recipe at ``path``'s data section (the other sections belong to other stages and are
    not read); an unchanged re-run is a no-op unless ``force``. Returns prep's manifest.

    `data.output_dir` must be new, empty or written by prep (pipeline/rundir.py): refused before any
    work, then owned and locked while written.
    """
    raw = load_recipe_dict(path, overrides)
    if "data" not in raw:
        raise RecipeError(f"{path}: no `data:` section; the prep stage needs one (see recipes/tiny/sft.yaml)")
    data = build(DataConfig, raw["data"], source=str(path), prefix="data")
    check_ownable(data.output_dir, "prep", key="data.output_dir")
    return prepare(data, force=force, own_output=functools.partial(owned_output, stage="prep", key="data.output_dir"))
