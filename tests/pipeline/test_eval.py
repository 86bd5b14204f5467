import json
import math
import shutil
from pathlib import Path

import datasets
import pytest
import torch

from data_prep import encode_messages, load_tokenizer
from model import Mixtral, MixtralConfig
from model.checkpoint import save_pretrained
from model.losses import IGNORE_INDEX
from pipeline.config import RecipeError
from pipeline.eval import load_recipe, main, run
from pipeline.evaluation.data import document_sources, first_documents, read_rows
from pipeline.evaluation.models import load_model_dir, resolve_models
from pipeline.evaluation.passkey import greedy_generate
from pipeline.evaluation.perplexity import loss_and_routing, token_nll
from pipeline.evaluation.recipe import EvalRecipe
from pipeline.evaluation.routing import routing_text
from pipeline.training.batches import collate_rows as collate

REPO = Path(__file__).resolve().parents[2]
TINY_RECIPE = REPO / "recipes" / "tiny" / "eval.yaml"


def evaluate(args: list[str]) -> dict:
    """The eval stage on a recipe and overrides, as `main` runs it, its summary returned and its errors raised."""
    return run(load_recipe(args[0], args[1:]))


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return Mixtral(MixtralConfig.preset("tiny")).eval()


def test_token_nll_by_hand():
    # V = 2, logits [0, ln 3]: p(1) = 3/4, p(0) = 1/4. Position s scores the label at s + 1.
    logits = torch.tensor([[[0.0, math.log(3)]] * 4])
    labels = torch.tensor([[IGNORE_INDEX, 1, 0, IGNORE_INDEX]])
    nll, count = token_nll(logits, labels)
    assert count.tolist() == [2]
    assert nll.item() == pytest.approx(math.log(4 / 3) + math.log(4))


def test_token_nll_matches_the_model_loss():
    model = tiny_model()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 32000, (3, 17), generator=gen)
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX
    labels[1, 9:] = IGNORE_INDEX
    with torch.no_grad():
        out = model(ids, labels=labels, loss_reduction="sum")
    nll, count = token_nll(out.logits, labels)
    assert count.sum() == out.num_label_tokens
    assert nll.sum().item() == pytest.approx(out.loss.item(), rel=1e-5)


def test_collate_pads_with_masked_tokens():
    rows = [{"input_ids": [1, 5, 6], "labels": [-100, 5, 6], "position_ids": [0, 0, 1], "document_ids": [0, 1, 1]},
            {"input_ids": [1, 7], "labels": [-100, 7]}]
    batch = collate(rows)
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 0]]
    assert batch["labels"].tolist() == [[-100, 5, 6], [-100, 7, -100]]
    assert batch["position_ids"].tolist() == [[0, 0, 1], [0, 1, 0]]
    assert batch["document_ids"].tolist() == [[0, 1, 1], [0, 0, -1]]
    assert "attention_mask" not in batch  # padding is document id -1 only


def test_greedy_generate_is_argmax_continuation():
    model = tiny_model()
    prompt = [1, 733, 16289, 28793]
    new = greedy_generate(model, prompt, 4, eos_id=2, device=torch.device("cpu"))
    ids = prompt + new
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    assert len(new) == 4
    assert [int(logits[len(prompt) - 1 + i].argmax()) for i in range(4)] == new


