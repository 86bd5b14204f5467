"""The prep stage end to end on small files: rejects, counts, re-run, policies, mixing, outputs."""

import collections
import json
from pathlib import Path

import datasets
import pytest
import yaml

from data_prep import encode_messages, load_tokenizer
from data_prep.config import DataConfig, SourceConfig
from data_prep.prepare import prepare
from data_prep.sample_data import FILES, generate
from pipeline import prep as prep_entry
from pipeline.config import RecipeError

REPO = Path(__file__).resolve().parents[2]


def conv(q, r):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": r}]}


def write_jsonl(path, records):
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def rejects(out):
    return [json.loads(line) for line in (Path(out) / "rejects.jsonl").read_text().splitlines()]


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_broken_sft_records_are_rejected_with_reasons(tmp_path):
    long_text = "word " * 400
    records = [
        conv("What is 2+2?", "4"),  # line 1: ok
        '{"messages": [',  # 2
        "[1, 2, 3]",  # 3
        {"foo": 1},  # 4
        {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]},  # 5
        {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "y"}]},  # 6
        {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]},  # 7
        {"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]},  # 8
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                      {"role": "system", "content": "late"}, {"role": "assistant", "content": "b"}]},  # 9
        {"messages": [{"role": "user", "content": "q"}]},  # 10
        {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]},  # 11
        {"instruction": "Do it", "input": ""},  # 12
        conv("What is 2+2?", "4"),  # 13: duplicate of line 1
        conv(long_text, "too long"),  # 14
        "",  # 15: a blank line is not a record
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},  # 16: ok
    ]
    src = write_jsonl(tmp_path / "broken.jsonl", records)
    out = tmp_path / "out"
    manifest = prepare(DataConfig(sources=[SourceConfig(path=src)], output_dir=str(out), max_seq_len=64), log=quiet)
    c = manifest["counts"][src]
    assert (c["read"], c["accepted"], c["rejected_total"]) == (15, 2, 13)
    expected = {
        "line 2": "malformed_json", "line 3": "not_an_object", "line 4": "unknown_format",
        "line 5": "unknown_role", "line 6": "empty_content", "line 7": "non_string_content",
        "line 8": "missing_field", "line 9": "system_after_assistant", "line 10": "no_final_answer",
        "line 11": "unknown_role", "line 12": "missing_field", "line 13": "duplicate", "line 14": "too_long",
    }
    got = {r["locator"]: r["reason"] for r in rejects(out)}
    assert got == expected
    assert all(r["source"] == src and r["detail"] for r in rejects(out))
    assert manifest["rejects_by_reason"]["missing_field"] == 2
    report = (out / "report.md").read_text()
    assert "| system_after_assistant | 1 |" in report and "| too_long | 1 |" in report


