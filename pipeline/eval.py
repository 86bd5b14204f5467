"""Evaluation: held-out loss per source, passkey retrieval and the Mixtral paper's routing analysis.

    python -m pipeline.eval recipes/tiny/eval.yaml [key=value ...]                  # make eval (CPU)
    accelerate launch --config_file recipes/accelerate/ddp.yaml \
        -m pipeline.eval recipes/mixtral-8x7b/eval.yaml models.sft=/runs/sft models.dpo=/runs/dpo

Launched on several processes with ``parallel.expert_parallel_size`` = P, each process holds only
its 1/P of every layer's experts (Mixtral-8x7B on 8 GPUs: ~14.5 GB of bf16 weights each) and every
forward is a collective (pipeline/distributed/expert_parallel.py's dispatch): the held-out batches are dealt
out over the processes, every process runs the same number of forwards, and the sums come back to
the main process; routing text and passkey prompts run on every process alike, each generated
token the main process's choice. The results are the one-process results; the main process writes.

Each entry of ``models`` (name -> directory) is evaluated in order: an SFT/DPO output directory
(manifest.json: a full model, or a LoRA adapter over the base it names, merged here) or a plain HF
Mixtral checkpoint. Missing directories are skipped (``missing_models: error`` refuses instead);
when none is there, a random-init ``fallback_preset`` model is evaluated, and the run says so.

Writes ``output_dir``: eval.json (every number), *.png (matplotlib), report.html (the plots and
tables in one file), recipe.yaml; and logs the same to W&B unless ``tracking.report_to: none``
(offline under output_dir when no WANDB_API_KEY is set).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist

from model.losses import IGNORE_INDEX, masked_ce, shift_labels
from pipeline.config import RecipeError, build, load_recipe_dict, parse_cli, save_recipe
from pipeline.distributed import parallel
from pipeline.distributed.expert_parallel import (
    ExpertPlacement,
    install_dispatch,
    load_local_experts,
    shard_experts,
)
from pipeline.distributed.sharded_load import merge_adapter_fp32
from pipeline.evaluation import passkey as pk
from pipeline.evaluation import report
from pipeline.evaluation.passkey import greedy_generate
from pipeline.evaluation.routing import (
    RoutingStats,
    default_layers,
    document_keys,
    top_k_experts,
    total_variation,
)
from pipeline.preflight import LaunchSpec, check_routing_layers, preflight
from pipeline.run_record import RunRecord, hf_checkpoint_behind
from pipeline.rundir import on_main_for_all, owned_output, record
from pipeline.training.batches import collate_rows as collate

COLUMNS = ("input_ids", "labels")


# ----------------------------------------------------------------------------------------------
# Recipe
# ----------------------------------------------------------------------------------------------


@dataclass
class DataSection:
    # Held-out rows written by pipeline.prep (input_ids, labels, position_ids, document_ids, document_sources).
    dir: str = "outputs/tiny/data_sft/eval"
    # When `dir` does not exist: run pipeline.prep on this recipe first (null: refuse).
    prep_recipe: str | None = None
    # More prepared splits (e.g. the train split) for the routing analysis only: more domains.
    # Their loss is not reported (it would not be held out).
    routing_dirs: list[str] = field(default_factory=list)
    # Rows per source (the first ones); null = all.
    max_rows_per_source: int | None = 32
    batch_size: int = 4
    # Tokenizer file/dir for passkey prompts and token display; null = Mixtral's (mistral-common v1).
    tokenizer: str | None = None

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.max_rows_per_source is not None and self.max_rows_per_source < 1:
            raise ValueError("data.max_rows_per_source must be >= 1 or null (all rows)")


@dataclass
class PasskeySection:
    enabled: bool = True
    # Prompt lengths in tokens (intro + filler + key line + question) and key depths in [0, 1].
    lengths: list[int] = field(default_factory=lambda: [256, 512, 1024])
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    trials: int = 2
    max_new_tokens: int = 8
    seed: int = 0
    # plain: the paper's completion prompt (base models); inst: [INST] task [/INST] The pass key is
    template: Literal["plain", "inst"] = "plain"

    def __post_init__(self):
        if not self.lengths or not self.depths:
            raise ValueError("passkey.lengths and passkey.depths must not be empty")
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"passkey.depths must lie in [0, 1], got {self.depths}")
        if self.trials < 1 or self.max_new_tokens < 1:
            raise ValueError("passkey.trials and passkey.max_new_tokens must be >= 1")


@dataclass
class RoutingSection:
    # Layers for the bar charts and coloured text; null = first, middle, last (0, 15, 31 for 8x7B).
    layers: list[int] | None = None
    # Held-out documents shown coloured by first-choice expert, per model, and tokens shown of each.
    text_samples: int = 2
    text_tokens: int = 160

    def __post_init__(self):
        if self.text_samples < 0 or self.text_tokens < 1:
            raise ValueError("routing.text_samples must be >= 0 and routing.text_tokens >= 1")


@dataclass
class EvalParallelSection:
    """How a launched eval shares the model (`accelerate launch --config_file recipes/accelerate/ddp.yaml`)."""

    # Process-group backend: "auto" is nccl with CUDA, gloo without.
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    # Experts of each layer split over groups of this many processes (1 = every process holds all).
    expert_parallel_size: int = 1

    # Eval runs no DeepSpeed: what the startup checks and the plan ask of a training `parallel:`.
    zero_stage = None
    offload_optimizer = False
    offload_params = False
    deepspeed = False

    def __post_init__(self):
        if self.expert_parallel_size < 1:
            raise ValueError(f"parallel.expert_parallel_size must be >= 1, got {self.expert_parallel_size}")


@dataclass
class EvalTracking:
    report_to: Literal["wandb", "none"] = "wandb"
    project: str = "mixtral-tune"
    run_name: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class EvalRecipe:
    output_dir: str
    # name -> run dir (SFT/DPO output) or HF Mixtral checkpoint dir, compared in this order.
    models: dict[str, str] = field(default_factory=dict)
    missing_models: Literal["skip", "error"] = "skip"
    # Evaluated (random init, `seed`) when no model directory exists; null = refuse.
    fallback_preset: str | None = "tiny"
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: str = "auto"
    seed: int = 0
    data: DataSection = field(default_factory=DataSection)
    passkey: PasskeySection = field(default_factory=PasskeySection)
    routing: RoutingSection = field(default_factory=RoutingSection)
    tracking: EvalTracking = field(default_factory=EvalTracking)
    parallel: EvalParallelSection = field(default_factory=EvalParallelSection)

    def __post_init__(self):
        if not self.models and self.fallback_preset is None:
            raise ValueError("give at least one entry in models (name: directory) or a fallback_preset")


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


def load_model_dir(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                   place: ExpertPlacement | None = None, device: str | torch.device = "cpu"):
    """A plain ``Mixtral`` from a stage output dir (full, or LoRA merged into its base) or an HF dir.

    A LoRA run's manifest names its base (``base.checkpoint``), which may itself be a run dir: a DPO
    run over an SFT run over a base checkpoint merges both adapters, in order, each in fp32 (as
    export merges). ``place``: hold only this rank's experts (expert parallelism, more than one
    rank), read from the checkpoint and the adapters alone; ``device``: where the weights are read to.
    (``pipeline.dpo``'s ``load_sft_model`` reads one level only, which is all DPO needs.)
    """
    from model.checkpoint import load_pretrained

    path = Path(path)
    if RunRecord.exists(path):
        record = RunRecord.read(path)
        if record.kind == "lora":
            base = load_model_dir(record.base_checkpoint, dtype, place, device)
            if record.quantization:
                # QLoRA: the adapter trained on the 4-bit base; it merges into that base's numbers (as export)
                from model.quant import hold_as_4bit_base

                hold_as_4bit_base(base, getattr(torch, record.quantization["dtype"]))
            return merge_adapter_fp32(base, str(record.adapter_dir))
        path = record.model_dir
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path}: neither a stage output (manifest.json) nor an HF checkpoint (config.json)")
    if place is not None and place.ep_size > 1:
        return load_local_experts(path, place, dtype=dtype, device=device)
    return load_pretrained(path, dtype=dtype, device=device)


def resolve_models(recipe: EvalRecipe, log=print) -> list[tuple[str, str | None]]:
    """(name, directory) to evaluate; directory None = the random fallback model."""
    found = []
    for name, directory in recipe.models.items():
        path = Path(directory)
        if RunRecord.exists(path) or (path / "config.json").is_file():
            found.append((name, directory))
            continue
        # A run still in progress has its directory but no manifest yet.
        why = "holds no finished run (no manifest.json or config.json)" if path.is_dir() else "does not exist"
        if recipe.missing_models == "error":
            raise FileNotFoundError(f"models.{name}: {directory} {why} (or set missing_models: skip)")
        log(f"eval: models.{name}: {directory} {why}, skipped")
    if not found:
        if recipe.fallback_preset is None:
            raise FileNotFoundError("eval: none of the model directories exist and fallback_preset is null")
        log(f"eval: no trained model found; evaluating a RANDOM-INIT '{recipe.fallback_preset}' model "
            f"(seed {recipe.seed}) — run `make sft` / `make dpo` first for real numbers")
        found.append((f"random-{recipe.fallback_preset}", None))
    return found


def build_model(directory: str | None, recipe: EvalRecipe, device: torch.device, procs: Processes | None = None):
    """The model to evaluate on ``device``; launched with expert parallelism, this process's experts
    only, their forwards dispatched over its EP group (every forward is then a collective)."""
    from model import Mixtral, MixtralConfig

    dtype = getattr(torch, recipe.dtype)
    place = procs.placement(_num_experts(directory, recipe)) if procs is not None else None
    sharded_experts = place is not None and place.ep_size > 1
    if directory is None:
        torch.manual_seed(recipe.seed)
        model = Mixtral(MixtralConfig.preset(recipe.fallback_preset)).to(dtype)
        if sharded_experts:
            shard_experts(model, place)  # the same draws on every process, each keeps its experts
    else:
        model = load_model_dir(directory, dtype, place, device)
    model = model.to(device).eval()
    if sharded_experts:
        install_dispatch(model, place, parallel.expert_groups(place.ep_size)[0])
    return model


def _num_experts(directory: str | None, recipe: EvalRecipe) -> int:
    """Experts per layer of the model in ``directory`` (its config, before any weight is read)."""
    from model import MixtralConfig

    if directory is None:
        return MixtralConfig.preset(recipe.fallback_preset).num_local_experts
    return MixtralConfig.from_hf(hf_checkpoint_behind(directory) / "config.json").num_local_experts


class Processes:
    """This eval's processes: one, or an `accelerate launch` (rank, world, device, EP placement).

    Every collective of the eval loop goes through here, on the device the process group
    communicates on (the process's GPU under NCCL, the CPU under gloo).
    """

    def __init__(self, section: EvalParallelSection, device_name: str):
        parallel.init_process_state(section.backend, deepspeed=False)
        self.section = section
        self.launched = dist.is_initialized()
        self.rank = dist.get_rank() if self.launched else 0
        self.world = dist.get_world_size() if self.launched else 1
        if self.launched:
            from accelerate import PartialState

            self.device = PartialState().device
        else:
            self.device = pick_device(device_name)
        self.is_main = self.rank == 0

    def placement(self, num_experts: int):
        return parallel.placement(self.section, num_experts)  # validates against the launch

    def barrier(self) -> None:
        if self.launched:
            dist.barrier()

    def gather(self, value) -> list:
        """Every process's ``value`` (any picklable object), in rank order, on every process."""
        if not self.launched:
            return [value]
        out = [None] * self.world
        dist.all_gather_object(out, value)
        return out


def check_eval_launch(launch) -> None:
    """Startup check of a launched eval (`preflight.LaunchSpec`): plain processes, no DeepSpeed. The
    expert-parallel size is checked against the launch and the model's experts by the preflight and
    again, per model, in `parallel.placement`."""
    if launch.deepspeed:
        raise RecipeError("eval runs no DeepSpeed: launch it with recipes/accelerate/ddp.yaml "
                          "(cpu_ddp.yaml on a CPU host), not a zero*.yaml config")


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def load_eval_rows(section: DataSection, log=print) -> list[dict]:
    """Held-out rows, then the routing-only rows (``heldout`` False), at most
    ``max_rows_per_source`` per source and directory; prepares ``dir`` first if asked."""
    root = Path(section.dir)
    if not root.is_dir():
        _refuse_an_empty_split(root)
        if section.prep_recipe is None:
            raise FileNotFoundError(f"data.dir: {root} does not exist; run `python -m pipeline.prep RECIPE` "
                                    "or set data.prep_recipe")
        from pipeline import prep

        log(f"eval: {root} missing, preparing it with pipeline.prep {section.prep_recipe}")
        prep.run(prep.load_recipe(section.prep_recipe, []))
        _refuse_an_empty_split(root)
        if not root.is_dir():
            raise FileNotFoundError(f"data.dir: {root} still missing after prepping {section.prep_recipe}; "
                                    "does that recipe's data.output_dir match?")
    rows = read_rows(root, "data.dir", section.max_rows_per_source, heldout=True)
    for i, extra in enumerate(section.routing_dirs):
        if not Path(extra).is_dir():
            raise FileNotFoundError(f"data.routing_dirs.{i}: {extra} does not exist (prepare it, or drop it)")
        rows += read_rows(Path(extra), f"data.routing_dirs.{i}", section.max_rows_per_source, heldout=False)
    return rows


def _refuse_an_empty_split(root: Path) -> None:
    """prep writes no directory for a split of 0 rows; say so instead of "does not exist"."""
    manifest = root.parent / "manifest.json"
    if root.is_dir() or not manifest.is_file():
        return
    stats = json.loads(manifest.read_text()).get("stats", {}).get(root.name)
    if stats is not None and stats.get("rows", 0) == 0:
        raise RecipeError(
            f"data.dir: {root} is an empty split (prep found no {root.name} rows: data.eval_fraction 0 and no "
            f"`role: eval` source in the recipe that prepared {root.parent}); prepare some, or point data.dir at "
            "a split with rows"
        )


def read_rows(root: Path, key: str, max_per_source: int | None, heldout: bool) -> list[dict]:
    import datasets

    table = datasets.load_from_disk(str(root))
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{key}: {root} lacks the columns {missing} (has {table.column_names}); "
                         "point it at an SFT split written by pipeline.prep")
    per_source: dict[str, int] = {}
    rows = []
    for index, row in enumerate(table):
        # The cap counts rows by their first document's source: it bounds the work, it does not
        # decide which source a token belongs to (document_sources does).
        source = row.get("source") or "unknown"
        if max_per_source is not None and per_source.get(source, 0) >= max_per_source:
            continue
        per_source[source] = per_source.get(source, 0) + 1
        row = row | {"source": source, "heldout": heldout}
        rows.append(row | {"document_sources": document_sources(row, f"{key}: {root} row {index}")})
    if not rows:
        raise ValueError(f"{key}: {root} holds no rows")
    return rows


def document_sources(row: dict, where: str = "row") -> list[str]:
    """The source of each document of a packed row, indexed by document id.

    Rows mix sources, so per-source numbers go by document: token t belongs to
    ``document_sources[document_ids[t]]``. Rows prepared before that column existed carry only
    ``source`` (the first document's), which is exact for a one-document row and wrong for the others,
    so those are refused rather than attributed to the first document's source.
    """
    ids = row.get("document_ids")
    num_documents = max(ids) + 1 if ids else 1
    sources = row.get("document_sources")
    if sources is None:
        if num_documents == 1:
            return [row.get("source") or "unknown"]
        raise ValueError(f"{where} packs {num_documents} documents but has no document_sources column (it was "
                         "prepared by an older pipeline.prep, which kept only the first document's source): "
                         "re-run `python -m pipeline.prep RECIPE` on it")
    if len(sources) != num_documents:
        raise ValueError(f"{where}: document_sources has {len(sources)} entries for {num_documents} documents")
    return list(sources)


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


# ----------------------------------------------------------------------------------------------
# Per-model evaluation
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def loss_and_routing(model, rows: list[dict], batch_size: int, device: torch.device,
                     procs: Processes | None = None) -> tuple[dict, RoutingStats]:
    """Held-out loss/perplexity per source and the routing statistics (all rows), in one pass.

    Both go by document, not by row: a packed row's tokens count for their own document's source
    (:func:`document_sources`), and "all" is the sum over the sources. Launched (``procs``), batch b
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
        batch = collate(chunk)
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


def first_documents(rows: list[dict], samples: int) -> list[tuple[str, list[int]]]:
    """(source, token ids) of the first document of each source, at most ``samples`` sources.

    A row's documents may come from several sources; the first document OF a source may sit behind
    another source's document in its row.
    """
    picked: list[tuple[str, list[int]]] = []
    seen: set[str] = set()
    for index, row in enumerate(rows):
        if len(picked) >= samples:
            break
        doc_ids = row.get("document_ids") or [0] * len(row["input_ids"])
        for doc, source in enumerate(document_sources(row, f"row {index}")):
            if source in seen or len(picked) >= samples:
                continue
            seen.add(source)
            picked.append((source, [t for t, d in zip(row["input_ids"], doc_ids, strict=True) if d == doc]))
    return picked


def passkey_grid(model, tokenizer, section: PasskeySection, device: torch.device) -> dict:
    """Passkey accuracy per (length, depth) with greedy answers, plus the mean over all cells."""

    def answer(ids: list[int]) -> str:
        return tokenizer.decode(greedy_generate(model, ids, section.max_new_tokens, tokenizer.eos_id, device))

    grid = pk.run_grid(tokenizer.encode, answer, section.lengths, section.depths, section.trials, section.seed,
                       tokenizer.bos_id, section.template)
    grid["mean_accuracy"] = sum(map(sum, grid["accuracy"])) / (len(section.lengths) * len(section.depths))
    return grid


class PieceNames:
    """Token id -> the tokenizer's piece ('▁The'), for display; from the same file as the Tokenizer."""

    def __init__(self, tokenizer):
        if tokenizer.kind == "sentencepiece":
            import sentencepiece

            self._lookup = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer.path)).id_to_piece
        else:
            from tokenizers import Tokenizer as HFTokenizer

            self._lookup = HFTokenizer.from_file(str(tokenizer.path)).id_to_token

    def __call__(self, ids: list[int]) -> list[str]:
        return [self._lookup(i) or "?" for i in ids]


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


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


