"""Held-out loss and perplexity per source, and the routing statistics, in one pass over the rows.

Numbers go by document, not by row: a packed row's tokens count for their own document's source
(`data.document_sources`). Launched, the batches are dealt out over the processes and the sums
added up (`loss_and_routing`), so the result is the one-process result.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from model.losses import IGNORE_INDEX, masked_ce, shift_labels
from pipeline.evaluation.data import document_sources
from pipeline.evaluation.routing import RoutingStats, document_keys
from pipeline.training.batches import collate_rows

if TYPE_CHECKING:
    from pipeline.evaluation.models import Processes


def position_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token NLL per position and whether it was scored: ([B, S] float, [B, S] bool), the
    model's own CE (`model.losses`).

    ``labels`` [B, S] are unshifted (HF convention): position s scores the prediction of label s + 1
    (`shift_labels`), the last position none. Unscored positions hold 0.
    """
    targets = shift_labels(labels)  # [B, S]
    nll = masked_ce(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), "none")  # [B*S]
    return nll.view(targets.shape), targets != IGNORE_INDEX


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token NLL summed per row and the number of scored tokens per row: ([B], [B])."""
    nll, scored = position_nll(logits, labels)
    return nll.sum(dim=1), scored.sum(dim=1)


def nll_per_document(nll: torch.Tensor, scored: torch.Tensor, document_ids: torch.Tensor,
                     num_documents: int) -> tuple[list[float], list[int]]:
    """One row's NLL sum and scored-token count per document: ([D], [D]) as lists.

    ``nll``/``scored`` [S] from :func:`position_nll`, ``document_ids`` [S] the row's. Every document
    starts with an unscored BOS, so no scored position predicts across a document boundary: a
    scored position and the label it predicts belong to the same document.
    """
    docs = document_ids[scored].long()  # [P]
    if docs.numel() and (int(docs.min()) < 0 or int(docs.max()) >= num_documents):
        raise ValueError(f"scored tokens carry document ids outside 0..{num_documents - 1}")
    sums = torch.zeros(num_documents, dtype=torch.float64).index_add_(0, docs, nll[scored].double())  # [D]
    counts = torch.bincount(docs, minlength=num_documents)  # [D]
    return sums.tolist(), counts.tolist()


@torch.no_grad()
def loss_and_routing(model, rows: list[dict], batch_size: int, device: torch.device,
                     procs: Processes | None = None) -> tuple[dict, RoutingStats]:
    """Held-out loss/perplexity per source and the routing statistics (all rows), in one pass.

    Both go by document, not by row: a packed row's tokens count for their own document's source
    (`data.document_sources`), and "all" is the sum over the sources. Launched (``procs``), batch b
    goes to process b mod W, every process runs the same number of forwards (a process short of
    batches repeats its first one and drops the result: under EP each forward is a collective),
    and the sums are added up over the processes: the batches, and so the numbers, of one process.
    """
    cfg = model.config
    stats = RoutingStats(cfg.num_hidden_layers, cfg.num_local_experts, cfg.num_experts_per_tok)
    nll_sum: dict[str, float] = {}
    counts: dict[str, int] = {}
    rank, world = (procs.rank, procs.world) if procs is not None else (0, 1)
    starts = list(range(0, len(rows), batch_size))
    mine = starts[rank::world]
    rounds = -(-len(starts) // world)
    for step in range(rounds):
        start = mine[step] if step < len(mine) else starts[0]
        chunk = rows[start:start + batch_size]
        chunk_sources = [document_sources(row, f"row {start + i}") for i, row in enumerate(chunk)]
        batch = collate_rows(chunk)
        out = model(batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                    document_ids=batch["document_ids"].to(device), output_router_logits=True)
        if step >= len(mine):
            continue  # a repeat for the collectives' sake
        nll, scored = position_nll(out.logits, batch["labels"].to(device))  # [B, S] each
        nll, scored = nll.cpu(), scored.cpu()
        for i, (row, sources) in enumerate(zip(chunk, chunk_sources, strict=True)):
            if not row.get("heldout", True):
                continue
            doc_nll, doc_count = nll_per_document(nll[i], scored[i], batch["document_ids"][i], len(sources))
            for source, value, count in zip(sources, doc_nll, doc_count, strict=True):
                nll_sum[source] = nll_sum.get(source, 0.0) + value
                counts[source] = counts.get(source, 0) + count
        keys = document_keys(batch["document_ids"], batch["input_ids"].shape)
        stats.add([r.cpu() for r in out.router_logits], keys, chunk_sources, batch["document_ids"])
    if procs is not None and procs.launched:
        nll_sum, counts, stats = _summed_over_processes(procs, nll_sum, counts, stats)
    nll_sum["all"], counts["all"] = sum(nll_sum.values()), sum(counts.values())
    losses = {}
    for source in sorted(nll_sum):
        mean = nll_sum[source] / counts[source] if counts[source] else float("nan")
        losses[source] = {"loss": mean, "perplexity": float(torch.tensor(mean).exp()), "tokens": counts[source]}
    return losses, stats


def _summed_over_processes(procs: Processes, nll_sum: dict, counts: dict,
                           stats: RoutingStats) -> tuple[dict, dict, RoutingStats]:
    """Per-source sums and routing tables of every process, added up (in rank order)."""
    total_nll: dict[str, float] = {}
    total_counts: dict[str, int] = {}
    total_stats = RoutingStats(stats.num_layers, stats.num_experts, stats.k)
    for part_nll, part_counts, part_stats in procs.gather((nll_sum, counts, stats)):
        for source, value in part_nll.items():
            total_nll[source] = total_nll.get(source, 0.0) + value
            total_counts[source] = total_counts.get(source, 0) + part_counts[source]
        total_stats.merge(part_stats)
    return dict(sorted(total_nll.items())), dict(sorted(total_counts.items())), total_stats
