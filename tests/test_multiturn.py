"""Multi-turn rollouts: the response region holds the model's turns and, between them, the
environment's tokens (tool outputs, user messages), read by the model (attention 1) but never
trained (response mask 0). Environment tokens get no gradient and no advantage, GAE and the
returns-to-go skip them, per-turn rewards are credited to the turn that earned them, and
trimming, packing and token budgets are correct for responses with holes."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rollouts import multiturn_rollout  # tests/rollouts.py
from test_trainer import tiny_config, weights

from rlhf_ppo import PPOTrainer, estimators
from rlhf_ppo.experience import make_targets, trim_padding
from rlhf_ppo.rollout import Rollout, dynamic_sampling
from rlhf_ppo.update import micro_step

EOS = 3  # the tiny tokenizer's <eos>, which ends every model turn
# Row layouts: the lengths of the segments, alternating model turn (trained) and environment
# tokens (read only), starting with a model turn. Row 2 is single-turn, row 3 has three turns,
# rows 1 and 7 end with an environment message after the last model turn. Trained tokens per row
# 6, 4, 6, 6, 9, 2, 6, 9 (at most 9), but row 4's last trained token is response column 11
# (row 7's response region is 13 columns, its last 2 the environment's): a width taken as the
# largest count (9) would cut the last turn of rows 0, 3, 4 and 7.
LAYOUTS = [[3, 4, 3], [2, 5, 2, 1], [6], [2, 2, 2, 3, 2], [4, 3, 5], [1, 6, 1], [3, 1, 3],
           [5, 2, 4, 2]]
# a reward for the first turn of rows 0, 3 and 4, on its last model token (its stop token)
TURN_REWARDS = [{2: 0.5}, {}, {}, {1: -1.0}, {3: 1.0}, {}, {}, {}]


def layout_turns(layouts: list[list[int]], seed: int = 0) -> list[list[tuple[list[int], bool]]]:
    """Token ids for ``layouts``: model turns of words (ids 9..80, positive words 9..16 among
    them) ending in EOS, environment segments of words."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for lengths in layouts:
        row = []
        for k, n in enumerate(lengths):
            words = torch.randint(9, 81, (n,), generator=gen).tolist()
            trained = k % 2 == 0
            row.append((words[:-1] + [EOS] if trained else words, trained))
        rows.append(row)
    return rows


def make_rollout(trainer, turn_rewards=TURN_REWARDS, layouts=LAYOUTS, seed=0) -> Rollout:
    prompts = trainer.sampler.prompts[:len(layouts)]
    return multiturn_rollout(prompts, layout_turns(layouts, seed), trainer.tokenizer.pad_token_id,
                             turn_rewards, trainer.tokenizer)


def holes(rollout: Rollout) -> torch.Tensor:
    """(B, R) bool: the environment's tokens (read, not trained)."""
    return rollout.attention_mask[:, rollout.prompt_length:].bool() & ~rollout.response_mask.bool()


def trainer_of(tmp_path, *extra: str) -> PPOTrainer:
    # every loss term on: policy, value, entropy bonus, KL loss
    return PPOTrainer(tiny_config(tmp_path, "iterations=1", "ppo.batch_size=8",
                                  "ppo.loss.entropy_coef=0.01", "ppo.kl.loss_coef=0.1", *extra))


SCORES = torch.tensor([1.0, -0.5, 0.25, 2.0, -1.0, 0.0, 0.75, -0.25])


def experience(trainer, rollout):
    out = trainer.rollout_outputs(rollout)
    return make_targets(trainer.accelerator, trainer.cfg.ppo, rollout, out, SCORES, 0.05).batch


