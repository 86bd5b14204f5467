"""The DPO stage: batches, the reference (adapters disabled / frozen copy / precomputed), recipes."""

import json

import pytest
import torch
from datasets import Dataset

from model import Mixtral, MixtralConfig
from model.checkpoint import load_pretrained, save_pretrained
from model.lora import apply_lora
from pipeline.config import RecipeError, build
from pipeline.dpo import build_policy, read_sft_manifest
from pipeline.recipe import DPORecipe, DPOSection
from pipeline.training.batches import collate_pairs
from pipeline.training.dpo_loss import preference_loss, split_pairs
from pipeline.training.reference_cache import (
    attach_reference_log_probs,
    compute_reference_log_probs,
    rank_block,
    ref_cache_path,
    reference_fingerprint,
)
from pipeline.training.tasks import DPOTask, Reference, policy_log_probs

VOCAB = 32000


def _row(prompt, chosen, rejected):
    return {
        "prompt_input_ids": prompt,
        "chosen_input_ids": prompt + chosen,
        "chosen_labels": [-100] * len(prompt) + chosen,
        "rejected_input_ids": prompt + rejected,
        "rejected_labels": [-100] * len(prompt) + rejected,
        "source": "test",
    }


def _pairs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        lens = torch.randint(2, 9, (3,), generator=g).tolist()
        p, c, r = (torch.randint(3, VOCAB, (k,), generator=g).tolist() for k in lens)
        rows.append(_row([1] + p, c + [2], r + [2]))
    return rows


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    """An SFT output as pipeline.sft writes it: base weights + a LoRA adapter that is not zero."""
    root = tmp_path_factory.mktemp("sft")
    torch.manual_seed(0)
    base = Mixtral(MixtralConfig.preset("tiny"))
    save_pretrained(base, root / "base")
    sft = apply_lora(base, 4, 8.0, 0.0, ["q_proj", "v_proj", "experts"])
    # B starts at zero; random B makes the adapter change the model like a trained one.
    with torch.no_grad():
        for name, p in sft.named_parameters():
            if "lora_B" in name or "lora_gate_up_B" in name or "lora_down_B" in name:
                p.normal_(std=0.05)
    sft.save_pretrained(root)
    manifest = {
        "stage": "sft",
        "kind": "lora",
        "base": {"checkpoint": str(root / "base"), "preset": "tiny", "config": {}},
        "adapter_dir": str(root),
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _recipe(sft_dir, data_dir="unused", **dpo):
    raw = {
        "model": {"sft_dir": str(sft_dir)},
        "data": {"kind": "dpo", "output_dir": str(data_dir), "sources": [{"path": "pairs.jsonl"}]},
        "output_dir": "unused",
        "lora": {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "experts"]},
        "dpo": dpo,
    }
    return build(DPORecipe, raw, source="test.yaml")


def _sft_peft_model(sft_dir):
    from peft import PeftModel

    base = load_pretrained(sft_dir / "base")
    return PeftModel.from_pretrained(base, str(sft_dir)).eval()


def test_collate_puts_chosen_then_rejected_right_padded():
    rows = [_row([1, 5], [7, 2], [8, 9, 2]), _row([1, 6, 6], [4, 2], [3, 2])]
    rows[0]["ref_chosen_logps"], rows[0]["ref_rejected_logps"] = -1.5, -2.5
    rows[1]["ref_chosen_logps"], rows[1]["ref_rejected_logps"] = -3.0, -4.0
    b = collate_pairs(rows)
    assert b["input_ids"].tolist() == [[1, 5, 7, 2, 0], [1, 6, 6, 4, 2], [1, 5, 8, 9, 2], [1, 6, 6, 3, 2]]
    assert b["labels"].tolist() == [
        [-100, -100, 7, 2, -100],
        [-100, -100, -100, 4, 2],
        [-100, -100, 8, 9, 2],
        [-100, -100, -100, 3, 2],
    ]
    # Attention per sequence; padding is document id -1, the batch's only padding encoding.
    assert b["document_ids"].tolist() == [[0, 0, 0, 0, -1], [0] * 5, [0] * 5, [0] * 5]
    assert "attention_mask" not in b
    assert b["ref_chosen_logps"].tolist() == [-1.5, -3.0]
    assert b["ref_rejected_logps"].tolist() == [-2.5, -4.0]
    assert DPOTask(DPOSection(), aux_coef=0.0, z_coef=0.0, reference=None).count_units(b) == 2


