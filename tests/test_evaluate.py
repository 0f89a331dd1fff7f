"""`rlhf-ppo evaluate`: config checks, default resolution of the reference, and end-to-end runs on
tiny models (a real 2-iteration PPO run, self-comparison, LoRA). The statistics are checked
against hand-computed values in test_eval_stats.py."""

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from rlhf_ppo import builtin
from rlhf_ppo.config import (
    ConfigError,
    DataConfig,
    GenerationConfig,
    ModelConfig,
    RewardConfig,
    load_config,
)
from rlhf_ppo.eval_config import EvalConfig, effective_config
from rlhf_ppo.eval_models import ModelSpec, find_run_config, load_sides, reference_from_run, resolve_specs
from rlhf_ppo.evaluate import run_evaluate
from rlhf_ppo.models import ModelLoadError
from rlhf_ppo.report import CURVE_KEYS, read_metrics
from rlhf_ppo.rewards import RewardError, keyword_share


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread; two threads on a busy machine spin-wait (a 64-wide
    linear layer took 32 ms with 2 threads instead of 0.2 ms with 1 under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SMALL = ["num_prompts=4", "samples_per_prompt=2", "batch_size=2", "generation.max_new_tokens=8",
         "bootstrap_samples=200", "data.max_prompt_length=16"]


def evaluate(out: Path, policy: str, *overrides: str) -> tuple[dict, list[dict]]:
    cfg = load_config(None, [f"policy={policy}", f"output_dir={out}", *SMALL, *overrides],
                      cls=EvalConfig)
    summary = run_evaluate(cfg)
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return summary, rows


# --------------------------------------------------------------------------- config and defaults

@pytest.mark.parametrize("overrides, key", [
    ([], "policy"),
    (["policy=x", "samples_per_prompt=0"], "samples_per_prompt"),
    (["policy=x", "num_prompts=0"], "num_prompts"),
    (["policy=x", "ci_level=1.0"], "ci_level"),
    (["policy=x", "bootstrap_samples=0"], "bootstrap_samples"),
    (["policy=x", "generation.temperature=0"], "generation.temperature"),
    (["policy=x", "reward.sources=[]"], "reward.sources"),
    (["policy=x", "device=gpu0"], "device"),
])
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(None, overrides, cls=EvalConfig)


def test_reference_from_run_config():
    plain = {"model": {"name_or_path": "init", "gguf_file": None}, "peft": {"enabled": False}}
    assert reference_from_run(plain, "c.yaml") == ModelSpec(
        "init", "reference (model.name_or_path in c.yaml)")
    own_ref = {"model": {"name_or_path": "init", "ref_name_or_path": "sft", "ref_gguf_file": "r.gguf"}}
    assert reference_from_run(own_ref, "c.yaml") == ModelSpec(
        "sft", "reference (model.ref_name_or_path in c.yaml)", "r.gguf")
    # LoRA: the base model (its GGUF file too), or the SFT adapter PPO started from over that base
    lora = {"model": {"name_or_path": "base", "gguf_file": "b.gguf"}, "peft": {"enabled": True}}
    assert reference_from_run(lora, "c.yaml") == ModelSpec(
        "base", "reference (model.name_or_path in c.yaml)", "b.gguf")
    lora["peft"]["adapter_path"] = "sft_adapter"
    assert reference_from_run(lora, "c.yaml") == ModelSpec(
        "sft_adapter", "reference (peft.adapter_path in c.yaml)", base="base", base_gguf_file="b.gguf")


def test_reference_is_required_without_a_ppo_run_config(tmp_path, tiny_policy_dir):
    folder = tmp_path / "final"
    shutil.copytree(tiny_policy_dir, folder)
    # the config of another stage beside the folder does not count
    (tmp_path / "config.yaml").write_text("model: {name_or_path: base}\nepochs: 1\n")
    assert find_run_config(folder) is None
    cfg = EvalConfig(policy=str(folder))
    with pytest.raises(ConfigError, match="^reference: no PPO run config"):
        resolve_specs(cfg, folder, None)
    (tmp_path / "config.yaml").write_text("model: {name_or_path: base}\nppo: {}\n")
    run = find_run_config(folder)
    assert run is not None and run[1] == (tmp_path / "config.yaml").resolve()
    _, ref = resolve_specs(cfg, folder, run)
    assert ref.name == "base"


# --------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory, tiny_policy_dir):
    """A real PPO run folder (config.yaml, metrics.jsonl, final/) trained for 2 iterations from the tiny
    policy with a large learning rate, so the policy differs from its reference."""
    from rlhf_ppo import PPOTrainer

    out = tmp_path_factory.mktemp("ppo_run")
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml",
                      [f"output_dir={out}", f"model.name_or_path={tiny_policy_dir}", "iterations=2",
                       "ppo.batch_size=4", "ppo.num_minibatches=1", "ppo.micro_batch_size=4",
                       "ppo.ppo_epochs=1", "optim.lr=1e-2", "generation.max_new_tokens=8"])
    PPOTrainer(cfg).train()
    return out