def gradients(trainer, batch) -> tuple[dict[str, torch.Tensor], tuple]:
    """The gradient of one micro-step over the whole ``batch`` (no optimizer step), and the
    model's outputs ``(logprobs, entropy, values)`` ``(B, r)`` with their own gradients."""
    trainer.optimizer.zero_grad(set_to_none=True)
    micro = batch.micro_batch(torch.arange(len(batch)), trainer.accelerator.device)
    tokens = torch.tensor(float(batch.response_mask.sum()))
    outputs = []

    def keep(module, args, out):
        for x in out:
            x.retain_grad()
        outputs.append(out)
    hook = trainer.unwrapped.register_forward_hook(keep)
    try:
        micro_step(trainer.accelerator, trainer.model, micro, trainer.update_settings, tokens,
                   tokens, critic_only=False)
    finally:
        hook.remove()
    grads = {k: q.grad.clone() for k, q in trainer.unwrapped.named_parameters() if q.grad is not None}
    trainer.optimizer.zero_grad(set_to_none=True)
    return grads, outputs[0]


def test_environment_tokens_get_zero_advantage_and_zero_gradient(tmp_path):
    trainer = trainer_of(tmp_path)
    rollout = make_rollout(trainer)
    env = holes(rollout)
    assert env.sum() == 29  # environment tokens: 4 + 6 + 0 + 5 + 3 + 6 + 1 + 4
    batch = experience(trainer, rollout)
    # zero advantage, return, reward and old log-prob on every environment token
    for name in ("advantages", "returns", "rewards", "logprobs", "values", "ref_logprobs"):
        assert (getattr(batch, name)[env] == 0).all(), name
    assert (batch.advantages[rollout.response_mask.bool()] != 0).all()

    grads, (lp, ent, v) = gradients(trainer, batch)
    r = lp.shape[1]
    assert r == 12  # up to the last trained column (11), not the largest count (9)
    # exactly zero gradient into the model's outputs at the environment's tokens; not at its own
    for out in (lp, ent, v):
        assert (out.grad[env[:, :r]] == 0).all()
        assert (out.grad[rollout.response_mask[:, :r].bool()] != 0).any()

    # the critic's values, the recorded old and reference log-probs, the advantages and the
    # returns at environment tokens are never read: the gradient is bit-identical
    gen = torch.Generator().manual_seed(1)

    def noise() -> torch.Tensor:
        return torch.randn(batch.logprobs.shape, generator=gen) * env
    changed = dataclasses.replace(
        batch, logprobs=batch.logprobs + noise(), values=batch.values + 3 * noise(),
        ref_logprobs=batch.ref_logprobs + noise(), advantages=batch.advantages + noise(),
        returns=batch.returns + noise())
    grads_changed, _ = gradients(trainer, changed)
    assert grads.keys() == grads_changed.keys()
    for k in grads:
        assert torch.equal(grads[k], grads_changed[k]), k

    # ... but the environment's tokens are read: other tokens there change the model's context
    P = rollout.prompt_length
    ids = batch.input_ids.clone()
    ids[:, P:][env] = 9 + (ids[:, P:][env] - 9 + 7) % 72  # other words
    other_context = dataclasses.replace(batch, input_ids=ids)
    grads_context, (lp_context, _, _) = gradients(trainer, other_context)
    assert not all(torch.equal(grads[k], grads_context[k]) for k in grads)
    later = rollout.response_mask.bool() & (env.long().cumsum(-1) > 0)  # model tokens after one
    assert not torch.equal(lp[later[:, :r]], lp_context[later[:, :r]])