def test_concatenated_forward_equals_separate_unpadded_forwards():
    torch.manual_seed(1)
    model = Mixtral(MixtralConfig.preset("tiny")).eval()
    rows = _pairs(3)
    _, logps, counts = policy_log_probs(model, collate_pairs(rows))
    with torch.no_grad():
        for i, row in enumerate(rows):
            for j, side in enumerate(("chosen", "rejected")):
                ids = torch.tensor([row[f"{side}_input_ids"]])
                labels = torch.tensor([row[f"{side}_labels"]])
                alone = model(input_ids=ids, labels=labels, loss_reduction="sum")
                k = i + j * len(rows)
                torch.testing.assert_close(logps[k], -alone.loss, rtol=1e-5, atol=1e-5)
                assert counts[k] == alone.num_label_tokens


def test_task_loss_is_the_preference_loss_sum_plus_router_terms():
    torch.manual_seed(2)
    model = Mixtral(MixtralConfig.preset("tiny"))
    rows = _pairs(4, seed=3)
    for r, (c, j) in zip(rows, [(-30.0, -31.0), (-20.0, -25.0), (-40.0, -35.0), (-33.0, -33.5)], strict=True):
        r["ref_chosen_logps"], r["ref_rejected_logps"] = c, j
    batch = collate_pairs(rows)
    cfg = DPOSection(beta=0.2, nll_coef=0.5)
    out = DPOTask(cfg, aux_coef=0.02, z_coef=0.001, reference=None).forward(model, batch)
    fwd, logps, counts = policy_log_probs(model, batch)
    (c, r), (nc, _) = split_pairs(logps), split_pairs(counts)
    want = preference_loss(c, r, batch["ref_chosen_logps"], batch["ref_rejected_logps"], beta=0.2)
    torch.testing.assert_close(out.loss_sum, want.losses.sum())
    nll = -c.sum() / nc.sum()
    torch.testing.assert_close(out.extra, 0.02 * fwd.aux_loss + 0.001 * fwd.z_loss + 0.5 * nll)
    margins = want.chosen_rewards - want.rejected_rewards
    assert out.sums["rewards/accuracies"].item() == (margins > 0).sum().item()
    torch.testing.assert_close(out.sums["rewards/margins"], margins.sum())
    assert out.tokens == int((batch["document_ids"] >= 0).sum())
    assert out.loss_sum.requires_grad


def test_disabled_adapters_reference_equals_the_sft_model(sft_dir):
    policy, frozen = build_policy(_recipe(sft_dir))
    assert frozen is None
    # Move the DPO adapter away from zero as training would.
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    batch = collate_pairs(_pairs(3, seed=4))
    policy.eval()
    ref = Reference(None)(policy, batch)
    with torch.no_grad():
        _, sft_logps, _ = policy_log_probs(_sft_peft_model(sft_dir), batch)
        _, policy_logps, _ = policy_log_probs(policy, batch)
    torch.testing.assert_close(ref, sft_logps, rtol=1e-5, atol=1e-4)
    # The DPO adapter does change the policy: the equality above is not trivial.
    assert (policy_logps - sft_logps).abs().max() > 1e-2


