"""The PPO loop end to end on the tiny model: learning, invariances, options, CLI."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rollouts import record_updates  # tests/rollouts.py
from transformers import AutoModelForCausalLM

from rlhf_ppo import Config, PPOTrainer, load_config
from rlhf_ppo.experience import Experience

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"

REQUIRED_KEYS = {"iteration", "score_mean", "score_std", "kl", "kl_coef", "entropy",
                 "policy_loss", "value_loss", "clipfrac", "approx_kl", "explained_variance",
                 "response_length", "time/rollout", "time/score", "time/update",
                 "tokens_per_second"}


def tiny_config(tmp_path, *overrides) -> Config:
    return load_config(TINY, [f"output_dir={tmp_path}", *overrides])


def weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.unwrapped.state_dict().items()}


def test_learning_raises_score_and_large_kl_coef_stays_near_reference(tmp_path):
    low = PPOTrainer(tiny_config(tmp_path / "low", "iterations=20")).train()
    first = sum(m["score_mean"] for m in low[:3]) / 3
    last = sum(m["score_mean"] for m in low[-3:]) / 3
    assert last > first + 0.25, (first, last)  # starts near 0.1 (8 positive words of 81)
    assert all(torch.isfinite(torch.tensor(m["kl"])) for m in low)
    high = PPOTrainer(tiny_config(tmp_path / "high", "iterations=20", "ppo.kl_coef=2.0")).train()
    high_kl = sum(m["kl"] for m in high[-3:]) / 3
    low_kl = sum(m["kl"] for m in low[-3:]) / 3
    high_score = sum(m["score_mean"] for m in high[-3:]) / 3
    # k1 from single samples is noisy (~1 nat per 15-token response after the first steps);
    # the low-coefficient run drifts several times further.
    assert high_kl < 2.0 and high_kl < low_kl / 4, (high_kl, low_kl)
    assert high_score < first + 0.1, (first, high_score)
    # metrics file: one line per iteration with every documented key
    lines = (tmp_path / "low" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 20
    assert REQUIRED_KEYS <= set(json.loads(lines[-1]))
    # the final policy loads with plain transformers
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "low" / "final") is not None
    assert (tmp_path / "low" / "final" / "value_head.safetensors").is_file()


def _one_iteration(tmp_path, micro: int, aggregation: str, *extra: str):
    cfg = tiny_config(tmp_path, "iterations=1", "ppo.batch_size=8", "ppo.num_minibatches=2",
                      f"ppo.micro_batch_size={micro}", "ppo.ppo_epochs=2",
                      f"ppo.loss_aggregation={aggregation}", *extra)
    trainer = PPOTrainer(cfg)
    grads = []  # the accumulated gradient of every optimizer step, as the optimizer sees it
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    inner.register_step_pre_hook(lambda opt, args, kwargs: grads.append(
        [q.grad.clone() for g in opt.param_groups for q in g["params"] if q.grad is not None]))
    metrics = trainer.step()
    return weights(trainer), metrics, grads


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean"])
def test_micro_batch_size_does_not_change_the_update(tmp_path, aggregation):
    """Gradient accumulation over micro-batches of 1 or 4 sequences gives the minibatch's
    gradient (compared step by step, before AdamW: its first step ``g / (|g| + eps)`` turns float
    noise of near-zero gradients into full-size updates, so weights are compared loosely)."""
    w4, m4, g4 = _one_iteration(tmp_path / "a", 4, aggregation)
    w1, m1, g1 = _one_iteration(tmp_path / "b", 1, aggregation)
    assert len(g1) == len(g4) == 4  # 2 epochs x 2 minibatches
    for step, (a, b) in enumerate(zip(g1, g4)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-4, msg=f"step {step}")
    for k in w4:
        torch.testing.assert_close(w1[k], w4[k], atol=1e-4, rtol=1e-4, msg=k)
    for k in ("policy_loss", "value_loss", "clipfrac", "approx_kl"):
        assert m1[k] == pytest.approx(m4[k], rel=1e-4, abs=1e-6), k


def test_critic_warmup_trains_only_the_value_head(tmp_path):
    trainer = PPOTrainer(tiny_config(tmp_path, "iterations=3", "ppo.critic_warmup=2"))
    before = weights(trainer)
    trainer.step()  # iteration 1: warmup
    after = weights(trainer)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"value_head.weight", "value_head.bias"}
    trainer.step()  # iteration 2: warmup
    trainer.step()  # iteration 3: past the warmup, the policy trains too
    assert not torch.equal(weights(trainer)["policy.model.norm.weight"],
                           after["policy.model.norm.weight"])
    assert trainer.iteration == 3


def test_target_kl_stops_before_the_overshooting_step(tmp_path):
    trainer = PPOTrainer(tiny_config(tmp_path, "iterations=1", "ppo.target_kl=1e-12",
                                     "ppo.old_logprobs=recompute"))
    before = weights(trainer)
    m = trainer.step()
    # First minibatch: ratio == 1 exactly (recomputed old log-probs), approx_kl == 0 -> one
    # step; the second sees KL > 0 and stops.
    assert m["ppo_steps"] == 1 and m["early_stopped"] == 1.0
    assert not torch.equal(before["policy.lm_head.weight"], weights(trainer)["policy.lm_head.weight"])


@pytest.mark.parametrize("old_logprobs", ["generation", "recompute"])
def test_first_minibatch_ratio_is_one(tmp_path, old_logprobs):
    """Rollout log-probs equal the training forward's before any step (dropout off, same
    temperature, same padding conventions), so the first minibatch clips nothing: recomputed
    ones exactly, the ones recorded while sampling up to float rounding."""
    cfg = tiny_config(tmp_path, "iterations=1", "ppo.ppo_epochs=1", "ppo.num_minibatches=1",
                      "ppo.micro_batch_size=32", "generation.temperature=0.7",
                      f"ppo.old_logprobs={old_logprobs}")
    m = PPOTrainer(cfg).step()
    assert m["clipfrac"] == 0.0 and abs(m["approx_kl"]) < 1e-6
    if old_logprobs == "recompute":
        assert m["approx_kl"] == 0.0


@pytest.mark.parametrize("critic, mode, forwards", [
    ("shared", "auto", 0),        # float32, no autocast: recorded while sampling
    ("shared", "recompute", 1),
    ("separate", "generation", 0),  # log-probs recorded; the critic runs its own pass
])
def test_old_logprobs_skip_the_policy_forward_when_recorded(tmp_path, tiny_reward_dir, critic,
                                                            mode, forwards, monkeypatch):
    overrides = ["iterations=1", f"ppo.old_logprobs={mode}", f"model.critic={critic}"]
    if critic == "separate":
        overrides.append(f"model.critic_name_or_path={tiny_reward_dir}")
    trainer = PPOTrainer(tiny_config(tmp_path, *overrides))
    calls = {"forward": 0, "values": 0}
    ac = trainer.unwrapped
    for name in calls:
        orig = getattr(ac, name)

        def counted(*a, _orig=orig, _name=name, **k):
            calls[_name] += 1
            return _orig(*a, **k)
        monkeypatch.setattr(ac, name, counted)
    seen = {}
    real_eval = trainer.rollout_outputs

    def spy(rollout):  # counts the passes of the scoring phase only (not the update's)
        seen["recorded"] = rollout.logprobs is not None
        before = dict(calls)
        out = real_eval(rollout)
        seen.update({k: calls[k] - before[k] for k in calls})
        return out
    monkeypatch.setattr(trainer, "rollout_outputs", spy)
    m = trainer.step()
    assert seen["recorded"] == (forwards == 0)
    # one inference batch (inference_batch_size >= batch_size in tiny.yaml); the shared head's
    # values come from generation too, so it needs no pass of its own
    assert seen["forward"] == forwards
    assert seen["values"] == (1 if critic == "separate" and forwards == 0 else 0)
    assert m["ppo_steps"] > 0 and all(torch.isfinite(torch.tensor(m[k])) for k in
                                      ("policy_loss", "value_loss", "entropy", "kl"))


def test_adaptive_kl_moves_the_coefficient(tmp_path):
    hist = PPOTrainer(tiny_config(tmp_path, "iterations=4", "ppo.adaptive_kl=true",
                                  "ppo.kl_target=0.01", "ppo.kl_horizon=100")).train()
    # KL above target -> e = +0.2 -> coef *= 1 + 0.2 * 32 / 100 each iteration once KL > 0.01
    coefs = [m["kl_coef"] for m in hist]
    assert coefs[0] == 0.02 and coefs[-1] > coefs[0]
    for m, nxt in zip(hist, hist[1:]):
        error = max(min(m["kl"] / 0.01 - 1, 0.2), -0.2)
        assert nxt["kl_coef"] == pytest.approx(m["kl_coef"] * (1 + error * 32 / 100))


def test_separate_critic_trains_and_saves(tmp_path, tiny_reward_dir):
    from transformers import AutoModelForSequenceClassification

    cfg = tiny_config(tmp_path, "iterations=2", "model.critic=separate",
                      f"model.critic_name_or_path={tiny_reward_dir}",
                      f"reward.sources=[{{model: {tiny_reward_dir}}}]")
    trainer = PPOTrainer(cfg)
    ac = trainer.unwrapped
    checkpoint = AutoModelForSequenceClassification.from_pretrained(tiny_reward_dir).state_dict()
    assert ac.value_head is None  # no head on the policy: the critic is a model of its own
    start = {k: v.detach().clone() for k, v in ac.critic.state_dict().items()}
    assert start.keys() == checkpoint.keys()  # ... loaded from model.critic_name_or_path
    for k, v in checkpoint.items():
        torch.testing.assert_close(start[k].float(), v.float(), msg=k)
    hist = trainer.train()
    assert len(hist) == 2 and all(torch.isfinite(torch.tensor(m["value_loss"])) for m in hist)
    trained = {k: v.detach() for k, v in ac.critic.state_dict().items()}
    assert not torch.equal(trained["score.weight"], start["score.weight"])  # the critic learned
    # ... on its own copy: the reward model scoring the run still has the checkpoint's weights
    scorer = trainer.rewards.model_sources()[0].model.state_dict()
    assert all(torch.equal(scorer[k].float(), v.float()) for k, v in checkpoint.items())
    # the trained critic is what final/critic holds
    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "final" / "critic")
    for k, v in saved.state_dict().items():
        torch.testing.assert_close(v.float(), trained[k].float(), msg=k)


def test_python_api_and_off_policy_warning(tmp_path, caplog):
    cfg = Config(output_dir=str(tmp_path), iterations=2, save_every=1)
    cfg.ppo.batch_size, cfg.ppo.micro_batch_size = 8, 4
    cfg.generation.top_k = 10
    with caplog.at_level("WARNING"):
        hist = PPOTrainer(cfg).train()
    assert [m["iteration"] for m in hist] == [1, 2]
    assert "top_k=10" in caplog.text and "off-policy" in caplog.text
    assert (tmp_path / "checkpoint-1" / "config.json").is_file()
    assert (tmp_path / "final" / "tokenizer_config.json").is_file()


# The CLI runs in this process (the `cli` fixture, conftest.py); one test starts the command in
# a process of its own.

def test_python_m_rlhf_ppo_runs_the_command_in_its_own_process():
    out = subprocess.run([sys.executable, "-m", "rlhf_ppo", "--help"], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("usage: rlhf-ppo ")
    for command in ("train", "sft", "reward", "evaluate", "quickstart"):
        assert command in out.stdout.split("\n\n", 1)[0]  # the usage lines


def test_python_m_rlhf_ppo_exits_with_mains_code(monkeypatch, capsys, cli):
    import runpy  # (cli: for its clean-up of what main() sets up in the process)

    monkeypatch.setattr(sys, "argv", ["rlhf-ppo", "train", "ppo.clip_rnge=0.1"])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("rlhf_ppo", run_name="__main__")
    assert e.value.code == 2 and "ppo.clip_rnge: unknown key" in capsys.readouterr().err


def test_cli_trains_with_overrides(tmp_path, cli):
    from rlhf_ppo import builtin

    out = cli("train", "--config", TINY, f"output_dir={tmp_path}", "iterations=2",
              "ppo.batch_size=8", "ppo.micro_batch_size=4")
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in lines] == [1, 2]
    # the run's config: the overrides over the --config file over the defaults
    saved = load_config(tmp_path / "config.yaml")
    assert (saved.iterations, saved.ppo.batch_size, saved.ppo.micro_batch_size) == (2, 8, 4)
    assert saved.output_dir == str(tmp_path)
    assert saved.to_dict() == tiny_config(tmp_path, "iterations=2", "ppo.batch_size=8",
                                          "ppo.micro_batch_size=4").to_dict()
    # the closing line reports the run's own numbers
    first, last = lines[0], lines[-1]
    assert out.stdout.splitlines()[-1] == (
        f"done: 2 iterations, score_mean {first['score_mean']:.3f} -> {last['score_mean']:.3f}, "
        f"kl {last['kl']:.3f}; policy saved to {tmp_path}/final")
    # ... where the trained policy is: not the initial weights
    initial = AutoModelForCausalLM.from_pretrained(builtin.resolve_model("builtin:tiny"))
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "final").state_dict()
    assert any(not torch.equal(v, final[k]) for k, v in initial.state_dict().items())


@pytest.mark.parametrize("override,key", [
    ("ppo.clip_rnge=0.1", "ppo.clip_rnge"),
    ("optim.lr=-1", "optim.lr"),
    ("ppo.batch_size=31", "ppo.batch_size"),
    ("ppo.ppo_epochs=two", "ppo.ppo_epochs"),
])
def test_cli_config_errors_stop_before_loading(tmp_path, override, key, cli):
    out = cli("train", "--config", TINY, f"output_dir={tmp_path}", override)
    assert out.returncode == 2 and f"rlhf-ppo: config error: {key}" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "metrics.jsonl").exists()


def test_tensorboard_tracker_and_stop_strings(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = tiny_config(tmp_path, "iterations=1", "report_to=[tensorboard]", "ppo.batch_size=8",
                      "ppo.micro_batch_size=4", "generation.stop_strings=[great]")
    trainer = PPOTrainer(cfg)
    trainer.train()
    assert list(tmp_path.rglob("events.out.tfevents*"))
    # stop strings end responses at the completing token, and the text is cut before them
    from rlhf_ppo.rollout import generate

    rollout = generate(trainer.unwrapped.policy, trainer.sampler.next_batch() * 4,
                       trainer.tokenizer, cfg.generation)
    great = trainer.tokenizer.convert_tokens_to_ids("great")
    for ids, n, text in zip(rollout.response_ids, rollout.response_mask.sum(-1),
                            rollout.response_texts):
        assert great not in ids[: n - 1].tolist() and "great" not in text
    assert any(ids[n - 1] == great for ids, n in zip(rollout.response_ids,
                                                      rollout.response_mask.sum(-1)))


def test_cli_help_lists_every_key(cli):
    out = cli("train", "--help")
    assert out.returncode == 0 and "ppo.kl.estimator" in out.stdout
    assert "reward.sources[].function" in out.stdout
    # the ppo sections, each under a header, in this order
    heads = [out.stdout.index(f"\n {s}: ") for s in ("ppo.advantages", "ppo.loss", "ppo.critic",
                                                      "ppo.kl", "ppo.forward")]
    assert heads == sorted(heads) and out.stdout.index("ppo.batch_size (") < heads[0]
    assert heads[1] < out.stdout.index("ppo.loss.clip_range (") < heads[2]


def test_lr_schedule_values():
    from rlhf_ppo.optim import lr_lambda

    # warmup 2 of 10 steps: (step+1)/2 during warmup, then linear decay over the remaining 8
    f = lr_lambda("linear", 2, 10)
    assert [f(s) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 1 - 4 / 8, 0.0]
    g = lr_lambda("cosine", 0, 10)
    assert g(0) == 1.0 and g(5) == pytest.approx(0.5) and g(10) == pytest.approx(0.0)
    assert lr_lambda("constant", 0, 10)(7) == 1.0


def test_separate_reference_checkpoint(tmp_path):
    from rlhf_ppo import builtin

    other = builtin.build_tiny_model(tmp_path / "other", seed=5)
    cfg = tiny_config(tmp_path / "run", "iterations=1", f"model.ref_name_or_path={other}",
                      "ppo.batch_size=8", "ppo.micro_batch_size=4")
    m = PPOTrainer(cfg).step()
    assert abs(m["kl"]) > 0.1  # a different random model: far from the policy at iteration 1


def test_config_changed_after_construction_is_checked(tmp_path):
    from rlhf_ppo import ConfigError

    cfg = Config(output_dir=str(tmp_path))
    cfg.ppo.loss.clip_range = -1.0
    with pytest.raises(ConfigError, match="ppo.loss.clip_range"):
        PPOTrainer(cfg)


@pytest.mark.parametrize("override,key", [
    ("generation.max_new_tokens=255", "generation.max_new_tokens"),  # 6 + 255 > context 256
    ("generation.stop_token_ids=[100000]", "generation.stop_token_ids"),
])
def test_length_and_stop_id_errors(tmp_path, override, key):
    from rlhf_ppo import ConfigError

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        PPOTrainer(tiny_config(tmp_path, override))


@pytest.mark.parametrize("overrides,code,message", [
    (["model.name_or_path=/nonexistent/model"], 1, "ModelLoadError: model.name_or_path"),
    (["reward.sources=[{function: 'rlhf_ppo.rewards:no_such_fn'}]"], 1,
     "RewardError: reward.sources[0].function"),
    (["data.path=/nonexistent/prompts.jsonl"], 1, "DataError: data.path"),
    (["resume_from=latest"], 1, "CheckpointError: resume_from=latest"),
])
def test_cli_bad_input_gives_a_clear_error(tmp_path, overrides, code, message, cli):
    out = cli("train", "--config", TINY, f"output_dir={tmp_path}", *overrides)
    assert out.returncode == code and message in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_cli_refuses_an_output_dir_with_another_run(tmp_path, cli):
    (tmp_path / "metrics.jsonl").write_text('{"iteration": 1}\n')
    out = cli("train", "--config", TINY, f"output_dir={tmp_path}")
    assert out.returncode == 2 and "holds a run (metrics.jsonl)" in out.stderr
    assert (tmp_path / "metrics.jsonl").read_text() == '{"iteration": 1}\n'


def test_mixed_precision_bf16_trains_under_autocast(tmp_path, cli, fresh_accelerate_state,
                                                   monkeypatch):
    # fresh_accelerate_state: accelerate fixes the precision once per process
    from safetensors import safe_open

    seen = []
    real = PPOTrainer.rollout_outputs

    def spy(self, rollout):
        if not seen:  # the update's matmuls: the first decoder layer's MLP output
            mlp = self.unwrapped.policy.model.layers[0].mlp
            mlp.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
        seen.append((self.accelerator.mixed_precision, rollout.logprobs is None))
        return real(self, rollout)
    monkeypatch.setattr(PPOTrainer, "rollout_outputs", spy)
    out = cli("train", "--config", TINY, f"output_dir={tmp_path}", "iterations=2",
              "mixed_precision=bf16", "ppo.batch_size=8", "ppo.micro_batch_size=4")
    assert out.returncode == 0, out.stderr[-2000:]
    # each iteration's scoring pass: under bf16 autocast sampling's log-probs are not the
    # training forward's, so ppo.old_logprobs=auto recomputes them
    assert [x for x in seen if isinstance(x, tuple)] == [("bf16", True)] * 2
    assert torch.bfloat16 in seen  # the forward passes ran in bf16 ...
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in lines] == [1, 2]
    for m in lines:
        assert all(torch.isfinite(torch.tensor(m[k])) for k in
                   ("policy_loss", "value_loss", "kl", "entropy", "approx_kl")), m
    # ... and the weights the optimizer updates (and the save) stay float32
    with safe_open(str(tmp_path / "final" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}


def test_sample_every_logs_fixed_greedy_samples_without_changing_the_run(tmp_path):
    small = ["ppo.batch_size=8", "ppo.micro_batch_size=8", "generation.max_new_tokens=6"]
    plain = PPOTrainer(load_config(TINY, [f"output_dir={tmp_path / 'a'}", "iterations=4", *small])).train()
    logged = PPOTrainer(load_config(TINY, [f"output_dir={tmp_path / 'b'}", "iterations=4",
                                           "sample_every=2", "sample_prompts=3", *small]))
    history = logged.train()
    strip = lambda m: {k: v for k, v in m.items() if not k.startswith(("time/", "tokens_per", "samples/"))}
    assert [strip(m) for m in history] == [strip(m) for m in plain]  # the RNG stream is untouched
    rows = [json.loads(x) for x in (tmp_path / "b" / "samples.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0] * 3 + [2] * 3 + [4] * 3
    # the mean score of the samples logged at an iteration joins its metrics (an alarm watches it)
    assert [m.get("samples/score_mean") for m in history] == [
        None, pytest.approx(sum(r["score"] for r in rows[3:6]) / 3), None,
        pytest.approx(sum(r["score"] for r in rows[6:]) / 3)]
    prompts = [p.text for p in logged.sampler.prompts[:3]]
    assert [r["prompt"] for r in rows] == prompts * 3
    # greedy: the same policy gives the same responses; the score is the reward function's
    again = logged.log_samples()
    assert [r["response"] for r in again] == [r["response"] for r in rows[-3:]]
    from rlhf_ppo.rewards import keyword_share

    assert [r["score"] for r in rows] == pytest.approx(
        keyword_share([], [r["response"] for r in rows]))


def test_global_stats_mean_variance_and_count(tmp_path):
    """The metrics' statistics, all in one reduction (one process here), against hand values."""
    from rlhf_ppo.distributed import global_mean, global_moments, global_stats

    trainer = PPOTrainer(tiny_config(tmp_path, "iterations=1"))
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    acc = trainer.accelerator
    (m1, v1, n1), (m2, v2, n2), (m3, v3, n3) = global_stats(
        acc, [(x, mask), (x, None), (torch.tensor(2.5), None)])
    # valid 1, 2, 4: mean 7/3, unbiased variance (16/9 + 1/9 + 25/9) / 2 = 7/3
    assert (m1, n1) == (pytest.approx(7 / 3), 3.0) and v1 == pytest.approx(7 / 3)
    assert (m2, v2, n2) == (pytest.approx(3.5), pytest.approx(3.5), 6.0)  # 1..6
    assert (m3, v3, n3) == (2.5, 0.0, 1.0)
    assert global_moments(acc, x, mask) == (pytest.approx(7 / 3), pytest.approx(7 / 3))
    assert global_mean(acc, x) == pytest.approx(3.5)


