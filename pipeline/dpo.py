"""Direct preference optimisation of Mixtral on top of the SFT result, on the shared trainer.

    python -m pipeline.dpo recipes/tiny/dpo.yaml [key=value ...]          # CPU demo (make dpo)
    accelerate launch --config_file recipes/accelerate/<config>.yaml \\
        -m pipeline.dpo recipes/mixtral-8x7b/dpo_lora.yaml model.sft_dir=outputs/mixtral-8x7b/sft

Reads the SFT output (``model.sft_dir``, its manifest.json) and the preference rows
``pipeline.prep`` wrote to ``data.output_dir``; writes ``output_dir``:

    adapter_config.json + adapter_model.safetensors   the DPO adapter (PEFT format), or
    config.json + model*.safetensors                  the full DPO model
    recipe.yaml  metrics.jsonl  manifest.json  checkpoints/step-*/  wandb/

Policy and reference. LoRA DPO: the SFT adapter is merged into the base weights at load, then a
fresh DPO adapter is trained on that; with the DPO adapter disabled the model *is* the SFT model,
so the reference costs no second copy. The manifest's ``base.checkpoint`` is the SFT output dir,
whose own manifest names the base and the SFT adapter: export merges base <- SFT adapter <- DPO
adapter, the same weights this stage trained on. Full DPO:
the reference is a frozen copy of the SFT model, or none at all with precomputed log-probs.

Reference log-probs with ``dpo.precompute_ref_log_probs`` are computed once before training and
cached next to the dataset, in ``<data.output_dir>/ref_logps/``, keyed by a hash of the reference
weights and the dataset fingerprints; training then runs no reference forward.
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from model.losses import IGNORE_INDEX, shift_labels
from pipeline.config import build, load_recipe_dict
from pipeline.distributed import sharded_load
from pipeline.distributed.comm import group_device
from pipeline.distributed.sharded_load import merge_adapter_fp32
from pipeline.recipe import DPORecipe, DPOSection, quantization_record
from pipeline.run_record import SFT_DIR_HINT, RunRecord, write_training_record
from pipeline.stage import StageState, TrainingStage, run_training_stage, stage_main
from pipeline.training.dpo_loss import chosen_nll, preference_loss, reward_sums, split_pairs
from pipeline.training.model_setup import build_model
from pipeline.training.trainer import TRAINING_ERRORS, TaskOutput

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
# Mixtral has no pad id; padded positions are masked out everywhere, so any valid id works.
PAD_ID = 0
REF_CACHE_DIR = "ref_logps"


def load_recipe(path: str, overrides: list[str]) -> DPORecipe:
    return build(DPORecipe, load_recipe_dict(path, overrides), source=str(path))


# ----------------------------------------------------------------------------------------------
# Batches: chosen and rejected in one padded forward
# ----------------------------------------------------------------------------------------------


def collate_pairs(rows: list[dict]) -> dict[str, torch.Tensor]:
    """B preference rows -> one right-padded batch of 2B rows, ``[chosen; rejected]``.

    input_ids/labels [2B, S]; document_ids [2B, S] (0 on each sequence, -1 on its padding: the
    model's one padding encoding), which the model attends through per sequence (variable-length kernels, no
    [2B, 1, S, S] mask); with precomputed reference log-probs in the rows also
    ref_chosen_logps/ref_rejected_logps [B].
    """
    seqs = [(r["chosen_input_ids"], r["chosen_labels"]) for r in rows]
    seqs += [(r["rejected_input_ids"], r["rejected_labels"]) for r in rows]
    width = max(len(ids) for ids, _ in seqs)
    batch = {
        "input_ids": torch.full((len(seqs), width), PAD_ID, dtype=torch.long),
        "labels": torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long),
        "document_ids": torch.full((len(seqs), width), -1, dtype=torch.long),
    }
    for i, (ids, labels) in enumerate(seqs):
        batch["input_ids"][i, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        batch["labels"][i, : len(labels)] = torch.as_tensor(labels, dtype=torch.long)
        batch["document_ids"][i, : len(ids)] = 0
    if all(name in rows[0] for name in REF_COLUMNS):
        for name in REF_COLUMNS:
            batch[name] = torch.tensor([r[name] for r in rows], dtype=torch.float32)
    return batch


def policy_log_probs(model: nn.Module, batch: dict[str, torch.Tensor], logits_chunk_size: int | None = None):
    """One forward over ``[chosen; rejected]`` -> (model output, summed completion log-probs [2B], counts [2B]).

    The model's per-token CE (``loss_reduction="none"``) is -log p of each label, 0 off the
    completion, so no [2B, S, V] logits are needed: only completion positions reach the LM head.
    """
    labels = batch["labels"]
    out = model(
        input_ids=batch["input_ids"],
        document_ids=batch["document_ids"],
        labels=labels,
        loss_reduction="none",
        logits_chunk_size=logits_chunk_size if logits_chunk_size is not None else labels.numel(),
    )
    return out, -out.loss.sum(dim=-1), (shift_labels(labels) != IGNORE_INDEX).sum(dim=-1)


class Reference:
    """Reference log-probs computed on the fly: the policy with adapters disabled, or a frozen copy."""

    def __init__(
        self,
        frozen: nn.Module | None,
        unwrap: Callable[[nn.Module], nn.Module] = lambda m: m,
        logits_chunk_size: int | None = None,
    ):
        self.frozen = frozen
        self.unwrap = unwrap
        self.logits_chunk_size = logits_chunk_size

    @torch.no_grad()
    def __call__(self, policy: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.frozen is not None:
            return policy_log_probs(self.frozen, batch, self.logits_chunk_size)[1]
        peft_model = self.unwrap(policy)
        with peft_model.disable_adapter():
            return policy_log_probs(peft_model, batch, self.logits_chunk_size)[1]


class DPOTask:
    """Preference rows -> ``[chosen; rejected]`` batch -> preference loss sum over pairs + router losses."""

    def __init__(
        self,
        cfg: DPOSection,
        *,
        aux_coef: float,
        z_coef: float,
        reference: Reference | None,
        logits_chunk_size: int | None = None,
    ):
        self.cfg = cfg
        self.aux_coef = aux_coef
        self.z_coef = z_coef
        self.reference = reference
        self.logits_chunk_size = logits_chunk_size

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        return collate_pairs(rows)

    def count_units(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0] // 2

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> TaskOutput:
        out, logps, counts = policy_log_probs(model, batch, self.logits_chunk_size)
        if "ref_chosen_logps" in batch:
            ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        elif self.reference is not None:
            ref_chosen, ref_rejected = split_pairs(self.reference(model, batch))
        else:
            raise ValueError("DPO batch without reference log-probs and no reference model to compute them")
        (chosen, rejected), (n_chosen, n_rejected) = split_pairs(logps), split_pairs(counts)
        pref = preference_loss(
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            beta=self.cfg.beta,
            loss_type=self.cfg.loss_type,
            label_smoothing=self.cfg.label_smoothing,
            chosen_lengths=n_chosen,
            rejected_lengths=n_rejected,
        )
        nll = chosen_nll(chosen, n_chosen)
        extra = self.aux_coef * out.aux_loss + self.z_coef * out.z_loss
        if self.cfg.nll_coef:
            extra = extra + self.cfg.nll_coef * nll
        loss_sum = pref.losses.sum()
        return TaskOutput(
            loss_sum=loss_sum,
            extra=extra,
            tokens=int((batch["document_ids"] >= 0).sum()),
            # Per-pair sums: the trainer divides by the pairs of the global batch -> exact means.
            sums={"loss": loss_sum.detach(), **reward_sums(pref, chosen, rejected)},
            means={"aux_loss": out.aux_loss.detach(), "z_loss": out.z_loss.detach(), "nll": nll.detach()},
            expert_counts=out.expert_counts,
        )


# ----------------------------------------------------------------------------------------------
# Precomputed reference log-probs, cached with the dataset
# ----------------------------------------------------------------------------------------------


def from_main_process(value, accelerator):
    """The main process's ``value`` on every rank (what it found on disk, its weights' hash)."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def reference_fingerprint(model: nn.Module, accelerator=None) -> str:
    """sha256 of the reference weights: every base parameter, none of the trainable adapters.

    PEFT's trainable copies (``lora_*``, ``modules_to_save``) are left out: with the adapters
    disabled the model computes with the other tensors only. A ZeRO-3 partitioned parameter holds
    only this rank's slice: each rank hashes its slices and the ranks' hashes are hashed together
    (a collective: every rank calls with the ``accelerator``).
    """
    digest = hashlib.sha256()
    params = dict(model.named_parameters())
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" in name or "modules_to_save" in name:
            continue
        tensor = getattr(params.get(name), "ds_tensor", tensor)
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    if accelerator is None or not any(sharded_load.is_partitioned(p) for p in params.values()):
        return digest.hexdigest()
    from accelerate.utils import gather_object

    return hashlib.sha256("|".join(gather_object([digest.hexdigest()])).encode()).hexdigest()


