"""The README's Mixtral-8x7B memory table: `pipeline.plan` for each documented configuration.

    python bench/plan_readme.py            # markdown table; each row is `make plan` of that line

Every row is the plan of a shipped recipe under a shipped accelerate config (overrides as in the
README's commands), for the model's real architecture (`--model-preset mixtral-8x7b`: the
checkpoint is not on this machine). Peak per GPU includes the assumed CUDA context
(pipeline/plan/lines.py `CUDA_RESERVE_GB`); host is per node. Nothing here is measured.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EP8 = ["parallel.zero_stage=2", "parallel.expert_parallel_size=8"]
ZERO3 = ["parallel.zero_stage=3", "parallel.expert_parallel_size=1", "model.logits_chunk_size=null"]
# sft_full.yaml's header alternative: ZeRO-2 + EP 8 keeps the weights on the GPUs, chunked LM loss.
FULL_EP8 = [*EP8, "parallel.offload_params=false", "model.logits_chunk_size=2048"]
ONE_GPU = ["parallel.zero_stage=null", "parallel.expert_parallel_size=1"]

# (what, recipe, accelerate config or None, overrides)
ROWS = [
    ("LoRA SFT, ZeRO-2 + EP 8", "sft_lora", "zero2_ep8", []),
    ("LoRA SFT, ZeRO-3", "sft_lora", "zero3", ZERO3),
    ("LoRA SFT, 1 GPU", "sft_lora", "single", ONE_GPU),
    ("QLoRA SFT (4-bit NF4 base), 1 GPU", "sft_qlora", "single", []),
    ("QLoRA SFT (4-bit NF4 base), ZeRO-2 + EP 2, 2 GPUs (fits 2 x 48 GB)", "sft_qlora", "zero2_ep2_2gpu",
     ["parallel.zero_stage=2", "parallel.expert_parallel_size=2"]),
    ("full SFT, ZeRO-2 + EP 8 + optimizer offload, 1 node", "sft_full", "zero2_ep8_offload", FULL_EP8),
    ("full SFT, ZeRO-2 + EP 8 + optimizer offload, 2 nodes", "sft_full", "multinode_zero2_ep8_offload", FULL_EP8),
    ("full SFT, ZeRO-3 + offload (params, optimizer)", "sft_full", "zero3_offload", []),
    ("full SFT, ZeRO-2 + EP 8, no offload", "sft_full", "zero2_ep8", [*FULL_EP8, "parallel.offload_optimizer=false"]),
    ("LoRA DPO (policy; reference = adapters off, precomputed), ZeRO-2 + EP 8", "dpo_lora", "zero2_ep8", []),
    ("eval, passkey at 32k, EP 8", "eval", "ddp", []),
]


def main() -> int:
    from model import MixtralConfig
    from pipeline.plan import GB, plan
    from pipeline.preflight import LaunchSpec, load_stage_recipe

    config = MixtralConfig.preset("mixtral-8x7b")
    print("| configuration | launch | peak per GPU | 8 x 80 GB | 8 x 141 GB | 1 x 80 GB | host per node |")
    print("|---|---|---:|:-:|:-:|:-:|---:|")
    for what, name, launch_name, overrides in ROWS:
        recipe = load_stage_recipe(ROOT / f"recipes/mixtral-8x7b/{name}.yaml", overrides)
        launch = (LaunchSpec.single() if launch_name is None
                  else LaunchSpec.from_config_file(ROOT / f"recipes/accelerate/{launch_name}.yaml"))
        result = plan(recipe, launch, model_config=config, config_source="preset mixtral-8x7b")
        peak = result.peak_gpu / GB
        gpus = launch.num_processes // launch.num_machines
        verdicts = ["-" if gpus > count else "yes" if peak <= memory else "no"
                    for count, memory in ((8, 80), (8, 141), (1, 80))]
        print(f"| {what} | {launch_name or 'python -m'} | {peak:,.1f} GB | {' | '.join(verdicts)} | "
              f"{result.peak_host / GB:,.0f} GB |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