def test_values_and_logprobs_recorded_on_environment_tokens_are_masked_out(tmp_path):
    """A sampler that records something on the environment's tokens changes nothing: the
    rollout's outputs are masked, and GAE never reads a value there."""
    trainer = trainer_of(tmp_path)
    rollout = make_rollout(trainer)
    out = trainer.rollout_outputs(rollout)
    recorded = dataclasses.replace(rollout, logprobs=out.logprobs, entropy=out.entropy,
                                   values=out.values)
    env = holes(rollout).float()
    garbage = dataclasses.replace(rollout, logprobs=out.logprobs - 5 * env,
                                  entropy=out.entropy + env, values=out.values + 100 * env)
    a = experience(trainer, recorded)
    b = experience(trainer, garbage)
    for name in ("logprobs", "values", "rewards", "advantages", "returns"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


GAMMA, LAM, KL_COEF = 0.9, 0.8, 0.5


def hand_batch():
    """One row of 7 response columns: model turn 1 (columns 0-1, its stop token at 1), two
    environment tokens (2-3), model turn 2 (4-5, the stop at 5), padding (6). KL and values
    hold 9 and 50 where the mask is 0: a recursion that read them would show it."""
    mask = torch.tensor([[1., 1, 0, 0, 1, 1, 0]])
    kl = torch.tensor([[0.2, -0.4, 9, 9, 0.6, 0.2, 9]])
    values = torch.tensor([[1.0, 0.5, 50, 50, 2.0, 1.5, 50]])
    scores = torch.tensor([3.0])
    turn = torch.tensor([[0, 1.0, 0, 0, 0, 0, 0]])  # turn 1's reward on its stop token
    return scores, kl, values, mask, turn


def test_gae_over_holes_with_a_turn_reward_by_hand():
    scores, kl, values, mask, turn = hand_batch()
    g, gl = GAMMA, GAMMA * LAM
    rewards, adv, ret = estimators.get("gae").estimate(scores, kl, KL_COEF, values, mask, 1, g, LAM,
                                                       turn_rewards=turn)
    # r_t = -0.5 KL_t, plus the turn reward 1 on column 1, plus the score 3 on column 5
    r0, r1, r4, r5 = -0.5 * 0.2, -0.5 * -0.4 + 1.0, -0.5 * 0.6, -0.5 * 0.2 + 3.0
    torch.testing.assert_close(rewards, torch.tensor([[r0, r1, 0, 0, r4, r5, 0]]))
    # GAE with t+1 the next *trained* token: column 1 bootstraps from V at column 4, once
    # discounted, whatever the environment said in between; V = 0 after column 5
    d5 = r5 - 1.5
    d4 = r4 + g * 1.5 - 2.0
    d1 = r1 + g * 2.0 - 0.5
    d0 = r0 + g * 0.5 - 1.0
    a5 = d5                # 1.4
    a4 = d4 + gl * a5      # -0.95 + 0.72 * 1.4 = 0.058
    a1 = d1 + gl * a4      # 2.5 + 0.72 * 0.058 = 2.54176
    a0 = d0 + gl * a1      # -0.65 + 0.72 * 2.54176 = 1.1800672
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, 0, 0, a4, a5, 0]]))
    torch.testing.assert_close(adv[0, [0, 1, 4, 5]], torch.tensor([1.1800672, 2.54176, 0.058, 1.4]))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 1.0, a1 + 0.5, 0, 0, a4 + 2.0, a5 + 1.5, 0]]))
    # the turn reward changes exactly its own turn's advantages: +1 on column 1, +gamma*lambda
    # on column 0; the later turn's not at all
    _, adv_without, _ = estimators.get("gae").estimate(scores, kl, KL_COEF, values, mask, 1, g, LAM)
    torch.testing.assert_close(adv - adv_without, torch.tensor([[gl, 1.0, 0, 0, 0, 0, 0]]))


def test_returns_to_go_over_holes_with_a_turn_reward_by_hand():
    scores, kl, values, mask, turn = hand_batch()
    g = GAMMA
    _, adv, ret = estimators.get("reinforce_pp").estimate(scores, kl, KL_COEF, values, mask, 1, g,
                                                          LAM, turn_rewards=turn)
    r0, r1, r4, r5 = -0.1, 1.2, -0.3, 2.9
    g5 = r5                # 2.9
    g4 = r4 + g * g5       # 2.31
    g1 = r1 + g * g4       # 3.279
    g0 = r0 + g * g1       # 2.8511
    torch.testing.assert_close(ret, torch.tensor([[g0, g1, 0, 0, g4, g5, 0]]))
    assert adv is ret
    _, _, without = estimators.get("reinforce_pp").estimate(scores, kl, KL_COEF, values, mask, 1, g,
                                                            LAM)
    torch.testing.assert_close(ret - without, torch.tensor([[g, 1.0, 0, 0, 0, 0, 0]]))