def test_full_dpo_reference_is_a_frozen_copy_of_the_sft_model(sft_dir):
    recipe = _recipe(sft_dir, precompute_ref_log_probs=False)
    recipe.lora.enabled = False
    policy, frozen = build_policy(recipe)
    assert frozen is not None and frozen is not policy
    assert not any(p.requires_grad for p in frozen.parameters())
    assert all(p.requires_grad for p in policy.parameters())
    batch = collate_pairs(_pairs(2, seed=5))
    before = Reference(frozen)(policy, batch)
    with torch.no_grad():
        _, sft_logps, _ = policy_log_probs(_sft_peft_model(sft_dir), batch)
    torch.testing.assert_close(before, sft_logps, rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        policy.lm_head.weight.add_(0.1)
    torch.testing.assert_close(Reference(frozen)(policy, batch), before)


def test_precomputed_equals_on_the_fly_and_is_cached(sft_dir, tmp_path):
    from accelerate import Accelerator

    policy, _ = build_policy(_recipe(sft_dir))
    dataset = Dataset.from_list(_pairs(7, seed=6))
    kw = dict(
        policy=policy,
        reference=Reference(None),
        data_dir=str(tmp_path),
        batch_size=3,
        accelerator=Accelerator(cpu=True),
    )
    key = reference_fingerprint(policy)
    with_ref = attach_reference_log_probs(dataset, "train", model_key=key, **kw)
    path = ref_cache_path(tmp_path, "train", dataset, key, "no")
    assert path.is_file()

    # On the fly, in other batch shapes (2 pairs per forward, other padding), inside the task.
    policy.eval()
    for start in (0, 2, 4, 6):
        rows = [dataset[i] for i in range(start, min(start + 2, len(dataset)))]
        on_the_fly = split_pairs(Reference(None)(policy, collate_pairs(rows)))
        pre = collate_pairs([with_ref[i] for i in range(start, min(start + 2, len(dataset)))])
        torch.testing.assert_close(pre["ref_chosen_logps"], on_the_fly[0], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(pre["ref_rejected_logps"], on_the_fly[1], rtol=1e-5, atol=1e-4)
        task = DPOTask(DPOSection(), aux_coef=0.0, z_coef=0.0, reference=Reference(None))
        a = task.forward(policy, pre).loss_sum
        b = task.forward(policy, collate_pairs(rows)).loss_sum
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    # A second run reads the cache: a reference that cannot run proves no forward happens.
    class Unusable(Reference):
        def __call__(self, policy, batch):
            raise AssertionError("reference forward despite a cache hit")

    again = attach_reference_log_probs(dataset, "train", model_key=key, **{**kw, "reference": Unusable(None)})
    assert again["ref_chosen_logps"] == with_ref["ref_chosen_logps"]


def test_cache_key_follows_the_weights_and_the_data(sft_dir, tmp_path):
    policy, _ = build_policy(_recipe(sft_dir))
    key = reference_fingerprint(policy)
    data = Dataset.from_list(_pairs(3))
    # Training the adapter does not change the reference, so the key stays.
    with torch.no_grad():
        next(p for p in policy.parameters() if p.requires_grad).add_(1.0)
    assert reference_fingerprint(policy) == key
    with torch.no_grad():
        policy.get_base_model().lm_head.weight[0, 0] += 1e-3
    assert reference_fingerprint(policy) != key
    other = Dataset.from_list(_pairs(3, seed=9))
    assert ref_cache_path(tmp_path, "train", data, key, "no") != ref_cache_path(
        tmp_path, "train", other, key, "no"
    )
    assert ref_cache_path(tmp_path, "train", data, key, "no") != ref_cache_path(
        tmp_path, "train", data, key, "bf16"
    )


def test_compute_reference_restores_train_mode(sft_dir):
    policy, _ = build_policy(_recipe(sft_dir))
    policy.train()
    c, r = compute_reference_log_probs(policy, Reference(None), Dataset.from_list(_pairs(3)), batch_size=2)
    assert policy.training and c.shape == r.shape == (3,)
    assert (c < 0).all() and (r < 0).all()


def test_recipe_errors_name_the_key(sft_dir, tmp_path):
    with pytest.raises(RecipeError, match="dpo.label_smoothing is for loss_type sigmoid or robust"):
        _recipe(sft_dir, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(RecipeError, match="dpo.beta must be > 0"):
        _recipe(sft_dir, beta=0.0)
    with pytest.raises(RecipeError, match="dpo.loss_type must be one of"):
        _recipe(sft_dir, loss_type="kto")
    with pytest.raises(RecipeError, match="unknown key 'dpo.betta'; did you mean 'dpo.beta'"):
        _recipe(sft_dir, betta=0.1)
    with pytest.raises(FileNotFoundError, match="model.sft_dir must be a finished SFT output"):
        read_sft_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"kind": "qlora", "base": {}}))
    with pytest.raises(ValueError, match="'kind' must be 'lora' or 'full'"):
        read_sft_manifest(tmp_path)