def make_report(out_dir: Path, results: dict[str, dict], shift: dict[str, dict], texts: dict[str, list[dict]],
                pieces: PieceNames, layers: list[int], note: str) -> list[Path]:
    """All PNGs and report.html; returns the PNG paths."""
    pngs: list[Path] = []
    sections = [("Run", f"<p class='note'>{note}</p>")]
    ppl = {m: {s: v["perplexity"] for s, v in r["loss"].items()} for m, r in results.items()}
    pngs.append(report.plot_bars(ppl, out_dir / "perplexity.png", ylabel="perplexity", log_scale=True,
                                 title="Held-out perplexity per source (answer tokens)"))
    rows = [[m, s, v["loss"], v["perplexity"], v["tokens"]] for m, r in results.items() for s, v in r["loss"].items()]
    sections.append(("Held-out loss", report.image_html(pngs[-1], "perplexity")
                     + report.table_html(["model", "source", "loss", "perplexity", "tokens"], rows)))
    for name, result in results.items():
        routing = result["routing"]
        num_experts = routing["num_experts"]
        body = ""
        shares_png = report.plot_expert_shares(
            {s: v for s, v in routing["expert_share"].items() if s != "all"}, layers,
            out_dir / f"expert_share_{name}.png", title=f"{name}: share of routed tokens per expert")
        rep_png = report.plot_repetition(routing["repetition"], routing["baseline"], out_dir / f"repetition_{name}.png",
                                         title=f"{name}: consecutive tokens routed alike")
        pngs += [shares_png, rep_png]
        body += report.image_html(shares_png, "expert shares") + report.image_html(rep_png, "repetition")
        # The paper's Table 5: per domain and layer, how often consecutive tokens keep their experts.
        base = routing["baseline"]
        body += report.table_html(
            ["source", "layer", "same first choice", "top-k overlap", "token pairs"],
            [[source, layer, rep["same_first"][layer], rep["topk_overlap"][layer], rep["pairs"][layer]]
             for source, rep in routing["repetition"].items() for layer in range(routing["num_layers"])]
            + [["random router", "any", base["same_first"], base["topk_overlap"], ""]])
        for i, sample in enumerate(texts.get(name, [])):
            names = pieces(sample["input_ids"])
            text_png = report.plot_token_experts(names, {int(k): v for k, v in sample["experts"].items()}, num_experts,
                                                 out_dir / f"routing_text_{name}_{i}.png",
                                                 title=f"{name}: {sample['source']}")
            pngs.append(text_png)
            body += f"<h3>{sample['source']}: first-choice expert per token</h3>" + report.legend_html(num_experts)
            for layer, experts in sample["experts"].items():
                body += f"<p>layer {layer}</p>" + report.token_experts_html(names, experts, num_experts)
            body += report.image_html(text_png, "routing text")
        if "passkey" in result:
            pk_png = report.plot_passkey(result["passkey"], out_dir / f"passkey_{name}.png",
                                         title=f"{name}: passkey retrieval")
            pngs.append(pk_png)
            body += "<h3>Passkey retrieval</h3>" + report.image_html(pk_png, "passkey")
        sections.append((f"Model: {name}", body))
    if shift:
        series = {pair: values["all"] for pair, values in shift.items()}
        tv_png = report.plot_lines(series, out_dir / "routing_shift.png", xlabel="layer",
                                   ylabel="total variation", title="How far fine-tuning moved expert shares")
        pngs.append(tv_png)
        rows = [[pair, layer, tv] for pair, values in series.items() for layer, tv in enumerate(values)]
        sections.append(("Routing shift between models", report.image_html(tv_png, "routing shift")
                         + report.table_html(["models", "layer", "total variation"], rows)))
    report.write_html(out_dir / "report.html", "Mixtral evaluation", sections)
    return pngs


