"""Startup checks of a (stage recipe, launch) pairing, run by the real launch and by `pipeline.plan`.

A launch is what `accelerate launch --config_file X` (or a plain `python -m`) starts: how many
processes on how many machines, DeepSpeed or not, which ZeRO stage and offload. The real launch
reads it from the environment accelerate sets (`LaunchSpec.from_env()`); the plan reads the same
facts from the accelerate config YAML (`LaunchSpec.from_config_file(path)`), so both run the same
checks on the same facts:

    launch = LaunchSpec.from_config_file("recipes/accelerate/zero2_ep8.yaml")
    pairing = preflight(recipe, launch, model_config=MixtralConfig.preset("mixtral-8x7b"))
    pairing.meta_model()          # the model as this launch builds it (rank 0's experts), on meta

The checks are the functions in `CHECKS`, run in that order; each takes the `Pairing` and raises
with a message that names the recipe key or launch field to change. Adding a check is one line
there. Checks of inputs an earlier stage writes (the prepared data, the SFT output) run when those
exist and are listed in `Pairing.skipped` otherwise, so a plan can be made before the data is.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import RecipeError, read_yaml_mapping
from pipeline.run_record import RECORD_FILE, RunRecord, hf_checkpoint_behind


class PreflightError(RecipeError):
    """The recipe and the launch cannot start together; the message says what to change."""


# ------------------------------------------------------------------------------------------------
# The launch
# ------------------------------------------------------------------------------------------------

# accelerate's distributed types this pipeline runs on (MULTI_CPU only as one process: accelerate
# starts several only through mpirun; recipes/accelerate/cpu_ddp.yaml says what to use instead).
SUPPORTED_DISTRIBUTED_TYPES = ("NO", "MULTI_GPU", "DEEPSPEED", "MULTI_CPU")


@dataclass(frozen=True)
class LaunchSpec:
    """What a launch starts, from an accelerate config file or from the environment it set."""

    num_processes: int = 1
    num_machines: int = 1
    distributed_type: str = "NO"
    # DeepSpeed: stage None = the launch does not say (the recipe's then holds).
    zero_stage: int | None = None
    offload_optimizer_device: str = "none"
    offload_param_device: str = "none"
    mixed_precision: str = "no"
    use_cpu: bool = False
    # Started by a launcher (accelerate launch, torchrun), which sets up the process group DeepSpeed needs.
    launched: bool = False
    # Where these facts come from (the config file's path, or "the environment"): named in errors.
    source: str = "single process (python -m)"

    @property
    def deepspeed(self) -> bool:
        return self.distributed_type == "DEEPSPEED"

    @property
    def processes_per_machine(self) -> int:
        return max(1, self.num_processes // max(1, self.num_machines))

    @classmethod
    def single(cls) -> LaunchSpec:
        """A plain `python -m pipeline.STAGE` (one process, no DeepSpeed)."""
        return cls()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> LaunchSpec:
        """The launch this process runs under, from what `accelerate launch` / torchrun set."""
        env = os.environ if environ is None else environ
        world = int(env.get("WORLD_SIZE", "1"))
        local = int(env.get("LOCAL_WORLD_SIZE", str(world)))
        deepspeed = env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        spec = dict(
            num_processes=world,
            num_machines=max(1, world // max(1, local)),
            distributed_type="DEEPSPEED" if deepspeed else ("MULTI_GPU" if world > 1 else "NO"),
            zero_stage=int(stage) if stage is not None else None,
            offload_optimizer_device=env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none").lower(),
            offload_param_device=env.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none").lower(),
            mixed_precision=env.get("ACCELERATE_MIXED_PRECISION", "no"),
            use_cpu=env.get("ACCELERATE_USE_CPU", "false").lower() == "true",
            launched="WORLD_SIZE" in env or deepspeed,
            source="the environment accelerate launch set",
        )
        ds_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if deepspeed and ds_file:
            spec.update(_deepspeed_json_fields(Path(ds_file), "ACCELERATE_DEEPSPEED_CONFIG_FILE"))
        return cls(**spec)

    @classmethod
    def from_config_file(cls, path: str | os.PathLike) -> LaunchSpec:
        """An accelerate config YAML (`accelerate launch --config_file PATH`)."""
        path = Path(path)
        raw = read_yaml_mapping(path, "accelerate config", PreflightError)
        kind = str(raw.get("distributed_type", "NO"))
        if kind not in SUPPORTED_DISTRIBUTED_TYPES:
            raise PreflightError(
                f"{path}: distributed_type {kind} is not supported here; use one of "
                f"{', '.join(SUPPORTED_DISTRIBUTED_TYPES)} (recipes/accelerate/ has one of each)"
            )
        spec: dict[str, Any] = dict(
            num_processes=_positive_int(raw, "num_processes", path),
            num_machines=_positive_int(raw, "num_machines", path),
            distributed_type=kind,
            mixed_precision=str(raw.get("mixed_precision", "no")),
            use_cpu=bool(raw.get("use_cpu", False)),
            launched=True,
            source=str(path),
        )
        if kind == "DEEPSPEED":
            ds = raw.get("deepspeed_config") or {}
            if not isinstance(ds, dict):
                raise PreflightError(f"{path}: deepspeed_config must be a mapping")
            if ds.get("deepspeed_config_file"):
                # As accelerate does: the JSON file then holds the ZeRO settings.
                json_path = Path(ds["deepspeed_config_file"])
                if not json_path.is_absolute() and not json_path.is_file():
                    json_path = path.parent / json_path
                spec.update(_deepspeed_json_fields(json_path, f"{path}: deepspeed_config.deepspeed_config_file"))
            else:
                if ds.get("zero_stage") is not None:
                    spec["zero_stage"] = int(ds["zero_stage"])
                spec["offload_optimizer_device"] = str(ds.get("offload_optimizer_device", "none")).lower()
                spec["offload_param_device"] = str(ds.get("offload_param_device", "none")).lower()
        return cls(**spec)


def _positive_int(raw: dict, key: str, path: Path) -> int:
    value = raw.get(key, 1)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PreflightError(f"{path}: {key} must be a positive integer, got {value!r}")
    return value


def _deepspeed_json_fields(path: Path, where: str) -> dict:
    """zero_stage and offload devices from a DeepSpeed JSON config."""
    if not path.is_file():
        raise PreflightError(f"{where}: DeepSpeed config {path} not found")
    try:
        zero = json.loads(path.read_text()).get("zero_optimization", {})
    except json.JSONDecodeError as err:
        raise PreflightError(f"{where}: {path} is not valid JSON ({err})") from err
    stage = zero.get("stage")
    return {
        "zero_stage": int(stage) if isinstance(stage, int) else None,
        "offload_optimizer_device": str((zero.get("offload_optimizer") or {}).get("device", "none")).lower(),
        "offload_param_device": str((zero.get("offload_param") or {}).get("device", "none")).lower(),
    }


# ------------------------------------------------------------------------------------------------
# The pairing and its checks
# ------------------------------------------------------------------------------------------------


@dataclass
class Pairing:
    """A stage recipe under a launch, with what the checks learnt about it."""

    stage: str  # "sft", "dpo" or "eval"
    recipe: Any
    launch: LaunchSpec
    # The model's hyper-parameters (MixtralConfig); None until known (see `model_config`).
    config: Any = None
    # Where `config` came from, for the plan's header.
    config_source: str = ""
    # Input checks that could not run (an input does not exist yet), as readable lines.
    skipped: list[str] = field(default_factory=list)
    _meta: Any = None

    @property
    def section(self):
        """The recipe's `parallel:` section (eval's has no DeepSpeed: `evaluation.recipe.EvalParallelSection`)."""
        from pipeline.distributed.parallel import ParallelSection

        return getattr(self.recipe, "parallel", None) or ParallelSection()

    def placement(self, rank: int = 0):
        from pipeline.distributed.expert_parallel import ExpertPlacement

        ep = self.section.expert_parallel_size
        return ExpertPlacement(num_experts=self.config.num_local_experts, ep_size=ep, ep_rank=rank % ep)

    def meta_model(self):
        """The training model as rank 0 builds it (its experts, LoRA, router freezing), on meta."""
        if self._meta is None:
            self._meta = build_meta_model(self)
        return self._meta


Check = Callable[[Pairing], None]


def check_launch_config(p: Pairing) -> None:
    """A launch accelerate can start with this pipeline."""
    launch = p.launch
    if launch.distributed_type == "MULTI_CPU" and launch.num_processes > 1:
        raise PreflightError(
            f"{launch.source}: distributed_type MULTI_CPU starts {launch.num_processes} processes only through "
            "mpirun (accelerate launch starts one); use distributed_type: MULTI_GPU with use_cpu: true "
            "(recipes/accelerate/cpu_ddp.yaml)"
        )
    if launch.num_processes % launch.num_machines:
        raise PreflightError(
            f"{launch.source}: num_processes={launch.num_processes} is not a multiple of "
            f"num_machines={launch.num_machines}"
        )


def check_parallel_launch(p: Pairing) -> None:
    """The recipe's `parallel:` section and the launch describe the same DeepSpeed setup (eval: none)."""
    if p.stage == "eval":
        from pipeline.evaluation.recipe import check_eval_launch

        check_eval_launch(p.launch)
        return
    from pipeline.distributed.parallel import check_launch

    check_launch(p.section, p.launch)