def test_cli_evaluates_a_ppo_run_with_consistent_outputs(tmp_path, ppo_run, tiny_policy_dir, cli):
    out = tmp_path / "eval"
    run = cli("evaluate", f"policy={ppo_run / 'final'}", f"output_dir={out}", *SMALL)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    # the closing line: the summary's numbers and where the report is
    f = lambda d: f"{d['mean']:.3f} [{d['ci_low']:.3f}, {d['ci_high']:.3f}]"
    assert run.stdout.splitlines()[-1] == (
        f"done: score policy {f(summary['policy']['score'])} vs reference "
        f"{f(summary['reference']['score'])}, win rate {f(summary['win_rate'])}, "
        f"kl {summary['kl']['mean']:.3f}; report: {out}/report.html")
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    # the reference defaults to the run's initial policy, read from its config
    assert summary["reference_path"] == tiny_policy_dir
    assert [(r["prompt_index"], r["sample"]) for r in rows] == [(i, k) for i in range(4) for k in range(2)]
    pol, ref = summary["policy"], summary["reference"]
    assert pol["score"]["mean"] == pytest.approx(np.mean([r["policy_score"] for r in rows]))
    assert ref["score"]["mean"] == pytest.approx(np.mean([r["reference_score"] for r in rows]))
    assert pol["sources"][0]["mean"] == pytest.approx(pol["score"]["mean"])  # one source, weight 1
    assert summary["score_diff"]["mean"] == pytest.approx(pol["score"]["mean"] - ref["score"]["mean"])
    wins = [1.0 if r["policy_score"] > r["reference_score"] else
            0.5 if r["policy_score"] == r["reference_score"] else 0.0 for r in rows]
    assert summary["win_rate"]["mean"] == pytest.approx(np.mean(wins))
    assert summary["kl"]["mean"] == pytest.approx(np.mean([r["kl"] for r in rows]))
    assert pol["response_length"] == pytest.approx(np.mean([r["policy_length"] for r in rows]))
    assert ref["stop_rate"] == pytest.approx(np.mean([r["reference_stopped"] for r in rows]))
    for stat in (pol["score"], ref["score"], summary["win_rate"], summary["score_diff"], summary["kl"]):
        assert stat["ci_low"] <= stat["mean"] <= stat["ci_high"]
    # each score belongs to its response: recompute the reward function on the texts
    for r in rows:
        assert r["policy_score"] == pytest.approx(keyword_share([r["prompt"]], [r["policy_response"]])[0])
        assert r["reference_score"] == pytest.approx(
            keyword_share([r["prompt"]], [r["reference_response"]])[0])
        assert 1 <= r["policy_length"] <= 8 and r["policy_source_scores"] == [r["policy_score"]]
    assert any(r["kl"] != 0.0 for r in rows)  # the trained policy is not its reference
    # the report: histogram and the run's training curves, every sample row
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 2
    assert page.count("<tr data-index=") == 8
    # the curves plot keys the trainer actually writes
    assert set(CURVE_KEYS) <= set(read_metrics(ppo_run / "metrics.jsonl")[0])