def log_wandb(recipe: EvalRecipe, out_dir: Path, summary: dict, pngs: list[Path], log=print) -> None:
    """Images, tables and headline numbers to W&B (offline when no API key is set)."""
    import wandb

    from pipeline.training.tracking import redacted_config, wandb_offline_reason

    reason = wandb_offline_reason()
    run = wandb.init(project=recipe.tracking.project, name=recipe.tracking.run_name, tags=recipe.tracking.tags,
                     dir=str(out_dir), config=redacted_config(recipe), job_type="eval",
                     mode="offline" if reason else None)
    data = {f"plots/{p.stem}": wandb.Image(str(p)) for p in pngs}
    loss_rows = [[m, s, v["loss"], v["perplexity"], v["tokens"]]
                 for m, r in summary["models"].items() for s, v in r["loss"].items()]
    data["tables/loss"] = wandb.Table(columns=["model", "source", "loss", "perplexity", "tokens"], data=loss_rows)
    rep_rows = []
    for m, r in summary["models"].items():
        base = r["routing"]["baseline"]
        for source, rep in r["routing"]["repetition"].items():
            for layer, (first, overlap) in enumerate(zip(rep["same_first"], rep["topk_overlap"], strict=True)):
                rep_rows.append([m, source, layer, first, overlap, base["same_first"], base["topk_overlap"]])
    data["tables/repetition"] = wandb.Table(
        columns=["model", "source", "layer", "same_first", "topk_overlap", "random_same_first", "random_topk_overlap"],
        data=rep_rows)
    pk_rows = [[m, n, d, r["passkey"]["accuracy"][i][j]] for m, r in summary["models"].items() if "passkey" in r
               for i, n in enumerate(r["passkey"]["lengths"]) for j, d in enumerate(r["passkey"]["depths"])]
    if pk_rows:
        data["tables/passkey"] = wandb.Table(columns=["model", "length", "depth", "accuracy"], data=pk_rows)
    tv_rows = [[pair, source, layer, tv] for pair, by_source in summary["routing_shift"].items()
               for source, values in by_source.items() for layer, tv in enumerate(values)]
    if tv_rows:
        data["tables/routing_shift"] = wandb.Table(columns=["models", "source", "layer", "tv"], data=tv_rows)
    run.log(data)
    for m, r in summary["models"].items():
        run.summary[f"{m}/loss"] = r["loss"]["all"]["loss"]
        run.summary[f"{m}/perplexity"] = r["loss"]["all"]["perplexity"]
        if "passkey" in r:
            run.summary[f"{m}/passkey_accuracy"] = r["passkey"]["mean_accuracy"]
    run.finish()
    if reason:
        log(f"eval: W&B {reason}, logged offline under {out_dir / 'wandb'}; upload with `wandb sync`")