def check_expert_parallel(p: Pairing) -> None:
    """expert_parallel_size divides the experts and the processes."""
    from pipeline.distributed.parallel import validate

    validate(p.section, num_experts=model_config(p).num_local_experts, world_size=p.launch.num_processes)


def check_zero3_model(p: Pairing) -> None:
    """ZeRO-3 works with neither the chunked LM loss nor compiled layers."""
    if p.stage not in ("sft", "dpo") or p.section.zero_stage != 3:
        return
    chunk = p.recipe.model.logits_chunk_size
    if chunk is not None:
        # Its checkpointed chunks read lm_head.weight outside lm_head's forward; ZeRO-3 has
        # released that partitioned weight by the time backward recomputes them.
        raise PreflightError(
            f"model.logits_chunk_size={chunk} does not work with parallel.zero_stage=3; "
            "set model.logits_chunk_size=null (or use zero_stage 2)"
        )
    if p.recipe.model.compile:
        # ZeRO-3 gathers and releases each module's weights in hooks that would run inside the
        # compiled layers; not supported there.
        raise PreflightError("model.compile=true does not work with parallel.zero_stage=3; "
                             "set model.compile=false (or use zero_stage 2)")


def check_quantization(p: Pairing) -> None:
    """A 4-bit base (model.quantization) is held whole by each rank: not under ZeRO-3; DPO on a
    QLoRA SFT adapter keeps that base 4-bit, in the dtype the adapter trained on."""
    if p.stage not in ("sft", "dpo"):
        return
    quantization = p.recipe.model.quantization
    if quantization is not None and p.section.zero_stage == 3:
        raise PreflightError(
            f"model.quantization={quantization} does not work with parallel.zero_stage=3 (ZeRO-3 partitions "
            "full-precision weights; a 4-bit base is not partitioned): use parallel.zero_stage=2, with "
            "parallel.expert_parallel_size to split the 4-bit experts over the GPUs (recipes/accelerate/"
            "zero2_ep2_2gpu.yaml on 2 GPUs), or one GPU (recipes/mixtral-8x7b/sft_qlora.yaml)")
    if p.stage != "dpo":
        return
    if not RunRecord.exists(p.recipe.model.sft_dir):
        p.skipped.append(f"quantization vs the SFT run: {Path(p.recipe.model.sft_dir) / RECORD_FILE} "
                         "does not exist yet")
        return
    record = RunRecord.read(p.recipe.model.sft_dir)
    manifest, sft = record.path, record.quantization
    if sft is not None and (quantization != sft["type"] or p.recipe.model.dtype != sft["dtype"]):
        raise PreflightError(
            f"{manifest}: the SFT adapter trained on a {sft['type']} base in {sft['dtype']}; set "
            f"model.quantization={sft['type']} and model.dtype={sft['dtype']} for DPO (the adapter merges into "
            "that base dequantized, as export merges it)")


