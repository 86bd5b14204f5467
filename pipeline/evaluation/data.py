"""The rows an eval reads: prepared SFT splits (pipeline.prep's layout), and the source of each
document of a packed row (rows mix sources; per-source numbers go by document)."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import RecipeError
from pipeline.evaluation.recipe import DataSection
from pipeline.prep_data import prepare_recipe_data

COLUMNS = ("input_ids", "labels")


def load_eval_rows(section: DataSection, log=print) -> list[dict]:
    """Held-out rows, then the routing-only rows (``heldout`` False), at most
    ``max_rows_per_source`` per source and directory; prepares ``dir`` first if asked."""
    root = Path(section.dir)
    if not root.is_dir():
        _refuse_an_empty_split(root)
        if section.prep_recipe is None:
            raise FileNotFoundError(f"data.dir: {root} does not exist; run `python -m pipeline.prep RECIPE` "
                                    "or set data.prep_recipe")
        log(f"eval: {root} missing, preparing it with pipeline.prep {section.prep_recipe}")
        prepare_recipe_data(section.prep_recipe)
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