def test_policy_against_itself_has_zero_kl_identical_samples_and_even_win_rate(tmp_path,
                                                                               tiny_policy_dir):
    summary, rows = evaluate(tmp_path, tiny_policy_dir, f"reference={tiny_policy_dir}")
    assert all(r["policy_response"] == r["reference_response"] for r in rows)
    assert [r["kl"] for r in rows] == [0.0] * 8
    assert summary["kl"] == {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    assert summary["win_rate"] == {"mean": 0.5, "ci_low": 0.5, "ci_high": 0.5}
    assert summary["score_diff"]["mean"] == 0.0
    for key in ("response_length", "stop_rate", "distinct_1", "distinct_2"):
        assert summary["policy"][key] == summary["reference"][key]
    # the K samples of a prompt differ (seeded, not repeated)
    assert len({r["policy_response"] for r in rows}) > 4


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, tiny_policy_dir):
    """A LoRA adapter over the tiny policy with random (non-zero) weights, saved without a
    tokenizer (as an adapter-only folder may be)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_policy_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    out = tmp_path_factory.mktemp("lora")
    model.save_pretrained(out)
    return out


def test_lora_policy_shares_its_base_with_the_reference(tmp_path, lora_dir, tiny_policy_dir):
    # without a run config the reference is required; the error names the adapter's base
    with pytest.raises(ConfigError, match=re.escape(tiny_policy_dir)):
        run_evaluate(EvalConfig(policy=str(lora_dir), output_dir=str(tmp_path / "x")))
    cfg = ModelConfig(disable_dropout=True)
    policy, reference = load_sides(ModelSpec(str(lora_dir), "policy"),
                                   ModelSpec(tiny_policy_dir, "reference"), cfg)
    assert reference.lm is policy.lm and reference.adapter_off  # one copy of the base weights
    one_batch = "batch_size=4"
    shared, shared_rows = evaluate(tmp_path / "shared", str(lora_dir), f"reference={tiny_policy_dir}",
                                   one_batch)
    # the same reference loaded on its own (another path to the same weights) gives the same numbers
    copy = shutil.copytree(tiny_policy_dir, tmp_path / "base_copy")
    separate, separate_rows = evaluate(tmp_path / "separate", str(lora_dir), f"reference={copy}",
                                       one_batch)
    assert [r["reference_response"] for r in shared_rows] == \
        [r["reference_response"] for r in separate_rows]
    assert [r["kl"] for r in shared_rows] == pytest.approx([r["kl"] for r in separate_rows])
    assert shared["kl"]["mean"] != 0.0  # the adapter changes the distribution


def test_lora_ppo_run_defaults_to_its_base_as_reference(tmp_path, tiny_policy_dir):
    from rlhf_ppo import PPOTrainer

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml",
                      [f"output_dir={tmp_path / 'run'}", f"model.name_or_path={tiny_policy_dir}",
                       "iterations=1", "ppo.batch_size=4", "ppo.num_minibatches=1",
                       "ppo.micro_batch_size=4", "ppo.ppo_epochs=1", "optim.lr=5e-2",
                       "generation.max_new_tokens=8", "peft.enabled=true", "peft.r=4"])
    PPOTrainer(cfg).train()
    final = tmp_path / "run" / "final"
    assert (final / "adapter_config.json").is_file()
    summary, rows = evaluate(tmp_path / "eval", str(final))
    assert summary["reference_path"] == tiny_policy_dir  # the run's base, from its config
    assert any(r["kl"] != 0.0 for r in rows)


@pytest.mark.parametrize("args, code, message", [
    (["policy=/no/such/policy"], 1, "policy: folder '/no/such/policy' not found"),
    (["policy=POLICY", "reference=/no/such/ref"], 1, "reference: folder '/no/such/ref' not found"),
    (["policy=POLICY", "reference=POLICY", "metrics_path=/no/metrics.jsonl"], 2, "metrics_path"),
    (["policy=POLICY"], 2, "reference: no PPO run config"),
    (["policy=POLICY", "samples_per_prompt=0"], 2, "samples_per_prompt: expected an integer >= 1"),
    (["policy=EMPTY", "reference=POLICY"], 1, "holds neither config.json nor adapter_config.json"),
    # tokenizer errors name evaluate's own keys, not the training config's model.*
    (["policy=POLICY", "reference=POLICY", "tokenizer=EMPTY"], 1, "tokenizer: could not load"),
    (["policy=NOTOK", "reference=POLICY"], 1, "policy: could not load"),
])
def test_bad_inputs_give_clear_errors(tmp_path, cli, tiny_policy_dir, args, code, message):
    (tmp_path / "empty").mkdir()
    notok = shutil.copytree(tiny_policy_dir, tmp_path / "notok")  # weights, no tokenizer files
    for f in notok.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab")):
            f.unlink()
    args = [a.replace("POLICY", tiny_policy_dir).replace("EMPTY", str(tmp_path / "empty"))
            .replace("NOTOK", str(notok)) for a in args]
    out = cli("evaluate", f"output_dir={tmp_path / 'out'}", *args)
    assert out.returncode == code and message in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "out" / "summary.json").exists()


def test_python_api_raises_the_error_types(tmp_path, tiny_policy_dir):
    with pytest.raises(ModelLoadError, match="^policy: folder"):
        run_evaluate(EvalConfig(policy=str(tmp_path / "missing"), reference=tiny_policy_dir))
    with pytest.raises(ConfigError, match="^metrics_path"):
        run_evaluate(EvalConfig(policy=tiny_policy_dir, reference=tiny_policy_dir,
                                metrics_path=str(tmp_path / "missing.jsonl")))


def test_builtin_policy_name_resolves(tmp_path):
    # `builtin:tiny` resolves to its built folder, like any model name
    summary, rows = evaluate(tmp_path, "builtin:tiny", "reference=builtin:tiny", "num_prompts=1",
                             "samples_per_prompt=1")
    assert summary["num_prompts"] == 1 and summary["kl"]["mean"] == 0.0
    folder = builtin.resolve_model("builtin:tiny")
    assert Path(folder).is_dir() and summary["policy_path"] == folder
    # both names load the same model: the same sample, scored the same
    assert [r["policy_response"] for r in rows] == [r["reference_response"] for r in rows]
    assert [r["policy_score"] for r in rows] == [r["reference_score"] for r in rows]


# --------------------------------------------------------------------------- the run's settings

RUN_PROMPTS = ["our city was", "this song is", "that game was", "my food is"]
RUN_REWARD = '''
def answer_words(completions, answer, **kwargs):
    """TRL style: 1 when the completion has `answer` words, else minus the distance."""
    return [-abs(len(c.split()) - a) + 1.0 if len(c.split()) != a else 1.0
            for c, a in zip(completions, answer)]
'''


@pytest.fixture(scope="module")
def custom_run(tmp_path_factory, tiny_policy_dir):
    """A 1-iteration PPO run whose config has its own prompts file (with an `answer` column), a
    TRL-style reward function of that column, max_new_tokens 3 and temperature 0.7."""
    from rlhf_ppo import PPOTrainer

    root = tmp_path_factory.mktemp("custom_run")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "answer": i + 1}) + "\n"
                               for i, p in enumerate(RUN_PROMPTS)))
    (root / "run_reward.py").write_text(RUN_REWARD)
    out = root / "run"
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml",
                      [f"output_dir={out}", f"model.name_or_path={tiny_policy_dir}", "iterations=1",
                       "ppo.batch_size=4", "ppo.num_minibatches=1", "ppo.micro_batch_size=4",
                       "ppo.ppo_epochs=1", f"data.path={prompts}",
                       f"reward.sources=[{{function: '{root / 'run_reward.py'}:answer_words'}}]",
                       "generation.max_new_tokens=3", "generation.temperature=0.7"])
    PPOTrainer(cfg).train()
    return out, f"{root / 'run_reward.py'}:answer_words", str(prompts)


RUN_SMALL = ["num_prompts=4", "samples_per_prompt=2", "batch_size=4", "bootstrap_samples=50"]


def test_evaluate_uses_the_runs_data_reward_and_generation(tmp_path, custom_run, caplog):
    run, reward, prompts_file = custom_run
    with caplog.at_level("INFO", logger="rlhf_ppo.evaluate"):
        cfg = load_config(None, [f"policy={run / 'final'}", f"output_dir={tmp_path}", *RUN_SMALL],
                          cls=EvalConfig)
        summary = run_evaluate(cfg)
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    # the run's prompts, not the built-in ones
    assert {r["prompt"] for r in rows} == set(RUN_PROMPTS)
    # the run's reward function, fed the prompts file's `answer` column
    for side in ("policy", "reference"):
        assert [s["name"] for s in summary[side]["sources"]] == [reward]
    answers = {p: i + 1 for i, p in enumerate(RUN_PROMPTS)}
    for r in rows:
        words = len(r["policy_response"].split())
        a = answers[r["prompt"]]
        assert r["policy_score"] == (1.0 if words == a else 1.0 - abs(words - a))
    # the run's generation settings: at most 3 tokens, temperature 0.7
    assert max(max(r["policy_length"], r["reference_length"]) for r in rows) <= 3
    assert summary["config"]["generation"]["max_new_tokens"] == 3
    assert summary["config"]["generation"]["temperature"] == 0.7
    assert summary["config"]["data"]["path"] == prompts_file
    run_config = run / "final" / "rlhf_ppo_config.yaml"
    assert summary["settings_from"] == {s: f"all from the PPO run's config {run_config}"
                                        for s in ("data", "reward", "generation")}
    # one INFO line per section, saying what it uses and where from
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("evaluate ")]
    for section, shown in (("data", f"path={prompts_file!r}"), ("reward", reward),
                           ("generation", "max_new_tokens=3")):
        (line,) = [m for m in lines if m.startswith(f"evaluate {section}: ")]
        assert shown in line and f"all from the PPO run's config {run_config}" in line


def test_keys_set_for_evaluate_win_key_by_key(tmp_path, custom_run):
    run, _, prompts_file = custom_run
    # temperature 1.0 is the default, and still wins over the run's 0.7: it was set
    cfg = load_config(None, [f"policy={run / 'final'}", f"output_dir={tmp_path}", *RUN_SMALL,
                             "generation.temperature=1.0",
                             "reward.sources=[{function: 'rlhf_ppo.rewards:response_length'}]"],
                      cls=EvalConfig)
    summary = run_evaluate(cfg)
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    gen = summary["config"]["generation"]
    assert (gen["temperature"], gen["max_new_tokens"]) == (1.0, 3)  # max_new_tokens: the run's
    assert summary["policy"]["sources"][0]["name"] == "rlhf_ppo.rewards:response_length"
    assert all(r["policy_score"] == len(r["policy_response"].split()) for r in rows)
    assert {r["prompt"] for r in rows} == set(RUN_PROMPTS)  # data: the run's
    run_config = run / "final" / "rlhf_ppo_config.yaml"
    assert summary["settings_from"] == {
        "data": f"all from the PPO run's config {run_config}",
        "reward": f"sources from the evaluate config; the rest from the PPO run's config {run_config}",
        "generation": f"temperature from the evaluate config; the rest from the PPO run's config "
                      f"{run_config}"}


def test_cli_accepts_a_ppo_runs_config_file(tmp_path, custom_run, cli):
    run, reward, prompts_file = custom_run
    out = tmp_path / "eval"
    res = cli("evaluate", "--config", run / "config.yaml", f"policy={run / 'final'}",
              f"output_dir={out}", *RUN_SMALL, "generation.max_new_tokens=2")
    assert res.returncode == 0, res.stderr[-3000:]
    # the PPO-only keys are ignored (output_dir among them: the run folder is left alone)
    assert (f"{run / 'config.yaml'} is a PPO run's config: evaluate uses its data, reward, "
            "generation section(s) and ignores alarms, iterations, keep_last, ") in res.stderr
    assert not (run / "summary.json").exists()
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {r["prompt"] for r in rows} == set(RUN_PROMPTS)
    assert summary["policy"]["sources"][0]["name"] == reward
    assert max(r["policy_length"] for r in rows) <= 2  # the command line wins over the file
    assert summary["config"]["generation"]["temperature"] == 0.7
    others = [f.name for f in dataclasses.fields(GenerationConfig) if f.name != "max_new_tokens"]
    assert summary["settings_from"] == {
        "data": f"all from --config {run / 'config.yaml'}",
        "reward": f"all from --config {run / 'config.yaml'}",
        "generation": f"max_new_tokens from the command line; {', '.join(others)} from --config "
                      f"{run / 'config.yaml'}"}
    assert f"INFO rlhf_ppo.evaluate: evaluate data: path={prompts_file!r}" in res.stderr


def test_effective_config_without_a_run_and_from_python(tmp_path):
    cfg = load_config(None, ["policy=x", "generation.max_new_tokens=32"], cls=EvalConfig)
    same, origins = effective_config(cfg, None)
    assert same.generation.max_new_tokens == 32
    assert origins["generation"] == ("max_new_tokens from the evaluate config; the rest from the "
                                     "defaults (no PPO run config found with the policy)")
    assert origins["data"] == "all from the defaults (no PPO run config found with the policy)"
    run = ({"model": {"name_or_path": "m"}, "ppo": {},
            "generation": {"max_new_tokens": 7, "top_k": 5}, "data": {"path": "p.jsonl"}},
           tmp_path / "config.yaml")
    # the loaded config set max_new_tokens (to its default, 32): it wins; top_k is the run's
    merged, _ = effective_config(cfg, run)
    assert (merged.generation.max_new_tokens, merged.generation.top_k) == (32, 5)
    assert merged.data.path == "p.jsonl" and merged.reward == RewardConfig()
    # sections built in Python: the keys that differ from the defaults count as set
    py = EvalConfig(policy="x", generation=GenerationConfig(top_k=3), data=DataConfig())
    merged, _ = effective_config(py, run)
    assert (merged.generation.max_new_tokens, merged.generation.top_k) == (7, 3)
    assert merged.data.path == "p.jsonl"
    # a combination the section's checks refuse names the key and where the other value came from
    bad = load_config(None, ["policy=x", "generation.min_new_tokens=10"], cls=EvalConfig)
    with pytest.raises(ConfigError) as e:
        effective_config(bad, run)
    assert str(e.value).startswith(
        "generation.min_new_tokens: expected an integer in [0, generation.max_new_tokens], got 10 "
        f"(from combining the generation keys set for evaluate, min_new_tokens, with the rest of "
        f"the PPO run's generation section in {tmp_path / 'config.yaml'}")


def test_a_config_file_mixing_ppo_and_evaluate_keys_is_refused(tmp_path, cli):
    f = tmp_path / "mixed.yaml"
    f.write_text("policy: x\nppo: {batch_size: 4}\n")
    res = cli("evaluate", "--config", f)
    assert res.returncode == 2 and (f"config file {str(f)!r}: mixes keys of a PPO run's config "
                                    "(ppo) with evaluate's (policy)") in res.stderr, res.stderr
    f.write_text("ppo: {batch_sise: 4}\ngeneration: {max_new_tokens: 4}\n")
    res = cli("evaluate", "--config", f, "policy=x")
    assert res.returncode == 2 and "(a PPO run's config): ppo.batch_sise: unknown key" in res.stderr


# --------------------------------------------------------------------------- unscored responses

SKIPPING_REWARD = """
def skip_even_prompts(prompts, completions, **kwargs):
    # TRL style: no score (None) for the prompts of even length
    return [None if len(p) % 2 == 0 else 1.0 for p in prompts]


