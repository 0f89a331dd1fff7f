"""Reward-model training: the Bradley-Terry loss, pairs formatted exactly as PPO's ModelReward
presents rollouts, a run that learns to rank held-out pairs and whose saved model ranks them the
same way through ModelReward, LoRA merged into a plain classifier, errors and the CLI."""

import json
import logging
import math
import random
from pathlib import Path

import pytest
import torch
from rollouts import rollout_of  # tests/rollouts.py

from rlhf_ppo import builtin
from rlhf_ppo import finetune as ft
from rlhf_ppo.config import (
    ConfigError,
    DataConfig,
    FinetuneOptimConfig,
    ModelConfig,
    PeftConfig,
    RewardSource,
    load_config,
)
from rlhf_ppo.data import DataError, Prompt, load_prompts
from rlhf_ppo.finetune import TrainConfig
from rlhf_ppo.models import load_tokenizer
from rlhf_ppo.reward_training import (
    PairFormatter,
    RewardDataConfig,
    RewardScorer,
    RewardTrainConfig,
    bradley_terry_loss,
    collate_pairs,
    encode_pairs,
    pair_loss,
    run_reward_training,
)
from rlhf_ppo.rewards import ModelReward

ROOT = Path(__file__).resolve().parents[1]
W = {w: i for i, w in enumerate(builtin.VOCAB_WORDS)}
PAD, EOS = W["<pad>"], W["<eos>"]
NEGATIVE_WORDS = ["bad", "sad", "boring", "awful", "worst", "dull"]


def ids(text: str) -> list[int]:
    return [W[w] for w in text.split()]


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    """A review prompt; chosen continues it with positive words, rejected with negative ones."""
    rng = random.Random(seed)

    def phrase(words):
        return " ".join(rng.choice(["very", "so", "really", "and"] + words) for _ in range(3)) \
            + " " + rng.choice(words) + " ."

    return [{"prompt": rng.choice(builtin.STEMS).format(s=rng.choice(builtin.SUBJECTS)),
             "chosen": phrase(builtin.POSITIVE_WORDS), "rejected": phrase(NEGATIVE_WORDS)}
            for _ in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these models are tiny, and on a shared machine a second thread spends
    its time waiting at every op's barrier."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rm_cfg(start: str, path: str, out: Path, **kw) -> RewardTrainConfig:
    train = dict(epochs=1, batch_size=16, micro_batch_size=16, lr=3e-3)
    train.update(kw.pop("train", {}))
    optim = {k: train.pop(k) for k in ("lr", "weight_decay", "max_grad_norm", "scheduler",
                                       "warmup_steps") if k in train}
    return RewardTrainConfig(output_dir=str(out), model=ModelConfig(name_or_path=start),
                             data=RewardDataConfig(path=path, max_length=32, **kw.pop("data", {})),
                             train=TrainConfig(**train), optim=FinetuneOptimConfig(**optim), **kw)


# --------------------------------------------------------------------------- the loss

def test_bradley_terry_loss_against_hand_values():
    chosen, rejected = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 0.0, 3.0])
    # -log sigmoid(d) = log(1 + exp(-d)), d = r_c - r_r - m
    want = torch.tensor([math.log(1 + math.exp(-1.0)), math.log(2.0), math.log(1 + math.exp(4.0))])
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected), want)
    margin = torch.tensor([0.5, -1.0, 0.0])
    want_m = torch.tensor([math.log(1 + math.exp(-0.5)), math.log(1 + math.exp(-1.0)),
                           math.log(1 + math.exp(4.0))])
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected, margin), want_m)
    # Finite for a huge gap in the wrong direction (no log(0)).
    assert bradley_terry_loss(torch.tensor([-1e4]), torch.tensor([1e4])).item() == pytest.approx(2e4)


# --------------------------------------------------------------------------- formatting