def test_start_of_run_says_what_the_run_will_do(tmp_path, caplog):
    with caplog.at_level("INFO", logger="rlhf_ppo.trainer"):
        trainer = PPOTrainer(tiny_config(tmp_path, "iterations=3", "ppo.batch_size=8",
                                         "ppo.micro_batch_size=2", "ppo.num_minibatches=2",
                                         "ppo.ppo_epochs=3"))
    text = caplog.text
    n_params = sum(q.numel() for q in trainer.unwrapped.parameters())
    assert f"prompts: {len(trainer.sampler.prompts)} from builtin:tiny" in text
    assert "reward: 1 x rlhf_ppo.rewards:keyword_share" in text
    assert f"trained parameters: {n_params / 1e6:.2f}M of {n_params / 1e6:.2f}M" in text
    # 8 rollouts, 2 minibatches of 4 in micro-batches of 2, 3 epochs: 6 steps per iteration
    assert ("batch: 8 rollouts per iteration = 1 process x 8; 2 minibatches of 4 per process "
            "in micro-batches of 2 sequences; 3 epochs: 6 optimizer steps per iteration, 18 in 3 "
            "iterations") in text
    assert "forward passes: packed, without padding" in text  # the tiny Llama passes the check
    assert f"torch threads {torch.get_num_threads()}" in text and f"output: {tmp_path}/" in text


