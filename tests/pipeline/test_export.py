"""pipeline.export on a tiny Mixtral: stacked LoRA adapters merged, transformers reload, layouts, safety."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from export_failures import kill_export_midway, with_short_lm_head
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import MixtralForCausalLM

import model.lora  # noqa: F401  (registers the expert LoRA layer with PEFT)
from model import Mixtral, MixtralConfig
from model.checkpoint import load_pretrained, save_pretrained
from model.lora import apply_lora
from pipeline.config import RecipeError, build
from pipeline.export import (
    ExportRecipe,
    ShardWriter,
    TensorPlan,
    export,
    hf_to_interleaved_rope,
    plan_shards,
)

REPO = Path(__file__).resolve().parents[2]
PROMPT = torch.tensor(
    [[1, 733, 16289, 28793, 13702, 426, 13253, 17504, 298, 733, 28748, 16289, 28793, 5, 99]]
)


def _randomize_adapter(peft_model, seed):
    # PEFT starts B at zero (delta 0); random adapters make the merge visible.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def _manifest(path: Path, base: Path, stage: str):
    manifest = {
        "stage": stage,
        "kind": "lora",
        "base": {"checkpoint": str(base)},
        "adapter_dir": str(path),
        "final_metrics": {"loss": 1.25, "eval_loss": 1.5},
    }
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """base/ (HF checkpoint), sft/ (LoRA + router on base), dpo/ (LoRA on the SFT-merged model)."""
    root = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    cfg = MixtralConfig.preset("tiny")
    save_pretrained(Mixtral(cfg), root / "base")

    sft = apply_lora(
        load_pretrained(root / "base", dtype=torch.float32), r=4, alpha=8, train_router=True
    )
    _randomize_adapter(sft, 1)
    sft.save_pretrained(root / "sft")
    _manifest(root / "sft", root / "base", "sft")

    sft_merged = PeftModel.from_pretrained(
        load_pretrained(root / "base", dtype=torch.float32), str(root / "sft")
    ).merge_and_unload()
    dpo = apply_lora(
        sft_merged, r=2, alpha=4, use_rslora=True, target_modules=("q_proj", "v_proj", "experts")
    )
    _randomize_adapter(dpo, 2)
    dpo.save_pretrained(root / "dpo")
    _manifest(root / "dpo", root / "sft", "dpo")
    with torch.no_grad():
        reference = dpo.eval()(PROMPT).logits  # DPO adapter active (unmerged) on the SFT-merged model
    return root, reference


def _recipe(root: Path, out: str, **export_section):
    raw = {
        "source": {"run_dir": str(root / "dpo")},
        "output_dir": str(root / out),
        "export": {"progress_bar": False, **export_section},
    }
    return build(ExportRecipe, raw, source="test")


@pytest.fixture(scope="module")
def fp32_export(runs):
    root, _ = runs
    return export(_recipe(root, "export-fp32", dtype="float32", max_shard_size="3MB"), log=lambda _: None)


def test_lora_export_loads_in_transformers_with_equal_logits(runs, fp32_export):
    _, reference = runs
    hf = MixtralForCausalLM.from_pretrained(fp32_export, dtype=torch.float32)
    with torch.no_grad():
        logits = hf(PROMPT).logits
    assert (logits - reference).abs().max().item() < 1e-4
    # The adapters really changed the model: the base alone is far from the reference.
    base = MixtralForCausalLM.from_pretrained(runs[0] / "base", dtype=torch.float32)
    with torch.no_grad():
        assert (base(PROMPT).logits - reference).abs().max().item() > 1e-2


def test_index_and_shards_are_consistent(fp32_export):
    index = json.loads((fp32_export / "model.safetensors.index.json").read_text())
    cfg = MixtralConfig.from_hf(fp32_export / "config.json")
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n >= 3 and files == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(cfg.num_hidden_layers):
        pre = f"model.layers.{i}."
        expected |= {
            pre + s
            for s in (
                "input_layernorm.weight",
                "post_attention_layernorm.weight",
                "block_sparse_moe.gate.weight",
            )
        }
        expected |= {f"{pre}self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
        expected |= {
            f"{pre}block_sparse_moe.experts.{e}.{w}.weight"
            for e in range(cfg.num_local_experts)
            for w in ("w1", "w2", "w3")
        }
    assert set(index["weight_map"]) == expected
    total, seen = 0, set()
    for file in files:
        with safe_open(str(fp32_export / file), framework="pt") as f:
            # A shard stays under the limit unless it is one tensor larger than the limit.
            assert len(f.keys()) == 1 or (fp32_export / file).stat().st_size <= 3_000_000 + 100_000
            for name in f.keys():
                assert index["weight_map"][name] == file
                tensor = f.get_tensor(name)
                assert tensor.dtype == torch.float32
                total += tensor.numel() * tensor.element_size()
                seen.add(name)
    assert seen == expected and index["metadata"]["total_size"] == total
    config = json.loads((fp32_export / "config.json").read_text())
    hub_fields = {
        "architectures",
        "attention_dropout",
        "bos_token_id",
        "eos_token_id",
        "hidden_act",
        "hidden_size",
        "initializer_range",
        "intermediate_size",
        "max_position_embeddings",
        "model_type",
        "num_attention_heads",
        "num_experts_per_tok",
        "num_hidden_layers",
        "num_key_value_heads",
        "num_local_experts",
        "output_router_logits",
        "rms_norm_eps",
        "rope_theta",
        "router_aux_loss_coef",
        "sliding_window",
        "tie_word_embeddings",
        "torch_dtype",
        "use_cache",
        "vocab_size",
    }
    assert hub_fields <= set(config) and config["architectures"] == ["MixtralForCausalLM"]
    assert config["torch_dtype"] == "float32"
    assert json.loads((fp32_export / "generation_config.json").read_text())["eos_token_id"] == 2
    for name in (
        "tokenizer.model",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "README.md",
    ):
        assert (fp32_export / name).is_file(), name
    card = (fp32_export / "README.md").read_text()
    assert "eval_loss" in card and "logits" in card


def test_bf16_default_from_a_full_checkpoint_equals_the_cast_weights(runs):
    root, _ = runs
    raw = {
        "source": {"checkpoint": str(root / "base")},
        "output_dir": str(root / "export-bf16"),
        "export": {"progress_bar": False},
        "verify": {"enabled": False},
    }
    out = export(build(ExportRecipe, raw, source="test"), log=lambda _: None)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    with (
        safe_open(str(root / "base" / "model.safetensors"), framework="pt") as base,
        safe_open(str(out / "model.safetensors"), framework="pt") as got,
    ):
        assert set(base.keys()) == set(got.keys())
        for name in base.keys():
            assert torch.equal(got.get_tensor(name), base.get_tensor(name).to(torch.bfloat16)), name


def _same_bytes(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], experts=None) -> None:
    """Every tensor of ``want`` (an expert stack: only ``experts``) in ``got``, byte for byte."""
    assert set(got) == set(want)
    for name, tensor in want.items():
        if experts is not None and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensor = tensor[experts]
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(got[name].contiguous().view(torch.uint8), tensor.contiguous().view(torch.uint8)), name


def test_eval_loads_the_bits_the_export_writes(runs, fp32_export):
    """One merge (pipeline/adapter_merge.py): eval's model of the DPO run (base <- SFT LoRA and
    trained router <- DPO rsLoRA) holds, at the export's dtype, the bytes export writes; so does an
    expert-parallel rank, for its experts."""
    from pipeline.distributed.expert_parallel import ExpertPlacement
    from pipeline.evaluation.models import load_model_dir

    root, _ = runs
    raw = {"source": {"run_dir": str(root / "dpo")}, "output_dir": str(root / "export-bf16-eval"),
           "export": {"progress_bar": False}, "verify": {"enabled": False}}
    bf16_export = export(build(ExportRecipe, raw, source="test"), log=lambda _: None)
    for written, dtype in ((fp32_export, torch.float32), (bf16_export, torch.bfloat16)):
        want = load_pretrained(written, dtype=dtype).state_dict()  # the stored bytes: no cast
        _same_bytes(load_model_dir(root / "dpo", dtype).state_dict(), want)
    for rank in (0, 1):
        place = ExpertPlacement(8, 2, rank)
        _same_bytes(load_model_dir(root / "dpo", torch.bfloat16, place).state_dict(), want, place.expert_ids)


def _permute_to_hf(w, n_heads):
    # transformers' convert_mixtral_weights_to_hf.py permute (consolidated -> HF), written from FORMATS.md.
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def test_consolidated_export_converts_back_to_the_hf_export(runs, fp32_export):
    root, _ = runs
    out = export(
        _recipe(root, "export-consolidated", dtype="float32", format="consolidated"), log=lambda _: None
    )
    params = json.loads((out / "params.json").read_text())
    assert params["moe"] == {"num_experts_per_tok": 2, "num_experts": 8} and params["n_layers"] == 2
    index = json.loads((fp32_export / "model.safetensors.index.json").read_text())["weight_map"]
    back = {}
    with safe_open(str(out / "consolidated.safetensors"), framework="pt") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            if name == "tok_embeddings.weight":
                back["model.embed_tokens.weight"] = t
            elif name == "norm.weight":
                back["model.norm.weight"] = t
            elif name == "output.weight":
                back["lm_head.weight"] = t
            else:
                _, i, group, *rest = name.split(".")
                pre = f"model.layers.{i}."
                if group == "attention":
                    proj = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}[rest[0]]
                    if proj == "q_proj":
                        t = _permute_to_hf(t, params["n_heads"])
                    elif proj == "k_proj":
                        t = _permute_to_hf(t, params["n_kv_heads"])
                    back[pre + f"self_attn.{proj}.weight"] = t
                elif group == "attention_norm":
                    back[pre + "input_layernorm.weight"] = t
                elif group == "ffn_norm":
                    back[pre + "post_attention_layernorm.weight"] = t
                elif rest[0] == "gate":
                    back[pre + "block_sparse_moe.gate.weight"] = t
                else:
                    back[pre + f"block_sparse_moe.experts.{rest[1]}.{rest[2]}.weight"] = t
    assert set(back) == set(index)
    for name, file in index.items():
        with safe_open(str(fp32_export / file), framework="pt") as f:
            assert torch.equal(back[name], f.get_tensor(name)), name


def test_adapter_export_loads_with_peft_onto_transformers_with_equal_logits(runs):
    # SFT (r=4, alpha=8, all targets, router trained fully) and DPO (r=2, rslora alpha=4, q/v/experts)
    # stacked: one PEFT adapter whose ranks add where both adapted a module.
    root, reference = runs
    out = export(_recipe(root, "export-adapter", format="adapter", dtype="float32"), log=lambda _: None)
    assert not list(out.glob("model*.safetensors"))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert sorted(config["target_modules"]) == [
        f"self_attn.{p}" for p in ("k_proj", "o_proj", "q_proj", "v_proj")
    ]
    assert config["lora_dropout"] == 0.0 and config["modules_to_save"] == ["mlp.gate"]
    # q, v, down_proj: 4 + 2 (the default); gate_up: 2 * 4 + 2 * 2; k, o: SFT's 4. alpha = scale * r
    # with the SFT's scale 8 / 4 = 2 (the DPO factors carry the ratio of their scale to it).
    assert (config["r"], config["lora_alpha"]) == (6, 12.0)
    assert config["rank_pattern"] == {
        "self_attn.k_proj": 4,
        "self_attn.o_proj": 4,
        "mlp.experts.gate_up_proj": 12,
    }
    assert config["alpha_pattern"] == {
        "self_attn.k_proj": 8.0,
        "self_attn.o_proj": 8.0,
        "mlp.experts.gate_up_proj": 24.0,
    }
    hf = MixtralForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
    adapted = PeftModel.from_pretrained(hf, str(out)).eval()
    with torch.no_grad():
        logits = adapted(PROMPT).logits
        assert (logits - reference).abs().max().item() < 1e-4
        with adapted.disable_adapter():  # and the adapter is what makes the difference
            assert (adapted(PROMPT).logits - reference).abs().max().item() > 1e-2
    assert "PeftModel.from_pretrained" in (out / "README.md").read_text()
    # Named, not located: the base's directory name (export.base_model_name sets a hub id instead).
    assert config["base_model_name_or_path"] == "base"
    _assert_no_paths_of_this_machine(out, root, root.resolve())


def test_adapter_export_of_a_full_model_or_a_rank_shard_is_a_clear_error(runs, tmp_path):
    root, _ = runs
    raw = {
        "source": {"checkpoint": str(root / "base")},
        "output_dir": str(tmp_path / "o"),
        "export": {"format": "adapter", "progress_bar": False},
    }
    with pytest.raises(ValueError, match="needs a LoRA source"):
        export(build(ExportRecipe, raw, source="test"), log=lambda _: None)
    # An expert-parallel rank's adapter holds only its experts.
    part = tmp_path / "rank0"
    part.mkdir()
    (part / "adapter_config.json").write_text((root / "sft" / "adapter_config.json").read_text())
    with safe_open(str(root / "sft" / "adapter_model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k)[:4] if ".experts.lora_" in k else f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(part / "adapter_model.safetensors"))
    raw["source"]["adapters"] = [str(part)]
    with pytest.raises(ValueError, match="holds 4 experts, the model 8: an expert-parallel"):
        export(build(ExportRecipe, raw, source="test"), log=lambda _: None)
    assert not (tmp_path / "o").exists()


def test_rope_permutation_is_the_inverse_of_the_hf_conversion():
    w = torch.arange(8 * 16 * 3, dtype=torch.float32).view(8 * 16, 3)  # 8 heads of head_dim 16
    assert torch.equal(_permute_to_hf(hf_to_interleaved_rope(w, 8), 8), w)
    # Within a head, consolidated row 2j + h comes from HF row h * hd/2 + j.
    assert torch.equal(hf_to_interleaved_rope(w, 8)[1], w[8]) and torch.equal(
        hf_to_interleaved_rope(w, 8)[2], w[1]
    )


def _base_recipe(root: Path, out: Path, **export_section):
    raw = {
        "source": {"checkpoint": str(root / "base")},
        "output_dir": str(out),
        "export": {"progress_bar": False, **export_section},
        "verify": {"enabled": False},
    }
    return build(ExportRecipe, raw, source="test")


def test_a_directory_the_export_did_not_write_is_refused_even_with_overwrite(runs):
    root, _ = runs
    out = root / "occupied"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(RecipeError, match=rf"{out} is not empty and was not written by this pipeline \(it holds keep.txt\)"):
            export(_base_recipe(root, out, overwrite=overwrite), log=lambda _: None)
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert not list(root.glob(".occupied.*"))  # no lock, temp or old dirs left behind


def test_the_command_stops_a_refused_output_or_a_missing_source_with_one_line_and_exit_2(tmp_path, capsys):
    from pipeline.export import main

    recipe = str(REPO / "recipes/tiny/export.yaml")
    out = tmp_path / "occupied"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main([recipe, f"output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: output_dir {out} is not empty and was not written by this pipeline") and \
        err.count("\n") == 1, err
    assert main([recipe, f"output_dir={tmp_path / 'new'}", f"source.run_dir={tmp_path / 'none'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'none'}: neither a stage output dir") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["occupied"]  # no lock, temp or new dir left


def test_an_earlier_export_is_replaced_only_with_overwrite(runs):
    root, _ = runs
    out = root / "again"
    export(_base_recipe(root, out), log=lambda _: None)
    before = (out / "model.safetensors").stat().st_ino
    with pytest.raises(FileExistsError, match="holds an earlier export; pass export.overwrite=true"):
        export(_base_recipe(root, out), log=lambda _: None)
    assert (out / "model.safetensors").stat().st_ino == before
    export(_base_recipe(root, out, overwrite=True), log=lambda _: None)
    assert (out / "model.safetensors").stat().st_ino != before
    assert not list(root.glob(".again.*"))


def test_the_next_export_removes_what_a_killed_one_left(runs, tmp_path):
    root, _ = runs
    out = tmp_path / "model"
    # What a SIGKILLed export leaves next to its output: the temp dir it was writing, and the old
    # output it was moving aside.
    (tmp_path / ".model.tmp-k1ll3d").mkdir()
    (tmp_path / ".model.tmp-k1ll3d" / "model-00001-of-00002.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / ".model.old-abc").mkdir()
    (tmp_path / ".other.tmp-keep").mkdir()  # another output's: not this export's business
    lines = []
    export(_base_recipe(root, out), log=lines.append)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-keep", "model"]
    assert any(".model.old-abc, .model.tmp-k1ll3d" in line for line in lines), lines


def test_a_second_export_of_a_live_output_is_refused(runs, tmp_path):
    """The lock is held by another process (a live export); a killed holder would not block (flock)."""
    root, _ = runs
    out = tmp_path / "model"
    (tmp_path / ".model.tmp-live").mkdir()  # the live export's temp dir: must survive
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pipeline.rundir import acquire_lock; "
         "acquire_lock(sys.argv[1], what='x'); print('held', flush=True); time.sleep(60)",
         str(tmp_path / ".model.lock")],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RecipeError, match=rf"output_dir {out} is in use by another run \(pid {holder.pid} on host"):
            export(_base_recipe(root, out), log=lambda _: None)
        assert (tmp_path / ".model.tmp-live").is_dir() and not out.exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder was killed without releasing anything: the lock does not outlive it.
    export(_base_recipe(root, out), log=lambda _: None)
    assert (out / "model.safetensors").is_file() and not (tmp_path / ".model.tmp-live").exists()


def test_exports_are_readable_by_others(fp32_export):
    mask = os.umask(0o022)
    os.umask(mask)
    for path in [fp32_export, *fp32_export.rglob("*")]:
        want = (0o777 if path.is_dir() else 0o666) & ~mask
        assert path.stat().st_mode & 0o777 == want, (path.name, oct(path.stat().st_mode & 0o777))


def _assert_no_paths_of_this_machine(out: Path, *roots: Path):
    for path in out.rglob("*"):
        if path.suffix in (".json", ".md", ".yaml", ".jinja", ".txt"):
            text = path.read_text()
            for root in (REPO, *roots):
                assert str(root) not in text, (path.name, str(root))
            assert "/tmp/" not in text, path.name


def test_shipped_files_hold_no_path_of_this_machine(runs, fp32_export):
    root, _ = runs
    _assert_no_paths_of_this_machine(fp32_export, root, root.resolve())
    card = (fp32_export / "README.md").read_text()
    assert "- checkpoint: `base`" in card and "- merged adapters (in order): `sft`, `dpo`" in card
    assert "run_dir: dpo" in (fp32_export / "recipe.yaml").read_text()


def test_bad_adapter_config_is_a_clear_error(runs, tmp_path):
    root, _ = runs
    bad = tmp_path / "adapter"
    bad.mkdir()
    config = json.loads((root / "sft" / "adapter_config.json").read_text())
    config["rank_pattern"] = {"q_proj": 8}
    (bad / "adapter_config.json").write_text(json.dumps(config))
    (bad / "adapter_model.safetensors").write_bytes((root / "sft" / "adapter_model.safetensors").read_bytes())
    raw = {
        "source": {"checkpoint": str(root / "base"), "adapters": [str(bad)]},
        "output_dir": str(tmp_path / "o"),
    }
    with pytest.raises(ValueError, match="rank_pattern"):
        export(build(ExportRecipe, raw, source="test"), log=lambda _: None)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_killed_export_leaves_no_final_dir(runs, tmp_path):
    root, _ = runs
    # Killed once the first shard is on disk in the temporary dir, i.e. in the middle of writing.
    out = kill_export_midway(tmp_path, root / "dpo", "{dtype: float32, max_shard_size: 1MB, progress_bar: false}",
                             partial="model-00002-of-*.safetensors")
    assert not out.exists()


def _export_threads():
    return [t.name for t in threading.enumerate() if t.name.startswith(("export-write", "export-fsync"))]


def test_error_in_the_middle_of_the_stream_leaves_nothing_behind(runs, tmp_path):
    # lm_head is the last parameter read: by then the background threads have written and fsynced
    # several shards into the temporary dir.
    root, _ = runs
    broken = with_short_lm_head(root / "base", tmp_path / "broken")
    raw = {
        "source": {"checkpoint": str(broken)},
        "output_dir": str(tmp_path / "o"),
        "export": {"dtype": "float32", "max_shard_size": "1MB", "progress_bar": False},
    }
    with pytest.raises(ValueError, match=r"lm_head.weight has shape .* config.json implies"):
        export(build(ExportRecipe, raw, source="test"), log=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]  # no output, no temp dir
    assert _export_threads() == []


def test_shard_writer_raises_the_write_threads_error(tmp_path):
    plan = [TensorPlan("a", (4,), 16), TensorPlan("b", (2, 2), 16)]
    with pytest.raises(FileNotFoundError), ShardWriter(tmp_path / "missing", [plan], torch.float32) as writer:
        writer.write("a", torch.ones(4))
        writer.write("b", torch.ones(2, 2))
        writer.finish()
    assert _export_threads() == []
    with (
        pytest.raises(RuntimeError, match="plans 16 bytes"),
        ShardWriter(tmp_path, [plan], torch.bfloat16) as writer,
    ):
        writer.write("a", torch.ones(4))
    plan = [TensorPlan("a", (4,), 8), TensorPlan("b", (2, 2), 8)]
    with ShardWriter(tmp_path, plan_shards(plan, 8), torch.bfloat16) as writer:
        writer.write("a", torch.arange(4.0))
        writer.write("b", torch.full((2, 2), 1 / 3))
        index = writer.finish()
    assert index["weight_map"] == {
        "a": "model-00001-of-00002.safetensors",
        "b": "model-00002-of-00002.safetensors",
    }
    with safe_open(str(tmp_path / "model-00002-of-00002.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_tensor("b"), torch.full((2, 2), 1 / 3).to(torch.bfloat16))


TRANSFORMERS4 = os.environ.get("MIXTRAL_TUNE_TRANSFORMERS4")
LOAD_WITH_TRANSFORMERS4 = """
import json, sys, torch, transformers
from transformers import AutoTokenizer, MixtralForCausalLM
out, conversations = sys.argv[1], json.loads(sys.argv[2])
tok = AutoTokenizer.from_pretrained(out)
model = MixtralForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
ids = [tok.apply_chat_template(c, tokenize=True) for c in conversations]
with torch.no_grad():
    logits = model(torch.tensor([ids[0]])).logits