def test_pairs_are_prompt_ids_then_response_ids_then_eos(tok):
    f = PairFormatter(tok)
    assert f.encode("the day was", "good .", 0, "c") == ids("the day was good .") + [EOS]
    # Chat: the prompt through the template with the generation prompt, the last assistant
    # message as the response.
    conv = [{"role": "user", "content": "the day was"}, {"role": "assistant", "content": "fun"}]
    assert f.encode(None, conv, 0, "c") == ids("user : the day was assistant : fun") + [EOS]
    assert f.encode("the day was", [conv[1]], 0, "c") == ids("user : the day was assistant : fun") + [EOS]
    no_eos = PairFormatter(tok, append_eos=False)
    assert no_eos.encode("the day was", "good", 0, "c") == ids("the day was good")




@pytest.mark.parametrize("reward_tokenizer", ["same", "char", "char+chat"])
def test_pairs_match_what_model_reward_scores(tok, tiny_policy_dir, char_reward_dir, tmp_path,
                                              reward_tokenizer):
    """The ids a pair is trained on are the ids ModelReward builds from the PPO rollout of the
    same prompt and response: same tokenizer (the rollout's ids), or another (re-tokenized text,
    with or without a chat template)."""
    rm_dir = {"same": tiny_policy_dir, "char": char_reward_dir}.get(reward_tokenizer)
    if reward_tokenizer == "char+chat":
        char = builtin.build_char_tokenizer()
        char.chat_template = builtin.CHAT_TEMPLATE
        rm_dir = str(builtin.build_tiny_model(tmp_path / "rm", task="reward", tokenizer=char,
                                              bos_token_id=None, eos_token_id=None))
    if reward_tokenizer == "same":
        rm_dir = str(builtin.build_tiny_model(tmp_path / "rm", task="reward"))
    reward = ModelReward(RewardSource(model=rm_dir), "reward.sources[0]", ModelConfig(), tok, 4)
    rows = [{"prompt": "i think the movie is", "response": "good and fun ."},
            {"prompt": [{"role": "user", "content": "the day was"}], "response": "very nice"}]
    chat_text = tok.apply_chat_template(rows[1]["prompt"], tokenize=False, add_generation_prompt=True)
    prompts = load_prompts(DataConfig(path=write_jsonl(tmp_path / "p.jsonl", rows[:1])), tok) + \
        [Prompt(chat_text, tok(chat_text, add_special_tokens=False)["input_ids"], rows[1]["prompt"])]
    rollout = rollout_of(tok, prompts, [r["response"] for r in rows])
    want_ids, want_mask = reward._inputs(rollout)
    f = PairFormatter(reward.tokenizer, tok)
    assert f.same_tokenizer == (reward_tokenizer == "same")
    for i, r in enumerate(rows):
        got = f.encode(r["prompt"], r["response"], i, "chosen")
        assert got == want_ids[i][want_mask[i].bool()].tolist()


# --------------------------------------------------------------------------- a run

@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_policy_dir):
    """A reward model trained from the tiny causal LM (new score head) on 192 pairs, with 48 held
    out in a separate file."""
    d = tmp_path_factory.mktemp("rm_run")
    rows = preference_rows(240)
    train, held = write_jsonl(d / "train.jsonl", rows[:192]), write_jsonl(d / "held.jsonl", rows[192:])
    cfg = rm_cfg(tiny_policy_dir, train, d / "out", data=dict(heldout_path=held), train=dict(epochs=2))
    return run_reward_training(cfg), rows[192:], d / "out"


def test_reward_training_learns_to_rank_heldout_pairs(trained):
    out, _, folder = trained
    assert out["heldout_pairs"] == 48 and out["train_pairs"] == 192 and out["steps"] == 24
    assert out["heldout_accuracy"] >= 0.9 and out["heldout_accuracy"] > out["heldout_accuracy_before"]
    assert out["heldout_loss"] < out["heldout_loss_before"] < 1.0  # ~log 2 at a random head
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == list(range(1, 25))
    evals = {m["stage"]: (m["heldout_accuracy"], m["heldout_loss"]) for m in lines if "heldout_loss" in m}
    assert evals == {"before": (out["heldout_accuracy_before"], out["heldout_loss_before"]),
                     "after": (out["heldout_accuracy"], out["heldout_loss"])}


