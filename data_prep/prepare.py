"""The prep stage: sources -> validated, encoded, deduplicated, split and packed datasets on disk.

    manifest = prepare(data_config)        # what `python -m pipeline.prep RECIPE` runs

Output directory (each entry written into a temp dir inside it, then renamed into place; the old
manifest.json goes first and the new one comes last, so a directory with a manifest is always whole):
    train/ eval/      datasets.save_to_disk (columns in docs/interfaces.md); no eval/ when the
                      eval split is empty (datasets cannot load a split of 0 rows back)
    manifest.json     sources + content hashes, tokenizer hash, resolved data recipe, counts,
                      token statistics and the fingerprint of all of it
    report.md         counts, rejects by reason, length histograms
    rejects.jsonl     one line per unused record: source, locator, reason, detail

Nothing is lost silently: per source, read = accepted + rejected, where rejected covers invalid
records (bad JSON, bytes that are not UTF-8, ...), over-long ones (policy "drop") and exact
duplicates. A source none of whose records is usable stops the stage (PrepError) before anything is
written, naming the file and the most common reasons. A re-run whose fingerprint (data recipe,
source hashes, tokenizer hash, this package's code) matches the manifest does nothing.

A re-run replaces only the entries prep writes (OUTPUT_ENTRIES); anything else in the directory
stays. ``python -m pipeline.prep`` also refuses a directory prep did not write (the folder of the
source files, say) and holds its lock while writing (``own_output``, from pipeline/rundir.py).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import random
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from data_prep.config import NOT_IN_OUTPUT, DataConfig, SourceConfig
from data_prep.encode import (
    IGNORE_INDEX,
    encode_conversations,
    encode_preferences,
    normalize_turns,
    truncate_pair,
    truncate_sft,
)
from data_prep.formats import RecordError, to_messages, to_preference
from data_prep.pack import pack
from data_prep.sources import RawSource, draw, file_hash, read_source
from data_prep.tokenizer import Tokenizer, load_tokenizer

# Version of what prep writes (manifest and row columns); part of the fingerprint. 2: SFT rows carry
# `document_sources`. The code hash alone would already redo the work after the change, but the
# version says in manifest.json which row layout a directory holds, and an older one is never
# taken as up to date whatever the code hash does.
MANIFEST_VERSION = 2
# What prep writes at the top of data.output_dir (ref_logps/: the DPO stage's reference cache, which a
# new preparation makes stale).
OUTPUT_ENTRIES = ("train", "eval", "manifest.json", "report.md", "rejects.jsonl", "ref_logps")


# ----------------------------------------------------------------------------------------------
# Per-record work (runs in worker processes when num_proc > 1)
# ----------------------------------------------------------------------------------------------


@dataclass
class ChunkResult:
    examples: list[dict] = field(default_factory=list)  # source, locator + token columns
    rejects: list[dict] = field(default_factory=list)  # source, locator, reason, detail
    truncated: int = 0
    read: int = 0


# Each worker process opens the tokenizer once (in _init_worker), not once per chunk.
_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(tokenizer: Tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _encode_in_worker(job: tuple) -> ChunkResult:
    return _encode_chunk(job, _WORKER_TOKENIZER)


def _encode_chunk(job: tuple, tokenizer: Tokenizer) -> ChunkResult:
    """Validate, encode and length-check one chunk of (locator, record) pairs of one source."""
    cfg, source_name, fmt, records = job
    result = ChunkResult()
    valid = []  # (locator, normalized turns | Preference)
    for locator, record in records:
        try:
            if isinstance(record, RecordError):
                raise record
            if cfg.kind == "sft":
                valid.append((locator, normalize_turns(to_messages(record, fmt))))
            else:
                pair = to_preference(record, fmt)
                normalize_turns(pair.prompt + [{"role": "assistant", "content": pair.chosen}])
                valid.append((locator, pair))
        except RecordError as err:
            result.rejects.append({"source": source_name, "locator": locator, "reason": err.reason, "detail": err.detail})
    if cfg.kind == "sft":
        encoded = encode_conversations([v for _, v in valid], tokenizer, last_answer_only=cfg.train_on_last_answer_only)
    else:
        encoded = encode_preferences([v for _, v in valid], tokenizer)
    for (locator, _), example in zip(valid, encoded, strict=True):
        fitted = _fit_length(cfg, example)
        if fitted is None:
            result.rejects.append({"source": source_name, "locator": locator, "reason": "too_long", "detail": _too_long_detail(cfg, example)})
            continue
        result.truncated += fitted is not example
        result.examples.append({"source": source_name, "locator": locator, **fitted})
    return result


def _length(kind: str, example: dict) -> int:
    if kind == "sft":
        return len(example["input_ids"])
    return len(example["prompt"]) + max(len(example["chosen"]), len(example["rejected"]))


def _fit_length(cfg: DataConfig, example: dict) -> dict | None:
    """The example itself when it fits, a truncated copy (policy "truncate"), or None (dropped)."""
    if _length(cfg.kind, example) <= cfg.max_seq_len:
        return example
    if cfg.overlength == "drop":
        return None
    if cfg.kind == "sft":
        return truncate_sft(example, cfg.max_seq_len)
    return truncate_pair(example, cfg.max_seq_len, cfg.prompt_budget)


def _too_long_detail(cfg: DataConfig, example: dict) -> str:
    action = "nothing left to train on after truncation" if cfg.overlength == "truncate" else "dropped (overlength: drop)"
    return f"{_length(cfg.kind, example)} tokens > max_seq_len {cfg.max_seq_len}: {action}"


# ----------------------------------------------------------------------------------------------
# Fingerprint
# ----------------------------------------------------------------------------------------------



def _code_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def resolved_config(cfg: DataConfig) -> dict:
    return dataclasses.asdict(cfg)


def source_hash(source: SourceConfig) -> str:
    """Content hash of a local file; for an HF dataset, its `datasets` fingerprint."""
    if source.path is not None:
        path = Path(source.path)
        if not path.is_file():
            raise FileNotFoundError(f"data.sources: {path} does not exist")
        return file_hash(path)
    return read_source(source).content_hash


def fingerprint(cfg: DataConfig, source_hashes: list[str], tokenizer: Tokenizer) -> str:
    recipe = {k: v for k, v in resolved_config(cfg).items() if k not in NOT_IN_OUTPUT}
    payload = {
        "version": MANIFEST_VERSION,
        "recipe": recipe,
        "sources": source_hashes,
        "tokenizer": tokenizer.sha256,
        "code": _code_hash(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def up_to_date(output_dir: Path, fp: str) -> dict | None:
    """The existing manifest when ``output_dir`` already holds exactly this fingerprint's output."""
    manifest_path = output_dir / "manifest.json"
    if not manifest_path.is_file() or not (output_dir / "train").is_dir():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return None
    if manifest.get("stats", {}).get("eval", {}).get("rows", 0) and not (output_dir / "eval").is_dir():
        return None
    return manifest if manifest.get("fingerprint") == fp else None