VARIANTS = {
    "grpo-clip-higher-dual-clip-kl-loss": (
        "seq-mean-token-sum", "ppo.advantage_estimator=grpo", "ppo.samples_per_prompt=2",
        "ppo.clip_range_high=0.3", "ppo.dual_clip=3.0", "ppo.kl_loss_coef=0.1"),
    "dr-grpo-gspo": ("seq-mean-token-sum-norm", "ppo.advantage_estimator=dr_grpo",
                     "ppo.samples_per_prompt=4", "ppo.ratio_level=sequence"),
    "rloo-masked-truncation-overlong": (
        "token-mean", "ppo.advantage_estimator=rloo", "ppo.samples_per_prompt=2",
        "ppo.mask_truncated=true", "ppo.overlong_buffer=4", "generation.stop_token_ids=[4,5,6]"),
    "reinforce-pp-baseline-tis": ("token-mean", "ppo.advantage_estimator=reinforce_pp_baseline",
                                  "ppo.samples_per_prompt=2", "ppo.tis_cap=2.0"),
    "reinforce-pp-kl-in-reward-k2": ("seq-mean", "ppo.advantage_estimator=reinforce_pp",
                                     "ppo.kl_coef=0.1", "ppo.kl_loss_coef=0.05",
                                     "ppo.kl_loss_estimator=k2"),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_micro_batch_size_does_not_change_the_update_of_the_variants(tmp_path, variant):
    """The same invariance for the critic-free estimators and the loss variants."""
    aggregation, *extra = VARIANTS[variant]
    w4, m4, g4 = _one_iteration(tmp_path / "a", 4, aggregation, *extra)
    w1, m1, g1 = _one_iteration(tmp_path / "b", 1, aggregation, *extra)
    assert len(g1) == len(g4) == 4
    for step, (a, b) in enumerate(zip(g1, g4)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-4, msg=f"step {step}")
    for k in ("policy_loss", "clipfrac", "approx_kl", "kl_loss", "dual_clipfrac"):
        assert m1[k] == pytest.approx(m4[k], rel=1e-4, abs=1e-6), k


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean", "seq-mean-token-sum-norm"])
def test_token_budgets_and_packing_do_not_change_the_update(tmp_path, aggregation):
    """Padded micro-batches of 4 sequences, packed ones, and packed or padded micro-batches cut
    by a token budget give the same gradient at every optimizer step."""
    base = _one_iteration(tmp_path / "a", 4, aggregation, "ppo.packing=false")
    variants = {
        "packed": _one_iteration(tmp_path / "b", 4, aggregation),
        # (micro_batch_size 1 sets up 4 micro-batches per step; the budget makes 1 to 3)
        "packed, 40 tokens": _one_iteration(tmp_path / "c", 1, aggregation,
                                            "ppo.micro_batch_tokens=40"),
        "padded, 40 tokens": _one_iteration(tmp_path / "d", 1, aggregation, "ppo.packing=false",
                                            "ppo.micro_batch_tokens=40"),
    }
    for name, (_w, m, g) in variants.items():
        assert len(g) == len(base[2]) == 4, name  # every optimizer step taken
        for step, (a, b) in enumerate(zip(g, base[2])):
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-4, msg=f"{name} step {step}")
        for k in ("policy_loss", "value_loss", "clipfrac", "approx_kl"):
            assert m[k] == pytest.approx(base[1][k], rel=1e-4, abs=1e-6), (name, k)
    # padding: packed passes compute fewer padded positions than padded ones
    assert variants["packed"][1]["padding_share"] < base[1]["padding_share"]


