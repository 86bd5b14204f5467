"""The launch commands in the shipped recipes' headers, for the tests that run their startup checks
(tests/pipeline/test_preflight.py) and their plans (test_plan.py)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("sft", "dpo", "eval")
COMMAND = re.compile(r"(?:accelerate launch .*?|python )-m pipeline\.(\w+) ")


def header_commands(path: Path) -> list[tuple[str, str | None, list[str]]]:
    """(stage, accelerate config or None for `python -m`, overrides) of every stage command in the
    recipe's comments that runs this recipe (backslash continuations joined, `...` dropped)."""
    lines = [line.strip()[1:].strip() for line in path.read_text().splitlines() if line.strip().startswith("#")]
    joined, pending = [], ""
    for line in lines:
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    found = []
    for line in joined:
        match = COMMAND.search(line + " ")
        if not match or match.group(1) not in STAGES:
            continue
        words = shlex.split(line[match.start():])
        module = words.index(f"pipeline.{match.group(1)}")
        if Path(words[module + 1]) != path.relative_to(ROOT):
            continue  # another recipe's command
        config = words[words.index("--config_file") + 1] if "--config_file" in words else None
        overrides = [w for w in words[module + 2:] if "=" in w]
        found.append((match.group(1), config, overrides))
    return found


SHIPPED = sorted((ROOT / "recipes/tiny").glob("*.yaml")) + sorted((ROOT / "recipes/mixtral-8x7b").glob("*.yaml"))
PAIRINGS = [(path, *command) for path in SHIPPED for command in header_commands(path)]
def pairing_id(pairing) -> str:
    path, stage, config, overrides = pairing
    return f"{path.parent.name}/{path.stem}:{Path(config).stem if config else 'python'}:{len(overrides)}"


def pairing_params() -> list:
    """PAIRINGS as pytest params, named recipe:config:overrides."""
    return [pytest.param(pairing, id=pairing_id(pairing)) for pairing in PAIRINGS]


def preset_of(path: Path) -> str:
    """The checkpoint / SFT output a header command names is not on this machine: its architecture is."""
    return "tiny" if path.parent.name == "tiny" else "mixtral-8x7b"