class PrepError(ValueError):
    """The sources give nothing to train on; the message names the file and what was wrong."""


def check_usable_sources(per_source: list[tuple[RawSource, ChunkResult]]) -> None:
    """Raise PrepError when a source gave no usable example (an empty file, a binary file, the
    wrong format...): the later stages would fail far from the cause."""
    for raw, result in per_source:
        if result.examples:
            continue
        name = raw.config.name
        if result.read == 0:
            raise PrepError(f"data.sources: {name} holds no records (an empty file, or only blank lines)")
        reasons = collections.Counter(r["reason"] for r in result.rejects).most_common(3)
        first = "; ".join(f"{r['locator']}: {r['detail']}" for r in result.rejects[:2])
        raise PrepError(
            f"data.sources: {name}: 0 of {result.read} records usable (rejected: "
            f"{', '.join(f'{reason} {n}' for reason, n in reasons)}; e.g. {first}); check the file's format "
            f"and encoding (records are UTF-8 JSON objects, see docs/stages.md, data prep)"
        )


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------


def prepare(cfg: DataConfig, *, force: bool = False, log=print,
            own_output: Callable[[Path], contextlib.AbstractContextManager] | None = None) -> dict:
    """Run the prep stage for ``cfg`` (skipped when the output is up to date); returns the manifest.

    ``own_output(output_dir)``: a context held while the output is written (pipeline.prep passes
    pipeline.rundir.owned_output: the ownership check and the lock).
    """
    started = time.perf_counter()
    output_dir = Path(cfg.output_dir)

    # 1. Fingerprint: an unchanged re-run stops here.
    tokenizer = load_tokenizer(cfg.tokenizer)
    hashes = [source_hash(s) for s in cfg.sources]
    fp = fingerprint(cfg, hashes, tokenizer)
    existing = None if force else up_to_date(output_dir, fp)
    if existing is not None:
        log(f"prep: {output_dir} is up to date (fingerprint {fp[:12]}), nothing to do")
        return existing

    # 2. Read, draw each source's fraction, validate + encode + apply the length policy.
    per_source = []
    for source in cfg.sources:
        raw = read_source(source)
        per_source.append((raw, _process_source(cfg, raw, tokenizer)))
    check_usable_sources(per_source)

    # 3. Exact duplicates (same ids) go; train sources come first so their copy is the one kept.
    counts, rejects = _count(per_source)
    ordered = sorted(range(len(per_source)), key=lambda i: cfg.sources[i].role != "train")
    seen: set = set()
    kept: dict[int, list[dict]] = {}
    for i in ordered:
        raw, result = per_source[i]
        kept[i] = []
        for example in result.examples:
            key = _dedup_key(cfg.kind, example)
            if cfg.dedup and key in seen:
                rejects.append({"source": raw.config.name, "locator": example["locator"], "reason": "duplicate", "detail": "same token ids as an earlier example"})
                rejected = counts[raw.config.name]["rejected"]
                rejected["duplicate"] = rejected.get("duplicate", 0) + 1
                continue
            seen.add(key)
            kept[i].append(example)

    # 4. Split: eval sources whole, plus a seeded eval_fraction of each train source.
    train, evals = [], []
    for i, source in enumerate(cfg.sources):
        examples = kept[i]
        if source.role == "eval":
            evals += examples
            continue
        n_eval = round(cfg.eval_fraction * len(examples))
        chosen = set(random.Random(f"{cfg.seed}:eval:{source.name}").sample(range(len(examples)), n_eval))
        for j, example in enumerate(examples):
            (evals if j in chosen else train).append(example)
        counts[source.name]["to_eval"] = n_eval
    for i, source in enumerate(cfg.sources):
        c = counts[source.name]
        c["accepted"] = len(kept[i])
        c["rejected_total"] = sum(c["rejected"].values())
        if c["accepted"] + c["rejected_total"] != c["read"]:
            raise AssertionError(f"prep lost records of {source.name}: {c}")
        if not kept[i]:
            log(f"prep: warning: every usable example of {source.name} ({source.role} source) duplicates one "
                "kept from another source, so it contributes nothing")
    if not train:
        raise PrepError("data.sources: no example is left for train/ (only role: eval sources, or every train "
                        "example went to eval); add a train source or lower data.eval_fraction")

    # 5. Rows.
    splits = {"train": _rows(cfg, train, seed=cfg.seed), "eval": _rows(cfg, evals, seed=cfg.seed + 1)}

    # 6. Write everything into a temp dir inside the destination, then move it in (see _write_output).
    manifest = {
        "version": MANIFEST_VERSION,
        "fingerprint": fp,
        "kind": cfg.kind,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "data": resolved_config(cfg),
        "tokenizer": {"path": str(tokenizer.path), "kind": tokenizer.kind, "sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size},
        "sources": [
            {"name": s.name, "path": s.path, "hf": s.hf, "split": s.split, "subset": s.subset, "revision": s.revision, "role": s.role, "fraction": s.fraction, "content_hash": h}
            for s, h in zip(cfg.sources, hashes, strict=True)
        ],
        "counts": counts,
        "rejects_by_reason": dict(collections.Counter(r["reason"] for r in rejects).most_common()),
        "stats": {name: _stats(cfg, examples, splits[name]) for name, examples in (("train", train), ("eval", evals))},
    }
    manifest["seconds"] = round(time.perf_counter() - started, 3)
    with (own_output or _no_owner)(output_dir):
        _write_output(output_dir, splits, manifest, rejects, cfg.kind)
    log(_summary(manifest, output_dir))
    return manifest


def _process_source(cfg: DataConfig, raw: RawSource, tokenizer: Tokenizer) -> ChunkResult:
    indices = draw(raw, cfg.seed)
    name = raw.config.name
    jobs = []
    for start in range(0, len(indices), cfg.batch_size):
        records = [(raw.locators[i], raw.record(i)) for i in indices[start : start + cfg.batch_size]]
        jobs.append((cfg, name, raw.config.format, records))
    total = ChunkResult()
    bar = tqdm(total=len(indices), desc=f"encode {name}", unit="rec", disable=len(indices) < 20_000 or None, leave=False)
    if cfg.num_proc > 1 and len(jobs) > 1:
        # spawn, not fork: the parent may hold threads (tokenizers, torch) that fork would copy mid-state.
        # A pool executor (not multiprocessing.Pool) so that a worker that dies raises instead of hanging.
        context = multiprocessing.get_context("spawn")
        workers = min(cfg.num_proc, len(jobs))
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(tokenizer,)) as pool:
            for result in pool.map(_encode_in_worker, jobs):
                _merge(total, result, bar)
    else:
        for job in jobs:
            _merge(total, _encode_chunk(job, tokenizer), bar)
    bar.close()
    total.read = len(indices)
    return total