def test_ppo_model_reward_scores_the_saved_model_as_trained(trained, tok, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out, held, _ = trained
    final = out["output"]
    model = AutoModelForSequenceClassification.from_pretrained(final)
    assert model.config.num_labels == 1 and model.config.pad_token_id == PAD
    # PPO's path: the held-out prompts through load_prompts, the responses as generated tokens.
    reward = ModelReward(RewardSource(model=final), "reward.sources[0]", ModelConfig(), tok, 16)
    prompts = load_prompts(DataConfig(path=write_jsonl(tmp_path / "p.jsonl", held),
                                      max_prompt_length=32), tok)
    chosen = reward(rollout_of(tok, prompts, [r["chosen"] for r in held]))
    rejected = reward(rollout_of(tok, prompts, [r["rejected"] for r in held]))
    assert (chosen > rejected).float().mean().item() == pytest.approx(out["heldout_accuracy"])
    # ... and the very scores training computed for those pairs.
    pairs = encode_pairs(ft.load_table(str(tmp_path / "p.jsonl"), "train", "data.path"),
                         PairFormatter(tok), RewardDataConfig(path="x"), "held")
    batch = collate_pairs(pairs, PAD)
    with torch.no_grad():
        scores = RewardScorer(model.eval())(batch["input_ids"], batch["attention_mask"])
        loss, _ = pair_loss(RewardScorer(model.eval()), batch)
    torch.testing.assert_close(scores, torch.cat([chosen, rejected]), atol=1e-5, rtol=1e-5)
    assert loss.item() / len(held) == pytest.approx(out["heldout_loss"], rel=1e-4)


def test_lora_reward_model_is_saved_merged_as_a_plain_classifier(tmp_path, tiny_reward_dir):
    from transformers import AutoModelForSequenceClassification

    path = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(80, seed=3))
    cfg = rm_cfg(tiny_reward_dir, path, tmp_path / "out", data=dict(heldout_fraction=0.25),
                 peft=PeftConfig(enabled=True, r=4), train=dict(epochs=2, batch_size=20, micro_batch_size=10))
    out = run_reward_training(cfg)
    final = Path(out["output"])
    assert not (final / "adapter_config.json").exists()
    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    # The merged weights give the accuracy measured on the PEFT model (same held-out split).
    _, held = ft.split_heldout(encode_pairs(ft.load_table(path, "train", "data.path"),
                                         PairFormatter(load_tokenizer(ModelConfig(name_or_path=str(final)))),
                                         RewardDataConfig(path=path), "p"), 0.25, 0)
    batch = collate_pairs(held, PAD)
    with torch.no_grad():
        loss, stats = pair_loss(RewardScorer(model), batch)
    assert stats["accuracy"].item() / len(held) == pytest.approx(out["heldout_accuracy"])
    assert loss.item() / len(held) == pytest.approx(out["heldout_loss"], rel=1e-4)
    assert out["heldout_loss"] < out["heldout_loss_before"]


# --------------------------------------------------------------------------- data handling

def test_margin_column_and_dropped_pairs_are_reported(tok, tmp_path, caplog):
    rows = [{"prompt": "the day was", "chosen": "good .", "rejected": "bad .", "margin": 1.5},
            {"prompt": "the day was", "chosen": "fun .", "rejected": "fun .", "margin": 0},
            {"prompt": "the day was", "chosen": " ".join(["good"] * 40), "rejected": "bad", "margin": 2}]
    ds = ft.load_table(write_jsonl(tmp_path / "d.jsonl", rows), "train", "data.path")
    with caplog.at_level(logging.WARNING):
        pairs = encode_pairs(ds, PairFormatter(tok), RewardDataConfig(path="x", max_length=16), "'d'")
    assert [(p.chosen, p.rejected, p.margin) for p in pairs] == [
        (ids("the day was good .") + [EOS], ids("the day was bad .") + [EOS], 1.5)]
    assert "dropped 1 of 3 pairs whose 'chosen' and 'rejected' are identical" in caplog.text
    assert "dropped 1 of 3 pairs longer than data.max_length=16" in caplog.text
    # Cut instead: the last 16 tokens, so the scored end (EOS) stays.
    cut = encode_pairs(ds, PairFormatter(tok), RewardDataConfig(path="x", max_length=16,
                                                                truncate_long=True), "'d'")
    assert cut[1].chosen == ids(" ".join(["good"] * 15)) + [EOS]
    batch = collate_pairs(pairs, PAD)
    assert batch["margin"].tolist() == [1.5]


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "a", "good": "fun", "rejected": "bad"}],
     "data.chosen_column: 'd' has columns ['prompt', 'good', 'rejected'], which fit no format"),
    ([{"chosen": "fun", "rejected": "fun"}],
     "'d': no usable pair (every pair is identical chosen and rejected)"),
    ([{"chosen": "fun", "rejected": "bad", "margin": "big"}], "data.margin_column 'margin': row 0 of 'd'"),
    ([{"chosen": "fun", "rejected": 3}], "data.rejected_column 'rejected': row 0 is int"),
    ([{"chosen": [{"role": "user", "content": "hi"}], "rejected": "bad"}],
     "data.chosen_column 'chosen': row 0 is a conversation that does not end with an assistant"),
])
def test_bad_pairs_name_the_column(tok, tmp_path, rows, message):
    ds = ft.load_table(write_jsonl(tmp_path / "d.jsonl", rows), "train", "data.path")
    with pytest.raises(DataError) as e:
        encode_pairs(ds, PairFormatter(tok), RewardDataConfig(path="x"), "'d'")
    assert message in str(e.value)


