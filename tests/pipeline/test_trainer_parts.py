"""The trainer's pure parts: schedules, parameter groups, data order, checkpoints, metrics."""

import json
import math

import pytest
import torch
from torch import nn

from pipeline.training import checkpointing as ckpt
from pipeline.training.optim import build_optimizer, freeze_router, lr_factor, param_group_name, param_groups
from pipeline.training.tracking import Tracker, expert_load_metrics, read_metrics
from pipeline.training.trainer import micro_batch_indices, steps_per_epoch


def factor(step, schedule="cosine", warmup=3, total=11, min_ratio=0.1):
    return lr_factor(step, warmup_steps=warmup, total_steps=total, schedule=schedule, min_ratio=min_ratio)


def test_warmup_is_linear_and_never_zero():
    assert factor(0) == pytest.approx(1 / 4)
    assert factor(1) == pytest.approx(2 / 4)
    assert factor(2) == pytest.approx(3 / 4)
    assert factor(3) == pytest.approx(1.0)


def test_cosine_hand_worked():
    # decay over 11 - 3 = 8 steps; step 7 is half way: cos(pi/2) = 0 -> 0.1 + 0.9 * 0.5
    assert factor(7) == pytest.approx(0.55)
    # a quarter of the way: 0.5 * (1 + cos(pi/4)) = 0.853553...
    assert factor(5) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert factor(11) == pytest.approx(0.1)
    assert factor(50) == pytest.approx(0.1)


def test_linear_and_constant():
    assert factor(5, "linear") == pytest.approx(0.1 + 0.9 * 0.75)
    assert factor(11, "linear") == pytest.approx(0.1)
    assert factor(0, "constant") == pytest.approx(0.25)
    assert factor(9, "constant") == 1.0
    with pytest.raises(ValueError, match="unknown schedule"):
        factor(5, "step")


