"""`python -m pipeline.plan RECIPE [--config_file ACCELERATE_YAML] ...` (`make plan`): exit 0 fits,
1 does not fit, 2 the recipe and launch cannot start together."""

from __future__ import annotations

import argparse
import sys

import pipeline.plan as package
from pipeline.plan import plan
from pipeline.preflight import LaunchSpec, PreflightError, load_stage_recipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.plan", description=package.__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="key=value recipe overrides, as the stage takes them")
    parser.add_argument("--config_file", "--config-file", dest="config_file", default=None,
                        help="the accelerate config of the launch (default: one process, python -m)")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0)
    parser.add_argument("--host-memory-gb", type=float, default=None)
    parser.add_argument("--model-preset", default=None,
                        help="plan with this MixtralConfig preset (a checkpoint that is not on this machine)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="default: cpu for an accelerate config with use_cpu, else cuda")
    args = parser.parse_intermixed_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        parser.error(f"arguments {bad} are not key=value")
    try:
        recipe = load_stage_recipe(args.recipe, args.overrides)
        launch = LaunchSpec.from_config_file(args.config_file) if args.config_file else LaunchSpec.single()
        model_config, config_source = None, ""
        if args.model_preset:
            from model import MixtralConfig

            model_config, config_source = MixtralConfig.preset(args.model_preset), f"preset {args.model_preset}"
        result = plan(recipe, launch, model_config=model_config, config_source=config_source, device=args.device,
                      gpu_memory_gb=args.gpu_memory_gb, host_memory_gb=args.host_memory_gb,
                      source=f"{args.recipe} under {args.config_file or 'python -m (one process)'}")
    except FileNotFoundError as err:
        print(f"plan: invalid: {err} (plan for a checkpoint that is not on this machine with "
              "--model-preset NAME, e.g. mixtral-8x7b)", file=sys.stderr)
        return 2
    except (PreflightError, ValueError) as err:
        print(f"plan: invalid: {err}", file=sys.stderr)
        return 2
    print(result.render())
    return 0 if result.fits else 1
