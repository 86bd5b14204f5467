"""Recipe key `model.compile`: the SFT and DPO stages build a model whose decoder layers are compiled."""

from pathlib import Path

from pipeline.sft import load_recipe
from pipeline.training.model_setup import build_model

ROOT = Path(__file__).resolve().parents[2]


def test_model_compile_compiles_every_decoder_layer(tmp_path):
    recipe = load_recipe(str(ROOT / "recipes/tiny/sft.yaml"), [f"output_dir={tmp_path}", "model.compile=true",
                                                                 "lora.enabled=true"])
    model = build_model(recipe, tmp_path, is_main=False)
    base = model.get_base_model()  # compiled after LoRA is in, so the adapters are inside the graphs
    assert base.blocks_compiled
    assert all(layer._compiled_call_impl is not None for layer in base.layers)
    assert base.embed_tokens._compiled_call_impl is None  # only the layers: the layout and loss stay eager


def test_dpo_recipe_takes_model_compile(tmp_path):
    from pipeline.dpo import load_recipe as load_dpo_recipe

    recipe = load_dpo_recipe(str(ROOT / "recipes/tiny/dpo.yaml"), [f"output_dir={tmp_path}", "model.compile=true"])
    assert recipe.model.compile