def _experience(prompt_lens, resp_lens, P=6, R=8):
    B = len(prompt_lens)
    cols = torch.arange(P + R)
    p, r = torch.tensor(prompt_lens)[:, None], torch.tensor(resp_lens)[:, None]
    am = ((cols >= P - p) & (cols < P + r)).long()
    z = torch.zeros(B, R)
    return Experience(torch.ones(B, P + R, dtype=torch.long), am, P, am[:, P:], z, z, z, z, z, z)


class _OneProcess:
    device = torch.device("cpu")

    @staticmethod
    def reduce(t, op):
        return t


def test_token_budget_micro_batches_by_hand():
    from rlhf_ppo.config import PPOConfig
    from rlhf_ppo.update import micro_batches

    #          row:  0  1  2  3  4  5
    mb = _experience([2, 6, 1, 3, 2, 4], [1, 8, 2, 5, 8, 1])  # lengths 3, 14, 3, 8, 10, 5
    p = PPOConfig(batch_size=6, num_minibatches=1, micro_batch_tokens=16)
    # packed: longest first (1, 4, 3, 5, 0, 2), each into the first micro-batch whose sum of
    # real tokens stays <= 16: [1] 14; [4] 10; [3] 8; 5 -> [4, 5] 15; 0 -> [3, 0] 11; 2 -> 14
    parts = [t.tolist() for t in micro_batches(_OneProcess, mb, p, packed=True)]
    assert parts == [[1], [4, 5], [0, 2, 3]]
    # padded: rows x (longest prompt + longest response): 0 -> [3, 0] 2 x (3 + 5) = 16;
    # 2 -> [3, 0, 2] 3 x 8 = 24 too much, [5, 2] 2 x (4 + 2) = 12
    parts = [t.tolist() for t in micro_batches(_OneProcess, mb, p, packed=False)]
    assert parts == [[1], [4], [0, 3], [2, 5]]
    # another process needing 5 micro-batches: the largest ones are split
    class Five(_OneProcess):
        @staticmethod
        def reduce(t, op):
            return torch.tensor([5])
    parts = [t.tolist() for t in micro_batches(Five, mb, p, packed=True)]
    assert len(parts) == 5 and sorted(sum(parts, [])) == list(range(6))
    p = PPOConfig(batch_size=6, num_minibatches=1, micro_batch_size=3)  # no budget: by count
    assert [t.tolist() for t in micro_batches(_OneProcess, mb, p, packed=True)] == [
        [0, 1, 2], [3, 4, 5]]