def test_load_full_and_lora_runs(tmp_path):
    import model.lora  # noqa: F401
    from model.lora import apply_lora

    base = tiny_model(1)
    save_pretrained(base, tmp_path / "base")
    ids = torch.randint(3, 32000, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected_base = base(ids).logits
    full = load_model_dir(tmp_path / "base")
    with torch.no_grad():
        assert torch.equal(full(ids).logits, expected_base)

    # A LoRA run: adapter with non-zero B (a fresh adapter is a no-op) + a manifest naming the base.
    peft_model = apply_lora(tiny_model(1), r=4, alpha=8, dropout=0.0,
                            target_modules=("q_proj", "v_proj", "experts"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.05)
        expected = peft_model(ids).logits
    run = tmp_path / "sft"
    peft_model.save_pretrained(run)
    (run / "manifest.json").write_text(json.dumps({"kind": "lora", "base": {"checkpoint": str(tmp_path / "base")}}))
    merged = load_model_dir(run)
    assert isinstance(merged, Mixtral)
    with torch.no_grad():
        got = merged(ids).logits
    assert (got - expected).abs().max().item() < 1e-4
    assert (got - expected_base).abs().max().item() > 1e-3

    # A DPO run over the SFT run: its base is the SFT dir, whose base is the checkpoint.
    dpo_model = apply_lora(load_model_dir(run), r=2, alpha=4, dropout=0.0, target_modules=("o_proj", "experts"))
    with torch.no_grad():
        for name, param in dpo_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.05)
        expected_dpo = dpo_model(ids).logits
    dpo = tmp_path / "dpo"
    dpo_model.save_pretrained(dpo)
    (dpo / "manifest.json").write_text(json.dumps({"kind": "lora", "base": {"checkpoint": str(run)}}))
    with torch.no_grad():
        got_dpo = load_model_dir(dpo)(ids).logits
    assert (got_dpo - expected_dpo).abs().max().item() < 1e-4
    assert (got_dpo - got).abs().max().item() > 1e-3

    (run / "manifest.json").write_text(json.dumps({"kind": "lora", "base": {}}))
    with pytest.raises(ValueError, match="base.checkpoint"):
        load_model_dir(run)
    with pytest.raises(FileNotFoundError, match="neither"):
        load_model_dir(tmp_path)


def test_missing_models_skip_or_refuse(tmp_path):
    (tmp_path / "here").mkdir()
    (tmp_path / "here" / "config.json").write_text("{}")
    (tmp_path / "unfinished").mkdir()
    logs = []
    recipe = EvalRecipe(output_dir=str(tmp_path / "out"), models={"a": str(tmp_path / "here"), "b": str(tmp_path / "gone")})
    assert resolve_models(recipe, logs.append) == [("a", str(tmp_path / "here"))]
    assert "models.b" in logs[0] and "skipped" in logs[0]
    recipe.models = {"c": str(tmp_path / "unfinished")}
    assert resolve_models(recipe, logs.append) == [("random-tiny", None)]
    assert "models.c" in logs[-2] and "no finished run" in logs[-2]
    recipe.models = {"b": str(tmp_path / "gone")}
    assert resolve_models(recipe, logs.append) == [("random-tiny", None)]
    assert "RANDOM-INIT" in logs[-1]
    recipe.missing_models = "error"
    with pytest.raises(FileNotFoundError, match="models.b"):
        resolve_models(recipe, logs.append)


def packed_row(documents: list[tuple[str, dict]]) -> dict:
    """One row in pipeline.prep's layout from (source, {"input_ids", "labels"}) documents, in order."""
    row = {"input_ids": [], "labels": [], "position_ids": [], "document_ids": []}
    for doc, (_, enc) in enumerate(documents):
        n = len(enc["input_ids"])
        row["input_ids"] += enc["input_ids"]
        row["labels"] += enc["labels"]
        row["position_ids"] += range(n)
        row["document_ids"] += [doc] * n
    sources = [source for source, _ in documents]
    return row | {"source": sources[0], "document_sources": sources, "num_documents": len(documents)}


def random_document(gen: torch.Generator, length: int, prompt: int) -> dict:
    """BOS + random ids; labels -100 on BOS and the first ``prompt`` tokens (as prep's encoding)."""
    ids = [1] + torch.randint(3, 32000, (length - 1,), generator=gen).tolist()
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * (prompt + 1) + ids[prompt + 1:]}


