"""pipeline/preflight.py: the launch as the plan reads it equals the launch as the stage sees it, every
startup check fails where the real launch fails, and every launch command in a shipped recipe's
header passes all of them (built on the meta device, no weights, no launch)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from recipe_headers import PAIRINGS, ROOT, SHIPPED, pairing_params, preset_of

from model import MixtralConfig
from pipeline.distributed.parallel import ParallelError
from pipeline.preflight import CHECKS, LaunchSpec, PreflightError, load_stage_recipe, preflight

LAUNCH_CONFIGS = sorted((ROOT / "recipes/accelerate").glob("*.yaml"))


def _accelerate_env(config: Path) -> dict[str, str]:
    """The environment `accelerate launch --config_file config` gives each process (accelerate's own
    code prepares it; torchrun then adds WORLD_SIZE and LOCAL_WORLD_SIZE)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "-m", "pipeline.sft", "r.yaml"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    env: dict[str, str] = {}
    if args.use_deepspeed:
        # As accelerate's launch_command does before its DeepSpeed launcher.
        fields = list(defaults.deepspeed_config.keys()) if defaults else []
        args.deepspeed_fields_from_accelerate_config = ",".join(fields + ["mixed_precision"] * mp_from_config)
        _, env = prepare_deepspeed_cmd_env(args)
    elif args.multi_gpu:
        env = prepare_multi_gpu_env(args)
    env = {k: v for k, v in env.items() if k.startswith("ACCELERATE_")}
    env.setdefault("ACCELERATE_MIXED_PRECISION", str(args.mixed_precision))
    env["WORLD_SIZE"] = str(args.num_processes)
    env["LOCAL_WORLD_SIZE"] = str(args.num_processes // args.num_machines)
    return env


@pytest.mark.parametrize("config", LAUNCH_CONFIGS, ids=lambda p: p.stem)
def test_launch_from_config_file_equals_launch_from_env(config):
    planned = LaunchSpec.from_config_file(config)
    launched = LaunchSpec.from_env(_accelerate_env(config))
    # accelerate's DeepSpeed launcher does not pass use_cpu on; nothing checks it for DeepSpeed.
    ignore = dict(source="", use_cpu=False)
    if planned.distributed_type == "NO":
        ignore["mixed_precision"] = "no"  # a one-process launch runs the script directly
    assert dataclasses.replace(launched, **ignore) == dataclasses.replace(planned, **ignore)


def test_launch_from_deepspeed_json(tmp_path):
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}')
    (tmp_path / "acc.yaml").write_text(
        "distributed_type: DEEPSPEED\nnum_processes: 16\nnum_machines: 2\n"
        "deepspeed_config:\n  deepspeed_config_file: ds.json\n"
    )
    launch = LaunchSpec.from_config_file(tmp_path / "acc.yaml")
    assert (launch.zero_stage, launch.offload_optimizer_device, launch.offload_param_device) == (3, "cpu", "none")
    assert launch.processes_per_machine == 8
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(tmp_path / "ds.json"),
           "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}
    assert LaunchSpec.from_env(env).zero_stage == 3


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("distributed_type: FSDP\nnum_processes: 8\n", "distributed_type FSDP is not supported"),
        ("distributed_type: MULTI_CPU\nnum_processes: 2\n", "MULTI_CPU starts 2 processes only through mpirun"),
        ("distributed_type: MULTI_GPU\nnum_processes: 0\n", "num_processes must be a positive integer"),
        ("distributed_type: MULTI_GPU\nnum_processes: 9\nnum_machines: 2\n", "not a multiple of num_machines=2"),
    ],
)
def test_bad_launch_configs_are_refused(tmp_path, yaml_text, message):
    path = tmp_path / "acc.yaml"
    path.write_text(yaml_text)
    recipe = load_stage_recipe(ROOT / "recipes/tiny/sft.yaml")
    with pytest.raises(PreflightError, match=message):
        preflight(recipe, LaunchSpec.from_config_file(path))


TINY = MixtralConfig.preset("tiny")