SCRIPTED_REWARD = '''
calls = 0
PLAN = {plan}

def scripted(prompts, responses, **kwargs):
    """Call n scores group g (4 rows in a row) 0, 1, 2, 3 where PLAN[n][g] is true, else 0.5 on
    every row (a group of equal scores: no signal). The last plan repeats."""
    global calls
    plan = PLAN[min(calls, len(PLAN) - 1)]
    calls += 1
    return [float(i % 4) if plan[i // 4] else 0.5 for i in range(len(responses))]
'''


def scripted_reward(tmp_path, plan: list[list[bool]]) -> str:
    """The ``reward.sources`` override for :data:`SCRIPTED_REWARD` with ``plan`` (a fresh module
    per test: the call counter starts at 0)."""
    fn = tmp_path / "scripted_reward.py"
    fn.write_text(SCRIPTED_REWARD.format(plan=plan))
    return f"reward.sources=[{{function: '{fn}:scripted'}}]"


# GRPO's advantage of the scores 0, 1, 2, 3: (s - 1.5) / (unbiased std sqrt(5 / 3) + eps 1e-6)
GRPO_0123 = torch.tensor([(j - 1.5) / (math.sqrt(5 / 3) + 1e-6) for j in range(4)])


def test_critic_free_grpo_builds_no_critic_and_uses_group_advantages(tmp_path):
    """GRPO: no value head, no critic, one optimizer group; each prompt sampled
    samples_per_prompt times in a row; every token of a response gets its group-normalised
    score (kl_coef 0, gamma 1). The scores 0, 1, 2, 3 in every group: each group has a spread,
    so the normalised advantages are known exactly."""
    trainer = PPOTrainer(tiny_config(
        tmp_path, "iterations=1", "ppo.batch_size=8", "ppo.micro_batch_size=8",
        "ppo.advantage_estimator=grpo", "ppo.samples_per_prompt=4", "ppo.kl_coef=0.0",
        scripted_reward(tmp_path, [[True, True]])))
    ac = trainer.unwrapped
    assert ac.value_head is None and ac.critic is None and not ac.has_critic
    assert len(trainer.optimizer.param_groups) == 1
    updates = record_updates(trainer)
    m = trainer.step()
    batch = updates[0][0]
    mask = batch.response_mask.float()
    assert m["ppo_steps"] > 0 and math.isnan(m["explained_variance"]) and m["value_loss"] == 0.0
    assert torch.equal(batch.values, torch.zeros_like(batch.values))
    # rows 4g..4g+3 answer the same prompt
    ids = batch.input_ids[:, : batch.prompt_length]
    for g in range(2):
        assert all(torch.equal(ids[4 * g], ids[4 * g + j]) for j in range(4))
    # the advantage is constant along each response and equals the group-normalised score:
    # centred within the group, unit (unbiased) std
    torch.testing.assert_close(batch.advantages, GRPO_0123.repeat(2)[:, None] * mask)
    per_row = (batch.advantages * mask).sum(-1) / mask.sum(-1)
    for g in range(2):
        a = per_row[4 * g: 4 * g + 4]
        assert abs(float(a.mean())) < 1e-6 and float(a.std()) == pytest.approx(1.0, abs=1e-5)