# ----------------------------------------------------------------------------------------------
# Entry
# ----------------------------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run(recipe: EvalRecipe, log=print) -> dict:
    """The whole stage; returns what eval.json holds. output_dir: new, empty or an earlier eval's
    (pipeline/rundir.py), locked by the main process while this runs."""
    import contextlib

    # 0. Every startup check of this recipe under this launch (the ones `make plan` runs).
    preflight(recipe, LaunchSpec.from_env())
    procs = Processes(recipe.parallel, recipe.device)
    with contextlib.ExitStack() as stack:
        # The main process claims and locks the output dir; a refusal stops every process.
        on_main_for_all(procs.is_main,
                        lambda: stack.enter_context(owned_output(recipe.output_dir, "eval")) and None)
        return _evaluate(recipe, log, procs)


def _evaluate(recipe: EvalRecipe, log, procs: Processes) -> dict:
    from data_prep import load_tokenizer

    started = time.perf_counter()
    # 1. Device, models to compare, tokenizer, held-out rows (run() checked the recipe and owns the
    #    output dir on the main process).
    device = procs.device
    if not procs.is_main:
        def log(*args, **kwargs):
            return None
    out_dir = Path(recipe.output_dir)
    if procs.is_main:
        save_recipe(recipe, out_dir / "recipe.yaml")
    models = resolve_models(recipe, log)
    tokenizer = load_tokenizer(recipe.data.tokenizer)
    if not procs.is_main:
        procs.barrier()  # the main process prepares data.dir first when it is missing
    rows = load_eval_rows(recipe.data, log)
    if procs.is_main:
        procs.barrier()
    sources = sorted({source for r in rows for source in r["document_sources"]})
    described = ", ".join(f"{n} ({d or 'random init'})" for n, d in models)
    where = f" ({procs.world} processes, expert parallel {recipe.parallel.expert_parallel_size})" if procs.launched else ""
    log(f"eval: {len(rows)} held-out rows ({', '.join(sources)}); models: {described}; device {device}{where}")

    # 2. Each model: loss per source + routing statistics, routing text, passkey grid.
    results: dict[str, dict] = {}
    texts: dict[str, list[dict]] = {}
    layers: list[int] = []
    for name, directory in models:
        model = build_model(directory, recipe, device, procs)
        num_layers = model.config.num_hidden_layers
        layers = recipe.routing.layers if recipe.routing.layers is not None else default_layers(num_layers)
        check_routing_layers(layers, num_layers)
        if recipe.passkey.enabled and max(recipe.passkey.lengths) > model.config.max_position_embeddings:
            log(f"eval: {name}: passkey.lengths go beyond the model's max_position_embeddings "
                f"({model.config.max_position_embeddings}); expect those cells to fail")
        t0 = time.perf_counter()
        losses, stats = loss_and_routing(model, rows, recipe.data.batch_size, device, procs)
        results[name] = {"directory": directory, "loss": losses, "routing": stats.summary()}
        texts[name] = routing_text(model, rows, layers, recipe.routing.text_samples, recipe.routing.text_tokens, device)
        log(f"eval: {name}: loss {losses['all']['loss']:.4f} (perplexity {losses['all']['perplexity']:.2f}) "
            f"in {time.perf_counter() - t0:.1f} s")
        if recipe.passkey.enabled:
            t0 = time.perf_counter()
            results[name]["passkey"] = passkey_grid(model, tokenizer, recipe.passkey, device)
            log(f"eval: {name}: passkey accuracy {results[name]['passkey']['mean_accuracy']:.1%} "
                f"in {time.perf_counter() - t0:.1f} s")
        del model

    # 3. Routing shift between models, plots, HTML, eval.json (the main process writes).
    shift = routing_shift(results)
    random_note = any(d is None for _, d in models)
    note = ("Evaluated a RANDOM-INIT model: no trained run directory was found." if random_note else
            "Evaluated: " + ", ".join(f"{n} = {d}" for n, d in models) + ".")
    summary = {
        "models": results, "routing_shift": shift, "layers": layers, "sources": sources,
        "random_init": random_note, "note": note, "routing_text": texts,
        "processes": procs.world, "expert_parallel_size": recipe.parallel.expert_parallel_size,
    }
    if not procs.is_main:
        procs.barrier()  # returns once the main process has written everything
        return summary
    pngs = make_report(out_dir, results, shift, texts, PieceNames(tokenizer), layers, note)
    record(out_dir, [p.name for p in pngs])
    summary |= {"plots": [p.name for p in pngs], "report": "report.html",
                "seconds": round(time.perf_counter() - started, 2)}
    tmp = out_dir / "eval.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, out_dir / "eval.json")

    # 4. Tracking.
    if recipe.tracking.report_to == "wandb":
        log_wandb(recipe, out_dir, summary, pngs, log)
    log(f"eval: done in {summary['seconds']} s; {out_dir / 'report.html'}")
    procs.barrier()
    return summary


def main(argv: list[str] | None = None) -> dict:
    path, overrides = parse_cli(argv, usage=__doc__.split("\n\n")[1])
    raw = load_recipe_dict(path, overrides)
    recipe = build(EvalRecipe, raw, source=str(path))
    return run(recipe)


if __name__ == "__main__":
    try:
        main()
    except (RecipeError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