def _merge(total: ChunkResult, result: ChunkResult, bar) -> None:
    total.examples += result.examples
    total.rejects += result.rejects
    total.truncated += result.truncated
    bar.update(len(result.examples) + len(result.rejects))


def _count(per_source) -> tuple[dict, list[dict]]:
    counts, rejects = {}, []
    for raw, result in per_source:
        reasons = collections.Counter(r["reason"] for r in result.rejects)
        counts[raw.config.name] = {
            "role": raw.config.role,
            "rows": len(raw.rows),
            "read": result.read,
            "accepted": 0,
            "rejected": dict(reasons),
            "truncated": result.truncated,
            "to_eval": 0,
        }
        rejects += result.rejects
    return counts, rejects


def _dedup_key(kind: str, example: dict) -> bytes:
    if kind == "sft":
        parts = (example["input_ids"], example["labels"])
    else:
        parts = (example["prompt"], example["chosen"], example["rejected"])
    return hashlib.blake2b(json.dumps(parts, separators=(",", ":")).encode(), digest_size=16).digest()


def _rows(cfg: DataConfig, examples: list[dict], seed: int) -> dict[str, list]:
    if cfg.kind == "sft":
        rows = pack(examples, cfg.max_seq_len, packing=cfg.packing)
    else:
        rows = {
            "prompt_input_ids": [e["prompt"] for e in examples],
            "chosen_input_ids": [e["prompt"] + e["chosen"] for e in examples],
            "chosen_labels": [[IGNORE_INDEX] * len(e["prompt"]) + e["chosen"] for e in examples],
            "rejected_input_ids": [e["prompt"] + e["rejected"] for e in examples],
            "rejected_labels": [[IGNORE_INDEX] * len(e["prompt"]) + e["rejected"] for e in examples],
            "source": [e["source"] for e in examples],
        }
    # Packing orders rows longest-first; shuffle so that batches mix lengths and sources.
    order = list(range(len(next(iter(rows.values())))))
    random.Random(seed).shuffle(order)
    return {k: [v[i] for i in order] for k, v in rows.items()}


