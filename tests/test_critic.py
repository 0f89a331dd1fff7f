"""Critic options: a critic from the reward model (full and as a LoRA adapter on its base), the
shared head's backbone gradient, separate gradient clipping, decoupled / length-adaptive GAE
lambdas, and the critic-health metrics and warnings."""

import types
from pathlib import Path

import pytest
import torch
from rollouts import record_updates  # tests/rollouts.py
from torch.testing import assert_close

from rlhf_ppo import PPOTrainer, load_config, ops
from rlhf_ppo.config import ConfigError
from rlhf_ppo.rewards import score_sequences
from rlhf_ppo.runs import metric_jumps, warn_on_jumps

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def config(tmp_path, *overrides):
    return load_config(TINY, [f"output_dir={tmp_path}", *overrides])


def rm_overrides(reward_dir, *extra):
    return [f"reward.sources=[{{model: {reward_dir}}}]", "model.critic=separate",
            "model.critic_init=reward", *extra]


def batch(trainer, n=3):
    """A fixed left-padded batch of prompts + responses from the trainer's own tokenizer."""
    tok = trainer.tokenizer
    texts = ["i think the movie is good and fun", "the food was", "what a great day it was"]
    enc = tok(texts[:n], return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def prompt_length(am):
    """A split of ``batch``'s left-padded rows where every row keeps a real prompt token."""
    return am.shape[1] - int(am.sum(1).min()) + 1


def prefix_scores(rm, ids, am, P):
    """The reward model's score of every prefix ids[:, :P + t] (t = 0..R-1): what a critic
    initialised from it should predict for the state before response token t."""
    return torch.stack([score_sequences(rm, ids[:, :P + t], am[:, :P + t])
                        for t in range(ids.shape[1] - P)], dim=1)


# --------------------------------------------------------------------------- lambdas

def test_decoupled_lambdas_policy_gae_critic_monte_carlo():
    rewards = torch.tensor([[1.0, -0.5, 2.0]])
    values = torch.tensor([[0.3, 0.7, -0.4]])
    mask = torch.ones(1, 3)
    adv, ret = ops.advantages_and_returns(rewards, values, mask, gamma=1.0, lam=0.5, critic_lam=1.0)
    # policy: GAE with lambda 0.5, gamma 1
    a2 = 2.0 + 0.4
    a1 = -0.5 - 0.4 - 0.7 + 0.5 * a2
    a0 = 1.0 + 0.7 - 0.3 + 0.5 * a1
    assert_close(adv, torch.tensor([[a0, a1, a2]]))
    # critic: lambda 1, gamma 1 -> Monte-Carlo reward-to-go, independent of the values
    assert_close(ret, torch.tensor([[2.5, 1.5, 2.0]]))
    # coupled (critic_lam null): returns = A + V of the policy's GAE
    _, ret = ops.advantages_and_returns(rewards, values, mask, gamma=1.0, lam=0.5, critic_lam=None)
    assert_close(ret, torch.tensor([[a0 + 0.3, a1 + 0.7, a2 - 0.4]]))


def test_length_adaptive_policy_lambda_per_row():
    # alpha 0.05: a 40-token row gets lambda 1 - 1/(0.05*40) = 0.5, a 20-token row 0
    rewards = torch.randn(2, 40)
    values = torch.randn(2, 40)
    mask = torch.ones(2, 40)
    mask[1, 20:] = 0
    adv, ret = ops.advantages_and_returns(rewards, values, mask, gamma=1.0, lam=0.95,
                                          critic_lam=1.0, lam_length_alpha=0.05)
    adv0, _ = ops.compute_gae(rewards[:1], values[:1], mask[:1], 1.0, 0.5)
    adv1, _ = ops.compute_gae(rewards[1:], values[1:], mask[1:], 1.0, 0.0)
    assert_close(adv, torch.cat([adv0, adv1]))
    _, mc = ops.compute_gae(rewards, values, mask, 1.0, 1.0)
    assert_close(ret, mc)


# --------------------------------------------------------------------------- health

def test_metric_jumps_flags_an_order_of_magnitude():
    history = [{"value_loss": v, "grad_norm": 1.0} for v in (2.0, 3.0, 4.0, float("nan"))]
    # median of the finite past values (2, 3, 4) is 3: 31 > 10 * 3, 29 is not
    assert metric_jumps(history, {"value_loss": 31.0, "grad_norm": 1.5},
                        ("value_loss", "grad_norm")) == [("value_loss", 31.0, 3.0)]
    assert metric_jumps(history, {"value_loss": 29.0, "grad_norm": 1.5},
                        ("value_loss", "grad_norm")) == []
    assert metric_jumps(history[:2], {"value_loss": 1e6}, ("value_loss",)) == []  # too little


def test_critic_health_metrics_and_jump_warning(tmp_path, caplog):
    trainer = PPOTrainer(config(tmp_path, "iterations=2"))
    m = trainer.step()
    for key in ("explained_variance", "value_mean", "return_mean", "value_error",
                "grad_norm_policy", "grad_norm_critic"):
        assert key in m and m[key] == m[key], key  # present and not NaN
    assert m["value_error"] > 0
    # per step, total = sqrt(policy^2 + critic^2); averaged over steps (Minkowski) it lies
    # between sqrt(mean_p^2 + mean_c^2) and mean_p + mean_c
    gp, gc = m["grad_norm_policy"], m["grad_norm_critic"]
    assert (gp * gp + gc * gc) ** 0.5 * (1 - 1e-5) <= m["grad_norm"] <= (gp + gc) * (1 + 1e-5)
    history = [dict(m, value_loss=1.0) for _ in range(3)]
    with caplog.at_level("WARNING"):
        warn_on_jumps(history, dict(m, value_loss=50.0))
    assert "value_loss 50 is 50x its median 1" in caplog.text


# --------------------------------------------------------------------------- gradients

def test_clip_grad_norms_joint_and_separate():
    from accelerate import Accelerator

    from rlhf_ppo.distributed import clip_grad_norms

    acc = Accelerator(cpu=True)
    for separate in (False, True):
        a = torch.nn.Parameter(torch.zeros(2))
        b = torch.nn.Parameter(torch.zeros(1))
        a.grad = torch.tensor([3.0, 0.0])  # norm 3
        b.grad = torch.tensor([4.0])       # norm 4; joint norm 5
        total, na, nb = clip_grad_norms(acc, [[a], [b]], 1.0, separate)
        assert float(total) == pytest.approx(5.0) and float(na) == pytest.approx(3.0)
        assert float(nb) == pytest.approx(4.0)
        if separate:  # each group to norm 1
            assert_close(a.grad, torch.tensor([1.0, 0.0]))
            assert_close(b.grad, torch.tensor([1.0]))
        else:  # both scaled by 1/5
            assert_close(a.grad, torch.tensor([0.6, 0.0]), rtol=1e-5, atol=1e-6)
            assert_close(b.grad, torch.tensor([0.8]), rtol=1e-5, atol=1e-6)


def test_value_backbone_grad_scales_the_value_gradient_into_the_backbone(tmp_path):
    trainer = PPOTrainer(config(tmp_path, "iterations=1"))
    ac = trainer.unwrapped
    torch.nn.init.normal_(ac.value_head.weight)  # a zero head passes no gradient at all
    ids, am = batch(trainer)
    P = prompt_length(am)
    grads = {}
    for scale in (1.0, 0.5, 0.0):
        ac.zero_grad(set_to_none=True)
        _, _, values = ac(ids, am, P, backbone_value_grad=scale)
        values.sum().backward()
        grads[scale] = (ac.policy.model.norm.weight.grad, ac.value_head.weight.grad.clone())
    full, half, none = grads[1.0], grads[0.5], grads[0.0]
    assert full[0].abs().sum() > 0
    assert_close(half[0], 0.5 * full[0])  # the backbone sees half the value gradient
    assert none[0] is None or (none[0] == 0).all()  # and none of it
    for g in (half, none):  # the head's own gradient is the same throughout
        assert_close(g[1], full[1])


def test_separate_grad_clip_refused_by_sharding_engines(tmp_path, monkeypatch):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    monkeypatch.setattr(type(acc), "distributed_type",
                        property(lambda self: types.SimpleNamespace(name="FSDP")))
    with pytest.raises(ConfigError, match="optim.separate_grad_clip"):
        PPOTrainer(config(tmp_path, "optim.separate_grad_clip=true"), accelerator=acc)


# --------------------------------------------------------------------------- critic from the RM

def test_critic_init_reward_starts_from_the_reward_models_prefix_scores(tmp_path,
                                                                        tiny_reward_dir):
    trainer = PPOTrainer(config(tmp_path, "iterations=1", *rm_overrides(tiny_reward_dir)))
    ac = trainer.unwrapped
    rm = trainer.rewards.model_sources()[0].model
    assert ac.critic is not rm  # full fine-tuning: the critic is its own copy
    ids, am = batch(trainer)
    P = prompt_length(am)
    real = am[:, P:].bool()
    with torch.no_grad():
        assert_close(ac.values(ids, am, P)[real], prefix_scores(rm, ids, am, P)[real])
    m = trainer.step()
    assert m["value_loss"] == m["value_loss"]


@pytest.mark.parametrize("overrides, key", [
    (["model.critic_init=reward"], "model.critic_init"),  # shared head
    (["model.critic=separate", "model.critic_init=reward"], "model.critic_init"),  # no RM
    (["model.critic=separate", "model.critic_init=reward", "model.critic_name_or_path=x",
      "reward.sources=[{model: y}]"], "model.critic_init"),
    (["ppo.critic_lam=1.5"], "ppo.critic_lam"),
    (["ppo.lam_length_alpha=0"], "ppo.lam_length_alpha"),
    (["ppo.value_backbone_grad=2"], "ppo.value_backbone_grad"),
])
def test_critic_options_are_validated(tmp_path, overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config(tmp_path, *overrides)


def test_lora_critic_adapter_on_the_reward_models_base(tmp_path, tiny_reward_dir):
    overrides = ["iterations=2", "peft.enabled=true", "peft.r=4", "optim.critic_lr=0.05",
                 *rm_overrides(tiny_reward_dir)]
    trainer = PPOTrainer(config(tmp_path / "run", *overrides))
    ac = trainer.unwrapped
    source = trainer.rewards.model_sources()[0]
    rm = source.model
    assert ac.critic_on_reward_model
    # one copy of the reward model's weights: the critic's base *is* the scorer's model
    rm_weights = {p.data_ptr() for n, p in rm.named_parameters() if "lora_" not in n}
    critic_base = {p.data_ptr() for n, p in ac.critic.named_parameters() if "lora_" not in n}
    assert rm_weights == critic_base
    # trained: the policy's and the critic's adapters and the value head, nothing else
    trained = {n for n, p in ac.named_parameters() if p.requires_grad}
    assert trained and all(".default." in n or ".critic." in n or n.startswith("value_head.")
                           for n in trained), trained
    assert any(n.startswith("critic.") and "lora_" in n for n in trained)
    ids, am = batch(trainer)
    P = prompt_length(am)
    real = am[:, P:].bool()
    with torch.no_grad():
        score_before = source.scorer(ids, am)
        values_before = ac.values(ids, am, P)
        assert_close(values_before[real], prefix_scores(rm, ids, am, P)[real])  # LoRA B = 0
    trainer.train()
    with torch.no_grad():
        assert not torch.allclose(ac.values(ids, am, P), values_before)  # the critic learned
        assert_close(source.scorer(ids, am), score_before)  # scoring runs with the adapter off
        # ... which matters: the same model with the critic adapter on scores differently
        assert not torch.allclose(score_sequences(rm, ids, am), score_before)
    lora_b = [p for n, p in ac.critic.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # the critic adapter trained
    final = tmp_path / "run" / "final"
    assert (final / "critic" / "adapter_model.safetensors").is_file()
    assert (final / "critic" / "value_head.safetensors").is_file()
    # resume restores the critic adapter and its head exactly
    resumed = PPOTrainer(config(tmp_path / "run", *overrides, "resume_from=latest"))
    rac = resumed.unwrapped
    for (n, p), (n2, q) in zip(ac.critic.named_parameters(), rac.critic.named_parameters()):
        assert n == n2 and torch.equal(p, q), n
    assert torch.equal(ac.value_head.weight, rac.value_head.weight)


def _critic_grads(tmp_path, scale_value_loss):
    """Value-head gradient of the first optimizer step (critic warmup: the loss is the value
    loss alone), the scale the update got, and the rollout's returns and mask."""
    trainer = PPOTrainer(config(tmp_path, "iterations=1", "ppo.critic_warmup=1",
                                "ppo.num_minibatches=1", "ppo.micro_batch_size=32",
                                "optim.max_grad_norm=null",  # clipping would mask the scale
                                f"ppo.scale_value_loss={str(scale_value_loss).lower()}",
                                "reward.sources=[{function: rlhf_ppo.rewards:response_length}]"))
    grads = []
    updates = record_updates(trainer)
    head = trainer.unwrapped.value_head
    getattr(trainer.optimizer, "optimizer", trainer.optimizer).register_step_pre_hook(
        lambda *a: grads.append(head.weight.grad.clone()) if not grads else None)
    trainer.step()
    batch, scale = updates[0]
    return grads[0], {"scale": scale, "returns": batch.returns, "mask": batch.response_mask}


def test_scale_value_loss_divides_by_the_return_variance(tmp_path):
    # response_length rewards: returns of ~10 words, variance well above 1
    g_plain, plain = _critic_grads(tmp_path / "a", False)
    g_scaled, scaled = _critic_grads(tmp_path / "b", True)
    assert plain["scale"] == 1.0
    torch.testing.assert_close(scaled["returns"], plain["returns"])  # same rollout (same seed)
    valid = plain["returns"][plain["mask"].bool()]
    var = valid.var().item()  # unbiased, over the valid tokens
    assert var > 1.0
    assert scaled["scale"] == pytest.approx(1.0 / var, rel=1e-5)
    assert_close(g_scaled, g_plain / var, rtol=1e-4, atol=1e-7)


def test_value_pretraining_trains_the_critic_toward_monte_carlo_returns(tmp_path,
                                                                         tiny_reward_dir):
    """critic_warmup=1 with critic_lam=1: iteration 1 trains only the (reward-model) critic, on
    the initial policy's rollouts, toward reward-to-go; iteration 2 trains the policy too."""
    trainer = PPOTrainer(config(tmp_path, "iterations=2", "ppo.critic_warmup=1",
                                "ppo.critic_lam=1.0", "ppo.lam=0.5",
                                *rm_overrides(tiny_reward_dir)))
    updates = record_updates(trainer)
    ac = trainer.unwrapped
    policy0 = {k: v.clone() for k, v in ac.policy.state_dict().items()}
    critic0 = {k: v.clone() for k, v in ac.critic.state_dict().items()}
    trainer.step()
    assert all(torch.equal(policy0[k], v) for k, v in ac.policy.state_dict().items())
    assert any(not torch.equal(critic0[k], v) for k, v in ac.critic.state_dict().items())
    # gamma 1, critic lambda 1: R_t = sum of the rewards from t to the end of the response
    batch = updates[0][0]  # iteration 1's
    m = batch.response_mask.float()
    to_go = (batch.rewards * m).flip(-1).cumsum(-1).flip(-1) * m
    assert_close(batch.returns, to_go, rtol=1e-5, atol=1e-5)
    trainer.step()
    assert any(not torch.equal(policy0[k], v) for k, v in ac.policy.state_dict().items())


def test_lora_critic_on_the_reward_model_refused_under_zero3(tmp_path, tiny_reward_dir,
                                                             monkeypatch):
    from accelerate import Accelerator

    import rlhf_ppo.distributed as distributed

    monkeypatch.setattr(distributed, "zero_stage", lambda acc: 3)
    cfg = config(tmp_path, "peft.enabled=true", *rm_overrides(tiny_reward_dir))
    with pytest.raises(ConfigError, match="ZeRO-3"):
        PPOTrainer(cfg, accelerator=Accelerator(cpu=True))
