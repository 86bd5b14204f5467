"""The recipes' shared checks (training stages, export) and the YAML reader every recipe and launch config goes through."""

from pathlib import Path

import pytest

from pipeline.config import RecipeError, build, load_recipe_dict, read_yaml_mapping, save_recipe
from pipeline.recipe import RunTracking, SFTRecipe, TrackingSection

ROOT = Path(__file__).resolve().parents[2]
SFT = ROOT / "recipes/tiny/sft.yaml"


def sft_recipe(*overrides: str) -> SFTRecipe:
    return build(SFTRecipe, load_recipe_dict(SFT, list(overrides)), source=str(SFT))


def test_a_training_recipe_refuses_other_data_and_a_router_trained_two_ways():
    with pytest.raises(ValueError, match="data.kind is 'dpo'; the SFT stage needs data.kind: sft"):
        sft_recipe("data.kind=dpo", "data.sources=[{path: pairs.jsonl}]")
    with pytest.raises(ValueError, match="model.freeze_router and lora.train_router contradict"):
        sft_recipe("model.freeze_router=true", "lora.train_router=true", "lora.enabled=true")
    # Full fine-tuning never trains the router through LoRA: no contradiction.
    assert sft_recipe("model.freeze_router=true", "lora.train_router=true", "lora.enabled=false").model.freeze_router


def test_training_tracking_is_the_run_plus_what_the_trainer_logs(tmp_path):
    recipe = sft_recipe("tracking.run_name=r1", "tracking.tags=[a]")
    assert isinstance(recipe.tracking, RunTracking) and isinstance(recipe.tracking, TrackingSection)
    save_recipe(recipe, tmp_path / "recipe.yaml")
    saved = read_yaml_mapping(tmp_path / "recipe.yaml", "recipe")["tracking"]
    assert list(saved) == ["report_to", "project", "run_name", "tags", "log_expert_load", "progress_bar"]
    assert saved["run_name"] == "r1" and saved["tags"] == ["a"]
    with pytest.raises(RecipeError, match="unknown key 'tracking.log_expert_load'"):
        build(RunTracking, {"log_expert_load": False}, source="eval.yaml", prefix="tracking")


class LaunchError(Exception):
    pass


def test_a_yaml_file_that_is_not_a_mapping_is_refused_naming_the_file_and_line(tmp_path):
    path = tmp_path / "launch.yaml"
    with pytest.raises(LaunchError, match="accelerate config not found: .*launch.yaml"):
        read_yaml_mapping(path, "accelerate config", LaunchError)
    path.write_text("num_processes: 2\nmixed_precision: [bf16\n")
    with pytest.raises(LaunchError, match=r"launch.yaml:3: invalid YAML"):
        read_yaml_mapping(path, "accelerate config", LaunchError)
    path.write_text("- num_processes: 2\n")
    with pytest.raises(LaunchError, match="launch.yaml: this accelerate config must be a mapping .*got list"):
        read_yaml_mapping(path, "accelerate config", LaunchError)
    path.write_text("")
    assert read_yaml_mapping(path, "accelerate config", LaunchError) == {}
    with pytest.raises(RecipeError, match="recipe not found"):
        load_recipe_dict(tmp_path / "missing.yaml")


def test_export_merge_device_is_named_and_a_missing_gpu_refused(monkeypatch):
    import torch

    from pipeline.export import ExportRecipe

    raw = {"source": {"checkpoint": "base"}, "output_dir": "out"}
    with pytest.raises(RecipeError, match="export.merge_device must be cpu, auto, cuda or cuda:N, got 'gpu'"):
        build(ExportRecipe, {**raw, "export": {"merge_device": "gpu"}}, source="test")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    auto = build(ExportRecipe, {**raw, "export": {"merge_device": "auto"}}, source="test")
    assert auto.export.merge_on() == torch.device("cpu")
    cuda = build(ExportRecipe, {**raw, "export": {"merge_device": "cuda:1"}}, source="test")
    with pytest.raises(ValueError, match="merge_device=cuda:1, but no CUDA device is visible here: set export.merge"):
        cuda.export.merge_on()