def test_a_turn_reward_on_an_environment_token_raises(tmp_path):
    scores, kl, values, mask, turn = hand_batch()
    on_env = torch.tensor([[0, 0, 1.0, 0, 0, 0, 0]])  # column 2: the environment's
    with pytest.raises(ValueError, match=r"turn_rewards: row 0, response column 2 .*action mask 0"):
        estimators.get("gae").estimate(scores, kl, KL_COEF, values, mask, 1, GAMMA, LAM,
                                       turn_rewards=on_env)
    trainer = trainer_of(tmp_path)
    bad = [dict(t) for t in TURN_REWARDS]
    bad[5] = {4: 0.5}  # row 5: column 4 is inside its environment segment (columns 1-6)
    rollout = make_rollout(trainer, bad)
    with pytest.raises(ValueError, match=r"turn_rewards: row 5, response column 4"):
        experience(trainer, rollout)


def test_turn_rewards_reach_the_advantages_in_training(tmp_path):
    """Through make_targets: the rewards carry the turn rewards, and with gamma = lambda = 1 and
    no whitening the advantage of every token of the rewarded turn and of the turns before it
    (none here) rises by the turn reward, later turns' advantages are unchanged."""
    trainer = trainer_of(tmp_path, "ppo.advantages.gamma=1.0", "ppo.advantages.lam=1.0",
                         "ppo.advantages.whiten=false")
    with_turns = experience(trainer, make_rollout(trainer))
    without = experience(trainer, make_rollout(trainer, turn_rewards=None))
    turn = make_rollout(trainer).turn_rewards
    torch.testing.assert_close(with_turns.rewards - without.rewards, turn)
    expected = torch.zeros_like(turn)
    for b, placed in enumerate(TURN_REWARDS):
        for t, value in placed.items():
            expected[b, :t + 1] = value  # columns 0..t: the first turn's tokens
    torch.testing.assert_close(with_turns.advantages - without.advantages, expected)


def test_trim_padding_keeps_the_last_model_turn(tmp_path):
    trainer = trainer_of(tmp_path)
    rollout = make_rollout(trainer)
    rm = rollout.response_mask
    assert int(rm.sum(-1).max()) == 9 and rm.shape[1] == 13  # a count would cut 3 columns
    ids, am, trimmed, P = trim_padding(rollout.input_ids, rollout.attention_mask, rm,
                                       rollout.prompt_length)
    # every trained token kept: up to column 11 (row 4's last); column 12 is row 7's
    # environment message after its last turn
    assert torch.equal(trimmed, rm[:, :12]) and trimmed.sum() == rm.sum() == 48
    assert torch.equal(ids[:, P:], rollout.response_ids[:, :12])
    # one row alone (row 5: 1 model token, 6 environment tokens, 1 model token) keeps its turn 2
    ids, am, trimmed, P = trim_padding(rollout.input_ids[5:6], rollout.attention_mask[5:6],
                                       rm[5:6], rollout.prompt_length)
    assert trimmed.tolist() == [[1, 0, 0, 0, 0, 0, 0, 1]] and ids[0, -1] == EOS
    # row 1 ends with an environment token after its last turn: nothing trained reads it
    ids, am, trimmed, P = trim_padding(rollout.input_ids[1:2], rollout.attention_mask[1:2],
                                       rm[1:2], rollout.prompt_length)
    assert trimmed.tolist() == [[1, 1, 0, 0, 0, 0, 0, 1, 1]]
    # and the no-grad pass scores every trained token, the last turn's included
    out = trainer.rollout_outputs(rollout)
    trained = rm.bool()
    assert (out.logprobs[trained] < 0).all() and (out.ref_logprobs[trained] < 0).all()


