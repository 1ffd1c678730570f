"""DPO: the fused log-probability op against its plain twin, the loss, the reference cache, a whole
tiny model against finite differences, a few training steps, and PyTorch parity when torch is there."""
import math

import numpy as np
import pytest

from minigpt import IGNORE_INDEX, GPTConfig, GPTModel, Tensor, gradcheck, no_grad, plain_ops, training
from minigpt.loader import DataLoader
from minigpt.nn import eval_mode
from minigpt.dpo import (batch_logprobs, dpo_batch_loss, dpo_loss, reference_logprobs, reward_metrics,
                         sequence_logprobs)
from minigpt.optim import Adam
from minigpt.pipeline.dpo_run import DPOObjective
from minigpt.preference import PreferenceDataset
from minigpt.tokenizer import byte_tokenizer

I = IGNORE_INDEX
PAIRS = [{"instruction": "2+2", "input": "", "output": "4", "chosen": "4", "rejected": "5!"},
         {"instruction": "3+4", "input": "", "output": "7", "chosen": "7", "rejected": "8"},
         {"instruction": "1+5", "input": "", "output": "6", "chosen": "6.", "rejected": "6"}]


def tiny_model(seed, dtype=np.float64):
    """A byte-level GPT with weights of order 1, so float64 gradients sit far above round-off."""
    model = GPTModel(GPTConfig(vocab_size=257, context_length=48, emb_dim=8, n_heads=2, n_layers=2),
                     seed=seed, dtype=dtype)
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        base = 1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0
        p.data[...] = base + 0.3 * rng.standard_normal(p.shape)
    return model


def tiny_dataset():
    return PreferenceDataset(PAIRS, byte_tokenizer(), style="phi3")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_sequence_logprobs_equals_its_plain_twin_in_value_and_gradient(reduction):
    rng = np.random.default_rng(0)
    B, T, C, V = 3, 6, 5, 11
    targets = rng.integers(0, V, size=(B, T))
    targets[0, :4] = I                                     # a prompt
    targets[2, -3:] = I                                    # padding
    x_data, wte_data = rng.standard_normal((B, T, C)), rng.standard_normal((V, C))
    results = []
    for op in (sequence_logprobs, plain_ops.sequence_logprobs_from_basic_ops):
        x, wte = Tensor(x_data.copy(), requires_grad=True), Tensor(wte_data.copy(), requires_grad=True)
        out = op(x, wte, targets, reduction)
        out.backward(np.array([0.5, -1.0, 2.0]))
        results.append((out.data, x.grad, wte.grad))
    for fused, plain in zip(*results):
        np.testing.assert_allclose(fused, plain, rtol=1e-12, atol=1e-14)
    plain_numpy = plain_ops.sequence_logprobs(x_data, wte_data, targets, reduction)   # the NumPy formula too
    np.testing.assert_allclose(plain_numpy, results[0][0], rtol=1e-12)
    assert np.all(results[0][1][0, :4] == 0) and np.all(results[0][1][2, -3:] == 0)  # ignored rows: exactly 0
    with no_grad():                                        # the reference's path skips the gradient passes
        values = sequence_logprobs(Tensor(x_data), Tensor(wte_data), targets, reduction).data
    np.testing.assert_allclose(values, results[0][0], rtol=1e-12)


def test_sequence_logprobs_is_a_log_probability_and_refuses_empty_sequences():
    x, wte = Tensor(np.zeros((2, 3, 4))), Tensor(np.zeros((7, 4)))   # all logits 0: each token has p = 1/7
    targets = np.array([[1, 2, I], [I, I, 6]])
    log7 = math.log(7)
    np.testing.assert_allclose(sequence_logprobs(x, wte, targets, "sum").data, [-2 * log7, -log7])
    np.testing.assert_allclose(sequence_logprobs(x, wte, targets).data, [-log7, -log7])
    with pytest.raises(ValueError, match="sequence 1 has no target that is not ignore_index"):
        sequence_logprobs(x, wte, np.array([[1, 2, I], [I, I, I]]))
    with pytest.raises(ValueError, match="reduction must be one of mean, sum"):
        sequence_logprobs(x, wte, targets, "max")