def mixed_rows_and_documents():
    """Packed rows mixing sources "a" and "b" (and one single document), plus each document alone."""
    gen = torch.Generator().manual_seed(3)
    docs = {name: random_document(gen, length, prompt) for name, length, prompt in
            [("a1", 13, 4), ("b1", 21, 6), ("b2", 9, 2), ("a2", 17, 5), ("b3", 11, 3), ("a3", 15, 7)]}
    layout = [["a1", "b1"], ["b2", "a2", "b3"], ["a3"]]
    rows = [packed_row([(name[0], docs[name]) for name in names]) for names in layout]
    alone = [packed_row([(name[0], doc)]) for name, doc in docs.items()]
    return rows, alone


def test_mixed_rows_attribute_loss_and_routing_to_each_documents_source():
    model = tiny_model()
    rows, alone = mixed_rows_and_documents()
    cpu = torch.device("cpu")
    losses, stats = loss_and_routing(model, rows, batch_size=2, device=cpu)  # the 3-doc row pads the 1-doc row
    expected, expected_stats = loss_and_routing(model, alone, batch_size=1, device=cpu)
    # Reference by hand too: each document alone, its NLL from the model's own summed loss.
    for source in ("a", "b"):
        nll, tokens = 0.0, 0
        for row in alone:
            if row["source"] == source:
                with torch.no_grad():
                    out = model(torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]]),
                                loss_reduction="sum")
                nll, tokens = nll + out.loss.item(), tokens + int(out.num_label_tokens)
        assert losses[source]["tokens"] == expected[source]["tokens"] == tokens
        assert losses[source]["loss"] == pytest.approx(nll / tokens, rel=1e-5)
        assert losses[source]["loss"] == pytest.approx(expected[source]["loss"], rel=1e-5)
    assert set(losses) == {"a", "b", "all"}
    assert losses["all"]["tokens"] == losses["a"]["tokens"] + losses["b"]["tokens"]
    all_nll = sum(losses[s]["loss"] * losses[s]["tokens"] for s in "ab")
    assert losses["all"]["loss"] == pytest.approx(all_nll / losses["all"]["tokens"], rel=1e-12)
    # Attributing whole rows to their first document (the old way) gives other token counts here.
    by_row = {"a": 0, "b": 0}
    for row in rows:
        by_row[row["source"]] += sum(label != IGNORE_INDEX for label in row["labels"])
    assert by_row != {s: losses[s]["tokens"] for s in "ab"}
    # Routing: every source's counts and consecutive pairs equal those of its documents run alone.
    assert set(stats.counts) == {"a", "b"}
    for source in ("a", "b"):
        assert torch.equal(stats.counts[source], expected_stats.counts[source])
        assert torch.equal(stats.first_counts[source], expected_stats.first_counts[source])
        assert torch.equal(stats.pairs[source], expected_stats.pairs[source])
    doc_tokens = {s: sum(len(r["input_ids"]) for r in alone if r["source"] == s) for s in "ab"}
    for source in ("a", "b"):  # every real token once per layer, K slots each
        assert stats.counts[source].sum(dim=1).tolist() == [2 * doc_tokens[source]] * 2
        assert stats.pairs[source][:, 2].tolist() == [doc_tokens[source] - 3] * 2  # 3 documents each


def test_rows_without_document_sources_fall_back_only_for_one_document():
    rows, alone = mixed_rows_and_documents()
    old_single = {k: v for k, v in alone[0].items() if k != "document_sources"}
    assert document_sources(old_single) == [alone[0]["source"]]
    old_packed = {k: v for k, v in rows[0].items() if k != "document_sources"}
    with pytest.raises(ValueError, match=r"packs 2 documents.*python -m pipeline.prep"):
        document_sources(old_packed)
    with pytest.raises(ValueError, match="python -m pipeline.prep"):
        loss_and_routing(tiny_model(), [old_single, old_packed], batch_size=2, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="3 entries for 2 documents"):
        document_sources(dict(rows[0], document_sources=["a", "b", "b"]))
    # The single-document fallback scores exactly what the new column would.
    model, cpu = tiny_model(), torch.device("cpu")
    olds = [{k: v for k, v in r.items() if k != "document_sources"} for r in alone]
    assert loss_and_routing(model, olds, 3, cpu)[0] == loss_and_routing(model, alone, 3, cpu)[0]