def _one_iteration(tmp_path, micro: int, aggregation: str, *extra: str):
    """One PPO iteration on the multi-turn batch (2 minibatches, 2 epochs): the weights, the
    metrics and the gradient of every optimizer step. adam_eps 1e-4 as in
    tests/test_distributed.py: Adam's first step ``lr * g / (|g| + eps)`` turns float noise in
    near-zero gradients into full-size updates at eps 1e-8, which the later steps' gradients
    would then compare."""
    cfg = tiny_config(tmp_path, "iterations=1", "ppo.batch_size=8", "ppo.num_minibatches=2",
                      f"ppo.forward.micro_batch_size={micro}", "ppo.ppo_epochs=2",
                      f"ppo.loss.aggregation={aggregation}", "optim.adam_eps=1e-4", *extra)
    trainer = PPOTrainer(cfg)
    grads = []
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    inner.register_step_pre_hook(lambda opt, args, kwargs: grads.append(
        [q.grad.clone() for g in opt.param_groups for q in g["params"] if q.grad is not None]))
    metrics = trainer.step(make_rollout(trainer))
    return weights(trainer), metrics, grads


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean"])
def test_packing_and_token_budgets_do_not_change_the_multiturn_update(tmp_path, aggregation):
    """As tests/test_trainer.py's single-turn test: padded micro-batches of 4 rows, packed
    ones, and packed or padded micro-batches cut by a token budget give the same gradient at
    every optimizer step, on responses with holes."""
    base = _one_iteration(tmp_path / "a", 4, aggregation, "ppo.forward.packing=false")
    variants = {
        "packed": _one_iteration(tmp_path / "b", 4, aggregation),
        "packed, 40 tokens": _one_iteration(tmp_path / "c", 1, aggregation,
                                            "ppo.forward.micro_batch_tokens=40"),
        "padded, 40 tokens": _one_iteration(tmp_path / "d", 1, aggregation, "ppo.forward.packing=false",
                                            "ppo.forward.micro_batch_tokens=40"),
    }
    assert base[1]["response_length"] == pytest.approx(48 / 8)  # trained tokens only
    for name, (_w, m, g) in variants.items():
        assert len(g) == len(base[2]) == 4, name
        for step, (a, b) in enumerate(zip(g, base[2])):
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-4, msg=f"{name} step {step}")
        for k in ("policy_loss", "value_loss", "clipfrac", "approx_kl"):
            assert m[k] == pytest.approx(base[1][k], rel=1e-4, abs=1e-6), (name, k)


def test_concat_and_dynamic_sampling_keep_turn_rewards(tmp_path):
    trainer = trainer_of(tmp_path)
    pad = trainer.tokenizer.pad_token_id
    a = make_rollout(trainer, layouts=LAYOUTS[:2], turn_rewards=TURN_REWARDS[:2])
    b = make_rollout(trainer, layouts=[[2, 1, 2]], turn_rewards=None, seed=1)
    both = Rollout.concat([a, b], pad)
    assert both.turn_rewards.shape == both.response_mask.shape == (3, 10)
    assert both.turn_rewards[0, 2] == 0.5 and both.turn_rewards.abs().sum() == 0.5
    assert Rollout.concat([b, b], pad).turn_rewards is None
    # dynamic sampling: the first group (rows 0-1) has equal scores and is replaced by b's rows
    new = make_rollout(trainer, layouts=[[2, 1, 2], [1]], turn_rewards=[{1: 2.0}, {}], seed=2)
    kept, scores, _ = dynamic_sampling(a, torch.tensor([1.0, 1.0]), 2,
                                       lambda: (new, torch.tensor([0.0, 1.0])),
                                       lambda short: short, pad)
    assert scores.tolist() == [0.0, 1.0]
    assert torch.equal(kept.response_mask[:, :5], new.response_mask)
    assert kept.turn_rewards[0, 1] == 2.0 and kept.turn_rewards.abs().sum() == 2.0