def check_dpo_reference(p: Pairing) -> None:
    """Full DPO with an on-the-fly reference needs a frozen copy, which is never sharded."""
    if p.stage != "dpo":
        return
    recipe = p.recipe
    sharded = recipe.parallel.expert_parallel_size > 1 or recipe.parallel.zero_stage == 3
    if sharded and not recipe.lora.enabled and not recipe.dpo.precompute_ref_log_probs:
        raise PreflightError(
            "full DPO with an on-the-fly reference keeps a frozen copy of the model, which is not "
            "sharded under expert parallelism or ZeRO-3; set dpo.precompute_ref_log_probs=true"
        )


def check_model_build(p: Pairing) -> None:
    """The model builds as the launch builds it: rank 0's experts, LoRA targets, router freezing."""
    if p.stage in ("sft", "dpo"):
        p.meta_model()


def check_data_fits_global_batch(p: Pairing) -> None:
    """The prepared training split holds at least one global batch (when it is prepared)."""
    if p.stage not in ("sft", "dpo"):
        return
    from pipeline.training.trainer import check_global_batch

    split = Path(p.recipe.data.output_dir) / "train"
    if not split.is_dir():
        p.skipped.append(f"global batch vs training rows: {split} is not prepared yet")
        return
    import datasets

    train = p.recipe.train
    check_global_batch(len(datasets.load_from_disk(str(split))), train.micro_batch_size,
                       train.grad_accum_steps, p.launch.num_processes)


def check_eval_layers(p: Pairing) -> None:
    """routing.layers lie inside the model."""
    if p.stage != "eval":
        return
    check_routing_layers(p.recipe.routing.layers or [], model_config(p).num_hidden_layers)


def check_eval_models(p: Pairing) -> None:
    """Every `models:` entry holds a finished run or a checkpoint (`resolve_models`), when the
    directories are on this machine."""
    if p.stage != "eval":
        return
    from pipeline.evaluation.models import resolve_models

    absent = [f"models.{name}: {directory}" for name, directory in p.recipe.models.items()
              if not Path(directory).exists()]
    if absent:
        p.skipped.append(f"eval models not on this machine: {', '.join(absent)}")
        return
    resolve_models(p.recipe, log=lambda *_: None)