def test_read_rows_refuses_an_old_packed_split_and_names_it(tmp_path):
    rows, alone = mixed_rows_and_documents()
    strip = [{k: v for k, v in r.items() if k != "document_sources"} for r in rows]
    datasets.Dataset.from_list(strip).save_to_disk(str(tmp_path / "old"))
    with pytest.raises(ValueError, match=r"data.dir: .*old row 0 packs 2 documents.*re-run"):
        read_rows(tmp_path / "old", "data.dir", None, heldout=True)
    datasets.Dataset.from_list([{k: v for k, v in r.items() if k != "document_sources"} for r in alone]).save_to_disk(
        str(tmp_path / "old_single"))
    read = read_rows(tmp_path / "old_single", "data.dir", None, heldout=True)
    assert [r["document_sources"] for r in read] == [[r["source"]] for r in alone]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "new"))
    read = read_rows(tmp_path / "new", "data.dir", None, heldout=True)
    assert [r["document_sources"] for r in read] == [["a", "b"], ["b", "a", "b"], ["a"]]


def test_routing_text_takes_the_first_document_of_each_source():
    rows, alone = mixed_rows_and_documents()
    # Source "b" first appears as the second document of row 0 (row 1 is the first row led by "b").
    picked = first_documents(rows, 5)
    assert [(s, ids) for s, ids in picked] == [("a", alone[0]["input_ids"]), ("b", alone[1]["input_ids"])]
    assert first_documents(rows, 1) == picked[:1]
    model = tiny_model()
    texts = routing_text(model, rows, [0, 1], samples=2, max_tokens=10, device=torch.device("cpu"))
    assert [t["source"] for t in texts] == ["a", "b"]
    assert texts[1]["input_ids"] == alone[1]["input_ids"][:10]
    with torch.no_grad():
        logits = model(torch.tensor([alone[1]["input_ids"][:10]]), output_router_logits=True).router_logits
    assert texts[1]["experts"][1] == logits[1].argmax(dim=-1).tolist()


def write_eval_data(root: Path) -> Path:
    """Held-out rows in pipeline.prep's layout: two sources, one row packing two documents."""
    tok = load_tokenizer()
    chats = {
        "arith": [("What is 65 + 27? Answer with the number only.", "92"),
                  ("What is 3 * 4?", "12"), ("Add 10 and 5.", "15")],
        "words": [("Convert to upper case: jvxptdun aniloy", "JVXPTDUN ANILOY"),
                  ("List these words as a bulleted list: lemon, river", "- lemon\n- river")],
    }
    encoded = {source: [encode_messages([{"role": "user", "content": q}, {"role": "assistant", "content": a}], tok)
                        for q, a in pairs] for source, pairs in chats.items()}
    # As prep packs them: rows mix sources. Two packed rows (arith + words, words + arith), one single.
    layout = [[("arith", 0), ("words", 0)], [("words", 1), ("arith", 1)], [("arith", 2)]]
    rows = [packed_row([(source, encoded[source][i]) for source, i in docs]) for docs in layout]
    path = root / "data_sft" / "eval"
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    # A "train" split with another domain, for data.routing_dirs (routing only, no loss).
    extra = [dict(r, source="extra", document_sources=["extra"] * r["num_documents"]) for r in rows[:2]]
    datasets.Dataset.from_list(extra).save_to_disk(str(root / "data_sft" / "train"))
    return path


SMALL = ["passkey.lengths=[128,160]", "passkey.depths=[0.0,1.0]", "passkey.trials=1", "passkey.max_new_tokens=6",
         "tracking.report_to=none", "routing.text_samples=2", "routing.text_tokens=40"]


