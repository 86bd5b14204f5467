"""The training stages' recipes (SFT, DPO): one dataclass per YAML section, checked in ``__post_init__``.

The ``data`` section is ``data_prep.config.DataConfig`` (pipeline.prep acts on it); SFT and DPO read
``data.output_dir`` from it, where prep wrote the ``train/`` and ``eval/`` datasets. The two
recipes share every section but ``model`` (DPO starts from an SFT output, ``model.sft_dir``) and
DPO's own ``dpo``.

    raw = load_recipe_dict("recipes/tiny/sft.yaml", ["train.lr=1e-5"])
    recipe = build(SFTRecipe, raw, source="recipes/tiny/sft.yaml")
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from data_prep.config import DataConfig
from pipeline.distributed.parallel import ParallelSection
from pipeline.training.dpo_loss import SMOOTHED_LOSS_TYPES

MODEL_PRESETS = ("tiny", "tiny-odd", "bench-small", "bench-8x7b-2layers", "mixtral-8x7b")
# Keys that change speed or memory, not what is trained: a resumed run may change them.
SPEED_ONLY_KEYS = ("data.num_proc", "data.batch_size", "model.gradient_checkpointing",
                   "model.logits_chunk_size", "dpo.ref_batch_size")


@dataclass
class ModelSection:
    # Where the weights come from: an HF Mixtral checkpoint dir, or a preset with random init.
    checkpoint: str | None = None
    preset: str | None = None
    # Storage dtype of the base weights; LoRA adapters and optimizer state stay fp32.
    dtype: Literal["float32", "bfloat16"] = "float32"
    gradient_checkpointing: bool = False
    # Each decoder layer compiled as a region of its own (torch.compile; Mixtral.compile_blocks).
    compile: bool = False
    # Loss in chunks of this many tokens so [T, V] logits never exist at once (None: plain logits).
    logits_chunk_size: int | None = None
    router_aux_loss_coef: float = 0.02
    router_z_loss_coef: float = 0.0
    # Full fine-tuning: keep the router fixed (LoRA never trains it unless lora.train_router).
    freeze_router: bool = False
    # QLoRA: "nf4" stores the frozen base's attention projections and expert stacks 4-bit
    # (bitsandbytes NF4, double quantization; model/quant.py), quantized tensor by tensor as the
    # checkpoint is read. Needs lora.enabled. null: the base stays in `dtype`.
    quantization: Literal["nf4"] | None = None

    def __post_init__(self):
        if (self.checkpoint is None) == (self.preset is None):
            raise ValueError("set exactly one of model.checkpoint (HF Mixtral dir) or model.preset (random init)")
        if self.preset is not None and self.preset not in MODEL_PRESETS:
            raise ValueError(f"model.preset must be one of {', '.join(MODEL_PRESETS)}, got {self.preset!r}")
        if self.router_aux_loss_coef < 0 or self.router_z_loss_coef < 0:
            raise ValueError("model.router_aux_loss_coef and model.router_z_loss_coef must be >= 0")
        if self.logits_chunk_size is not None and self.logits_chunk_size <= 0:
            raise ValueError("model.logits_chunk_size must be a positive number of tokens or null")


@dataclass
class TrainSection:
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    # The schedule ends at lr * min_lr_ratio.
    min_lr_ratio: float = 0.0
    epochs: int = 1
    # Optimizer steps; null = as many as `epochs` of data give.
    max_steps: int | None = None
    micro_batch_size: int = 1
    grad_accum_steps: int = 1
    max_grad_norm: float | None = 1.0
    # "auto": bf16 where the device supports it, fp32 elsewhere (CPU). "fp32" is the same as "no"
    # (a bare `no` in YAML or an override reads as false).
    mixed_precision: Literal["auto", "no", "fp32", "bf16"] = "auto"
    seed: int = 0
    log_every: int = 1
    eval_every: int | None = None
    eval_max_batches: int | None = None
    save_every: int | None = None
    keep_last: int = 2
    # "auto": continue from the newest complete checkpoint in output_dir if there is one;
    # "never": start fresh; any other value: a checkpoint directory to continue from.
    resume: str = "auto"
    # Start over in an output_dir that holds a finished or started run, whatever `resume` says:
    # deletes what the pipeline wrote there (pipeline/rundir.py), never other files.
    overwrite_output_dir: bool = False

    def __post_init__(self):
        if self.mixed_precision == "fp32":
            self.mixed_precision = "no"
        positive = ("micro_batch_size", "grad_accum_steps", "epochs", "log_every", "keep_last")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_every", "eval_max_batches", "save_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"train.{name} must be >= 1 or null, got {value}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"train.lr must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"train.weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if not all(0.0 <= b < 1.0 for b in self.betas) or len(self.betas) != 2:
            raise ValueError(f"train.betas must be two numbers in [0, 1), got {list(self.betas)}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"train.eps must be a finite number > 0, got {self.eps}")
        if self.warmup_steps < 0:
            raise ValueError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"train.max_grad_norm must be a finite number > 0, or null for no clipping, got "
                             f"{self.max_grad_norm}")


@dataclass
class LoraSection:
    # false: full fine-tuning of every weight (minus the router with model.freeze_router).
    enabled: bool = True
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "experts"])
    # Train a full copy of the router next to the adapters (saved with them).
    train_router: bool = False

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"lora.r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class RunTracking:
    """Where a stage's W&B run goes: the whole `tracking:` of a stage that does not train (eval)."""

    report_to: Literal["wandb", "none"] = "wandb"
    project: str = "mixtral-tune"
    run_name: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class TrackingSection(RunTracking):
    """A training stage's `tracking:`: the run, and what the trainer logs to it."""

    # Per-layer expert load charts (E + 1 series per layer).
    log_expert_load: bool = True
    progress_bar: bool = True


