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

import contextlib
import json
import os
import time
from pathlib import Path

from pipeline.config import build, load_recipe_dict, save_recipe
from pipeline.evaluation.data import load_eval_rows
from pipeline.evaluation.models import Processes, build_model, resolve_models
from pipeline.evaluation.passkey import passkey_grid
from pipeline.evaluation.perplexity import loss_and_routing
from pipeline.evaluation.recipe import EvalRecipe
from pipeline.evaluation.results import PieceNames, log_wandb, make_report
from pipeline.evaluation.routing import default_layers, routing_shift, routing_text
from pipeline.preflight import LaunchSpec, check_routing_layers, preflight
from pipeline.rundir import on_main_for_all, owned_output, record
from pipeline.stage import stage_main


def run(recipe: EvalRecipe, log=print) -> dict:
    """The whole stage; returns what eval.json holds. output_dir: new, empty or an earlier eval's
    (pipeline/rundir.py), locked by the main process while this runs."""
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


def load_recipe(path: str, overrides: list[str]) -> EvalRecipe:
    return build(EvalRecipe, load_recipe_dict(path, overrides), source=str(path))


def main(argv: list[str] | None = None) -> int:
    return stage_main(argv, __doc__.split("\n\n")[1], load_recipe, run, local_errors=(FileNotFoundError, ValueError))


if __name__ == "__main__":
    raise SystemExit(main())
