"""Friction a new user met (issue 26, item 4): data mostly ``<unk>`` warned about, a reward model
given as the policy refused, a mistyped local model path failing at once, and a run's saved
config that works from any working directory (evaluate, resume)."""

import json
import logging
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from rlhf_ppo import PPOTrainer, load_config
from rlhf_ppo.config import DataConfig, ModelConfig
from rlhf_ppo.data import UNKNOWN_SHARE_WARNING, load_prompts, unknown_token_id, warn_unknown_tokens
from rlhf_ppo.errors import ConfigError, ModelLoadError
from rlhf_ppo.loading import load_causal_lm, load_pretrained, local_reason
from rlhf_ppo.paths import absolute_paths

ROOT = Path(__file__).resolve().parents[1]
ISSUE_PROMPT = "The movie was great. I loved the acting!"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def unknown_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "unknown token" in r.getMessage()]


# --------------------------------------------------------------------------- 1. <unk> share

def test_prompts_mostly_unknown_words_warn_once_with_share_words_and_remedy(tmp_path, tok, caplog):
    # The word tokenizer splits on whitespace: The | movie | was | great. | I | loved | the |
    # acting!  ->  5 of the 8 words are not in its vocabulary ("great." is not "great").
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": ISSUE_PROMPT}] * 3)
    with caplog.at_level(logging.WARNING, logger="rlhf_ppo.data"):
        prompts = load_prompts(DataConfig(path=str(path)), tok)
    assert [tok.convert_ids_to_tokens(p.input_ids) for p in prompts][0] == [
        "<unk>", "movie", "was", "<unk>", "<unk>", "<unk>", "the", "<unk>"]
    (message,) = unknown_warnings(caplog)  # once per dataset, not once per row
    assert message.startswith(f"data.path {str(path)!r} (data.prompt_column 'prompt', prompts): "
                              "62% of the tokens (15 of 24) are the tokenizer's unknown token "
                              "'<unk>' (it replaced e.g. 'The', 'great.', 'I'), more than 5%")
    assert "Use a model whose tokenizer covers the data" in message
    assert "docs/data.md" in message


def test_the_tiny_datasets_stay_quiet(tok, caplog):
    with caplog.at_level(logging.WARNING, logger="rlhf_ppo.data"):
        load_prompts(DataConfig(path="builtin:tiny"), tok)
    assert unknown_warnings(caplog) == []


def test_threshold_is_a_share_strictly_above_five_percent(tok, caplog):
    unk = tok.unk_token_id
    known = tok.convert_tokens_to_ids("movie")
    assert UNKNOWN_SHARE_WARNING == 0.05
    with caplog.at_level(logging.WARNING, logger="rlhf_ppo.data"):
        # 1 of 20 = 5%: not above the threshold
        assert warn_unknown_tokens([[unk] + [known] * 9, [known] * 10], [], tok, "w") == 1 / 20
        assert unknown_warnings(caplog) == []
        # 2 of 20 = 10%
        assert warn_unknown_tokens([[unk, unk] + [known] * 8, [known] * 10], [], tok, "w") == 2 / 20
    assert unknown_warnings(caplog) == [
        "w: 10% of the tokens (2 of 20) are the tokenizer's unknown token '<unk>', more than 5%: the "
        "model cannot tell those words apart. Use a model whose tokenizer covers the data "
        "(model.name_or_path: a pretrained model); builtin:tiny knows 72 lowercase words of short "
        "reviews (docs/data.md, 'The built-in tiny vocabulary')"]


def test_an_unknown_token_shared_with_eos_is_not_counted():
    # GPT-2: unk, bos and eos are all <|endoftext|> (50256); counting it would count every EOS
    gpt2 = SimpleNamespace(unk_token_id=50256, eos_token_id=50256, bos_token_id=50256, pad_token_id=None)
    assert unknown_token_id(gpt2) is None
    assert warn_unknown_tokens([[50256] * 4], [], gpt2, "w") is None
    llama = SimpleNamespace(unk_token_id=0, eos_token_id=2, bos_token_id=1, pad_token_id=None)
    assert unknown_token_id(llama) == 0


def test_sft_and_reward_data_warn_naming_file_and_columns(tmp_path, tok, caplog):
    from rlhf_ppo import reward_training as rt
    from rlhf_ppo import sft

    sft_file = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "the movie was", "response": ISSUE_PROMPT}])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "the movie was",
                                                    "chosen": ISSUE_PROMPT, "rejected": "bad ."}])
    with caplog.at_level(logging.WARNING):
        sft.load_examples(sft.SFTDataConfig(path=str(sft_file), heldout_fraction=0), tok, 0)
        rt.load_pairs(rt.RewardDataConfig(path=str(pairs), heldout_fraction=0), rt.PairFormatter(tok), 0)
    sft_msg, pairs_msg = unknown_warnings(caplog)
    # sft: prompt 3 words + response 8 words + EOS = 12 tokens, 5 <unk>
    assert sft_msg.startswith(f"{str(sft_file)!r} (prompt-completion (standard): prompt 'prompt', "
                              "completion 'response'): 42% of the tokens (5 of 12)")
    # pairs: chosen 3 + 8 + EOS, rejected 3 + 2 + EOS = 18 tokens, 5 <unk>
    assert pairs_msg.startswith(f"{str(pairs)!r} (preference (standard): prompt 'prompt', chosen "
                                "'chosen', rejected 'rejected'): 28% of the tokens (5 of 18)")