def _features(kind: str):
    import datasets

    ids = datasets.Sequence(datasets.Value("int32"))
    if kind == "sft":
        columns = {k: ids for k in ("input_ids", "labels", "position_ids", "document_ids")}
        columns |= {"source": datasets.Value("string"), "document_sources": datasets.Sequence(datasets.Value("string")),
                    "num_documents": datasets.Value("int32")}
    else:
        columns = {k: ids for k in ("prompt_input_ids", "chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")}
        columns["source"] = datasets.Value("string")
    return datasets.Features(columns)


# ----------------------------------------------------------------------------------------------
# Statistics and report
# ----------------------------------------------------------------------------------------------


def _stats(cfg: DataConfig, examples: list[dict], rows: dict[str, list]) -> dict:
    if cfg.kind == "sft":
        lengths = [len(e["input_ids"]) for e in examples]
        tokens = sum(lengths)
        n_rows = len(rows["input_ids"])
        return {
            "examples": len(examples),
            "rows": n_rows,
            "tokens": tokens,
            "label_tokens": sum(sum(label != IGNORE_INDEX for label in e["labels"]) for e in examples),
            "max_len": max(lengths, default=0),
            "mean_len": round(tokens / len(lengths), 2) if lengths else 0.0,
            # Share of row slots (rows x max_seq_len) that hold real tokens.
            "packing_efficiency": round(tokens / (n_rows * cfg.max_seq_len), 4) if n_rows else 0.0,
            "length_histogram": _histogram(lengths, cfg.max_seq_len),
        }
    lengths = [_length("dpo", e) for e in examples]
    return {
        "examples": len(examples),
        "rows": len(examples),
        "prompt_tokens": sum(len(e["prompt"]) for e in examples),
        "chosen_tokens": sum(len(e["chosen"]) for e in examples),
        "rejected_tokens": sum(len(e["rejected"]) for e in examples),
        "max_len": max(lengths, default=0),
        "mean_len": round(sum(lengths) / len(lengths), 2) if lengths else 0.0,
        "length_histogram": _histogram(lengths, cfg.max_seq_len),
    }