def test_dynamic_sampling_fills_the_batch_with_informative_groups(tmp_path):
    """Two groups a batch. Round 0: group 0 has equal scores, group 1 a spread; round 1: both
    equal; round 2: group 0 a spread. The batch is full of informative groups after two extra
    rounds: round 0's group 1 then round 2's group 0 (rows kept in sampling order)."""
    trainer = PPOTrainer(tiny_config(
        tmp_path, "iterations=1", "ppo.batch_size=8", "ppo.micro_batch_size=8",
        "ppo.advantage_estimator=grpo", "ppo.samples_per_prompt=4", "ppo.dynamic_sampling=true",
        "ppo.kl_coef=0.0",
        scripted_reward(tmp_path, [[False, True], [False, False], [True, False], [True, True]])))
    sampled = []  # every rollout the trainer drew, in order
    sample = trainer.sample
    trainer.sample = lambda prompts: sampled.append(sample(prompts)) or sampled[-1]
    updates = record_updates(trainer)
    m = trainer.step()
    draws = len(sampled)
    assert draws == 3  # the first batch and two extra rounds
    assert m["dynamic/rounds"] == 2.0
    assert m["dynamic/informative_first"] == 0.5  # 1 of 2 groups
    assert m["dynamic/informative_kept"] == 1.0
    assert m["score_mean"] == pytest.approx(1.5)  # the batch's scores: 0, 1, 2, 3 twice
    batch = updates[0][0]
    assert len(batch) == 8

    def tokens(input_ids, attention_mask, row):  # the row's prompt and response, no padding
        return input_ids[row][attention_mask[row].bool()].tolist()
    expected = [(sampled[0], 4 + j) for j in range(4)] + [(sampled[2], j) for j in range(4)]
    for row, (rollout, r) in enumerate(expected):
        assert tokens(batch.input_ids, batch.attention_mask, row) == tokens(
            rollout.input_ids, rollout.attention_mask, r), row
    # every group that reaches the update has a signal: GRPO's advantages of 0, 1, 2, 3
    mask = batch.response_mask.float()
    torch.testing.assert_close(batch.advantages, GRPO_0123.repeat(2)[:, None] * mask)