def skip_all(completions, **kwargs):
    return [None] * len(completions)
"""


def test_evaluate_with_a_function_that_skips_responses(tmp_path, tiny_policy_dir):
    (tmp_path / "skip.py").write_text(SKIPPING_REWARD)
    fn = f"{tmp_path / 'skip.py'}:skip_even_prompts"
    summary, rows = evaluate(
        tmp_path / "out", tiny_policy_dir, f"reference={tiny_policy_dir}", "num_prompts=8",
        f"reward.sources=[{{function: '{fn}', weight: 2.0}}, "
        "{function: 'rlhf_ppo.rewards:response_length'}]")
    skipped = [len(r["prompt"]) % 2 == 0 for r in rows]
    assert any(skipped) and not all(skipped)
    for r, skip in zip(rows, skipped):
        words = len(r["policy_response"].split())
        assert r["policy_source_scores"] == [None if skip else 1.0, words]  # null in the file
        assert r["policy_score"] == words + (0.0 if skip else 2.0)  # left out of the sum
    src = summary["policy"]["sources"][0]
    assert src["mean"] == 1.0 and src["scored"] == pytest.approx(1 - np.mean(skipped))
    assert "scored" not in summary["policy"]["sources"][1]
    # a response that no source scores cannot be compared
    with pytest.raises(RewardError, match=r"^no reward source scored 4 of 4 responses"):
        evaluate(tmp_path / "none", tiny_policy_dir, f"reference={tiny_policy_dir}",
                 f"reward.sources=[{{function: '{tmp_path / 'skip.py'}:skip_all'}}]")


def test_a_ppo_config_given_as_config_names_the_reference_of_a_moved_policy(tmp_path, custom_run,
                                                                            tiny_policy_dir, cli):
    # the policy folder copied away from its run, without the run's config
    run, _, _ = custom_run
    moved = shutil.copytree(run / "final", tmp_path / "moved" / "final")
    (moved / "rlhf_ppo_config.yaml").unlink()
    assert find_run_config(moved) is None
    res = cli("evaluate", f"policy={moved}", f"output_dir={tmp_path / 'a'}", *RUN_SMALL)
    assert res.returncode == 2 and "reference: no PPO run config" in res.stderr
    res = cli("evaluate", "--config", run / "config.yaml", f"policy={moved}",
              f"output_dir={tmp_path / 'b'}", *RUN_SMALL)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["reference_path"] == tiny_policy_dir  # model.name_or_path of that config
    assert {r["prompt"] for r in map(json.loads, (tmp_path / "b" / "samples.jsonl").read_text()
                                     .splitlines())} == set(RUN_PROMPTS)


# --------------------------------------------------------------------------- accuracy and pass@k

@pytest.mark.parametrize("overrides, key", [
    (["samples_per_prompt=4", "pass_k=[5]"], "pass_k"),
    (["pass_k=[0]"], "pass_k"),
    (["pass_k=[]"], "pass_k"),
    (["accuracy_function=nocolon"], "accuracy_function"),
    (["accuracy_column=''"], "accuracy_column"),
])
def test_accuracy_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(None, ["policy=x", *overrides], cls=EvalConfig)


PARITY_CHECKER = """
def parity(prompts, responses, answer, **kwargs):
    # correct when the response's word count has the parity in the answer column
    return [1.0 if len(r.split()) % 2 == int(a) else 0.0 for r, a in zip(responses, answer)]