@pytest.mark.parametrize(
    "stage, recipe, config, overrides, error, message",
    [
        ("sft", "tiny/sft.yaml", "zero3.yaml", ["parallel.zero_stage=3"], PreflightError,
         "logits_chunk_size=1024 does not work with parallel.zero_stage=3"),
        ("dpo", "tiny/dpo.yaml", "zero3.yaml", ["parallel.zero_stage=3", "model.logits_chunk_size=null",
                                                "model.compile=true"], PreflightError,
         "model.compile=true does not work with parallel.zero_stage=3"),
        ("sft", "tiny/sft.yaml", "zero2.yaml", [], ParallelError,
         r"launches DeepSpeed with parallel.zero_stage=2 but the recipe says otherwise"),
        ("sft", "tiny/sft.yaml", "zero3_offload.yaml", ["parallel.zero_stage=3", "model.logits_chunk_size=null"],
         ParallelError, "parallel.offload_optimizer=True, parallel.offload_params=True"),
        ("sft", "tiny/sft.yaml", "ddp.yaml", ["parallel.zero_stage=2"], ParallelError,
         "does not use DeepSpeed"),
        ("sft", "tiny/sft.yaml", "zero2.yaml", ["parallel.zero_stage=2", "parallel.expert_parallel_size=16"],
         ParallelError, r"must divide the number of experts \(8\)"),
        ("sft", "tiny/sft.yaml", "zero2.yaml", ["parallel.zero_stage=2", "lora.enabled=true",
                                                "lora.target_modules=[q_proj,w9]"], ValueError, "w9"),
        ("dpo", "tiny/dpo.yaml", "zero2_ep8.yaml", ["parallel.zero_stage=2", "parallel.expert_parallel_size=8",
                                                    "lora.enabled=false"], PreflightError,
         "set dpo.precompute_ref_log_probs=true"),
        ("eval", "tiny/eval.yaml", "single.yaml", ["routing.layers=[0,5]"], PreflightError,
         r"routing.layers: \[5\] out of range for a 2-layer model"),
    ],
)
def test_checks_refuse_what_the_launch_refuses(stage, recipe, config, overrides, error, message):
    launch = LaunchSpec.from_config_file(ROOT / "recipes/accelerate" / config)
    with pytest.raises(error, match=message):
        preflight(load_stage_recipe(ROOT / "recipes" / recipe, overrides, stage=stage), launch, model_config=TINY)


def test_data_check_runs_when_the_data_is_prepared(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"input_ids": [[1, 2]] * 5}).save_to_disk(str(tmp_path / "train"))
    recipe = load_stage_recipe(ROOT / "recipes/tiny/sft.yaml", [f"data.output_dir={tmp_path}"])
    assert preflight(recipe, LaunchSpec.single()).skipped == []
    with pytest.raises(ValueError, match="the training set has 5 rows, fewer than one global batch"):
        preflight(recipe, LaunchSpec.from_config_file(ROOT / "recipes/accelerate/cpu_ddp.yaml"))
    missing = load_stage_recipe(ROOT / "recipes/tiny/sft.yaml", [f"data.output_dir={tmp_path / 'none'}"])
    assert "is not prepared yet" in preflight(missing, LaunchSpec.single()).skipped[0]


def test_eval_models_are_checked_when_they_are_on_this_machine(tmp_path):
    (tmp_path / "run").mkdir()  # a run still in progress: no manifest.json yet
    recipe = load_stage_recipe(ROOT / "recipes/tiny/eval.yaml",
                               [f"models={{base: {tmp_path / 'run'}}}", "missing_models=error"])
    with pytest.raises(FileNotFoundError, match="holds no finished run"):
        preflight(recipe, LaunchSpec.single(), model_config=TINY)
    absent = load_stage_recipe(ROOT / "recipes/tiny/eval.yaml", [f"models={{base: {tmp_path / 'none'}}}"])
    assert "eval models not on this machine: models.base" in preflight(absent, LaunchSpec.single(),
                                                                        model_config=TINY).skipped[0]


def test_the_stage_runs_the_preflight_before_anything_else(tmp_path, monkeypatch):
    """The real launch refuses with the same message, from its environment, before writing anything."""
    from pipeline import sft

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    recipe = load_stage_recipe(ROOT / "recipes/tiny/sft.yaml", [f"output_dir={tmp_path / 'out'}", "parallel.zero_stage=3"])
    with pytest.raises(PreflightError, match="does not work with parallel.zero_stage=3"):
        sft.run(recipe)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# Every launch command in the shipped recipes' headers
# ------------------------------------------------------------------------------------------------


def test_every_shipped_stage_recipe_has_a_launch_command_in_its_header():
    stages = {path.name: {stage for p, stage, _, _ in PAIRINGS if p == path} for path in SHIPPED}
    assert {name: s for name, s in stages.items() if name != "export.yaml" and not s} == {}
    assert len(PAIRINGS) >= 8


@pytest.mark.parametrize("pairing", pairing_params())
def test_every_header_launch_passes_every_startup_check(pairing):
    path, stage, config, overrides = pairing
    launch = LaunchSpec.from_config_file(ROOT / config) if config else LaunchSpec.single()
    recipe = load_stage_recipe(path, overrides, stage=stage)
    result = preflight(recipe, launch, model_config=MixtralConfig.preset(preset_of(path)))
    assert result.stage == stage


def test_checks_are_listed_once():
    assert len(set(CHECKS)) == len(CHECKS)