# 2 processes: this file is its own torchrun worker (``python -m torch.distributed.run
# tests/test_multiturn.py OUT OVERRIDES...``): every process builds the same multi-turn batch and
# trains on its contiguous share, as tests/dist_worker.py does with sampled rollouts.
DIST = ["iterations=1", "ppo.batch_size=8", "ppo.num_minibatches=1", "ppo.ppo_epochs=2",
        "ppo.forward.micro_batch_size=2", "ppo.kl.adaptive=true", "ppo.kl.adaptive_target=0.5",
        "ppo.kl.horizon=100", "reward.normalize=true", "optim.adam_eps=1e-4"]


def worker(out: Path, overrides: list[str]) -> None:
    from test_trainer import TINY

    from rlhf_ppo import load_config

    trainer = PPOTrainer(load_config(TINY, overrides))
    acc = trainer.accelerator
    b = len(LAYOUTS) // acc.num_processes
    rows = list(range(acc.process_index * b, (acc.process_index + 1) * b))
    metrics = trainer.step(make_rollout(trainer).subset(rows))
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics))
        torch.save({k: v.detach().cpu() for k, v in trainer.unwrapped.state_dict().items()},
                   out / "weights.pt")
    acc.wait_for_everyone()


def torchrun(nproc: int, out: Path, *overrides: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", __file__, str(out), *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_two_processes_reproduce_one_process_on_a_multiturn_batch(tmp_path):
    """The multi-turn batch split over 2 processes (4 rows each) gives the update of one process
    with all 8 rows: token counts, whitening, score normalisation and the KL controller reduce
    over processes, and each process trims its own share."""
    torchrun(1, tmp_path / "one", f"output_dir={tmp_path / 'run1'}", *DIST)
    torchrun(2, tmp_path / "two", f"output_dir={tmp_path / 'run2'}", *DIST)
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m1["response_length"] == m2["response_length"] == 48 / 8
    for key in ("score_mean", "kl", "entropy", "policy_loss", "value_loss", "clipfrac",
                "approx_kl", "grad_norm", "explained_variance", "value_mean", "return_mean"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-6), key
    w1 = torch.load(tmp_path / "one" / "weights.pt", weights_only=True)
    w2 = torch.load(tmp_path / "two" / "weights.pt", weights_only=True)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=1e-4, msg=k)
    assert m1["ppo_steps"] == m2["ppo_steps"] == 2


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2:])


def test_trl_style_reward_functions_receive_the_whole_transcript_ids(tmp_path):
    """completion_ids of a multi-turn response run to its last read token (the environment's
    turns included), not to the count of trained tokens, which would cut the transcript short."""
    from rlhf_ppo.config import RewardSource
    from rlhf_ppo.rewards import FunctionReward

    trainer = trainer_of(tmp_path / "run")
    rollout = make_rollout(trainer)
    (tmp_path / "ids_reward.py").write_text(
        "def ids(completions, completion_ids, **kwargs):\n    return [0.0] * len(completions)\n")
    fn = FunctionReward(RewardSource(function=f"{tmp_path / 'ids_reward.py'}:ids"), "reward.sources[0]")
    assert fn.style == "trl"
    _, kwargs = fn.arguments(rollout)
    P = rollout.prompt_length
    for b, ids in enumerate(kwargs["completion_ids"]):
        read = rollout.attention_mask[b, P:].nonzero().flatten()
        assert ids == rollout.input_ids[b, P:P + int(read[-1]) + 1].tolist()
        assert len(ids) > int(rollout.response_mask[b].sum()) or not holes(rollout)[b].any()
    assert holes(rollout).any()  # the batch has environment tokens at all
