from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from pipeline.config import RecipeError, build, load_recipe_dict, save_recipe


@dataclass
class Source:
    path: str
    fraction: float = 1.0


@dataclass
class Train:
    learning_rate: float = 1e-4
    epochs: int = 1
    schedule: Literal["cosine", "linear"] = "cosine"
    bf16: bool = False

    def __post_init__(self):
        if self.learning_rate <= 0:
            raise ValueError("train.learning_rate must be > 0")


@dataclass
class Recipe:
    train: Train = field(default_factory=Train)
    sources: list[Source] = field(default_factory=list)
    output_dir: str = "out"
    wandb_api_key: str | None = None


def write(tmp_path, data):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_overrides_dot_paths_and_list_indices(tmp_path):
    path = write(tmp_path, {"train": {"learning_rate": 1e-3}, "sources": [{"path": "a"}, {"path": "b"}]})
    raw = load_recipe_dict(path, ["train.learning_rate=1e-5", "sources.1.fraction=0.25", "train.epochs=3"])
    recipe = build(Recipe, raw, source=str(path))
    assert recipe.train.learning_rate == 1e-5
    assert recipe.train.epochs == 3
    assert recipe.sources[1] == Source("b", 0.25)
    assert recipe.sources[0] == Source("a", 1.0)


def test_misspelled_key_names_the_closest(tmp_path):
    path = write(tmp_path, {"train": {"lerning_rate": 1e-3}})
    with pytest.raises(RecipeError, match=r"r\.yaml: unknown key 'train\.lerning_rate'; did you mean 'train\.learning_rate'"):
        build(Recipe, load_recipe_dict(path), source=str(path))


def test_misspelled_override_fails_too(tmp_path):
    path = write(tmp_path, {})
    with pytest.raises(RecipeError, match="did you mean 'output_dir'"):
        build(Recipe, load_recipe_dict(path, ["outptu_dir=x"]), source=str(path))


def test_type_and_choice_errors_name_the_key(tmp_path):
    path = write(tmp_path, {"train": {"epochs": "three"}})
    with pytest.raises(RecipeError, match=r"train\.epochs must be an integer"):
        build(Recipe, load_recipe_dict(path), source=str(path))
    with pytest.raises(RecipeError, match=r"train\.schedule must be one of 'cosine', 'linear'"):
        build(Recipe, load_recipe_dict(path, ["train.epochs=1", "train.schedule=step"]), source=str(path))
    with pytest.raises(RecipeError, match=r"learning_rate must be > 0"):
        build(Recipe, load_recipe_dict(path, ["train.epochs=1", "train.learning_rate=0"]), source=str(path))


def test_out_of_range_index(tmp_path):
    path = write(tmp_path, {"sources": [{"path": "a"}]})
    with pytest.raises(RecipeError, match="index 3 out of range"):
        load_recipe_dict(path, ["sources.3.path=x"])


def test_saved_recipe_has_no_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "wandb-secret-0123456789")
    recipe = Recipe(output_dir="run-wandb-secret-0123456789", wandb_api_key="hunter2hunter2")
    save_recipe(recipe, tmp_path / "recipe.yaml")
    text = (tmp_path / "recipe.yaml").read_text()
    assert "wandb-secret-0123456789" not in text
    assert "hunter2hunter2" not in text
    assert yaml.safe_load(text)["train"]["learning_rate"] == 1e-4


def test_secret_looking_keys_are_redacted_and_settings_that_mention_tokens_are_kept():
    from pipeline.config import to_dict

    saved = to_dict({"hf_token": "hf_abc", "wandb_api_key": "k", "auth": "x", "db_password": "p", "apikey": "q",
                     "client_secret": "s", "tokenizer": "/models/tokenizer.model", "max_new_tokens": 64,
                     "routing": {"text_tokens": 160}, "empty_token": None})
    assert all(saved[k] == "<redacted>" for k in ("hf_token", "wandb_api_key", "auth", "db_password", "apikey",
                                                    "client_secret"))
    assert saved["tokenizer"] == "/models/tokenizer.model" and saved["max_new_tokens"] == 64
    assert saved["routing"] == {"text_tokens": 160} and saved["empty_token"] is None