def test_sft_adapter_is_merged_in_fp32_then_cast(sft_dir):
    from safetensors.torch import load_file

    from pipeline.dpo import load_sft_model

    merged = load_sft_model(sft_dir, torch.bfloat16)
    base = load_pretrained(sft_dir / "base")  # fp32
    adapter = load_file(str(sft_dir / "adapter_model.safetensors"))
    prefix = "base_model.model.layers.0.self_attn.q_proj"
    a, b = adapter[f"{prefix}.lora_A.weight"], adapter[f"{prefix}.lora_B.weight"]
    # One rounding of the fp32 sum, as export does (alpha 8 / r 4 = scale 2).
    want = (
        base.layers[0].self_attn.q_proj.weight.bfloat16().float() + 2.0 * (b.float() @ a.float())
    ).bfloat16()
    assert torch.equal(merged.layers[0].self_attn.q_proj.weight, want)
    assert merged.layers[0].moe.experts.gate_up_proj.dtype == torch.bfloat16
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_a_4bit_dpo_streams_the_sft_merge_into_its_4bit_base(sft_dir):
    """DPO with model.quantization=nf4 on an SFT adapter trained on the full-precision base: the
    loader merges each weight and quantizes it at once (never the whole merged model in its dtype),
    giving the model that merging whole and then quantizing gives."""
    from model.quant import quantize_model
    from pipeline.distributed.sharded_load import checkpoint_loader, merge_adapter_fp32
    from pipeline.dpo import load_sft_model

    streamed = load_sft_model(sft_dir, load=checkpoint_loader(torch.float32, None, None, "nf4")).eval()
    whole = merge_adapter_fp32(load_pretrained(sft_dir / "base", dtype=torch.float32), str(sft_dir))
    whole = quantize_model(whole, "nf4", "cpu").eval()
    assert streamed.quantization == "nf4" and not any(p.requires_grad for p in streamed.parameters())
    assert type(streamed.layers[0].moe.experts.gate_up_proj) is type(whole.layers[0].moe.experts.gate_up_proj)
    ids = torch.randint(0, streamed.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(streamed(ids).logits, whole(ids).logits, rtol=0, atol=0)


def _full_and_rank1_of_ep2(sft_dir):
    from pipeline.distributed.expert_parallel import ExpertPlacement

    torch.manual_seed(0)
    full, _ = build_policy(_recipe(sft_dir))
    torch.manual_seed(0)
    part, _ = build_policy(_recipe(sft_dir), ExpertPlacement(8, 2, 1))
    assert part.get_base_model().expert_ids == [4, 5, 6, 7]
    full_params, part_params = dict(full.named_parameters()), dict(part.named_parameters())
    assert full_params.keys() == part_params.keys()
    # [E, ...] -> this rank's [El, ...] for expert tensors.
    return [
        (n, p, full_params[n][4:] if ".moe.experts." in n else full_params[n]) for n, p in part_params.items()
    ]


def test_expert_parallel_build_holds_this_ranks_slice_of_the_same_policy(sft_dir):
    # SFT weights merged per expert, every LoRA A drawn placement-independently (model_setup.build_model's
    # order): rank 1 of ep=2 holds exactly experts 4..7 of the ep=1 policy.
    for name, p, want in _full_and_rank1_of_ep2(sft_dir):
        torch.testing.assert_close(p, want, rtol=0, atol=0, msg=name)
        assert p.requires_grad == want.requires_grad, name


@pytest.mark.parametrize("n, world", [(7, 1), (7, 2), (8, 4), (2, 4), (9, 4)])
def test_reference_precompute_blocks_cover_every_row_once_in_order(n, world):
    blocks = [rank_block(n, rank, world) for rank in range(world)]
    assert len({len(b) for b in blocks}) == 1  # the same number of forwards on every rank
    # Gathered rank by rank and cut to n, the blocks give the dataset order.
    assert [i for b in blocks for i in b][:n] == list(range(n))
