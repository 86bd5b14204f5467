"""The run record (manifest.json): one reader, errors naming the file and field, chains followed."""

import json

import pytest

from pipeline.run_record import RECORD_FILE, RunRecord, hf_checkpoint_behind


def write(run_dir, record):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RECORD_FILE).write_text(json.dumps(record))
    return run_dir


def test_a_dpo_record_leads_through_the_sft_record_to_the_base(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"num_local_experts": 4}))
    sft = write(tmp_path / "sft-run", {"kind": "lora", "base": {"checkpoint": str(base)}})
    # A relative path that does not exist from the working directory is taken from the run dir.
    dpo = write(tmp_path / "dpo", {"kind": "lora", "base": {"checkpoint": "../sft-run"}, "adapter_dir": "dpo-adapter"})
    record = RunRecord.read(dpo)
    assert record.base_checkpoint == dpo / "../sft-run"
    assert record.adapter_dir == dpo / "dpo-adapter"
    assert record.model_config() == {"num_local_experts": 4}
    assert hf_checkpoint_behind(dpo).resolve() == base.resolve()
    assert RunRecord.read(sft).fields == {"kind": "lora", "base": {"checkpoint": str(base)}}


def test_a_full_run_is_its_own_checkpoint(tmp_path):
    # SFT's full fine-tuning writes the model into the run dir, next to its record (model_dir defaults to it).
    full = write(tmp_path / "sft", {"kind": "full", "base": {"checkpoint": str(tmp_path / "base")}})
    (full / "config.json").write_text(json.dumps({"num_local_experts": 4}))
    dpo = write(tmp_path / "dpo", {"kind": "lora", "base": {"checkpoint": str(full)}})
    assert hf_checkpoint_behind(full) == full
    assert hf_checkpoint_behind(dpo) == full
    assert RunRecord.read(dpo).config_file() == full / "config.json"


def test_bad_records_name_the_file_and_the_field(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{RECORD_FILE} not found: say why"):
        RunRecord.read(tmp_path, missing_hint="say why")
    (tmp_path / RECORD_FILE).write_text("{")
    with pytest.raises(ValueError, match=f"{RECORD_FILE}: not valid JSON"):
        RunRecord.read(tmp_path)
    write(tmp_path, {"kind": "merged"})
    with pytest.raises(ValueError, match="field 'kind' must be 'lora' or 'full', got 'merged'"):
        RunRecord.read(tmp_path)
    write(tmp_path, {"kind": "lora", "base": {}})
    with pytest.raises(ValueError, match=r"field 'base.checkpoint' \(the model the adapter"):
        RunRecord.read(tmp_path)