def _histogram(lengths: list[int], max_len: int) -> dict[str, int]:
    """Counts in power-of-two buckets ("<=16", "<=32", ... up to max_len)."""
    edges, edge = [], 16
    while edge < max_len:
        edges.append(edge)
        edge *= 2
    edges.append(max_len)
    counts = collections.Counter(next(e for e in edges if n <= e) for n in lengths)
    return {f"<={e}": counts.get(e, 0) for e in edges}


def _report(manifest: dict) -> str:
    lines = [f"# Data prep report ({manifest['kind']})", "", f"Fingerprint `{manifest['fingerprint']}`, {manifest['seconds']} s.", ""]
    lines += ["## Sources", "", "| source | role | rows | read | accepted | rejected | truncated | to eval |", "|---|---|---|---|---|---|---|---|"]
    for name, c in manifest["counts"].items():
        lines.append(f"| {name} | {c['role']} | {c['rows']} | {c['read']} | {c['accepted']} | {c['rejected_total']} | {c['truncated']} | {c['to_eval']} |")
    lines += ["", "## Rejects by reason", "", "| reason | count |", "|---|---|"]
    lines += [f"| {reason} | {n} |" for reason, n in manifest["rejects_by_reason"].items()] or ["| (none) | 0 |"]
    for split, stats in manifest["stats"].items():
        lines += ["", f"## {split}", ""]
        lines += [f"- {k}: {v}" for k, v in stats.items() if k != "length_histogram"]
        hist = stats["length_histogram"]
        top = max(hist.values(), default=0) or 1
        lines += ["", "| tokens | examples | |", "|---|---|---|"]
        lines += [f"| {bucket} | {n} | {'#' * round(40 * n / top)} |" for bucket, n in hist.items()]
    return "\n".join(lines) + "\n"


def _summary(manifest: dict, output_dir: Path) -> str:
    read = sum(c["read"] for c in manifest["counts"].values())
    accepted = sum(c["accepted"] for c in manifest["counts"].values())
    train, evals = manifest["stats"]["train"], manifest["stats"]["eval"]
    text = (
        f"prep: {read} records read, {accepted} accepted, {read - accepted} rejected "
        f"({', '.join(f'{k} {v}' for k, v in manifest['rejects_by_reason'].items()) or 'none'}); "
        f"train {train['examples']} examples in {train['rows']} rows, eval {evals['examples']} in {evals['rows']} rows"
    )
    if "packing_efficiency" in train:
        text += f"; packing efficiency {train['packing_efficiency']:.1%}"
    return text + f"; wrote {output_dir} in {manifest['seconds']} s"


def _write_output(output_dir: Path, splits: dict, manifest: dict, rejects: list[dict], kind: str) -> None:
    """Write every entry into a temp dir inside ``output_dir``, then replace prep's entries: the old
    manifest.json goes first, the new one comes last. The caller holds the directory's lock."""
    import datasets

    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in output_dir.glob(".tmp-prep-*"):  # a killed prep's; the lock says none is live
        shutil.rmtree(stale, ignore_errors=True)
    tmp = output_dir / f".tmp-prep-{os.getpid()}"
    tmp.mkdir()
    try:
        features = _features(kind)
        with _quiet_datasets():
            for name, rows in splits.items():
                if next(iter(rows.values())):  # an empty split is left out (see the module docstring)
                    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp / name))
        with open(tmp / "rejects.jsonl", "w", encoding="utf-8") as fh:
            for reject in rejects:
                fh.write(json.dumps(reject, ensure_ascii=False) + "\n")
        (tmp / "report.md").write_text(_report(manifest))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        (output_dir / "manifest.json").unlink(missing_ok=True)
        for name in OUTPUT_ENTRIES:
            old = output_dir / name
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            elif old.exists() or old.is_symlink():
                old.unlink()
        for name in sorted(p.name for p in tmp.iterdir() if p.name != "manifest.json") + ["manifest.json"]:
            os.replace(tmp / name, output_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _no_owner(output_dir: Path):
    yield


@contextlib.contextmanager
def _quiet_datasets():
    """No "Saving the dataset" bars: prep prints its own one-line summary."""
    import datasets

    was_disabled = datasets.is_progress_bar_enabled() is False
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()
