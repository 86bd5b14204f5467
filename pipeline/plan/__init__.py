"""Before a GPU-hour is spent: does a (stage recipe, launch) pairing start, and does it fit?

    python -m pipeline.plan RECIPE --config_file ACCELERATE_YAML [--gpu-memory-gb 80]
        [--host-memory-gb N] [--model-preset NAME] [--device cuda|cpu] [key=value ...]
    make plan RECIPE=recipes/mixtral-8x7b/sft_lora.yaml CONFIG=recipes/accelerate/zero2_ep8.yaml

Without --config_file the launch is a plain `python -m pipeline.STAGE` (one process). The model is
read as the launch reads it (the recipe's checkpoint config.json, SFT manifest or preset);
`--model-preset mixtral-8x7b` plans for a checkpoint that is not on this machine.

1. Every startup check of the real launch runs first (`pipeline.preflight`, on the meta device): an
   invalid pairing prints the reason and exits 2.
2. The model is built on the meta device as rank 0 builds it (its experts under expert parallelism,
   LoRA, router freezing); the parameter counts come from it.
3. Memory, per GPU and per node, at the moments a step peaks (forward, the loss's logits chunks, the
   backward of the last layer, the optimizer step) and in the phases around training (loading,
   DeepSpeed's set-up, the final consolidation). Sizes follow the code that runs: DeepSpeed's own
   ZeRO configuration (its defaults and ours, from `parallel.deepspeed_config`) and its buffers as
   `runtime/zero/stage_1_and_2.py` and `stage3.py` allocate them, and the tensors each layer saves
   for backward (`model/`, listed in `activations.layer_saved`).

The last line is `plan: fits|does not fit: peak X GB per GPU of Y GB; host Z GB per node`; exit 0
fits, 1 does not fit, 2 the recipe and launch cannot start together. GB = 10^9 bytes.

What it assumes (said again in its output): the worst case of the recipe, not of a dataset: every row
is data.max_seq_len tokens and every token but a row's first carries a label; "balanced" routing
gives each expert-parallel rank the rows it sends, "worst case" sends it every token's slots that
its experts can take. It does not model the CUDA caching allocator's fragmentation, and the CUDA
context / NCCL / cuBLAS workspace is an assumed `CUDA_RESERVE_GB`.

    from pipeline.plan import plan
    result = plan(recipe, launch, model_config=MixtralConfig.preset("mixtral-8x7b"))
    print(result.render()); result.fits

The package, one concern a module:

    setup          what the launch runs (precision, device, counts, ZeRO config) and the parameter counts
    lines          Line and Moment, the units (GB, dtype bytes, CUDA_RESERVE_GB)
    activations    what a decoder layer and the LM head / loss keep, per micro-batch
    train_step     the moments of a training step (and eval during training), a 4-bit base
    load_and_save  loading, DeepSpeed's set-up and the final consolidation and save
    eval_stage     pipeline.eval's moments
    report         Plan: peaks, verdict and the printed table
    cli            the command line (`python -m pipeline.plan`)
"""

from __future__ import annotations

from pipeline.plan.activations import activations
from pipeline.plan.eval_stage import eval_moments
from pipeline.plan.lines import GB
from pipeline.plan.report import Plan
from pipeline.plan.setup import count_parameters, setup_of
from pipeline.plan.train_step import training_moments
from pipeline.preflight import LaunchSpec, preflight


def plan(recipe, launch: LaunchSpec, *, model_config=None, config_source: str = "", device: str | None = None,
         gpu_memory_gb: float = 80.0, host_memory_gb: float | None = None, source: str = "") -> Plan:
    """Run every startup check (raises on an invalid pairing) and plan rank 0's memory."""
    pairing = preflight(recipe, launch, model_config=model_config, config_source=config_source)
    device = device or ("cpu" if launch.use_cpu else "cuda")
    setup = setup_of(pairing, device)
    counts = count_parameters(pairing, setup)
    if setup.stage == "eval":
        moments = eval_moments(pairing, setup, counts)
        balanced, table = moments, {}
    else:
        moments = training_moments(pairing, setup, counts, routing="worst", checkpointing=setup.checkpointing)
        balanced = training_moments(pairing, setup, counts, routing="balanced", checkpointing=setup.checkpointing)
        table = {}
        for ckpt in (False, True):
            for routing in ("balanced", "worst"):
                a = activations(setup, pairing.config, routing=routing, checkpointing=ckpt)
                table[ckpt, routing] = a.saved + a.backward_peak
    result = Plan(pairing=pairing, setup=setup, counts=counts, moments=moments, balanced=balanced,
                  activation_table=table, gpu_memory=gpu_memory_gb * GB,
                  host_memory=None if host_memory_gb is None else host_memory_gb * GB, source=source)
    result.notes = notes_for(result)
    return result


def notes_for(result: Plan) -> list[str]:
    s = result.setup
    notes = ["worst case of the recipe: every row data.max_seq_len tokens, every token but a row's first "
             "labelled; GB = 10^9 bytes; the CUDA caching allocator's fragmentation is not modelled"]
    if s.stage == "eval":
        notes.append("eval: each process holds the whole model" if s.ep == 1 else
                     f"eval: each process holds the dense weights and 1/{s.ep} of the experts; every process "
                     "runs the passkey and routing prompts, balanced routing assumed")
    return notes