def test_dpo_loss_formula_stability_and_checks():
    pc = Tensor(np.array([-1.0, -2.0]), requires_grad=True)
    pr = Tensor(np.array([-3.0, -1.0]), requires_grad=True)
    rc, rr = np.array([-1.5, -2.0]), np.array([-2.0, -2.0])
    beta = 0.5
    z = beta * ((pc.data - rc) - (pr.data - rr))           # [0.5 * (0.5 + 1), 0.5 * (0 - 1)] = [0.75, -0.5]
    loss = dpo_loss(pc, pr, rc, rr, beta)
    expected = np.mean([-math.log(1 / (1 + math.exp(-zb))) for zb in z])
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    sigmoid_neg_z = 1 / (1 + np.exp(z))
    np.testing.assert_allclose(pc.grad, -beta * sigmoid_neg_z / 2, rtol=1e-12)
    np.testing.assert_allclose(pr.grad, beta * sigmoid_neg_z / 2, rtol=1e-12)

    huge = Tensor(np.array([4000.0, -4000.0]), requires_grad=True)   # z = +-400: exp(400) overflows float64
    loss = dpo_loss(huge, Tensor(np.zeros(2)), np.zeros(2), np.zeros(2), beta=0.1)
    assert loss.item() == pytest.approx((0.0 + 400.0) / 2)
    loss.backward()
    np.testing.assert_allclose(huge.grad, [-0.05 * math.exp(-400), -0.05], rtol=1e-12)  # -beta sigma(-z) / B

    with pytest.raises(ValueError, match="beta must be a positive number"):
        dpo_loss(pc, pr, rc, rr, beta=0)
    with pytest.raises(ValueError, match=r"ref_rejected has shape \(3,\), expected \(2,\)"):
        dpo_loss(pc, pr, rc, np.zeros(3))
    with pytest.raises(ValueError, match="ref_chosen holds a non-finite value"):
        dpo_loss(pc, pr, np.array([0.0, np.nan]), rr)


def test_reward_metrics_by_hand():
    ref = [-2.0, -2.0, -1.0]
    metrics = reward_metrics([-1.0, -2.0, -1.0], [-3.0, -1.0, -1.0], ref, ref, beta=0.1)
    # chosen rewards 0.1 * [1, 0, 0], rejected 0.1 * [-1, 1, 0]; margins [0.2, -0.1, 0]: one strictly above
    assert metrics == pytest.approx({"chosen_reward": 0.1 / 3, "rejected_reward": 0.0,
                                     "reward_margin": 0.1 / 3, "reward_accuracy": 1 / 3})


def test_reference_cache_matches_any_batching_and_starts_dpo_at_log_2():
    dataset = tiny_dataset()
    reference = tiny_model(seed=1)
    reference.train()
    one_by_one = reference_logprobs(reference, dataset, batch_size=1)
    together = reference_logprobs(reference, dataset, batch_size=2)     # padding and batching change nothing
    np.testing.assert_allclose(together.chosen, one_by_one.chosen, rtol=1e-12)
    np.testing.assert_allclose(together.rejected, one_by_one.rejected, rtol=1e-12)
    assert reference.training and reference.wte.weight.grad is None
    assert np.all(one_by_one.chosen < 0) and not np.allclose(one_by_one.chosen, one_by_one.rejected)

    loss, metrics = dpo_batch_loss(reference, dataset.batch([2, 0]), together)   # policy == reference
    assert loss.item() == pytest.approx(math.log(2), rel=1e-12)
    assert metrics == pytest.approx({"loss": math.log(2), "chosen_reward": 0, "rejected_reward": 0,
                                     "reward_margin": 0, "reward_accuracy": 0}, abs=1e-12)

    other = PreferenceDataset(PAIRS[:2], byte_tokenizer(), style="phi3")
    with pytest.raises(ValueError, match="computed for another dataset"):
        dpo_batch_loss(reference, other.batch([0, 1]), together)


def test_whole_model_dpo_loss_gradient_matches_finite_differences():
    dataset = tiny_dataset()
    ref_logps = reference_logprobs(tiny_model(seed=1), dataset, batch_size=3)
    policy = tiny_model(seed=2)
    batch = dataset.batch([0, 1, 2])
    params = dict(policy.named_parameters())
    report = gradcheck(lambda: dpo_batch_loss(policy, batch, ref_logps, beta=0.5)[0], params, max_elements=4)
    assert len(report.checked) == len(params) == 4 + 12 * 2
    assert max(report.max_relative_error.values()) <= 1e-6


def test_the_chosen_nll_term_adds_to_the_loss_and_its_gradient_matches_finite_differences():
    dataset = tiny_dataset()
    ref_logps = reference_logprobs(tiny_model(seed=1), dataset, batch_size=3)
    policy = tiny_model(seed=2)
    batch = dataset.batch([0, 1, 2])
    plain, _ = dpo_batch_loss(policy, batch, ref_logps, beta=0.5)
    loss, metrics = dpo_batch_loss(policy, batch, ref_logps, beta=0.5, nll_weight=0.7)
    chosen = batch_logprobs(policy, batch).data[:batch.size]               # mean log-probability per response
    assert metrics["chosen_nll"] == pytest.approx(-chosen.mean(), rel=1e-12) and metrics["chosen_nll"] > 0
    assert metrics["dpo_loss"] == pytest.approx(plain.item(), rel=1e-12)
    assert loss.item() == pytest.approx(plain.item() + 0.7 * metrics["chosen_nll"], rel=1e-12)
    params = dict(policy.named_parameters())
    report = gradcheck(lambda: dpo_batch_loss(policy, batch, ref_logps, beta=0.5, nll_weight=0.7)[0], params,
                       max_elements=4)
    assert len(report.checked) == len(params)
    assert max(report.max_relative_error.values()) <= 1e-6
    for bad in (-0.1, math.inf, math.nan, True, "1"):
        with pytest.raises(ValueError, match="nll_weight must be a finite number >= 0"):
            dpo_batch_loss(policy, batch, ref_logps, nll_weight=bad)


