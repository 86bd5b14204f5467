"""The training stages' tasks for the shared trainer (the `Task` protocol of trainer.py): how rows
become a batch, what the loss is summed over, and the forward.

    SFTTask    packed rows -> CE summed over the answer tokens + router losses
    DPOTask    preference pairs -> [chosen; rejected] in one forward -> preference loss summed over
               the pairs + router losses (+ RPO's chosen NLL)
    Reference  DPO reference log-probs on the fly: the policy with its adapters disabled, or a frozen copy
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from model.losses import IGNORE_INDEX, shift_labels
from pipeline.recipe import DPOSection
from pipeline.training.batches import collate_pairs, collate_rows
from pipeline.training.dpo_loss import chosen_nll, preference_loss, reward_sums, split_pairs
from pipeline.training.trainer import TaskOutput


class SFTTask:
    """Packed SFT rows -> padded tensors -> CE sum over answer tokens + router losses."""

    def __init__(self, *, aux_coef: float, z_coef: float, logits_chunk_size: int | None):
        self.aux_coef = aux_coef
        self.z_coef = z_coef
        self.logits_chunk_size = logits_chunk_size

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        return collate_rows(rows)

    def count_units(self, batch: dict[str, torch.Tensor]) -> int:
        # The labels the model's loss scores (it shifts them inside, HF convention).
        return int((shift_labels(batch["labels"]) != IGNORE_INDEX).sum())

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> TaskOutput:
        out = model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            document_ids=batch["document_ids"],
            labels=batch["labels"],
            loss_reduction="sum",
            logits_chunk_size=self.logits_chunk_size,
        )
        return TaskOutput(
            loss_sum=out.loss,
            extra=self.aux_coef * out.aux_loss + self.z_coef * out.z_loss,
            tokens=int((batch["document_ids"] >= 0).sum()),
            sums={"loss": out.loss.detach()},
            means={"aux_loss": out.aux_loss.detach(), "z_loss": out.z_loss.detach()},
            expert_counts=out.expert_counts,
        )


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