# --------------------------------------------------------------------------- 2. classifier as policy

def test_a_reward_model_folder_is_refused_as_the_policy(tiny_reward_dir):
    with pytest.raises(ModelLoadError) as e:
        load_causal_lm(tiny_reward_dir, ModelConfig(name_or_path=tiny_reward_dir), "model.name_or_path")
    assert str(e.value) == (
        f"model.name_or_path: {tiny_reward_dir!r} is a sequence classifier (a reward model or critic: "
        "its config.json architectures are ['LlamaForSequenceClassification']); expected a causal "
        "language model (*ForCausalLM), such as the model the reward model was trained from. A "
        "reward model belongs in reward.sources: [{model: ...}]")


def test_a_classifier_without_architectures_is_refused_by_its_score_head(tmp_path, tiny_reward_dir):
    folder = tmp_path / "rm"
    shutil.copytree(tiny_reward_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    del config["architectures"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"model\.name_or_path: .* is a sequence classifier .*"
                                             r"a classifier head \(score\.weight\)"):
        load_causal_lm(str(folder), ModelConfig(name_or_path=str(folder)), "model.name_or_path")


def test_sft_refuses_a_reward_model_as_its_base(tiny_reward_dir):
    from rlhf_ppo import sft

    cfg = load_config(ROOT / "configs" / "sft_tiny.yaml", [f"model.name_or_path={tiny_reward_dir}"],
                      cls=sft.SFTConfig)
    with pytest.raises(ModelLoadError, match="model.name_or_path: .* is a sequence classifier"):
        sft.load_model(cfg)


def test_the_policy_still_loads(tiny_policy_dir):
    load_causal_lm(tiny_policy_dir, ModelConfig(name_or_path=tiny_policy_dir), "model.name_or_path")


# --------------------------------------------------------------------------- 3. missing local path

@pytest.mark.parametrize("name, reason", [
    ("./m", "it starts like a path"),
    ("~/m", "it starts like a path"),
    ("/abs/m", "it starts like a path"),
    ("runs/x/final", "a hub id has at most one '/'"),
    ("model.gguf", "it ends in a weight-file suffix"),
    ("runs/does_not_exist", "'runs' is a folder in the working directory"),
    ("gpt2", None),
    ("HuggingFaceTB/SmolLM2-135M", None),  # no folder HuggingFaceTB here: a hub id
    ("builtin:tiny", None),
])
def test_what_reads_as_a_local_path(tmp_path, monkeypatch, name, reason):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    got = local_reason(name)
    assert (got is None) if reason is None else got.startswith(reason), got


def test_a_missing_local_path_fails_at_once_without_asking_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    asked = []
    loader = lambda name, **kw: asked.append(name)  # noqa: E731  (stands for from_pretrained)
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as e:
        load_pretrained(loader, "runs/does_not_exist", "model.name_or_path")
    assert time.perf_counter() - start < 1 and asked == []
    assert str(e.value) == (
        f"model.name_or_path: folder 'runs/does_not_exist' not found (read as a local path: 'runs' is a "
        f"folder in the working directory {str(tmp_path)!r}); expected a folder with config.json "
        "and weights, a hub id ('org/name'), or builtin:tiny")
    # a hub id (no such folder here) still goes to the loader
    load_pretrained(loader, "HuggingFaceTB/SmolLM2-135M", "model.name_or_path")
    assert asked == ["HuggingFaceTB/SmolLM2-135M"]


# --------------------------------------------------------------------------- 4. saved paths

def test_absolute_paths_changes_existing_relative_paths_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("prompts.jsonl", "r.py", "tools.py"):
        (tmp_path / name).write_text("")
    (tmp_path / "policy").mkdir()
    data = {"output_dir": "policy", "model": {"name_or_path": "policy", "tokenizer": "gpt2",
                                              "gguf_file": "prompts.jsonl"},
            "data": {"path": "prompts.jsonl", "prompt_column": "policy"},
            "reward": {"sources": [{"function": "r.py:score", "kwargs": {"path": "prompts.jsonl"}},
                                   {"function": "rlhf_ppo.rewards:keyword_share"},
                                   {"model": "builtin:tiny-reward"}]},
            "agent": {"tools": ["tools.py:add", "missing.py:f"], "environment": "http://h:1/env"}}
    assert absolute_paths(data) == {
        "output_dir": f"{tmp_path}/policy",
        "model": {"name_or_path": f"{tmp_path}/policy", "tokenizer": "gpt2", "gguf_file": "prompts.jsonl"},
        "data": {"path": f"{tmp_path}/prompts.jsonl", "prompt_column": "policy"},
        "reward": {"sources": [{"function": f"{tmp_path}/r.py:score", "kwargs": {"path": "prompts.jsonl"}},
                               {"function": "rlhf_ppo.rewards:keyword_share"},
                               {"model": "builtin:tiny-reward"}]},
        "agent": {"tools": [f"{tmp_path}/tools.py:add", "missing.py:f"], "environment": "http://h:1/env"}}


REWARD = "def n_words(prompts, responses, **kwargs):\n    return [float(len(r.split())) for r in responses]\n"
RUN = ["ppo.batch_size=4", "ppo.num_minibatches=1", "ppo.forward.micro_batch_size=4", "ppo.ppo_epochs=1",
       "generation.max_new_tokens=4", "threads=1"]


@pytest.fixture
def relative_run(tmp_path, tiny_policy_dir, monkeypatch):
    """A 1-iteration PPO run started in ``tmp_path/start`` with every path relative: the policy
    (a link), the prompts, a reward function file and the output folder. Returns the start and
    another working directory."""
    start, other = tmp_path / "start", tmp_path / "other"
    start.mkdir(), other.mkdir()
    (start / "policy").symlink_to(tiny_policy_dir)
    write_jsonl(start / "prompts.jsonl", [{"prompt": p} for p in ("the movie was", "my day is",
                                                                   "the food was", "our game is")])
    (start / "reward.py").write_text(REWARD)
    monkeypatch.chdir(start)
    original = ["output_dir=run", "model.name_or_path=policy", "data.path=prompts.jsonl",
                "reward.sources=[{function: 'reward.py:n_words'}]", *RUN]
    PPOTrainer(load_config(ROOT / "configs" / "tiny.yaml", [*original, "iterations=1"])).train()
    return start, other, original


@pytest.mark.slow  # ~15 s: two tiny PPO runs, one resume
def test_a_runs_saved_config_resumes_from_any_directory(relative_run, monkeypatch):
    start, other, original = relative_run
    for saved in (start / "run" / "config.yaml",
                  start / "run" / "checkpoint-1" / "training_state" / "config.yaml",
                  start / "run" / "final" / "rlhf_ppo_config.yaml"):
        cfg = yaml.safe_load(saved.read_text())
        assert (cfg["output_dir"], cfg["model"]["name_or_path"], cfg["data"]["path"],
                cfg["reward"]["sources"][0]["function"]) == (
            str(start / "run"), str(start / "policy"), str(start / "prompts.jsonl"),
            f"{start / 'reward.py'}:n_words"), saved
    # from another directory, with the saved config
    monkeypatch.chdir(other)
    resumed = PPOTrainer(load_config(start / "run" / "config.yaml",
                                     ["iterations=2", "resume_from=latest"]))
    assert resumed.iteration == 1
    # from the original directory with the original relative paths: the same settings
    monkeypatch.chdir(start)
    assert PPOTrainer(load_config(ROOT / "configs" / "tiny.yaml",
                                  [*original, "iterations=2", "resume_from=latest"])).iteration == 1
    # ... and a real difference is still refused
    with pytest.raises(ConfigError, match=r"data\.path \(saved .*prompts\.jsonl', now .*other\.jsonl'\)"):
        write_jsonl(start / "other.jsonl", [{"prompt": "the day was"}])
        PPOTrainer(load_config(ROOT / "configs" / "tiny.yaml",
                               [*original, "data.path=other.jsonl", "iterations=2", "resume_from=latest"]))


@pytest.mark.slow  # ~15 s: a tiny PPO run and its evaluation
def test_evaluate_of_a_run_works_from_another_directory(relative_run, cli, monkeypatch):
    start, other, _ = relative_run
    monkeypatch.chdir(other)  # after the cli fixture's chdir to the repository root
    res = cli("evaluate", "--config", start / "run" / "config.yaml", f"policy={start / 'run' / 'final'}",
              f"output_dir={other / 'eval'}", "num_prompts=4", "samples_per_prompt=1", "batch_size=4",
              "bootstrap_samples=20")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((other / "eval" / "summary.json").read_text())
    assert summary["reference_path"] == str(start / "policy")
    assert summary["policy"]["sources"][0]["name"] == f"{start / 'reward.py'}:n_words"


def test_a_hub_id_that_fails_says_it_is_no_local_folder_either(tmp_path, monkeypatch):
    """`runs/x` with no `runs` folder here reads as a hub id (org/name); when the hub cannot give
    it, the error also says there is no such local folder, for the user who meant one."""
    from rlhf_ppo.loading import load_pretrained
    from rlhf_ppo.models import ModelLoadError

    monkeypatch.chdir(tmp_path)

    def offline(name, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")
    with pytest.raises(ModelLoadError, match=r"model.name_or_path: could not load 'runs/x' .*"
                       rf"no local folder '{tmp_path}/runs/x' either"):
        load_pretrained(offline, "runs/x", "model.name_or_path")
    (tmp_path / "org" / "name").mkdir(parents=True)  # a folder that exists is not said to be missing
    with pytest.raises(ModelLoadError) as e:
        load_pretrained(offline, "org/name", "model.name_or_path")
    assert "either" not in str(e.value)
