"""Preference losses (DPO and relatives) on summed completion log-probs.

Shape legend: B pairs, S sequence, V vocab. A DPO batch holds 2B rows, ``[chosen; rejected]``.

Everything here is a small pure function of tensors, tested against hand-worked numbers and
against TRL's ``DPOTrainer`` on the same log-probs (tests/pipeline/test_dpo_loss.py). The log-probs
come from the model's own per-token CE (``pipeline.training.tasks.policy_log_probs``).

Notation: for a pair, ``logratio_c = log pi(y_c|x) - log ref(y_c|x)`` (summed over completion
tokens), the same for the rejected completion, and ``delta = logratio_c - logratio_r``.

- ``sigmoid`` (DPO, https://arxiv.org/abs/2305.18290): ``-log sigmoid(beta * delta)``. With
  ``label_smoothing`` eps > 0 it is conservative DPO (cDPO, https://ericmitchell.ai/cdpo.pdf): the
  labels are assumed flipped with probability eps, ``-(1-eps) log s(beta d) - eps log s(-beta d)``.
- ``robust`` (rDPO, https://arxiv.org/abs/2403.00409): the unbiased version of the same noisy-label
  loss, ``((1-eps) (-log s(beta d)) - eps (-log s(-beta d))) / (1 - 2 eps)``.
- ``hinge`` (SLiC, https://arxiv.org/abs/2305.10425): ``relu(1 - beta * delta)``.
- ``ipo`` (https://arxiv.org/abs/2310.12036, eq. 17): ``(delta_avg - 1 / (2 beta))^2`` where the
  log-ratios are averaged per completion token before the difference, as TRL does and as the IPO
  authors confirmed their results were obtained (without it the square grows with length).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

LossType = Literal["sigmoid", "robust", "hinge", "ipo"]
LOSS_TYPES: tuple[str, ...] = ("sigmoid", "robust", "hinge", "ipo")
# Losses whose formula has a label-noise rate; the others have no place for one.
SMOOTHED_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "robust")

# ----------------------------------------------------------------------------------------------
# Pairs
# ----------------------------------------------------------------------------------------------


def split_pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[2B, ...] in ``[chosen; rejected]`` order -> (chosen [B, ...], rejected [B, ...])."""
    if values.shape[0] % 2:
        raise ValueError(
            f"a DPO batch has an even number of rows ([chosen; rejected]), got {values.shape[0]}"
        )
    chosen, rejected = values.chunk(2, dim=0)
    return chosen, rejected


# ----------------------------------------------------------------------------------------------
# Per-pair losses: functions of the log-ratio difference
# ----------------------------------------------------------------------------------------------


def sigmoid_loss(delta: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO, or conservative DPO with ``label_smoothing`` > 0. delta [B] -> [B]."""
    logits = beta * delta
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def robust_loss(delta: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """Robust DPO: unbiased under labels flipped with probability ``label_smoothing`` (< 0.5)."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs label_smoothing in [0, 0.5), got {label_smoothing}")
    logits = beta * delta
    clean = -(1.0 - label_smoothing) * F.logsigmoid(logits)
    flipped = -label_smoothing * F.logsigmoid(-logits)
    return (clean - flipped) / (1.0 - 2.0 * label_smoothing)


def hinge_loss(delta: torch.Tensor, beta: float) -> torch.Tensor:
    """SLiC hinge on the scaled log-ratio difference. delta [B] -> [B]."""
    return torch.relu(1.0 - beta * delta)


def ipo_loss(delta_per_token: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO: squared distance of the per-token log-ratio difference from 1/(2 beta). [B] -> [B]."""
    return (delta_per_token - 1.0 / (2.0 * beta)) ** 2


# ----------------------------------------------------------------------------------------------
# The DPO objective on a batch of pairs
# ----------------------------------------------------------------------------------------------


@dataclass
class PreferenceLoss:
    """Per-pair loss terms and the implicit rewards ``beta * logratio`` (no gradient), each [B]."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: LossType = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> PreferenceLoss:
    """Per-pair preference loss from summed completion log-probs (all [B]).

    ``chosen_lengths``/``rejected_lengths`` (completion token counts [B]) are needed by ``ipo``
    only. ``label_smoothing`` is the assumed label-flip rate of ``sigmoid`` (cDPO) and ``robust``.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if label_smoothing and loss_type not in SMOOTHED_LOSS_TYPES:
        raise ValueError(
            f"label_smoothing applies to {'/'.join(SMOOTHED_LOSS_TYPES)} only, not {loss_type!r}"
        )
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    if loss_type == "sigmoid":
        losses = sigmoid_loss(chosen_logratios - rejected_logratios, beta, label_smoothing)
    elif loss_type == "robust":
        losses = robust_loss(chosen_logratios - rejected_logratios, beta, label_smoothing)
    elif loss_type == "hinge":
        losses = hinge_loss(chosen_logratios - rejected_logratios, beta)
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(
                "the ipo loss needs chosen_lengths and rejected_lengths (completion token counts)"
            )
        chosen_per_token = chosen_logratios / chosen_lengths.clamp_min(1)
        rejected_per_token = rejected_logratios / rejected_lengths.clamp_min(1)
        losses = ipo_loss(chosen_per_token - rejected_per_token, beta)
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    return PreferenceLoss(
        losses=losses,
        chosen_rewards=beta * chosen_logratios.detach(),
        rejected_rewards=beta * rejected_logratios.detach(),
    )


def chosen_nll(chosen_token_logps_sum: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """Token-mean negative log-likelihood of the chosen completions over the batch.

    The RPO / "DPO + SFT" regulariser (https://arxiv.org/abs/2404.19733): keeps the chosen
    answers likely while the margin grows. Sums [B], counts [B] -> scalar.
    """
    return -chosen_token_logps_sum.sum() / chosen_lengths.sum().clamp_min(1)


def reward_sums(
    out: PreferenceLoss, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The DPO diagnostics (TRL's names) summed over the pairs, detached.

    Sums, not means, so that a trainer can divide by the pairs of the whole global batch.
    """
    margins = out.chosen_rewards - out.rejected_rewards
    return {
        "rewards/chosen": out.chosen_rewards.sum(),
        "rewards/rejected": out.rejected_rewards.sum(),
        "rewards/margins": margins.sum(),
        "rewards/accuracies": (margins > 0).float().sum(),
        "logps/chosen": chosen_logps.detach().sum(),
        "logps/rejected": rejected_logps.detach().sum(),
    }