def check_routing_layers(layers: list[int], num_layers: int) -> None:
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad:
        raise PreflightError(f"routing.layers: {bad} out of range for a {num_layers}-layer model")


# Every startup check, in order. A new check is a function of the Pairing added here.
CHECKS: tuple[Check, ...] = (
    check_launch_config,
    check_expert_parallel,
    check_parallel_launch,
    check_zero3_model,
    check_quantization,
    check_dpo_reference,
    check_model_build,
    check_data_fits_global_batch,
    check_eval_models,
    check_eval_layers,
)


def preflight(recipe, launch: LaunchSpec, *, model_config=None, config_source: str = "",
              checks: tuple[Check, ...] = CHECKS) -> Pairing:
    """Run every startup check of ``recipe`` (an SFT, DPO or eval recipe) under ``launch``.

    ``model_config``: the model's MixtralConfig when the recipe's checkpoint (or SFT output, or
    eval model) is not on this machine yet; otherwise it is read from there, as the launch reads it.
    Returns the Pairing (its model config, its meta model on demand, the input checks skipped);
    raises PreflightError (or the check's own ParallelError / RecipeError) on the first failure.
    """
    pairing = Pairing(stage=stage_of(recipe), recipe=recipe, launch=launch, config=model_config,
                      config_source=config_source or ("given" if model_config is not None else ""))
    for check in checks:
        check(pairing)
    return pairing


STAGES = ("sft", "dpo", "eval")


def load_stage_recipe(path: str | os.PathLike, overrides=(), stage: str | None = None):
    """A stage recipe from YAML + overrides: its class from ``stage`` or the file's `stage:` key
    (an eval recipe has none: it names `models:`)."""
    from pipeline.config import build, load_recipe_dict

    raw = load_recipe_dict(path, list(overrides))
    stage = stage or raw.get("stage") or ("eval" if "models" in raw else None)
    if stage not in STAGES:
        raise PreflightError(f"{path}: not a stage recipe this plan knows (stage: {stage!r}; want one of {STAGES})")
    if stage == "sft":
        from pipeline.recipe import SFTRecipe as cls
    elif stage == "dpo":
        from pipeline.recipe import DPORecipe as cls
    else:
        from pipeline.evaluation.recipe import EvalRecipe as cls
    return build(cls, raw, source=str(path))


def stage_of(recipe) -> str:
    stage = getattr(recipe, "stage", None)
    if stage in ("sft", "dpo"):
        return stage
    if hasattr(recipe, "models") and hasattr(recipe, "passkey"):
        return "eval"
    raise PreflightError(f"preflight: {type(recipe).__name__} is not an SFT, DPO or eval recipe")


# ------------------------------------------------------------------------------------------------
# The model, as the launch builds it
# ------------------------------------------------------------------------------------------------


def model_config(p: Pairing):
    """The model's MixtralConfig, read as the launch reads it (cached on the pairing)."""
    if p.config is None:
        p.config, p.config_source = read_model_config(p.recipe, p.stage)
    return p.config


def read_model_config(recipe, stage: str):
    """(MixtralConfig, where it came from) for a recipe: its checkpoint's config.json or preset (SFT),
    the SFT output's manifest (DPO), the first model directory there is (eval)."""
    from model import MixtralConfig

    if stage in ("sft", "dpo"):
        from pipeline.training.model_setup import starting_config

        return starting_config(recipe)
    for name, directory in recipe.models.items():
        found = _eval_model_config(Path(directory))
        if found is not None:
            return MixtralConfig.from_hf(found), f"models.{name}: {found}"
    if recipe.fallback_preset is not None:
        return MixtralConfig.preset(recipe.fallback_preset), f"fallback_preset {recipe.fallback_preset}"
    raise FileNotFoundError("eval: none of the model directories exist and fallback_preset is null")


def _eval_model_config(path: Path) -> Path | None:
    """The config.json behind an eval model directory (a run dir's record leads to its base)."""
    config = hf_checkpoint_behind(path) / "config.json"
    return config if config.is_file() else None


def build_meta_model(p: Pairing):
    """The training model as rank 0 of the launch sets it up (`pipeline.training.model_setup.configure_for_training`:
    its experts, LoRA, router freezing) on a base on the meta device: no weight anywhere."""
    import torch

    from model import Mixtral
    from pipeline.distributed.expert_parallel import shard_experts
    from pipeline.training.model_setup import configure_for_training

    place = p.placement(0)
    base = Mixtral(model_config(p), device="meta", dtype=getattr(torch, p.recipe.model.dtype))
    if place.ep_size > 1:
        shard_experts(base, place)
    return configure_for_training(base, p.recipe, place)