@pytest.mark.e2e
def test_make_eval_entry_on_a_random_tiny_model(tmp_path, capsys):
    data = write_eval_data(tmp_path)
    out = tmp_path / "eval"
    assert main([str(TINY_RECIPE), f"output_dir={out}", f"data.dir={data}",
                 f"data.routing_dirs=[{data.parent / 'train'}]", f"models.base={tmp_path}/none",
                 f"models.sft={tmp_path}/none2", f"models.dpo={tmp_path}/none3", *SMALL]) == 0
    assert "RANDOM-INIT 'tiny' model" in capsys.readouterr().out
    saved = json.loads((out / "eval.json").read_text())
    assert saved["random_init"] is True and saved["layers"] == [0, 1]
    result = saved["models"]["random-tiny"]
    assert set(result["loss"]) == {"arith", "words", "all"}  # "extra" is routing-only
    # Each source is scored on exactly its own documents' answer tokens, though rows mix sources.
    rows = datasets.load_from_disk(str(data))
    for source in ("arith", "words"):
        labelled = sum(label != IGNORE_INDEX for r in rows for label, d in zip(r["labels"], r["document_ids"], strict=True)
                       if r["document_sources"][d] == source)
        assert result["loss"][source]["tokens"] == labelled
    assert result["loss"]["all"]["tokens"] == result["loss"]["arith"]["tokens"] + result["loss"]["words"]["tokens"]
    assert [s["source"] for s in saved["routing_text"]["random-tiny"]] == ["arith", "words"]
    assert set(result["routing"]["expert_share"]) == {"arith", "words", "extra", "all"}
    # A random model over a 32000-id vocab: loss near ln(32000) = 10.37.
    assert abs(result["loss"]["all"]["loss"] - math.log(32000)) < 0.5
    routing = result["routing"]
    assert routing["baseline"] == {"same_first": 0.125, "topk_overlap": pytest.approx(13 / 28), "share": 0.125}
    # Pairs never cross the packed boundary: each document of n tokens gives n - 1 pairs.
    expected_pairs = sum(len(r["input_ids"]) - r["num_documents"] for r in rows)
    expected_pairs += sum(len(r["input_ids"]) - r["num_documents"] for r in list(rows)[:2])  # "extra"
    assert routing["repetition"]["all"]["pairs"] == [expected_pairs, expected_pairs]
    grid = result["passkey"]
    assert grid["lengths"] == [128, 160] and grid["depths"] == [0.0, 1.0] and len(grid["samples"]) == 4
    for sample in grid["samples"]:
        assert sample["tokens"] <= sample["length"] and sample["correct"] == (sample["parsed"] == sample["key"])
        assert grid["accuracy"][grid["lengths"].index(sample["length"])][grid["depths"].index(sample["depth"])] == sample["correct"]
    assert grid["mean_accuracy"] == sum(s["correct"] for s in grid["samples"]) / 4
    for name in saved["plots"]:
        png = out / name
        assert png.is_file() and png.stat().st_size > 2000, name
    assert {"perplexity.png", "expert_share_random-tiny.png", "repetition_random-tiny.png",
            "passkey_random-tiny.png", "routing_text_random-tiny_0.png"} <= set(saved["plots"])
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(saved["plots"])
    assert "RANDOM-INIT" in page
    assert (out / "recipe.yaml").is_file()


@pytest.mark.e2e
def test_routing_shift_between_models(tmp_path):
    data = write_eval_data(tmp_path)
    save_pretrained(tiny_model(1), tmp_path / "m1")
    shutil.copytree(tmp_path / "m1", tmp_path / "m1_copy")
    save_pretrained(tiny_model(2), tmp_path / "m2")
    out = tmp_path / "eval"
    summary = evaluate([str(TINY_RECIPE), f"output_dir={out}", f"data.dir={data}", "data.routing_dirs=[]",
                    "passkey.enabled=false",
                    "tracking.report_to=none", "routing.text_samples=1",
                    f"models={{base: {tmp_path}/m1, same: {tmp_path}/m1_copy, other: {tmp_path}/m2}}"])
    shift = summary["routing_shift"]
    assert set(shift) == {"same vs base", "other vs base", "other vs same"}
    assert shift["same vs base"]["all"] == [0.0, 0.0]
    assert all(tv > 0 for tv in shift["other vs base"]["all"])
    assert shift["other vs base"]["all"] == shift["other vs same"]["all"]
    assert (out / "routing_shift.png").stat().st_size > 2000
    assert summary["random_init"] is False