class Named(nn.Module):
    """A module tree with the Mixtral names the groups look for."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(10, 4)
        self.layers = nn.ModuleList([nn.Module()])
        layer = self.layers[0]
        layer.input_layernorm = nn.LayerNorm(4)
        layer.self_attn = nn.Linear(4, 4)
        layer.moe = nn.Module()
        layer.moe.gate = nn.Linear(4, 8, bias=False)
        layer.moe.experts = nn.Module()
        layer.moe.experts.gate_up_proj = nn.Parameter(torch.zeros(8, 6, 4))
        self.lm_head = nn.Linear(4, 10, bias=False)


def test_param_groups_by_name():
    model = Named()
    names = {n: param_group_name(n, p) for n, p in model.named_parameters()}
    assert names == {
        "embed_tokens.weight": "no_decay",
        "layers.0.input_layernorm.weight": "no_decay",
        "layers.0.input_layernorm.bias": "no_decay",
        "layers.0.self_attn.weight": "decay",
        "layers.0.self_attn.bias": "no_decay",
        "layers.0.moe.gate.weight": "router",
        "layers.0.moe.experts.gate_up_proj": "experts",
        "lm_head.weight": "decay",
    }
    # PEFT prefixes and its trained router copy keep their group
    assert param_group_name("base_model.model.layers.3.moe.gate.modules_to_save.default.weight",
                            torch.zeros(8, 4)) == "router"
    assert param_group_name("base_model.model.layers.3.moe.experts.lora_down_A.default",
                            torch.zeros(8, 2, 4)) == "experts"
    groups = {g["name"]: g for g in param_groups(model.named_parameters(), 0.1)}
    assert groups["no_decay"]["weight_decay"] == 0.0
    assert groups["router"]["weight_decay"] == groups["experts"]["weight_decay"] == 0.1


def test_freeze_router_and_empty_model_error():
    model = Named()
    assert freeze_router(model) == 1
    assert "router" not in {g["name"] for g in param_groups(model.named_parameters(), 0.0)}
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)


def test_data_order_partitions_each_epoch_and_is_deterministic():
    rows, mbs, accum, world = 23, 2, 2, 2
    per_epoch = steps_per_epoch(rows, mbs, accum, world)
    assert per_epoch == 2  # 23 // 8, the last 7 rows of each epoch are dropped

    def epoch(e):
        seen = []
        for step in range(e * per_epoch, (e + 1) * per_epoch):
            for micro in range(accum):
                for rank in range(world):
                    seen += micro_batch_indices(rows, seed=5, step=step, micro=micro, rank=rank,
                                                micro_batch_size=mbs, grad_accum_steps=accum, world_size=world)
        return seen

    first, second = epoch(0), epoch(1)
    assert len(first) == len(set(first)) == 16
    assert first != second  # reshuffled per epoch
    assert first == epoch(0)  # a pure function of (seed, step)


def test_optimizer_state_round_trips_through_safetensors(tmp_path):
    torch.manual_seed(0)
    model = Named()
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    for _ in range(2):
        sum(p.sum() for p in model.parameters()).backward()
        opt.step()
    tmp = ckpt.begin_checkpoint(tmp_path, 2)
    ckpt.save_main_files(tmp, model_tensors=dict(model.named_parameters()), optimizer_state=opt.state_dict(),
                         state={"step": 2})
    ckpt.save_rank_files(tmp, 0)
    final = ckpt.commit_checkpoint(tmp, keep_last=3)
    data = ckpt.load_checkpoint(final)
    fresh = build_optimizer(Named(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    fresh.load_state_dict(data["optimizer"])
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == [dict(g, betas=tuple(g["betas"])) for g in b["param_groups"]]
    for idx, state in a["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["state"][idx][key])
    assert data["state"] == {"step": 2}


def test_rng_state_restores_the_same_draws(tmp_path):
    torch.manual_seed(3)
    tmp = ckpt.begin_checkpoint(tmp_path, 1)
    ckpt.save_main_files(tmp, model_tensors={}, optimizer_state={"state": {}, "param_groups": []}, state={})
    ckpt.save_rank_files(tmp, 0)
    expected = torch.rand(5)
    torch.rand(7)
    data = ckpt.load_checkpoint(ckpt.commit_checkpoint(tmp, 1))
    ckpt.set_rng_tensors(data["rng"])
    assert torch.equal(torch.rand(5), expected)


def test_commit_is_atomic_and_keeps_last_k(tmp_path):
    for step in (1, 2, 3, 4):
        tmp = ckpt.begin_checkpoint(tmp_path, step)
        (tmp / "x").write_text(str(step))
        ckpt.commit_checkpoint(tmp, keep_last=2)
    # a save killed half way leaves only a .tmp dir: never picked for resume
    (tmp_path / ".tmp-step-000005").mkdir()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000003", "step-000004"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000004"
    with pytest.raises(FileNotFoundError, match="incomplete.*model.safetensors"):
        ckpt.load_checkpoint(tmp_path / "step-000004")


def test_saved_tensors_load_only_into_the_same_names_and_shapes():
    live = {"a": nn.Parameter(torch.zeros(2, 3)), "b": nn.Parameter(torch.zeros(4))}
    hint = "resume with the recipe that wrote it"
    with pytest.raises(ValueError, match=r"ckpt does not match .*missing \['b'\], unexpected \['c'\]\): resume"):
        ckpt.copy_saved_tensors({"a": torch.ones(2, 3), "c": torch.ones(4)}, live, "ckpt", hint)
    # [1, 3] would broadcast into [2, 3] without the shape check
    with pytest.raises(ValueError, match=r"ckpt: a is \(1, 3\), this run holds \(2, 3\): resume"):
        ckpt.copy_saved_tensors({"a": torch.ones(1, 3), "b": torch.ones(4)}, live, "ckpt", hint)
    assert not any(t.any() for t in live.values())  # nothing copied before the checks pass
    ckpt.copy_saved_tensors({"a": torch.ones(2, 3), "b": torch.arange(4.0)}, live, "ckpt", hint)
    assert torch.equal(live["a"], torch.ones(2, 3)) and torch.equal(live["b"], torch.arange(4.0))
    assert live["a"].requires_grad and live["a"].grad_fn is None


def test_expert_load_shares_ratio_and_dead_experts():
    counts = torch.tensor([[6, 2, 0, 0], [3, 3, 1, 1]])
    m = expert_load_metrics(counts)
    assert m["expert_load/layer0/expert0"] == pytest.approx(0.75)
    assert "expert_load/layer0/max_min_ratio" not in m  # infinite: the dead count says it instead
    assert m["expert_load/dead_experts"] == 2.0
    assert m["expert_load/layer1/expert2"] == pytest.approx(0.125)
    assert m["expert_load/layer1/max_min_ratio"] == pytest.approx(3.0)
    assert all(math.isfinite(v) for v in m.values())


def test_dead_experts_are_warned_once_and_no_metric_is_a_string(tmp_path, capsys):
    from accelerate import Accelerator

    tracker = Tracker(Accelerator(cpu=True), tmp_path, report_to="none", project="p", run_name=None, tags=[],
                      config={})
    tracker.dead_experts.steps = 3
    alive, dead = torch.tensor([[2, 2, 1, 1]]), torch.tensor([[2, 2, 2, 0]])
    for step, counts in enumerate([dead, alive, dead, dead, dead, dead, dead], start=1):
        tracker.log(step, {"loss": 1.0, "grad_norm": math.inf, **expert_load_metrics(counts)})
    out = capsys.readouterr().out
    # expert 3 was dead at step 1, alive at 2, then dead from step 3 on: warned once, at step 5
    assert out.count("warning: expert 3 of layer 0 got no token in any logged step from 3 to 5") == 1, out
    assert out.count("dead expert") == 1
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "Infinity" not in text and '"inf"' not in text and "NaN" not in text
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows[0]["grad_norm"] is None and [r["expert_load/dead_experts"] for r in rows] == [1, 0, 1, 1, 1, 1, 1]


def test_read_metrics_parses_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n\n" + json.dumps({"step": 2, "loss": 1.5}) + "\n")
    assert [m["loss"] for m in read_metrics(path)] == [2.0, 1.5]
