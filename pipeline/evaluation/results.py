"""What an eval writes besides eval.json's numbers: the plots and report.html (`make_report`, from
pipeline/evaluation/report.py's pieces), and the same to W&B (`log_wandb`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.evaluation import report

if TYPE_CHECKING:
    from pipeline.evaluation.recipe import EvalRecipe


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
