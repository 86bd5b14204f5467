"""Routing analysis of the Mixtral paper (arXiv 2401.04088, section 5), as pure functions.

Inputs are the router logits the model returns (``out.router_logits``: L tensors [T, E]) and, per
token, a document key: tokens of the same document share a key >= 0, padding has -1. "Consecutive"
always means two neighbouring tokens of one document: a pair that crosses a packed document
boundary, a row boundary or padding is never counted.

- :func:`top_k_experts`: the routing itself ([T, K], first choice first).
- :func:`repetition_counts`: how often consecutive tokens keep the same first-choice expert, and
  how often their top-k sets share at least one expert (the paper's Table 5 / Figure 10).
- :func:`random_baselines`: the same two rates for a router that picks k of E uniformly.
- :func:`expert_counts` / :func:`total_variation`: expert shares per domain (Figure 7) and how far
  fine-tuning moved them.
- :class:`RoutingStats`: accumulates all of the above over batches, per layer and per source
  (a token's source is its document's: packed rows mix sources).
- :func:`routing_shift`: total variation between every two evaluated models' expert shares.
- :func:`routing_text`: the first-choice expert of every token of sample documents (runs the model).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from model.moe import route_tokens
from pipeline.evaluation.data import first_documents


def top_k_experts(router_logits: torch.Tensor, k: int) -> torch.Tensor:
    """[T, E] logits -> [T, K] expert ids, best first: exactly the experts the MoE block used
    (the model's own ``route_tokens``, so ties and bf16 logits resolve the same way)."""
    if router_logits.dim() != 2:
        raise ValueError(f"router logits must be [T, E], got shape {tuple(router_logits.shape)}")
    if not 1 <= k <= router_logits.shape[1]:
        raise ValueError(f"top-k must be in 1..{router_logits.shape[1]} (experts), got {k}")
    return route_tokens(router_logits, k)[1]


def document_keys(document_ids: torch.Tensor | None, shape: Sequence[int]) -> torch.Tensor:
    """Per-token document key [T] for a [B, S] batch: unique per (row, document), -1 on padding.

    ``document_ids`` may be None (one document per row); padding is where the document id is negative.
    """
    batch, seq = shape
    if document_ids is None:
        document_ids = torch.zeros(batch, seq, dtype=torch.long)
    document_ids = document_ids.long().cpu()
    valid = document_ids >= 0
    # Rows never share a key: row r's documents live in [r * span, (r + 1) * span).
    span = int(document_ids.max().item()) + 1 if document_ids.numel() else 1
    rows = torch.arange(batch).unsqueeze(1) * span  # [B, 1]
    keys = torch.where(valid, rows + document_ids, torch.full_like(document_ids, -1))
    return keys.reshape(-1)  # [B, S] -> [T]


def token_sources(row_sources: Sequence[str | Sequence[str]], document_ids: torch.Tensor | None,
                  shape: Sequence[int]) -> tuple[list[str], torch.Tensor]:
    """(source names, per-token index into them [T], -1 on padding) for a [B, S] batch.

    ``row_sources[b]`` is either one source for the whole row, or the source of each of row b's
    documents, indexed by document id (packed rows mix sources); the latter needs ``document_ids``
    [B, S] (negative = padding).
    """
    batch, seq = shape
    if len(row_sources) != batch:
        raise ValueError(f"{len(row_sources)} row sources for {batch} rows")
    names = sorted({s for sources in row_sources for s in ([sources] if isinstance(sources, str) else sources)})
    if document_ids is None:
        if not all(isinstance(sources, str) or len(sources) == 1 for sources in row_sources):
            raise ValueError("per-document sources need the batch's document_ids")
        document_ids = torch.zeros(batch, seq, dtype=torch.long)
    document_ids = document_ids.long().cpu()
    index = torch.full((batch, seq), -1, dtype=torch.long)
    for b, sources in enumerate(row_sources):
        docs = document_ids[b]  # [S]
        real = docs >= 0
        if isinstance(sources, str):  # one source for the whole row
            index[b, real] = names.index(sources)
            continue
        table = torch.tensor([names.index(s) for s in sources], dtype=torch.long)  # [D]: document id -> name
        if real.any() and int(docs[real].max()) >= len(table):
            raise ValueError(f"row {b} has document id {int(docs[real].max())} but {len(table)} document sources")
        index[b, real] = table[docs[real]]
    return names, index.reshape(-1)  # [B, S] -> [T]


def consecutive_pairs(keys: torch.Tensor) -> torch.Tensor:
    """[T] document keys -> [T-1] bool: token t and t+1 are real tokens of the same document."""
    return (keys[:-1] == keys[1:]) & (keys[:-1] >= 0)


def repetition_counts(experts: torch.Tensor, keys: torch.Tensor) -> tuple[int, int, int]:
    """(same first choice, top-k sets overlap, pairs) over consecutive pairs of one document.

    ``experts`` is [T, K] from :func:`top_k_experts`, ``keys`` is [T] from :func:`document_keys`.
    """
    if experts.shape[0] != keys.shape[0]:
        raise ValueError(f"{experts.shape[0]} routed tokens but {keys.shape[0]} document keys")
    pairs = consecutive_pairs(keys)
    prev, nxt = experts[:-1][pairs], experts[1:][pairs]  # [P, K] each
    same_first = int((prev[:, 0] == nxt[:, 0]).sum())
    overlap = int((prev.unsqueeze(2) == nxt.unsqueeze(1)).flatten(1).any(dim=1).sum())  # [P, K, K] -> [P]
    return same_first, overlap, int(pairs.sum())


def random_baselines(num_experts: int, k: int) -> tuple[float, float]:
    """Rates for a router that picks k of E experts uniformly without replacement, per token.

    First choice: two tokens agree with probability 1/E. Top-k overlap: the second token's k
    experts miss all of the first token's k with probability C(E-k, k) / C(E, k).
    """
    if not 1 <= k <= num_experts:
        raise ValueError(f"top-k must be in 1..{num_experts}, got {k}")
    return 1.0 / num_experts, 1.0 - math.comb(num_experts - k, k) / math.comb(num_experts, k)


def hoeffding_radius(pairs: int, delta: float) -> float:
    """Half-width e with P(|rate - p| >= e) <= delta for the mean of ``pairs`` iid Bernoulli(p).

    For a uniform random router the indicators are iid (see tests/pipeline/test_routing.py), so
    Hoeffding's inequality 2 exp(-2 n e^2) <= delta gives e = sqrt(ln(2 / delta) / (2 n)).
    """
    if pairs <= 0 or not 0 < delta < 1:
        raise ValueError(f"need pairs > 0 and 0 < delta < 1, got {pairs}, {delta}")
    return math.sqrt(math.log(2.0 / delta) / (2.0 * pairs))


def expert_counts(experts: torch.Tensor, num_experts: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """[T, K] expert ids -> [E] number of top-k slots sent to each expert (``valid`` [T] masks tokens)."""
    if valid is not None:
        experts = experts[valid]
    return torch.bincount(experts.reshape(-1), minlength=num_experts)[:num_experts]


def shares(counts: torch.Tensor) -> torch.Tensor:
    """Counts [..., E] -> shares summing to 1 over the last axis (zeros stay zeros)."""
    counts = counts.double()
    total = counts.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, counts / total.clamp(min=1), torch.zeros_like(counts))


def total_variation(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Total variation distance 0.5 * sum |p - q| over the last axis (p, q: distributions)."""
    if p.shape != q.shape:
        raise ValueError(f"distributions differ in shape: {tuple(p.shape)} vs {tuple(q.shape)}")
    return 0.5 * (p.double() - q.double()).abs().sum(dim=-1)


def default_layers(num_layers: int) -> list[int]:
    """First, middle and last layer (0, 15, 31 for Mixtral-8x7B, as in the paper's figure)."""
    return sorted({0, (num_layers - 1) // 2, num_layers - 1})


class RoutingStats:
    """Expert counts and consecutive-token repetitions, per layer, per source and overall.

    ``counts[source]`` is [L, E] top-k slots per expert, ``first_counts[source]`` [L, E] first
    choices, ``pairs[source]`` [L, 3] (same first choice, top-k overlap, pairs).
    """

    def __init__(self, num_layers: int, num_experts: int, k: int):
        self.num_layers, self.num_experts, self.k = num_layers, num_experts, k
        self.counts: dict[str, torch.Tensor] = {}
        self.first_counts: dict[str, torch.Tensor] = {}
        self.pairs: dict[str, torch.Tensor] = {}

    def _slot(self, source: str) -> None:
        if source not in self.counts:
            self.counts[source] = torch.zeros(self.num_layers, self.num_experts, dtype=torch.long)
            self.first_counts[source] = torch.zeros(self.num_layers, self.num_experts, dtype=torch.long)
            self.pairs[source] = torch.zeros(self.num_layers, 3, dtype=torch.long)

    def add(self, router_logits: Sequence[torch.Tensor], keys: torch.Tensor,
            row_sources: Sequence[str | Sequence[str]], document_ids: torch.Tensor | None = None) -> None:
        """One [B, S] batch: L tensors [T, E], keys [T] (:func:`document_keys`) and per row its source,
        or its documents' sources by document id with ``document_ids`` [B, S] (:func:`token_sources`).

        Tokens count for their own document's source: a packed row that mixes sources is split.
        """
        if len(router_logits) != self.num_layers:
            raise ValueError(f"expected router logits for {self.num_layers} layers, got {len(router_logits)}")
        if not row_sources or keys.shape[0] % len(row_sources):
            raise ValueError(f"{keys.shape[0]} tokens do not split into {len(row_sources)} rows")
        shape = (len(row_sources), keys.shape[0] // len(row_sources))
        names, token_source = token_sources(row_sources, document_ids, shape)  # [T]
        masks = {name: (token_source == i) & (keys >= 0) for i, name in enumerate(names)}
        for layer, logits in enumerate(router_logits):
            experts = top_k_experts(logits.detach().cpu(), self.k)  # [T, K]
            for name, mask in masks.items():
                if not mask.any():
                    continue
                self._slot(name)
                self.counts[name][layer] += expert_counts(experts, self.num_experts, mask)
                self.first_counts[name][layer] += expert_counts(experts[:, :1], self.num_experts, mask)
                # Only pairs inside this source: other sources' tokens count as padding here.
                source_keys = torch.where(mask, keys, torch.full_like(keys, -1))
                self.pairs[name][layer] += torch.tensor(repetition_counts(experts, source_keys))

    def merge(self, other: RoutingStats) -> None:
        """Add another's tables: the same model's routing over other rows (another process's)."""
        for source in other.counts:
            self._slot(source)
            self.counts[source] += other.counts[source]
            self.first_counts[source] += other.first_counts[source]
            self.pairs[source] += other.pairs[source]

    def total(self, table: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of a per-source table over all sources."""
        if not table:
            raise ValueError("no routed tokens were recorded")
        return torch.stack(list(table.values())).sum(dim=0)

    def summary(self) -> dict:
        """Plain data for eval.json: shares and repetition rates per layer, per source and overall."""
        first_base, overlap_base = random_baselines(self.num_experts, self.k)

        def rates(pairs: torch.Tensor) -> dict:
            n = pairs[:, 2].clamp(min=1).double()
            return {"same_first": (pairs[:, 0] / n).tolist(), "topk_overlap": (pairs[:, 1] / n).tolist(),
                    "pairs": pairs[:, 2].tolist()}

        sources = sorted(self.counts)
        return {
            "num_layers": self.num_layers, "num_experts": self.num_experts, "top_k": self.k,
            "baseline": {"same_first": first_base, "topk_overlap": overlap_base, "share": 1.0 / self.num_experts},
            "expert_share": {s: shares(self.counts[s]).tolist() for s in sources}
            | {"all": shares(self.total(self.counts)).tolist()},
            "first_choice_share": {s: shares(self.first_counts[s]).tolist() for s in sources}
            | {"all": shares(self.total(self.first_counts)).tolist()},
            "repetition": {s: rates(self.pairs[s]) for s in sources} | {"all": rates(self.total(self.pairs))},
        }


def routing_shift(results: dict[str, dict]) -> dict[str, dict]:
    """Per layer, total variation between two models' expert-share distributions (all sources
    together, and per shared source), for every ordered pair of evaluated models."""
    names = list(results)
    out = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ra, rb = results[a]["routing"]["expert_share"], results[b]["routing"]["expert_share"]
            out[f"{b} vs {a}"] = {source: total_variation(torch.tensor(ra[source]), torch.tensor(rb[source])).tolist()
                                  for source in ra if source in rb}
    return out


@torch.no_grad()
def routing_text(model, rows: list[dict], layers: list[int], samples: int, max_tokens: int,
                 device: torch.device) -> list[dict]:
    """The first document of each source (in row order, then document order within a row), run
    alone: its first ``max_tokens`` tokens and first-choice expert per layer."""
    out = []
    for source, input_ids in first_documents(rows, samples):
        ids = torch.tensor([input_ids[:max_tokens]], device=device)  # [1, n]
        router_logits = model(ids, output_router_logits=True).router_logits
        experts = {layer: top_k_experts(router_logits[layer].cpu(), 1)[:, 0].tolist() for layer in layers}
        out.append({"source": source, "input_ids": input_ids[:max_tokens], "experts": experts})
    return out
