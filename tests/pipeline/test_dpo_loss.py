"""DPO losses: hand-worked numbers, and TRL's DPOTrainer on the same log-probs."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from model.losses import IGNORE_INDEX, masked_ce, shift_labels
from pipeline.training.dpo_loss import (
    chosen_nll,
    hinge_loss,
    ipo_loss,
    preference_loss,
    reward_sums,
    robust_loss,
    sigmoid_loss,
    split_pairs,
)

# One pair worked by hand: policy (chosen, rejected) = (-10, -12), reference = (-11, -11), beta 0.5.
# logratio_c = 1, logratio_r = -1, delta = 2, beta * delta = 1.
POLICY_C, POLICY_R, REF_C, REF_R, BETA = -10.0, -12.0, -11.0, -11.0, 0.5
# -log sigmoid(1) = log(1 + e^-1); -log sigmoid(-1) = 1 + log(1 + e^-1).
NLS1 = 0.31326168751822286
NLS_M1 = 1.31326168751822286


def _t(*values):
    return torch.tensor(values, dtype=torch.float64)


def _hand_pair(loss_type, **kw):
    return preference_loss(
        _t(POLICY_C), _t(POLICY_R), _t(REF_C), _t(REF_R), beta=BETA, loss_type=loss_type, **kw
    )


def test_sigmoid_hand_worked():
    out = _hand_pair("sigmoid")
    assert out.losses.item() == pytest.approx(NLS1, abs=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(0.5)
    assert out.rejected_rewards.item() == pytest.approx(-0.5)


def test_conservative_dpo_hand_worked():
    # eps 0.1: 0.9 * 0.313262 + 0.1 * 1.313262 = 0.413262 (= plain DPO + eps * beta * delta).
    out = _hand_pair("sigmoid", label_smoothing=0.1)
    assert out.losses.item() == pytest.approx(0.9 * NLS1 + 0.1 * NLS_M1, abs=1e-12)
    assert out.losses.item() == pytest.approx(0.41326168751822286, abs=1e-12)


def test_robust_dpo_hand_worked():
    # (0.9 * 0.313262 - 0.1 * 1.313262) / 0.8 = 0.150609 / 0.8 = 0.188262
    out = _hand_pair("robust", label_smoothing=0.1)
    assert out.losses.item() == pytest.approx(0.18826168751822286, abs=1e-12)
    # With no label noise robust DPO is plain DPO.
    assert _hand_pair("robust").losses.item() == pytest.approx(NLS1, abs=1e-12)


def test_hinge_hand_worked():
    # beta * delta = 1 sits exactly on the hinge: 0.
    assert _hand_pair("hinge").losses.item() == 0.0
    # delta = -1: relu(1 + 0.5) = 1.5, and the slope is -beta.
    delta = _t(-1.0).requires_grad_()
    loss = hinge_loss(delta, 0.5)
    loss.backward()
    assert loss.item() == pytest.approx(1.5)
    assert delta.grad.item() == pytest.approx(-0.5)


def test_ipo_hand_worked():
    # chosen 4 completion tokens, rejected 2: per-token delta = 1/4 - (-1/2) = 0.75; target 1/(2*0.5) = 1.
    out = _hand_pair("ipo", chosen_lengths=_t(4), rejected_lengths=_t(2))
    assert out.losses.item() == pytest.approx(0.0625, abs=1e-12)
    assert ipo_loss(_t(1.0), 0.5).item() == 0.0


def test_pure_losses_match_their_formulas_on_random_deltas():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(64, generator=g, dtype=torch.float64) * 5
    beta, eps = 0.3, 0.2
    sig = lambda x: 1 / (1 + torch.exp(-x))  # noqa: E731
    torch.testing.assert_close(sigmoid_loss(delta, beta), -torch.log(sig(beta * delta)))
    torch.testing.assert_close(
        sigmoid_loss(delta, beta, eps),
        -(1 - eps) * torch.log(sig(beta * delta)) - eps * torch.log(sig(-beta * delta)),
    )
    torch.testing.assert_close(
        robust_loss(delta, beta, eps),
        ((1 - eps) * -torch.log(sig(beta * delta)) - eps * -torch.log(sig(-beta * delta))) / (1 - 2 * eps),
    )
    torch.testing.assert_close(hinge_loss(delta, beta), torch.clamp(1 - beta * delta, min=0))


def test_sigmoid_is_stable_for_large_margins():
    out = sigmoid_loss(_t(-1e4, 1e4), 1.0)
    assert torch.isfinite(out).all()
    assert out[0].item() == pytest.approx(1e4)
    assert out[1].item() == 0.0


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="label_smoothing applies to sigmoid/robust only"):
        _hand_pair("hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="ipo loss needs chosen_lengths"):
        _hand_pair("ipo")
    with pytest.raises(ValueError, match="unknown DPO loss_type 'kto'"):
        _hand_pair("kto")
    with pytest.raises(ValueError, match=r"robust DPO needs label_smoothing in \[0, 0.5\)"):
        _hand_pair("robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="even number of rows"):
        split_pairs(torch.zeros(3))


def test_chosen_nll_and_metrics_hand_worked():
    # Two chosen completions: log-prob sums -6 (3 tokens) and -2 (1 token): NLL = 8 / 4 = 2.
    assert chosen_nll(_t(-6.0, -2.0), torch.tensor([3, 1])).item() == pytest.approx(2.0)
    out = preference_loss(_t(-1.0, -5.0), _t(-2.0, -1.0), _t(-1.5, -4.0), _t(-1.5, -2.0), beta=0.1)
    # rewards: chosen 0.1 * (0.5, -1) ; rejected 0.1 * (-0.5, 1); margins (0.1, -0.2)
    m = {k: v.item() for k, v in reward_sums(out, _t(-1.0, -5.0), _t(-2.0, -1.0)).items()}
    assert m["rewards/chosen"] == pytest.approx(-0.05)
    assert m["rewards/rejected"] == pytest.approx(0.05)
    assert m["rewards/margins"] == pytest.approx(-0.1)
    assert m["rewards/accuracies"] == 1.0
    assert m["logps/chosen"] == pytest.approx(-6.0)
    assert m["logps/rejected"] == pytest.approx(-3.0)


def sequence_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each row's labelled tokens and how many there are, from the model's own
    CE and label shift (what `pipeline.training.tasks.policy_log_probs` reads off the model's output):
    logits [R, S, V], labels [R, S] unshifted -> ([R], [R])."""
    targets = shift_labels(labels)  # [R, S]
    nll = masked_ce(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), "none").view(targets.shape)
    return -nll.sum(dim=-1), (targets != IGNORE_INDEX).sum(dim=-1)