@dataclass
class SFTRecipe:
    model: ModelSection
    data: DataConfig
    output_dir: str
    train: TrainSection = field(default_factory=TrainSection)
    lora: LoraSection = field(default_factory=LoraSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    # Which stage the file is for (a DPO recipe handed to SFT fails here, not half way).
    stage: Literal["sft"] = "sft"

    def __post_init__(self):
        check_training_recipe(self, "sft")


@dataclass
class DPOModelSection:
    # The SFT output directory (its manifest.json says base checkpoint + adapter, or full model).
    sft_dir: str
    # Storage dtype of the base weights; LoRA adapters and optimizer state stay fp32.
    dtype: Literal["float32", "bfloat16"] = "float32"
    gradient_checkpointing: bool = False
    # Each decoder layer compiled as a region of its own (as in SFT).
    compile: bool = False
    # Completion tokens per LM-head chunk: only labelled positions go through lm_head and no
    # [2B, S, V] logits are held; null = one LM-head call on the completion tokens of the batch.
    logits_chunk_size: int | None = 4096
    router_aux_loss_coef: float = 0.02
    router_z_loss_coef: float = 0.0
    # Full fine-tuning: keep the router fixed (LoRA never trains it unless lora.train_router).
    freeze_router: bool = False
    # QLoRA (as in SFT): the SFT model (an SFT adapter merged in fp32) stored 4-bit; needs LoRA.
    # The reference is the 4-bit model with the DPO adapter disabled.
    quantization: Literal["nf4"] | None = None

    def __post_init__(self):
        if self.router_aux_loss_coef < 0 or self.router_z_loss_coef < 0:
            raise ValueError("model.router_aux_loss_coef and model.router_z_loss_coef must be >= 0")
        if self.logits_chunk_size is not None and self.logits_chunk_size <= 0:
            raise ValueError(f"model.logits_chunk_size must be > 0 or null, got {self.logits_chunk_size}")


@dataclass
class DPOSection:
    # Strength of the KL anchor to the reference: small beta lets the policy move further.
    beta: float = 0.1
    loss_type: Literal["sigmoid", "robust", "hinge", "ipo"] = "sigmoid"
    # Assumed rate of flipped preference labels (cDPO with sigmoid, rDPO with robust).
    label_smoothing: float = 0.0
    # Weight of the token-mean NLL of the chosen completions added to the loss (RPO); 0 = off.
    nll_coef: float = 0.0
    # Reference log-probs computed once before training and cached with the dataset.
    precompute_ref_log_probs: bool = True
    # Pairs per forward when precomputing.
    ref_batch_size: int = 8

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"dpo.beta must be > 0, got {self.beta}")
        if self.label_smoothing and self.loss_type not in SMOOTHED_LOSS_TYPES:
            raise ValueError(
                f"dpo.label_smoothing is for loss_type {' or '.join(SMOOTHED_LOSS_TYPES)}; "
                f"{self.loss_type} has no label-noise term: set it to 0"
            )
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.nll_coef < 0:
            raise ValueError(f"dpo.nll_coef must be >= 0, got {self.nll_coef}")
        if self.ref_batch_size < 1:
            raise ValueError(f"dpo.ref_batch_size must be >= 1, got {self.ref_batch_size}")


@dataclass
class DPORecipe:
    model: DPOModelSection
    data: DataConfig
    output_dir: str
    # Names the stage a recipe is for, so an SFT recipe given to DPO fails here.
    stage: Literal["dpo"] = "dpo"
    dpo: DPOSection = field(default_factory=DPOSection)
    train: TrainSection = field(default_factory=TrainSection)
    lora: LoraSection = field(default_factory=LoraSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)

    def __post_init__(self):
        check_training_recipe(self, "dpo")


def quantization_record(model) -> dict | None:
    """A stage manifest's `quantization`: how the base was stored while the adapter trained; export
    merges the adapter into the same dequantized weights (pipeline/adapter_merge.py)."""
    if model.quantization is None:
        return None
    return {"type": model.quantization, "dtype": model.dtype}


def check_training_recipe(recipe, stage: Literal["sft", "dpo"]) -> None:
    """What a training stage's recipe (SFT or DPO) asks of its sections together: data prepared for
    this stage, the router trained one way at most, a 4-bit base only under LoRA."""
    if recipe.data.kind != stage:
        raise ValueError(f"data.kind is {recipe.data.kind!r}; the {stage.upper()} stage needs data.kind: {stage}")
    if recipe.lora.enabled and recipe.model.freeze_router and recipe.lora.train_router:
        raise ValueError("model.freeze_router and lora.train_router contradict each other; pick one")
    check_quantization_recipe(recipe.model, recipe.lora)


def check_quantization_recipe(model, lora: LoraSection) -> None:
    """A 4-bit base is frozen: it trains through LoRA only, and runs eager (model/quant.py)."""
    if model.quantization is None:
        return
    if not lora.enabled:
        raise ValueError(f"model.quantization={model.quantization} stores the base 4-bit, which is frozen: "
                         "set lora.enabled=true (QLoRA), or model.quantization=null for full fine-tuning")
    if model.compile:
        raise ValueError(f"model.compile=true does not work with model.quantization={model.quantization} "
                         "(the 4-bit expert products loop over the experts on host counts); set model.compile=false")
