"""Losses as small pure functions: language-model cross-entropy, router load balancing, router z-loss.

Shape legend: T tokens, E experts, K top-k, V vocab, H hidden.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from model.labels import IGNORE_INDEX


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """HF convention: position s predicts labels[s + 1]. labels [B, S] -> [B, S], last column ignored."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(fn: str, reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")


def masked_ce(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over tokens whose target is not -100, computed in fp32.

    logits [T, V], targets [T] (already shifted). "mean" divides by the number of labelled tokens
    (0 when there are none, instead of NaN); "sum" leaves that to the caller; "none" gives the
    per-token losses [T], 0 where the target is ignored.
    """
    _check_reduction("masked_ce", reduction)
    if reduction == "none":
        return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="none")
    total = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    if reduction == "sum":
        return total
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


def _chunk_ce(hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """hidden [C, H], lm_head_weight [V, H], targets [C] (all labelled) -> per-token CE [C], fp32."""
    return F.cross_entropy((hidden @ lm_head_weight.T).float(), targets, reduction="none")


class _FrozenHeadCE(torch.autograd.Function):
    """Per-token CE through a frozen LM head, with d(CE_t)/d(hidden_t) computed in the forward pass.

    For CE_t = logsumexp(z_t) - z_t[y_t] with z_t = W h_t, d(CE_t)/d(h_t) = (softmax(z_t) - onehot(y_t)) W
    depends on token t only, so it is computed chunk by chunk while the chunk's logits exist and the
    backward scales it by each token's incoming gradient. Against checkpointed chunks this skips
    the logits' recomputation (one [C, H] x [H, V] GEMM per chunk) and their second softmax; what
    is kept is one [T, H] gradient. Only for a frozen head: the head's own gradient would need the
    incoming gradients first.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int):
        losses = hidden.new_empty(targets.shape, dtype=torch.float32)  # [T]
        grad_hidden = torch.empty_like(hidden)  # [T, H]
        for start in range(0, targets.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            probs = (hidden[rows] @ weight.T).float().log_softmax(-1)  # [C, V] log-probabilities
            target = targets[rows, None]  # [C, 1]
            losses[rows] = -probs.gather(1, target).squeeze(1)
            probs.exp_().scatter_add_(1, target, probs.new_full(target.shape, -1.0))  # softmax - onehot
            torch.mm(probs.to(hidden.dtype), weight, out=grad_hidden[rows])
        ctx.save_for_backward(grad_hidden)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_losses[:, None].to(grad_hidden.dtype), None, None, None


def chunked_lm_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int,
    reduction: str = "mean",
) -> torch.Tensor:
    """The LM loss without ever holding [T, V] logits: hidden [T, H], lm_head_weight [V, H], targets [T].

    Only labelled tokens go through the LM head, `chunk_size` of them at a time. With a frozen head
    (LoRA) the gradient w.r.t. hidden is computed in the same pass (`_FrozenHeadCE`); with a
    trained head each chunk is checkpointed, so backward recomputes its logits one chunk at a time.
    "none" returns per-token losses [T] (0 where the target is ignored), as `masked_ce` does.
    """
    _check_reduction("chunked_lm_loss", reduction)
    if chunk_size <= 0:
        raise ValueError(f"chunked_lm_loss: logits_chunk_size must be > 0, got {chunk_size}")
    # Dropping unlabelled tokens first makes prompt-heavy SFT and DPO batches cheaper. Their count
    # sets the chunks: the loss's one host sync per step (index_select, unlike a boolean mask, has
    # none in backward).
    labelled = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # [T_lab]
    kept_hidden, kept_targets = hidden.index_select(0, labelled), targets.index_select(0, labelled)
    # Equal chunks (1196 tokens at chunk_size 1024: 2 x 598, not 1024 + 172; small GEMMs run slower).
    n_chunks = -(-kept_targets.shape[0] // chunk_size)
    chunk_size = -(-kept_targets.shape[0] // max(n_chunks, 1))
    if kept_targets.shape[0] == 0:
        per_label = hidden.new_zeros(0, dtype=torch.float32)  # [0]
    elif torch.is_grad_enabled() and kept_hidden.requires_grad and not lm_head_weight.requires_grad:
        per_label = _FrozenHeadCE.apply(kept_hidden, lm_head_weight, kept_targets, chunk_size)  # [T_lab]
    else:
        per_label = torch.cat([
            checkpoint(
                _chunk_ce, kept_hidden[start : start + chunk_size], lm_head_weight,
                kept_targets[start : start + chunk_size], use_reentrant=False,
            )
            for start in range(0, kept_targets.shape[0], chunk_size)
        ])  # [T_lab]
    if reduction == "none":
        per_token = hidden.new_zeros(targets.shape, dtype=torch.float32)  # [T]
        return per_token.index_copy(0, labelled, per_label)
    total = per_label.sum()
    if reduction == "sum":
        return total
    return total / max(kept_targets.shape[0], 1)


def load_balancing_loss(
    router_logits: Sequence[torch.Tensor],
    top_k: int,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch-Transformer load-balancing loss as transformers' `load_balancing_loss_func` defines it.

    router_logits: one [T, E] tensor per layer; token_mask [T] (True/1 = real token) excludes padding.
    With f_le the fraction of top-k slots layer l sends to expert e (per token, so sum_e f_le = K)
    and P_le the mean router probability, the loss is E * sum_e mean_l(f_le) * mean_l(P_le):
    counts and probabilities are averaged over layers before the product, exactly as HF does.
    """
    if len(router_logits) == 0:
        raise ValueError("load_balancing_loss: router_logits is empty")
    num_experts = router_logits[0].shape[-1]
    device = router_logits[0].device
    weight = (
        None if token_mask is None else token_mask.reshape(-1).float()
    )  # [T]
    slot_fraction = torch.zeros(num_experts, device=device)  # [E]
    prob_sum = torch.zeros(num_experts, device=device)  # [E]
    rows = 0.0
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
        chosen = torch.topk(probs, top_k, dim=-1).indices  # [T, K]
        slot_weight = (
            torch.ones(chosen.shape, device=device)
            if weight is None
            else weight[:, None].expand(chosen.shape)
        )
        slot_fraction = slot_fraction + torch.zeros(num_experts, device=device).scatter_add(
            0, chosen.reshape(-1), slot_weight.reshape(-1)
        )
        prob_sum = prob_sum + (probs.sum(0) if weight is None else (probs * weight[:, None]).sum(0))
        rows = rows + (probs.shape[0] if weight is None else weight.sum())
    return num_experts * torch.sum((slot_fraction / rows) * (prob_sum / rows))


def router_z_loss(
    router_logits: Sequence[torch.Tensor], token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """ST-MoE router z-loss: mean over real tokens (and layers) of logsumexp(logits)^2.

    router_logits: one [T, E] tensor per layer; token_mask [T] excludes padding.
    """
    if len(router_logits) == 0:
        raise ValueError("router_z_loss: router_logits is empty")
    per_layer = []
    for logits in router_logits:
        z = torch.logsumexp(logits.float(), dim=-1) ** 2  # [T]
        if token_mask is None:
            per_layer.append(z.mean())
        else:
            mask = token_mask.reshape(-1).to(z.dtype)
            per_layer.append((z * mask).sum() / mask.sum().clamp(min=1))
    return torch.stack(per_layer).mean()