@pytest.mark.parametrize("packing", [False, True])
def test_padding_share_counts_the_padding_the_update_computed(tmp_path, packing):
    """One row per micro-batch: each row is trimmed to its own prompt and response, so no
    padding is computed. The whole batch in one micro-batch: 1 - real positions / positions
    computed: padded, rows x the batch's trimmed width; packed, the packed rows' positions
    (rows x row length, first-fit decreasing), both computed here from the batch itself."""
    from rlhf_ppo.experience import trim_padding
    from rlhf_ppo.packing import attention_weight, first_fit, layout

    stops = "generation.stop_token_ids=[4,5,6,7,8]"  # punctuation: responses of many lengths
    flag = f"ppo.packing={str(packing).lower()}"
    one = PPOTrainer(tiny_config(tmp_path / "a", "iterations=1", "ppo.batch_size=8",
                                 "ppo.num_minibatches=1", "ppo.micro_batch_size=1", stops, flag))
    assert one.step()["padding_share"] == 0.0
    whole = PPOTrainer(tiny_config(tmp_path / "b", "iterations=1", "ppo.batch_size=8",
                                   "ppo.num_minibatches=1", "ppo.micro_batch_size=8", stops,
                                   flag))
    updates = record_updates(whole)
    m = whole.step()
    b = updates[0][0]
    _, am, rm, _ = trim_padding(b.input_ids, b.attention_mask, b.response_mask, b.prompt_length)
    assert len(set(rm.sum(-1).tolist())) > 1  # the lengths differ: there is padding to count
    lengths = am.sum(-1).tolist()
    if not packing:
        assert m["padding_share"] == pytest.approx(1 - sum(lengths) / am.numel())
        assert m["padding_share"] > 0
        return
    _, fill, C = layout(lengths, attention_weight(whole.unwrapped.policy.config))
    assert C >= max(lengths) and first_fit(lengths, C)[1] == fill
    assert m["padding_share"] == pytest.approx(1 - sum(lengths) / (len(fill) * C))
    assert m["padding_share"] < 1 - sum(lengths) / am.numel()  # less than padded