def test_broken_preference_records(tmp_path):
    user = {"role": "user", "content": "q"}
    records = [
        {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},  # ok
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        {"chosen": [user, {"role": "assistant", "content": "a"}],
         "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]},
        {"prompt": "p", "chosen": "a"},
        {"chosen": [user, {"role": "assistant", "content": "a"}], "rejected": [user]},
        {"prompt": [user, {"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"},
        conv("sft", "record"),
        {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},  # duplicate
        {"chosen": [user, {"role": "assistant", "content": "a"}], "rejected": [user, {"role": "assistant", "content": "b"}]},  # ok
    ]
    src = write_jsonl(tmp_path / "pairs.jsonl", records)
    out = tmp_path / "out"
    manifest = prepare(DataConfig(kind="dpo", sources=[SourceConfig(path=src)], output_dir=str(out)), log=quiet)
    got = [r["reason"] for r in rejects(out)]
    assert sorted(got) == sorted(["chosen_equals_rejected", "prompt_mismatch", "missing_field", "no_final_answer",
                                  "invalid_structure", "unknown_format", "duplicate"])
    c = manifest["counts"][src]
    assert (c["read"], c["accepted"], c["rejected_total"]) == (9, 2, 7)


def test_dpo_rows_follow_the_interface_and_truncation_policy(tmp_path, tok):
    long_prompt = " ".join(f"w{i}" for i in range(200))
    records = [
        {"prompt": "Short?", "chosen": "yes", "rejected": "no"},
        {"prompt": long_prompt, "chosen": "A " * 80, "rejected": "B"},
    ]
    src = write_jsonl(tmp_path / "pairs.jsonl", records)
    out = tmp_path / "out"
    cfg = DataConfig(kind="dpo", sources=[SourceConfig(path=src)], output_dir=str(out), max_seq_len=96,
                     overlength="truncate", max_prompt_len=40)
    manifest = prepare(cfg, log=quiet)
    assert manifest["counts"][src]["truncated"] == 1
    ds = datasets.load_from_disk(str(out / "train"))
    assert set(ds.column_names) == {"prompt_input_ids", "chosen_input_ids", "chosen_labels", "rejected_input_ids",
                                    "rejected_labels", "source"}
    full_prompt = encode_messages([{"role": "user", "content": long_prompt}, {"role": "assistant", "content": "x"}], tok)
    full_prompt = full_prompt["input_ids"][: -len(tok.encode("x")) - 1]
    full_chosen = tok.encode("A " * 80) + [tok.eos_id]
    for row in ds:
        p = row["prompt_input_ids"]
        assert row["chosen_input_ids"][: len(p)] == p and row["rejected_input_ids"][: len(p)] == p
        assert row["chosen_labels"] == [-100] * len(p) + row["chosen_input_ids"][len(p):]
        assert row["rejected_labels"] == [-100] * len(p) + row["rejected_input_ids"][len(p):]
        assert len(row["chosen_input_ids"]) <= 96 and len(row["rejected_input_ids"]) <= 96
        if len(p) > 20:  # the long one: BOS + the end of the prompt, the start of the answer
            assert len(p) == 40 and p[0] == tok.bos_id and p[1:] == full_prompt[-39:]
            assert row["chosen_input_ids"][len(p):] == full_chosen[: 96 - 40]


def test_sft_truncation_keeps_the_start_and_drop_counts(tmp_path, tok):
    records = [conv("short", "ok"), conv("long " * 100, "answer " * 100)]
    src = write_jsonl(tmp_path / "d.jsonl", records)
    full = encode_messages(records[1]["messages"], tok)
    m = prepare(DataConfig(sources=[SourceConfig(path=src)], output_dir=str(tmp_path / "t"), max_seq_len=160,
                           overlength="truncate", packing=False), log=quiet)
    ds = datasets.load_from_disk(str(tmp_path / "t" / "train"))
    kept = [row for row in ds if len(row["input_ids"]) == 160]
    assert len(kept) == 1 and kept[0]["input_ids"] == full["input_ids"][:160] and kept[0]["labels"] == full["labels"][:160]
    assert m["counts"][src]["truncated"] == 1
    m = prepare(DataConfig(sources=[SourceConfig(path=src)], output_dir=str(tmp_path / "d"), max_seq_len=160), log=quiet)
    assert m["counts"][src]["rejected"] == {"too_long": 1} and m["stats"]["train"]["examples"] == 1
    # Truncated so far that no answer is left: nothing to learn, dropped as too long.
    m = prepare(DataConfig(sources=[SourceConfig(path=src)], output_dir=str(tmp_path / "n"), max_seq_len=60,
                           overlength="truncate"), log=quiet)
    assert m["counts"][src]["rejected"] == {"too_long": 1}


def test_unchanged_rerun_is_a_noop_and_changes_redo(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [conv(f"q{i}", f"a{i}") for i in range(20)])
    out = tmp_path / "out"
    cfg = DataConfig(sources=[SourceConfig(path=src)], output_dir=str(out))
    first = prepare(cfg, log=quiet)
    marker = out / "train" / "marker"
    marker.write_text("kept if nothing is rewritten")
    messages = []
    second = prepare(cfg, log=messages.append)
    assert second == first and marker.exists()
    assert "up to date" in messages[0] and "nothing to do" in messages[0]
    # the speed knobs do not change the output
    prepare(DataConfig(sources=[SourceConfig(path=src)], output_dir=str(out), num_proc=1, batch_size=7), log=quiet)
    assert marker.exists()
    # a changed source, setting or --force redoes the work
    write_jsonl(tmp_path / "d.jsonl", [conv(f"q{i}", f"a{i}") for i in range(21)])
    third = prepare(cfg, log=quiet)
    assert not marker.exists() and third["fingerprint"] != first["fingerprint"]
    assert third["stats"]["train"]["examples"] == 21
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("x")
    prepare(DataConfig(sources=[SourceConfig(path=src)], output_dir=str(out), max_seq_len=1024), log=quiet)
    assert not marker.exists()
    marker.write_text("x")
    prepare(DataConfig(sources=[SourceConfig(path=src)], output_dir=str(out), max_seq_len=1024), force=True, log=quiet)
    assert not marker.exists()
    assert not list(tmp_path.glob(".out.*"))  # no temp dirs left behind


def test_output_of_an_older_row_layout_is_prepared_again(tmp_path, monkeypatch):
    """A directory written under manifest version 1 (rows without document_sources) is never taken
    as up to date: the version is part of the fingerprint."""
    import data_prep.prepare as prepare_module

    src = write_jsonl(tmp_path / "d.jsonl", [conv(f"q{i}", f"a{i}") for i in range(8)])
    cfg = DataConfig(sources=[SourceConfig(path=src)], output_dir=str(tmp_path / "out"))
    current = prepare_module.MANIFEST_VERSION
    assert current >= 2
    monkeypatch.setattr(prepare_module, "MANIFEST_VERSION", 1)
    old = prepare(cfg, log=quiet)
    monkeypatch.setattr(prepare_module, "MANIFEST_VERSION", current)
    messages = []
    new = prepare(cfg, log=messages.append)
    assert old["version"] == 1 and new["version"] == current
    assert new["fingerprint"] != old["fingerprint"] and "up to date" not in messages[0]


def test_mixing_fractions_eval_split_and_determinism(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [conv(f"alpha {i}", f"A{i}") for i in range(200)])
    b = write_jsonl(tmp_path / "b.jsonl", [conv(f"beta {i}", f"B{i}") for i in range(100)])
    e = write_jsonl(tmp_path / "e.jsonl", [conv(f"eval {i}", f"E{i}") for i in range(10)])

    def run(out, seed=0):
        sources = [SourceConfig(path=a, fraction=0.25), SourceConfig(path=b), SourceConfig(path=e, role="eval")]
        cfg = DataConfig(sources=sources, output_dir=str(tmp_path / out), eval_fraction=0.1, seed=seed)
        return prepare(cfg, log=quiet), datasets.load_from_disk(str(tmp_path / out / "train")), \
            datasets.load_from_disk(str(tmp_path / out / "eval"))

    m1, train1, eval1 = run("one")
    assert m1["counts"][a]["read"] == 50 and m1["counts"][b]["read"] == 100 and m1["counts"][e]["read"] == 10
    assert (m1["counts"][a]["to_eval"], m1["counts"][b]["to_eval"]) == (5, 10)
    assert m1["stats"]["train"]["examples"] == 45 + 90 and m1["stats"]["eval"]["examples"] == 5 + 10 + 10
    assert sum(train1["num_documents"]) == 135 and sum(eval1["num_documents"]) == 25
    # Per document, every source has exactly its own examples, although rows mix sources.
    def by_source(ds):
        return collections.Counter(s for sources in ds["document_sources"] for s in sources)
    assert by_source(train1) == {a: 45, b: 90} and by_source(eval1) == {a: 5, b: 10, e: 10}
    assert any(len(set(sources)) > 1 for sources in train1["document_sources"])
    for row in train1:
        assert len(row["document_sources"]) == row["num_documents"] == max(row["document_ids"]) + 1
        assert row["source"] == row["document_sources"][0]
    m2, train2, eval2 = run("two")
    assert train1.to_dict() == train2.to_dict() and eval1.to_dict() == eval2.to_dict()
    m3, train3, _ = run("three", seed=1)
    assert train3.to_dict() != train1.to_dict()
    assert m3["counts"][a]["read"] == 50
    # eval and train never share a document
    def docs(ds):
        out = set()
        for ids, d in zip(ds["input_ids"], ds["document_ids"], strict=True):
            for k in set(d):
                out.add(tuple(t for t, dk in zip(ids, d, strict=True) if dk == k))
        return out
    assert not docs(train1) & docs(eval1)


def test_all_file_types_and_formats_give_the_same_tokens(tmp_path):
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    alpaca = [{"instruction": f"Say {i}", "input": "now" if i % 2 else "", "output": f"{i}!"} for i in range(6)]
    as_messages = [
        conv(f"Say {i}\n\nnow" if i % 2 else f"Say {i}", f"{i}!") for i in range(6)
    ]
    as_sharegpt = [{"conversations": [{"from": "human", "value": m["messages"][0]["content"]},
                                      {"from": "gpt", "value": m["messages"][1]["content"]}]} for m in as_messages]
    files = {
        "alpaca.jsonl": write_jsonl(tmp_path / "alpaca.jsonl", alpaca),
        "messages.json": str(tmp_path / "messages.json"),
        "sharegpt.parquet": str(tmp_path / "sharegpt.parquet"),
        "alpaca.csv": str(tmp_path / "alpaca.csv"),
    }
    Path(files["messages.json"]).write_text(json.dumps(as_messages))
    pq.write_table(pa.Table.from_pylist(as_sharegpt), files["sharegpt.parquet"])
    with open(files["alpaca.csv"], "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(alpaca)
    hf_dir = tmp_path / "hf_local"
    hf_dir.mkdir()
    write_jsonl(hf_dir / "train.jsonl", as_messages)

    results = []
    for name, path in files.items():
        m = prepare(DataConfig(sources=[SourceConfig(path=path)], output_dir=str(tmp_path / f"o_{name}"),
                               packing=False, dedup=False), log=quiet)
        assert m["counts"][path]["accepted"] == 6, name
        results.append(sorted(datasets.load_from_disk(str(tmp_path / f"o_{name}" / "train"))["input_ids"]))
    m = prepare(DataConfig(sources=[SourceConfig(hf=str(hf_dir), split="train")], output_dir=str(tmp_path / "o_hf"),
                           packing=False), log=quiet)
    assert m["sources"][0]["content_hash"].startswith("hf-fingerprint:")
    results.append(sorted(datasets.load_from_disk(str(tmp_path / "o_hf" / "train"))["input_ids"]))
    assert all(r == results[0] for r in results)


def test_entry_point_reads_only_the_data_section(tmp_path):
    recipe = yaml.safe_load((REPO / "recipes/tiny/sft.yaml").read_text())
    recipe["train"] = {"anything": "belongs to the sft stage"}
    recipe["data"]["sources"] = [{"path": str(REPO / s["path"]), **{k: v for k, v in s.items() if k != "path"}}
                                 for s in recipe["data"]["sources"]]
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(recipe))
    manifest = prep_entry.run(prep_entry.load_recipe(str(path), [f"data.output_dir={tmp_path / 'out'}",
                                                                 "data.max_seq_len=128"]))
    assert manifest["data"]["max_seq_len"] == 128
    train = datasets.load_from_disk(str(tmp_path / "out" / "train"))
    assert set(train.column_names) == {"input_ids", "labels", "position_ids", "document_ids", "source",
                                       "document_sources", "num_documents"}
    assert manifest["stats"]["train"]["packing_efficiency"] > 0.9
    for c in manifest["counts"].values():
        assert c["accepted"] + c["rejected_total"] == c["read"]
    with pytest.raises(RecipeError, match="did you mean 'data.max_seq_len'"):
        prep_entry.load_recipe(str(path), ["data.max_seq_length=128"])


def test_bundled_sample_data_is_small_and_regenerates_identically(tmp_path):
    written = generate(tmp_path)
    assert {p.name for p in written} == set(FILES)
    for path in written:
        committed = REPO / "data_prep" / "data" / path.name
        assert committed.read_bytes() == path.read_bytes(), f"{committed} differs from the generator's output"
        assert path.stat().st_size < 1_000_000


def test_worker_processes_and_an_hf_tokenizer_json_give_the_same_rows(tmp_path):
    from pipeline.hf_tokenizer import save_tokenizer_files

    records = [conv(f"q {i}  with  spaces", f" answer {i} </s> [INST]") for i in range(60)] + ['{"broken']
    src = write_jsonl(tmp_path / "d.jsonl", records)
    tok_dir = tmp_path / "tok"
    save_tokenizer_files(tok_dir)
    (tok_dir / "tokenizer.model").unlink()  # leave tokenizer.json only: the `tokenizers` backend
    outputs = []
    for name, extra in (("one", {}), ("two", {"num_proc": 2, "batch_size": 16}), ("hf", {"tokenizer": str(tok_dir)})):
        m = prepare(DataConfig(sources=[SourceConfig(path=src)], output_dir=str(tmp_path / name), **extra), log=quiet)
        assert m["counts"][src]["rejected"] == {"malformed_json": 1}
        outputs.append(datasets.load_from_disk(str(tmp_path / name / "train")).to_dict())
    assert outputs[0] == outputs[1] == outputs[2]


def test_bytes_that_are_not_utf8_are_rejected_and_a_bom_is_skipped(tmp_path):
    ok = json.dumps(conv("What is 2+2?", "4")).encode()
    latin1 = json.dumps(conv("caf_", "ok")).encode().replace(b"caf_", b"caf\xe9")  # a Latin-1 export
    surrogate = b'{"messages": [{"role": "user", "content": "a \\udc80 b"}, {"role": "assistant", "content": "c"}]}'
    jsonl = tmp_path / "mixed.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + ok + b"\n" + latin1 + b"\n" + surrogate + b"\n" + ok.replace(b"4", b"5") + b"\n")
    records = [conv("json one", "a"), conv("json caf_", "b")]
    as_json = tmp_path / "list.json"
    as_json.write_bytes(b"\xef\xbb\xbf" + json.dumps(records).encode().replace(b"caf_", b"caf\xe9"))
    as_csv = tmp_path / "table.csv"
    as_csv.write_bytes(b"\xef\xbb\xbfinstruction,output\nSay hi,hi\nSay caf\xe9,x\n")
    cfg = DataConfig(sources=[SourceConfig(path=str(p)) for p in (jsonl, as_json, as_csv)],
                     output_dir=str(tmp_path / "out"), max_seq_len=64, dedup=False)
    manifest = prepare(cfg, log=quiet)
    got = {(Path(r["source"]).name, r["locator"]): r["reason"] for r in rejects(tmp_path / "out")}
    assert got == {("mixed.jsonl", "line 2"): "invalid_utf8", ("mixed.jsonl", "line 3"): "invalid_utf8",
                   ("list.json", "index 1"): "invalid_utf8", ("table.csv", "line 3"): "invalid_utf8"}
    for name, c in manifest["counts"].items():
        assert c["read"] == c["accepted"] + c["rejected_total"], name
        assert c["accepted"] >= 1, name  # line 1 of each file, after its BOM, is a record
    assert manifest["counts"][str(jsonl)]["rejected"] == {"invalid_utf8": 2}
    # no U+FFFD was trained on
    train = datasets.load_from_disk(str(tmp_path / "out" / "train"))
    tok = load_tokenizer()
    assert all("\ufffd" not in tok.decode(row) for row in train["input_ids"])


def test_a_source_with_no_usable_record_stops_prep_naming_it(tmp_path):
    from data_prep.prepare import PrepError

    binary = tmp_path / "weights.jsonl"
    binary.write_bytes(bytes(range(256)) * 40 + b"\n" + bytes(range(128, 256)) * 3 + b"\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    good = write_jsonl(tmp_path / "good.jsonl", [conv("q", "a")])
    out = tmp_path / "out"
    with pytest.raises(PrepError, match=rf"{binary}: 0 of \d+ records usable \(rejected: invalid_utf8 \d+"):
        prepare(DataConfig(sources=[SourceConfig(path=good), SourceConfig(path=str(binary))], output_dir=str(out)),
                log=quiet)
    with pytest.raises(PrepError, match=rf"{empty} holds no records"):
        prepare(DataConfig(sources=[SourceConfig(path=str(empty))], output_dir=str(out)), log=quiet)
    invalid = write_jsonl(tmp_path / "invalid.jsonl", [{"foo": 1}, '{"messages": [', {"instruction": "x"}])
    with pytest.raises(PrepError, match=r"0 of 3 records usable \(rejected: unknown_format 1, malformed_json 1, "
                                         r"missing_field 1; e.g. line 1: keys \[foo\]"):
        prepare(DataConfig(sources=[SourceConfig(path=invalid)], output_dir=str(out)), log=quiet)
    assert not out.exists()  # nothing written


def test_the_command_exits_2_with_one_line_naming_the_file(tmp_path):
    import subprocess
    import sys

    binary = tmp_path / "data.jsonl"
    binary.write_bytes(bytes(range(256)) * 8)
    proc = subprocess.run([sys.executable, "-m", "pipeline.prep", str(REPO / "recipes/tiny/sft.yaml"),
                           f"data.sources=[{{path: {binary}}}]", f"data.output_dir={tmp_path / 'out'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: data.sources: {binary}: 0 of ") and "invalid_utf8" in lines[0]


def test_the_command_redoes_an_up_to_date_output_only_with_force(tmp_path, capsys):
    src = write_jsonl(tmp_path / "t.jsonl", [conv(f"q{i}", f"a{i}") for i in range(4)])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"sources": [{"path": src}], "output_dir": str(tmp_path / "out")}}))
    assert prep_entry.main([str(recipe)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert prep_entry.main([str(recipe)]) == 0
    assert "is up to date" in capsys.readouterr().out
    assert prep_entry.main(["--force", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "up to date" not in out and "wrote" in out


def test_prep_imports_no_torch():
    """Data prep needs IGNORE_INDEX, not torch (~1.5 s to import): neither the library nor the prep
    command imports it (nor the training stack the stage skeleton runs for SFT and DPO)."""
    import subprocess
    import sys

    heavy = ("torch", "accelerate", "deepspeed", "transformers")
    code = f"import sys, data_prep.prepare, pipeline.prep; print([m for m in {heavy} if m in sys.modules])"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_an_empty_eval_split_is_left_out_and_loads_as_none(tmp_path):
    from data_prep.dataset import load_prepared, no_eval_note

    train_src = write_jsonl(tmp_path / "t.jsonl", [conv(f"q{i}", f"a{i}") for i in range(6)])
    cfg = DataConfig(sources=[SourceConfig(path=train_src)], output_dir=str(tmp_path / "out"), eval_fraction=0.0)
    manifest = prepare(cfg, log=quiet)
    assert manifest["stats"]["eval"]["rows"] == 0 and not (tmp_path / "out" / "eval").exists()
    train, eval_set = load_prepared(cfg, stage="sft")
    assert len(train) >= 1 and eval_set is None
    assert "data.eval_fraction is 0 and no source has role: eval" in no_eval_note(cfg)
    lines = []
    prepare(cfg, log=lines.append)
    assert "up to date" in lines[0]
    # An eval source whose every example duplicates a train one: said, and eval is empty too.
    eval_src = write_jsonl(tmp_path / "e.jsonl", [conv("q1", "a1"), conv("q2", "a2")])
    cfg = DataConfig(sources=[SourceConfig(path=train_src), SourceConfig(path=eval_src, role="eval")],
                     output_dir=str(tmp_path / "out2"))
    lines = []
    manifest = prepare(cfg, log=lines.append)
    assert any(f"every usable example of {eval_src} (eval source) duplicates" in line for line in lines), lines
    assert manifest["counts"][eval_src]["rejected"] == {"duplicate": 2}
    assert load_prepared(cfg, stage="sft")[1] is None
    assert "every held-out example was rejected or a duplicate" in no_eval_note(cfg)


def test_prepared_data_that_does_not_match_the_recipe_is_refused_with_the_difference(tmp_path):
    from data_prep.dataset import PreparedDataError, load_prepared

    src = write_jsonl(tmp_path / "t.jsonl", [conv(f"q{i}", f"a{i}") for i in range(4)])
    cfg = DataConfig(sources=[SourceConfig(path=src)], output_dir=str(tmp_path / "out"), max_seq_len=64)
    prepare(cfg, log=quiet)
    load_prepared(DataConfig(**{**cfg.__dict__, "num_proc": 2, "batch_size": 7}), stage="sft")  # speed only: fine
    changed = DataConfig(**{**cfg.__dict__, "max_seq_len": 128, "packing": False})
    with pytest.raises(PreparedDataError, match=r"prepared from a different data section \(prepared -> recipe: "
                                                r"data.max_seq_len: 64 -> 128; data.packing: True -> False\)"):
        load_prepared(changed, stage="sft")
    with pytest.raises(PreparedDataError, match="holds data.kind 'sft' rows, the dpo stage needs 'dpo'"):
        load_prepared(DataConfig(**{**cfg.__dict__, "kind": "dpo"}), stage="dpo")
    with pytest.raises(PreparedDataError, match="holds no prepared data"):
        load_prepared(DataConfig(**{**cfg.__dict__, "output_dir": str(tmp_path / "none")}), stage="sft")


def test_prep_refuses_a_directory_it_did_not_write_and_replaces_only_its_own_entries(tmp_path, capsys):
    from pipeline.rundir import OWNER_FILE

    sources = tmp_path / "my_data"
    sources.mkdir()
    src = write_jsonl(sources / "chats.jsonl", [conv(f"q{i}", f"a{i}") for i in range(4)])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"sources": [{"path": src}], "output_dir": str(sources)}}))
    assert prep_entry.main([str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: data.output_dir {sources} is not empty and was not written by this pipeline (it holds "
                   "chats.jsonl); choose a new or empty directory (nothing was deleted)\n"), err
    assert sorted(p.name for p in sources.iterdir()) == ["chats.jsonl"]

    out = tmp_path / "prepared"
    assert prep_entry.main([str(recipe), f"data.output_dir={out}"]) == 0
    owner = json.loads((out / OWNER_FILE).read_text())
    assert owner["stage"] == "prep" and {"train", "manifest.json", "ref_logps"} <= set(owner["entries"])
    (out / "notes.txt").write_text("mine")
    (out / "ref_logps").mkdir()  # the DPO reference cache: stale once the data changes
    assert prep_entry.main([str(recipe), f"data.output_dir={out}", "data.max_seq_len=128"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and not (out / "ref_logps").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [OWNER_FILE, "manifest.json", "notes.txt", "rejects.jsonl", "report.md", "train"])
    # A directory written by another stage is not prep's either.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / OWNER_FILE).write_text(json.dumps({"stage": "sft", "entries": []}))
    capsys.readouterr()
    assert prep_entry.main([str(recipe), f"data.output_dir={tmp_path / 'run'}"]) == 2
    assert "holds the output of the sft stage" in capsys.readouterr().err