def test_sequence_log_probs_equal_log_softmax_gather_and_ignore_masked():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 7, 11, generator=g)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[:, :3] = -100
    labels[2, 5:] = -100
    ref = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, labels[:, 1:].clamp_min(0)[..., None]).squeeze(-1)
    ref = ref * (labels[:, 1:] != -100)  # [R, S-1]: position s scores label s + 1
    sums, counts = sequence_log_probs(logits, labels)
    torch.testing.assert_close(sums, ref.sum(-1))
    assert counts.tolist() == [4, 4, 2]


# ----------------------------------------------------------------------------------------------
# TRL's DPOTrainer on the same log-probs
# ----------------------------------------------------------------------------------------------

VOCAB = 64


@pytest.fixture(scope="module")
def trl_setup():
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level, pad_token="<pad>", eos_token="</s>", bos_token="<s>"
    )
    cfg = MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    model = MixtralForCausalLM(cfg)
    # Completions of different lengths so that padding and the IPO length normalisation both matter.
    rows = {
        "prompt": ["w3 w4 w5", "w6 w7", "w20 w21 w22 w23"],
        "chosen": [" w8 w9", " w10", " w30 w31 w32 w33"],
        "rejected": [" w11", " w12 w13 w14", " w40 w41"],
    }
    return model, tokenizer, Dataset.from_dict(rows)


def _trl_loss_and_ours(
    trl_setup, tmp_path, loss_type, trl_loss_types, trl_weights=None, label_smoothing=0.0, nll=0.0
):
    from trl import DPOConfig, DPOTrainer

    model, tokenizer, dataset = trl_setup
    args = DPOConfig(
        output_dir=str(tmp_path),
        beta=0.3,
        loss_type=trl_loss_types,
        loss_weights=trl_weights,
        label_smoothing=label_smoothing,
        report_to=[],
        router_aux_loss_coef=0.0,
        use_cpu=True,
    )
    trainer = DPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(dataset))])
    # Hand-made reference log-probs, read from the batch the way TRL's precomputed path reads them.
    ref_c, ref_r = torch.tensor([-40.0, -35.0, -52.0]), torch.tensor([-37.0, -50.0, -41.0])
    batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref_c, ref_r
    trainer.precompute_ref_logps = True
    trainer.model.train()
    trl_loss = trainer._compute_loss(trainer.model, batch, False)

    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps, counts = sequence_log_probs(logits, labels)
    (pc, pr), (nc, nr) = split_pairs(logps), split_pairs(counts)
    out = preference_loss(
        pc,
        pr,
        ref_c,
        ref_r,
        beta=0.3,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        chosen_lengths=nc,
        rejected_lengths=nr,
    )
    ours = out.losses.mean() + nll * chosen_nll(pc, nc)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    means = {k: v.item() / len(pc) for k, v in reward_sums(out, pc, pr).items()}
    return trl_loss.detach(), ours, metrics, means


@pytest.mark.parametrize(
    "loss_type, label_smoothing",
    [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.15)],
)
def test_loss_equals_trl(trl_setup, tmp_path, loss_type, label_smoothing):
    trl_loss, ours, trl_metrics, our_metrics = _trl_loss_and_ours(
        trl_setup, tmp_path, loss_type, [loss_type], label_smoothing=label_smoothing
    )
    assert math.isfinite(ours.item()) and ours.item() > 0
    torch.testing.assert_close(ours, trl_loss, rtol=1e-5, atol=1e-6)
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
    ):
        assert our_metrics[key] == pytest.approx(trl_metrics[key], rel=1e-5, abs=1e-6), key


def test_nll_term_equals_trl_sigmoid_plus_sft(trl_setup, tmp_path):
    trl_loss, ours, _, _ = _trl_loss_and_ours(
        trl_setup, tmp_path, "sigmoid", ["sigmoid", "sft"], [1.0, 0.7], nll=0.7
    )
    torch.testing.assert_close(ours, trl_loss, rtol=1e-5, atol=1e-6)
