"""The eval recipe (recipes/*/eval.yaml): the models to compare, the held-out data, the passkey grid,
the routing analysis, tracking and how a launched eval shares the model.

Read by pipeline.eval, and by the startup checks and `make plan` (pipeline/preflight.py), which
import it from here, not from the stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.config import RecipeError
from pipeline.recipe import RunTracking


@dataclass
class DataSection:
    # Held-out rows written by pipeline.prep (input_ids, labels, position_ids, document_ids, document_sources).
    dir: str = "outputs/tiny/data_sft/eval"
    # When `dir` does not exist: run pipeline.prep on this recipe first (null: refuse).
    prep_recipe: str | None = None
    # More prepared splits (e.g. the train split) for the routing analysis only: more domains.
    # Their loss is not reported (it would not be held out).
    routing_dirs: list[str] = field(default_factory=list)
    # Rows per source (the first ones); null = all.
    max_rows_per_source: int | None = 32
    batch_size: int = 4
    # Tokenizer file/dir for passkey prompts and token display; null = Mixtral's (mistral-common v1).
    tokenizer: str | None = None

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.max_rows_per_source is not None and self.max_rows_per_source < 1:
            raise ValueError("data.max_rows_per_source must be >= 1 or null (all rows)")


@dataclass
class PasskeySection:
    enabled: bool = True
    # Prompt lengths in tokens (intro + filler + key line + question) and key depths in [0, 1].
    lengths: list[int] = field(default_factory=lambda: [256, 512, 1024])
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    trials: int = 2
    max_new_tokens: int = 8
    seed: int = 0
    # plain: the paper's completion prompt (base models); inst: [INST] task [/INST] The pass key is
    template: Literal["plain", "inst"] = "plain"

    def __post_init__(self):
        if not self.lengths or not self.depths:
            raise ValueError("passkey.lengths and passkey.depths must not be empty")
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"passkey.depths must lie in [0, 1], got {self.depths}")
        if self.trials < 1 or self.max_new_tokens < 1:
            raise ValueError("passkey.trials and passkey.max_new_tokens must be >= 1")


@dataclass
class RoutingSection:
    # Layers for the bar charts and coloured text; null = first, middle, last (0, 15, 31 for 8x7B).
    layers: list[int] | None = None
    # Held-out documents shown coloured by first-choice expert, per model, and tokens shown of each.
    text_samples: int = 2
    text_tokens: int = 160

    def __post_init__(self):
        if self.text_samples < 0 or self.text_tokens < 1:
            raise ValueError("routing.text_samples must be >= 0 and routing.text_tokens >= 1")


@dataclass
class EvalParallelSection:
    """How a launched eval shares the model (`accelerate launch --config_file recipes/accelerate/ddp.yaml`)."""

    # Process-group backend: "auto" is nccl with CUDA, gloo without.
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    # Experts of each layer split over groups of this many processes (1 = every process holds all).
    expert_parallel_size: int = 1

    # Eval runs no DeepSpeed: what the startup checks and the plan ask of a training `parallel:`.
    zero_stage = None
    offload_optimizer = False
    offload_params = False
    deepspeed = False

    def __post_init__(self):
        if self.expert_parallel_size < 1:
            raise ValueError(f"parallel.expert_parallel_size must be >= 1, got {self.expert_parallel_size}")


@dataclass
class EvalRecipe:
    output_dir: str
    # name -> run dir (SFT/DPO output) or HF Mixtral checkpoint dir, compared in this order.
    models: dict[str, str] = field(default_factory=dict)
    missing_models: Literal["skip", "error"] = "skip"
    # Evaluated (random init, `seed`) when no model directory exists; null = refuse.
    fallback_preset: str | None = "tiny"
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: str = "auto"
    seed: int = 0
    data: DataSection = field(default_factory=DataSection)
    passkey: PasskeySection = field(default_factory=PasskeySection)
    routing: RoutingSection = field(default_factory=RoutingSection)
    tracking: RunTracking = field(default_factory=RunTracking)
    parallel: EvalParallelSection = field(default_factory=EvalParallelSection)

    def __post_init__(self):
        if not self.models and self.fallback_preset is None:
            raise ValueError("give at least one entry in models (name: directory) or a fallback_preset")


def check_eval_launch(launch) -> None:
    """Startup check of a launched eval (`preflight.LaunchSpec`): plain processes, no DeepSpeed. The
    expert-parallel size is checked against the launch and the model's experts by the preflight and
    again, per model, in `parallel.placement`."""
    if launch.deepspeed:
        raise RecipeError("eval runs no DeepSpeed: launch it with recipes/accelerate/ddp.yaml "
                          "(cpu_ddp.yaml on a CPU host), not a zero*.yaml config")