def test_bad_recipe_values_name_the_key(tmp_path):
    with pytest.raises(RecipeError, match="passkey"):
        evaluate([str(TINY_RECIPE), "passkey.depths=[0.5,2.0]"])
    with pytest.raises(RecipeError, match="did you mean 'routing.layers'"):
        evaluate([str(TINY_RECIPE), "routing.layer=[0]"])
    data = write_eval_data(tmp_path)
    with pytest.raises(RecipeError, match="routing.layers"):
        evaluate([str(TINY_RECIPE), f"output_dir={tmp_path / 'o'}", f"data.dir={data}", "routing.layers=[0,5]",
              "data.routing_dirs=[]",
              "models={}", "tracking.report_to=none", "passkey.enabled=false"])


@pytest.mark.slow
def test_wandb_offline_gets_every_plot_and_table(tmp_path, monkeypatch):
    from pipeline.evaluation.report import plot_lines
    from pipeline.evaluation.results import log_wandb

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    pngs = [plot_lines({"a": [0.1, 0.2]}, tmp_path / f"plot{i}.png", xlabel="layer", ylabel="tv", title="t")
            for i in range(2)]
    routing = {"baseline": {"same_first": 0.125, "topk_overlap": 13 / 28},
               "repetition": {"all": {"same_first": [0.2, 0.3], "topk_overlap": [0.5, 0.6]}}}
    summary = {"models": {"m": {"loss": {"all": {"loss": 2.0, "perplexity": 7.39, "tokens": 10}}, "routing": routing,
                                "passkey": {"lengths": [128], "depths": [0.5], "accuracy": [[1.0]], "mean_accuracy": 1.0}}},
               "routing_shift": {"m vs b": {"all": [0.1, 0.2]}}}
    recipe = EvalRecipe(output_dir=str(tmp_path))
    logs = []
    log_wandb(recipe, tmp_path, summary, pngs, logs.append)
    assert "offline" in logs[-1]
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    images = sorted(p.name.split("_")[0] for p in (run_dir / "files" / "media" / "images").rglob("*.png"))
    assert images == ["plot0", "plot1"]
    tables = sorted(p.name.split("_")[0] for p in (run_dir / "files" / "media" / "table").rglob("*.table.json"))
    assert tables == ["loss", "passkey", "repetition", "routing"]
    assert list(run_dir.glob("*.wandb"))


def test_eval_refuses_a_directory_it_did_not_write_and_names_an_empty_split(tmp_path):
    from data_prep.config import DataConfig, SourceConfig
    from data_prep.prepare import prepare
    from pipeline.rundir import RunDirError

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "paper.pdf").write_bytes(b"%PDF")
    with pytest.raises(RunDirError, match=rf"output_dir {mine} is not empty and was not written by this pipeline"):
        evaluate([str(TINY_RECIPE), f"output_dir={mine}", "tracking.report_to=none"])
    assert sorted(p.name for p in mine.iterdir()) == ["paper.pdf"]
    chats = tmp_path / "c.jsonl"
    chats.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                         {"role": "assistant", "content": f"a{i}"}]})
                               for i in range(3)) + "\n")
    prepare(DataConfig(sources=[SourceConfig(path=str(chats))], output_dir=str(tmp_path / "data")), log=lambda _: None)
    with pytest.raises(RecipeError, match=rf"data.dir: {tmp_path / 'data' / 'eval'} is an empty split"):
        evaluate([str(TINY_RECIPE), f"output_dir={tmp_path / 'out'}", f"data.dir={tmp_path / 'data' / 'eval'}",
              "tracking.report_to=none"])