def test_missing_eval_file_names_the_key(tmp_path, tiny_policy_dir):
    path = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(8))
    cfg = rm_cfg(tiny_policy_dir, path, tmp_path / "out", data=dict(heldout_path=str(tmp_path / "no.jsonl")))
    with pytest.raises(DataError, match="data.heldout_path: file .*no.jsonl.* not found"):
        run_reward_training(cfg)


@pytest.mark.parametrize("override, message", [
    ("data.rejected_column=chosen", "data.rejected_column: expected a column other than data.chosen_column"),
    ("peft.adapter_path=x", "peft.adapter_path: expected null unless peft.enabled is true"),
    ("model.critic=separate", "model.critic: expected 'shared' (not used by `rlhf-ppo reward`)"),
    ("model.gguf_file=m.gguf", "model.gguf_file: expected null (not used by `rlhf-ppo reward`)"),
    ("optim.lr=0", "optim.lr: expected a number > 0"),
])
def test_bad_config_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs" / "reward_tiny.yaml", [override], cls=RewardTrainConfig)
    assert message in str(e.value)


# --------------------------------------------------------------------------- CLI

def test_cli_reward_runs_the_example_config_and_refuses_bad_keys(tmp_path, tiny_policy_dir, cli):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = ROOT / "configs" / "reward_tiny.yaml"
    overrides = [f"output_dir={tmp_path}", f"model.name_or_path={tiny_policy_dir}",
                 f"data.path={ROOT / 'configs' / 'data' / 'pairs_tiny.jsonl'}", "train.max_steps=2"]
    out = cli("reward", "--config", config, *overrides)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == [1, 2]  # train.max_steps
    evals = {m["stage"]: m for m in lines if "heldout_loss" in m}
    assert evals.keys() == {"before", "after"}
    # the closing line reports this run's held-out numbers
    done = out.stdout.splitlines()[-1]
    assert done.startswith("done: ") and "steps 2," in done, done
    after = evals["after"]
    assert f"heldout_accuracy {round(after['heldout_accuracy'], 4)}," in done, done
    assert f"heldout_loss {round(after['heldout_loss'], 4)}," in done, done
    # the run's config: the overrides over the --config file
    assert load_config(tmp_path / "config.yaml", cls=RewardTrainConfig).to_dict() == \
        load_config(config, overrides, cls=RewardTrainConfig).to_dict()
    # a one-output classifier whose backbone was trained from the policy's weights
    rm = AutoModelForSequenceClassification.from_pretrained(tmp_path / "final")
    assert rm.config.num_labels == 1
    initial = AutoModelForCausalLM.from_pretrained(tiny_policy_dir).model.state_dict()
    trained = rm.model.state_dict()
    assert trained.keys() == initial.keys()
    assert any(not torch.equal(v, trained[k]) for k, v in initial.items())
    out = cli("reward", "--config", config, "data.chosen=x")
    assert out.returncode == 2 and "data.chosen: unknown key" in out.stderr