def ref_cache_path(data_dir: str | os.PathLike, split: str, dataset, model_key: str, autocast: str) -> Path:
    key = hashlib.sha256(f"{model_key}|{dataset._fingerprint}|{len(dataset)}|{autocast}".encode()).hexdigest()
    return Path(data_dir) / REF_CACHE_DIR / f"{split}-{key[:24]}.safetensors"


def rank_block(n: int, rank: int, world: int) -> list[int]:
    """Row indices rank ``rank`` of ``world`` scores: its contiguous ceil(n / world) block, padded
    with its last row (row 0 if it has none) so that every rank has the same count."""
    block = -(-n // world)
    mine = list(range(min(rank * block, n), min((rank + 1) * block, n)))
    return mine + [mine[-1] if mine else 0] * (block - len(mine))


@torch.no_grad()
def compute_reference_log_probs(
    policy: nn.Module, reference: Reference, dataset, batch_size: int, autocast=None, accelerator=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen [N], rejected [N]) reference log-probs of every pair, in dataset order.

    With an ``accelerator`` of P processes, every rank scores a contiguous block of ceil(N / P) pairs
    and the blocks are gathered: P times faster under data parallelism, and under expert parallelism
    (a forward is a collective there) every rank runs the same number of forwards, a short block
    being padded with its own last row (or row 0) whose result is dropped.
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    n = len(dataset)
    padded = rank_block(n, rank, world)
    block = len(padded)
    chosen, rejected = [], []
    was_training = policy.training
    policy.eval()
    device = next(policy.parameters()).device
    for start in range(0, block, batch_size):
        rows = [dataset[i] for i in padded[start : start + batch_size]]
        batch = {k: v.to(device) for k, v in collate_pairs(rows).items()}
        with autocast() if autocast is not None else torch.autocast("cpu", enabled=False):
            c, r = split_pairs(reference(policy, batch))
        chosen.append(c.float())
        rejected.append(r.float())
    policy.train(was_training)
    chosen, rejected = torch.cat(chosen), torch.cat(rejected)  # [block] each
    if world > 1:
        device = group_device()
        chosen, rejected = accelerator.gather(chosen.to(device)), accelerator.gather(rejected.to(device))  # [P * block]
    return chosen[:n].cpu(), rejected[:n].cpu()


def attach_reference_log_probs(
    dataset,
    split: str,
    *,
    policy: nn.Module,
    reference: Reference,
    data_dir: str,
    model_key: str,
    batch_size: int,
    accelerator,
):
    """The dataset with ref_chosen_logps/ref_rejected_logps columns, from the cache or computed now.

    Every rank scores its share of the pairs, the main process writes the cache (atomically) and
    the others read it. The main process's file check decides for all, so no rank starts forwards
    (collectives under expert parallelism) that the others skip.
    """
    from safetensors.torch import load_file, save_file

    path = ref_cache_path(data_dir, split, dataset, model_key, str(accelerator.mixed_precision))
    missing = from_main_process(not path.is_file(), accelerator)
    if missing:
        chosen, rejected = compute_reference_log_probs(
            policy, reference, dataset, batch_size, autocast=accelerator.autocast, accelerator=accelerator
        )
    if missing and accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        save_file({"chosen": chosen, "rejected": rejected}, str(tmp), metadata={"model_key": model_key})
        os.replace(tmp, path)
        accelerator.print(f"dpo: reference log-probs of {len(dataset)} {split} pairs cached in {path}")
    accelerator.wait_for_everyone()
    cached = load_file(str(path))
    if cached["chosen"].shape[0] != len(dataset):
        raise ValueError(
            f"{path}: {cached['chosen'].shape[0]} cached pairs for {len(dataset)} rows; delete it"
        )
    dataset = dataset.add_column("ref_chosen_logps", cached["chosen"].tolist())
    return dataset.add_column("ref_rejected_logps", cached["rejected"].tolist())


# ----------------------------------------------------------------------------------------------
# Policy from the SFT output
# ----------------------------------------------------------------------------------------------


def read_sft_manifest(sft_dir: str | os.PathLike) -> RunRecord:
    return RunRecord.read(sft_dir, missing_hint=SFT_DIR_HINT)


def load_sft_model(
    sft_dir: str | os.PathLike, dtype: torch.dtype | None = None,
    *, load: Callable[[str], nn.Module] | None = None,
) -> nn.Module:
    """The SFT model as one plain Mixtral: base + SFT adapter merged, or the full SFT weights.

    ``load(path)``: how to read a checkpoint instead of whole (``model_setup.build_model`` passes its own:
    EP experts or ZeRO-3 partitions). The SFT adapter is merged in fp32 and then cast to ``dtype``,
    as export merges it, so DPO trains on the weights export writes.
    """
    from model.checkpoint import load_pretrained

    if load is None:
        def load(path, quantize=True):
            return load_pretrained(path, dtype=dtype)

    record = read_sft_manifest(sft_dir)
    if record.kind == "full":
        return load(str(record.model_dir))
    base_dir = str(record.base_checkpoint)
    adapter_dir = str(record.adapter_dir)
    # An adapter trained on a 4-bit base merges into that base dequantized (QLoRA's merge, as
    # export does); one trained on the full-precision base merges into it, and a 4-bit DPO run
    # quantizes the merged model afterwards (model_setup.build_model).
    base = load(base_dir, quantize=record.quantization is not None)
    merged = merge_adapter_fp32(base, adapter_dir)
    if getattr(merged, "quantization", None) is None:
        # get_peft_model froze the base; full DPO trains all of it (build_model freezes it for LoRA).
        merged.requires_grad_(True)
    return merged


def build_policy(recipe: DPORecipe, place=None) -> tuple[nn.Module, nn.Module | None]:
    """(policy, frozen reference or None): SFT model -> the SFT stage's build order (checkpointing,
    router freezing, a fresh LoRA adapter placed independently of EP) -> full or LoRA."""
    sft_dir = recipe.model.sft_dir
    model = build_model(
        recipe,
        Path(recipe.output_dir),
        False,
        place,
        load_base=lambda load: load_sft_model(sft_dir, load=load),
    )
    if recipe.lora.enabled:
        return model, None
    frozen = None
    if not recipe.dpo.precompute_ref_log_probs:
        frozen = copy.deepcopy(model).eval().requires_grad_(False)
    return model, frozen


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------


class DPOStage(TrainingStage):
    """DPO's parts of the shared order (pipeline/stage.py): the policy from the SFT output, its
    reference (adapters disabled, a frozen copy, or log-probs computed once before training)."""

    name = "dpo"
    compare = ("data", "model", "lora", "dpo")
    summary_keys = ("loss", "eval_loss", "eval_rewards/accuracies", "eval_rewards/margins")

    def shared_directories(self) -> list[tuple[str, str]]:
        # Rank 0 writes the reference log-probs cache there and every rank reads it back.
        return [(self.recipe.data.output_dir, "data.output_dir")] if self.recipe.dpo.precompute_ref_log_probs else []

    def build_model(self, out: Path, is_main: bool, place) -> nn.Module:
        model, self.frozen = build_policy(self.recipe, place)
        return model

    def make_task(self, state: StageState) -> DPOTask:
        recipe, accelerator, model, frozen = self.recipe, state.accelerator, state.model, self.frozen
        model.to(accelerator.device)
        if frozen is not None:
            frozen.to(accelerator.device)
        elif not recipe.lora.enabled:
            # Full DPO with precomputed log-probs: before the first update the policy is the reference.
            frozen = model
        chunk = recipe.model.logits_chunk_size
        reference = Reference(frozen, accelerator.unwrap_model, chunk)
        # Reference log-probs once, before any update: the policy still equals the reference here.
        if recipe.dpo.precompute_ref_log_probs:
            # Under EP each rank holds other experts: the main process's hash names the cache for all.
            model_key = from_main_process(reference_fingerprint(model, accelerator), accelerator)
            kw = dict(policy=model, reference=reference, data_dir=recipe.data.output_dir, model_key=model_key,
                      batch_size=recipe.dpo.ref_batch_size, accelerator=accelerator)
            # ZeRO-3: before `prepare` no DeepSpeed hooks gather the partitioned weights; these do.
            with sharded_load.forward_gathers(model):
                state.train = attach_reference_log_probs(state.train, "train", **kw)
                if state.eval_set is not None:
                    state.eval_set = attach_reference_log_probs(state.eval_set, "eval", **kw)
            reference = None
        self.reference_kind = ("precomputed" if reference is None else "adapters disabled" if frozen is None
                               else "frozen copy")
        return DPOTask(recipe.dpo, aux_coef=recipe.model.router_aux_loss_coef,
                       z_coef=recipe.model.router_z_loss_coef, reference=reference, logits_chunk_size=chunk)

    def describe(self, state: StageState) -> str:
        n_eval = len(state.eval_set) if state.eval_set is not None else 0
        return f"{len(state.train)} train pairs, {n_eval} eval pairs; reference: {self.reference_kind}"

    def write_record(self, out: Path, *, files, data, final, steps, model_config) -> None:
        recipe = self.recipe
        write_training_record(
            out, stage="dpo", lora=recipe.lora, quantization=quantization_record(recipe.model),
            # The SFT output dir: its record names the base and the SFT adapter (merged into the
            # weights this stage trained on); export follows it, then merges adapter_dir on top.
            base={"checkpoint": str(Path(recipe.model.sft_dir).resolve()), "config": model_config},
            reference="the SFT model" + (" (this adapter disabled)" if recipe.lora.enabled else ""),
            dpo={"beta": recipe.dpo.beta, "loss_type": recipe.dpo.loss_type,
                 "label_smoothing": recipe.dpo.label_smoothing, "nll_coef": recipe.dpo.nll_coef},
            files=files, data=data, final=final, steps=steps)


def run(recipe: DPORecipe) -> Path:
    """The whole stage (pipeline/stage.py's order); returns the output directory."""
    return run_training_stage(recipe, DPOStage(recipe))


def main(argv: list[str] | None = None) -> int:
    return stage_main(argv, __doc__.split("\n\n")[1], load_recipe, run, errors=TRAINING_ERRORS)


if __name__ == "__main__":
    raise SystemExit(main())