def test_a_few_dpo_steps_raise_the_margin_on_the_training_pairs():
    dataset = tiny_dataset()
    policy = tiny_model(seed=1, dtype=np.float32)
    ref_logps = reference_logprobs(policy, dataset)                     # the policy starts as the reference
    batch = dataset.batch([0, 1, 2])
    optimizer = Adam(policy.parameters(), lr=1e-2)
    for _ in range(10):
        loss, metrics = dpo_batch_loss(policy, batch, ref_logps, beta=0.1)
        policy.zero_grad()
        loss.backward()
        optimizer.step()
    loss, metrics = dpo_batch_loss(policy, batch, ref_logps, beta=0.1)
    assert loss.dtype == np.float32 and loss.item() < math.log(2) - 0.05
    assert metrics["reward_margin"] > 0.05 and metrics["reward_accuracy"] == 1.0


def test_loss_and_rewards_match_pytorch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    B, T, C, V, beta = 4, 7, 6, 13, 0.1
    targets = rng.integers(0, V, size=(2 * B, T))
    targets[:, :3] = I                                   # the prompt
    targets[1, -2:] = targets[B + 2, -3:] = I            # padding
    x_data, wte_data = rng.standard_normal((2 * B, T, C)), rng.standard_normal((V, C))
    ref_chosen, ref_rejected = rng.standard_normal(B) - 3, rng.standard_normal(B) - 3

    x, wte = Tensor(x_data, requires_grad=True), Tensor(wte_data, requires_grad=True)
    logp = sequence_logprobs(x, wte, targets)
    loss = dpo_loss(logp[:B], logp[B:], ref_chosen, ref_rejected, beta)
    loss.backward()
    metrics = reward_metrics(logp[:B], logp[B:], ref_chosen, ref_rejected, beta)

    tx, twte = torch.tensor(x_data, requires_grad=True), torch.tensor(wte_data, requires_grad=True)
    log_probs = torch.log_softmax(tx @ twte.T, dim=-1)                    # (2B, T, V)
    mask = torch.tensor(targets != I, dtype=torch.float64)
    picked = torch.gather(log_probs, -1, torch.tensor(np.where(targets == I, 0, targets))[..., None])[..., 0]
    tlogp = (picked * mask).sum(-1) / mask.sum(-1)                        # mean over the kept tokens
    chosen_rewards = beta * (tlogp[:B] - torch.tensor(ref_chosen))
    rejected_rewards = beta * (tlogp[B:] - torch.tensor(ref_rejected))
    tloss = -torch.nn.functional.logsigmoid(chosen_rewards - rejected_rewards).mean()
    tloss.backward()

    np.testing.assert_allclose(logp.data, tlogp.detach().numpy(), rtol=1e-12)
    assert loss.item() == pytest.approx(tloss.item(), rel=1e-12)
    np.testing.assert_allclose(x.grad, tx.grad.numpy(), rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(wte.grad, twte.grad.numpy(), rtol=1e-9, atol=1e-15)
    assert metrics == pytest.approx({
        "chosen_reward": chosen_rewards.mean().item(), "rejected_reward": rejected_rewards.mean().item(),
        "reward_margin": (chosen_rewards - rejected_rewards).mean().item(),
        "reward_accuracy": (chosen_rewards > rejected_rewards).double().mean().item()}, rel=1e-12)


def test_test_pair_metrics_count_each_pair_once_whatever_the_batches():
    dataset = tiny_dataset()                                            # 3 pairs: batches of 2, then 1
    ref_logps = reference_logprobs(tiny_model(seed=1), dataset)
    policy = tiny_model(seed=2)
    objective = DPOObjective([ref_logps], beta=0.5, nll_weight=0.3)
    _, whole = objective(policy, dataset.batch([0, 1, 2]))              # one batch: the mean over pairs
    with eval_mode(policy):                                             # as dpo_run measures the test pairs
        metrics = training.calc_metrics_loader(policy, DataLoader(dataset, batch_size=2), objective=objective,
                                               per_example=True)
    assert set(metrics) == set(whole)
    for name in whole:
        assert metrics[name] == pytest.approx(whole[name], rel=1e-9), name
    assert metrics["reward_accuracy"] in (0, 1 / 3, 2 / 3, 1)           # a share of three pairs