print(json.dumps({"version": transformers.__version__, "class": type(tok).__name__, "ids": ids,
                  "logits": logits[0, -1, :50].tolist()}))
"""


@pytest.mark.skipif(not TRANSFORMERS4, reason="set MIXTRAL_TUNE_TRANSFORMERS4 to a dir with transformers<5 (make test does) "
                    "(pip install --target DIR 'transformers<5')")
def test_transformers_4_loads_the_export_with_the_same_template_ids_and_logits(fp32_export):
    from transformers import AutoTokenizer

    conversations = [
        [{"role": "user", "content": "Explain MoE."}, {"role": "assistant", "content": "Experts </s> route."}],
        [{"role": "system", "content": "<s>Be brief."}, {"role": "user", "content": "  [INST] hi [/INST] "}],
    ]
    proc = subprocess.run([sys.executable, "-c", LOAD_WITH_TRANSFORMERS4, str(fp32_export), json.dumps(conversations)],
                          env={**os.environ, "PYTHONPATH": TRANSFORMERS4}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["version"].startswith("4.") and got["class"] == "PreTrainedTokenizerFast"
    tok = AutoTokenizer.from_pretrained(fp32_export)
    assert got["ids"] == [tok.apply_chat_template(c, tokenize=True, return_dict=False) for c in conversations]
    hf = MixtralForCausalLM.from_pretrained(fp32_export, dtype=torch.float32)
    with torch.no_grad():
        ours = hf(torch.tensor([got["ids"][0]])).logits[0, -1, :50]
    assert torch.allclose(torch.tensor(got["logits"]), ours, atol=1e-5)