"""


def test_evaluate_reports_accuracy_and_pass_at_k(tmp_path, ppo_run, tiny_policy_dir, cli):
    from rlhf_ppo.ops import pass_at_k

    (tmp_path / "check.py").write_text(PARITY_CHECKER)
    data = tmp_path / "prompts.jsonl"
    prompts = ["the movie was", "i think the food is", "the day was", "my day was very",
               "the book is", "we feel the game was"]
    data.write_text("".join(json.dumps({"prompt": p, "solution": i % 2}) + "\n"
                            for i, p in enumerate(prompts)))
    out = tmp_path / "out"
    res = cli("evaluate", f"policy={ppo_run / 'final'}", f"output_dir={out}", *SMALL,
              "num_prompts=6", "samples_per_prompt=4", f"data.path={data}",
              "data.shuffle=false", "accuracy_column=solution",
              f"accuracy_function={tmp_path / 'check.py'}:parity")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 24
    for side in ("policy", "reference"):
        ok = [len(r[f"{side}_response"].split()) % 2 == r["prompt_index"] % 2 for r in rows]
        assert [r[f"{side}_correct"] for r in rows] == ok
        s = summary[side]
        assert s["accuracy"]["mean"] == pytest.approx(np.mean(ok))
        assert list(s["pass@k"]) == ["1", "2", "4"]
        counts = np.array(ok).reshape(6, 4).sum(1)
        for k in (1, 2, 4):
            want = np.mean([pass_at_k(4, int(c), k) for c in counts])
            assert s["pass@k"][str(k)]["mean"] == pytest.approx(want)
    p_ok = np.array([r["policy_correct"] for r in rows], dtype=float)
    r_ok = np.array([r["reference_correct"] for r in rows], dtype=float)
    assert summary["accuracy_diff"]["mean"] == pytest.approx(np.mean(p_ok - r_ok))
    assert "accuracy policy" in res.stdout and "pass@4" in res.stderr  # done line, log line
    page = (out / "report.html").read_text()
    assert "accuracy (mean, CI)" in page and "pass@4 (CI)" in page
    # without accuracy_column: no accuracy keys
    summary2, rows2 = evaluate(tmp_path / "plain", str(ppo_run / "final"))
    assert "accuracy" not in summary2["policy"] and "accuracy_diff" not in summary2
    assert "policy_correct" not in rows2[0]


def test_accuracy_column_missing_from_the_data_is_named(tmp_path, tiny_policy_dir):
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "the movie was", "answer": 1}) + "\n")
    with pytest.raises(ConfigError, match=r"^accuracy_column: the prompts have no column 'solution'"):
        evaluate(tmp_path / "out", tiny_policy_dir, f"reference={tiny_policy_dir}",
                 f"data.path={data}", "accuracy_column=solution")
