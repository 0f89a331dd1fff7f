"""Supervised fine-tuning: response-only labels (prompt/response and chat), packing, the loss,
micro-batch invariance, a run that lowers the held-out loss and saves a model PPO loads, errors
and the CLI."""

import json
import logging
import random
from pathlib import Path

import pytest
import torch

from rlhf_ppo import builtin
from rlhf_ppo import finetune as ft
from rlhf_ppo.config import ConfigError, FinetuneOptimConfig, ModelConfig, PeftConfig, load_config
from rlhf_ppo.data import DataError
from rlhf_ppo.finetune import TrainConfig
from rlhf_ppo.models import build_actor_critic, load_causal_lm, load_tokenizer
from rlhf_ppo.sft import (
    IGNORE_INDEX,
    CausalLMLoss,
    SFTConfig,
    SFTDataConfig,
    collate,
    encode_chat,
    encode_prompt_response,
    encode_rows,
    fit_length,
    label_count,
    lm_loss,
    pack,
    run_sft,
)

ROOT = Path(__file__).resolve().parents[1]
W = {w: i for i, w in enumerate(builtin.VOCAB_WORDS)}  # word -> id of the built-in tokenizer
PAD, EOS, X = W["<pad>"], W["<eos>"], IGNORE_INDEX


def ids(text: str) -> list[int]:
    return [W[w] for w in text.split()]


def review_rows(n: int, seed: int = 0) -> list[dict]:
    """Prompts such as "i think the movie is" with 2-4 positive words and a full stop."""
    rng = random.Random(seed)
    return [{"prompt": rng.choice(builtin.STEMS).format(s=rng.choice(builtin.SUBJECTS)),
             "response": " ".join(rng.choice(builtin.POSITIVE_WORDS)
                                  for _ in range(rng.randint(2, 4))) + " ."}
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


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("sft_data") / "reviews.jsonl", review_rows(240))


def sft_cfg(policy: str, path: str, out: Path, **kw) -> SFTConfig:
    train = dict(epochs=1, batch_size=16, micro_batch_size=8, lr=3e-3)
    train.update(kw.pop("train", {}))
    optim = {k: train.pop(k) for k in ("lr", "weight_decay", "max_grad_norm", "scheduler",
                                       "warmup_steps") if k in train}
    return SFTConfig(output_dir=str(out), model=ModelConfig(name_or_path=policy),
                     data=SFTDataConfig(path=path, max_length=32, **kw.pop("data", {})),
                     train=TrainConfig(**train), optim=FinetuneOptimConfig(**optim), **kw)


# --------------------------------------------------------------------------- labels

def test_labels_mask_exactly_the_prompt_and_padding(tok):
    data = SFTDataConfig(path="x")
    a = encode_prompt_response("i think the movie is", "good .", tok, 0, data)
    b = encode_prompt_response("the food was", "very bad !", tok, 1, data)
    # The word tokenizer adds no BOS; the response's tokens then EOS carry the loss.
    assert a.input_ids == ids("i think the movie is good .") + [EOS]
    assert a.labels == [X] * 5 + ids("good .") + [EOS]
    assert b.labels == [X] * 3 + ids("very bad !") + [EOS]
    batch = collate([a, b], PAD, packed=False)
    assert batch["input_ids"].tolist() == [a.input_ids, b.input_ids + [PAD]]
    assert batch["labels"].tolist() == [a.labels, b.labels + [X]]
    assert batch["attention_mask"].tolist() == [[1] * 8, [1] * 7 + [0]]
    assert batch["position_ids"].tolist() == [list(range(8)), list(range(7)) + [0]]
    assert label_count(batch) == 3 + 4


def test_chat_labels_cover_every_assistant_turn_and_eos(tok):
    data = SFTDataConfig(path="x")
    msgs = [{"role": "user", "content": "the movie was"}, {"role": "assistant", "content": "good"},
            {"role": "user", "content": "and the food"}, {"role": "assistant", "content": "bad ."}]
    ex = encode_chat(msgs, tok, 0, data)
    # builtin template: "user : the movie was assistant : good user : and the food assistant :
    # bad . " -- it marks no end of turn, so EOS is appended (learned) after the last turn.
    assert ex.input_ids == ids("user : the movie was assistant : good user : and the food "
                               "assistant : bad .") + [EOS]
    assert ex.labels == [X] * 7 + ids("good") + [X] * 7 + ids("bad .") + [EOS]


def test_chat_labels_include_the_templates_own_end_of_turn(tok):
    tok2 = builtin.build_word_tokenizer()
    tok2.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }}"
                          "{% if m['role'] == 'assistant' %} <eos>{% endif %} {% endfor %}"
                          "{% if add_generation_prompt %}assistant :{% endif %}")
    msgs = [{"role": "user", "content": "the day was"}, {"role": "assistant", "content": "fun"}]
    ex = encode_chat(msgs, tok2, 0, SFTDataConfig(path="x"))
    assert ex.input_ids == ids("user : the day was assistant : fun") + [EOS]  # no second EOS
    assert ex.labels == [X] * 7 + ids("fun") + [EOS]


# --------------------------------------------------------------------------- packing and loss

def test_packing_keeps_the_labels_and_restarts_positions(tok):
    data = SFTDataConfig(path="x")
    exs = [encode_prompt_response(r["prompt"], r["response"], tok, i, data)
           for i, r in enumerate(review_rows(12))]
    blocks = pack(exs, 24, seed=0)
    assert all(len(b.input_ids) <= 24 for b in blocks) and len(blocks) < len(exs)
    # Every example appears once, whole: its ids, labels and positions 0..n-1 in a block.
    pieces = []
    for b in blocks:
        starts = [i for i, p in enumerate(b.position_ids) if p == 0] + [len(b.input_ids)]
        for s, e in zip(starts, starts[1:]):
            pieces.append((b.input_ids[s:e], b.labels[s:e], b.position_ids[s:e]))
    want = sorted((x.input_ids, x.labels, x.position_ids) for x in exs)
    assert sorted(pieces) == want


def test_packed_loss_equals_the_sum_of_separate_losses(tok, tiny_policy_dir):
    # Positions restart per example, so attention stays inside each one: the packed block's
    # summed NLL is the sum of the examples' own.
    data = SFTDataConfig(path="x")
    exs = [encode_prompt_response(r["prompt"], r["response"], tok, i, data)
           for i, r in enumerate(review_rows(3, seed=1))]
    model = CausalLMLoss(load_causal_lm(tiny_policy_dir, ModelConfig(), "m")).eval()
    with torch.no_grad():
        separate = sum(lm_loss(model, collate([x], PAD, packed=False))[0] for x in exs)
        packed = lm_loss(model, collate(pack(exs, 64, seed=0), PAD, packed=True))[0]
        padded = lm_loss(model, collate(exs, PAD, packed=False))[0]
    torch.testing.assert_close(packed, separate)
    torch.testing.assert_close(padded, separate)


def test_a_step_does_not_depend_on_the_micro_batch_size(tok, tiny_policy_dir):
    data = SFTDataConfig(path="x")
    exs = [encode_prompt_response(r["prompt"], r["response"], tok, i, data)
           for i, r in enumerate(review_rows(6, seed=2))]
    from rlhf_ppo.distributed import make_accelerator

    acc = make_accelerator(None)
    after = []
    for micro in (6, 4, 1):
        module = CausalLMLoss(load_causal_lm(tiny_policy_dir, ModelConfig(), "m"))
        opt = torch.optim.SGD(module.parameters(), lr=1.0)  # params move by exactly -grad
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        mbs = [collate(exs[s:s + micro], PAD, packed=False) for s in range(0, 6, micro)]
        m = ft.train_step(acc, module, opt, sched, mbs, [label_count(b) for b in mbs], lm_loss,
                          None)
        after.append((m["loss"], torch.cat([p.detach().flatten() for p in module.parameters()])))
    for loss, params in after[1:]:
        assert loss == pytest.approx(after[0][0], rel=1e-5)
        torch.testing.assert_close(params, after[0][1])


# --------------------------------------------------------------------------- a run

def test_sft_lowers_the_heldout_loss_and_saves_a_model_ppo_loads(tmp_path, tiny_policy_dir, reviews,
                                                                 tok):
    from transformers import AutoModelForCausalLM

    cfg = sft_cfg(tiny_policy_dir, reviews, tmp_path, train=dict(micro_batch_size=16))
    out = run_sft(cfg)
    # 2-4 words drawn uniformly from 8, then "." and EOS: the best possible loss is ~1.6 nats
    # per token; the random init starts near ln(81) ~ 4.4.
    assert out["heldout_loss_before"] > 4.0 and out["heldout_loss_after"] < 3.0
    assert out["train_loss_last"] < out["train_loss_first"] - 1.0
    # 240 rows: 24 held out, 216 in ceil(216 / 16) = 14 steps.
    assert out["train_examples"] == 216 and out["heldout_examples"] == 24 and out["steps"] == 14
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 15))
    assert all(m["lr"] > 0 and m["tokens"] > 0 for m in steps)
    evals = {m["stage"]: m["heldout_loss"] for m in lines if "heldout_loss" in m}
    assert evals == {"before": out["heldout_loss_before"], "after": out["heldout_loss_after"]}
    final = Path(out["output"])
    assert final == tmp_path / "final"
    AutoModelForCausalLM.from_pretrained(final)
    ac, _ = build_actor_critic(ModelConfig(name_or_path=str(final)))  # PPO's loading path
    saved_tok = load_tokenizer(ModelConfig(name_or_path=str(final)))
    assert saved_tok.get_vocab() == tok.get_vocab()
    # The saved weights are the trained ones: the held-out loss under them is the reported one.
    held = SFTDataConfig(path=reviews, max_length=32)
    rows = ft.load_table(reviews, "train", "data.path")
    _, eval_ex = ft.split_heldout(encode_rows(rows, saved_tok, held, "reviews"), 0.1, 0)
    batch = collate(eval_ex, PAD, packed=False)
    with torch.no_grad():
        loss = lm_loss(CausalLMLoss(ac.policy).eval(), batch)[0] / label_count(batch)
    assert loss.item() == pytest.approx(out["heldout_loss_after"], rel=1e-4)


def test_lora_sft_saves_an_adapter_that_ppo_starts_from(tmp_path, tiny_policy_dir, reviews):
    from transformers import AutoModelForCausalLM

    cfg = sft_cfg(tiny_policy_dir, reviews, tmp_path, data=dict(packing=True),
                  train=dict(max_steps=4, micro_batch_size=4),
                  peft=PeftConfig(enabled=True, r=4, save_merged=True))
    out = run_sft(cfg)
    assert out["heldout_loss_after"] < out["heldout_loss_before"]
    final = Path(out["output"])
    assert out["merged"] == str(final / "merged")
    assert (final / "adapter_config.json").is_file() and (final / "merged" / "config.json").is_file()
    # PPO: the SFT adapter becomes the frozen reference and a trainable copy of it the policy.
    ac, ref = build_actor_critic(ModelConfig(name_or_path=tiny_policy_dir),
                                 PeftConfig(enabled=True, adapter_path=str(final)))
    merged = AutoModelForCausalLM.from_pretrained(final / "merged").eval()
    x = torch.tensor([ids("i think the movie is good")])
    with torch.no_grad():
        torch.testing.assert_close(ac.policy(input_ids=x).logits, merged(input_ids=x).logits)


def test_lora_sft_adapter_of_a_builtin_base_is_portable(tmp_path, reviews):
    """The adapter names its base `builtin:tiny` (as the config did), not the cache folder that
    name resolved to on this machine; load_policy resolves it again."""
    import json

    from rlhf_ppo import load_policy

    out = run_sft(sft_cfg("builtin:tiny", reviews, tmp_path, train=dict(max_steps=1),
                          peft=PeftConfig(enabled=True, r=4)))
    final = Path(out["output"])
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] \
        == "builtin:tiny"
    policy = load_policy(final)
    assert type(policy).__name__ == "PeftModelForCausalLM" and policy.active_adapter == "default"


# --------------------------------------------------------------------------- errors

def test_long_examples_are_dropped_or_cut_with_a_log_line(tok, tmp_path, caplog):
    rows = [{"prompt": "the day was", "response": "good ."},
            {"prompt": "the day was", "response": " ".join(["fun"] * 20)}]
    ds = ft.load_table(write_jsonl(tmp_path / "d.jsonl", rows), "train", "data.path")
    with caplog.at_level(logging.WARNING):
        kept = encode_rows(ds, tok, SFTDataConfig(path="x", max_length=10), "'d.jsonl'")
    assert len(kept) == 1 and "dropped 1 of 2 examples longer than data.max_length=10" in caplog.text
    cut = encode_rows(ds, tok, SFTDataConfig(path="x", max_length=10, truncate_long=True), "d")
    assert [len(x.input_ids) for x in cut] == [6, 10]
    assert cut[1].labels == [X] * 3 + [W["fun"]] * 7  # the first 10 tokens; no EOS survives
    # Cut inside the prompt: no response token is left, so it is dropped even when cutting.
    ex = encode_prompt_response("i think the movie is", "good", tok, 0, SFTDataConfig(path="x"))
    assert fit_length(ex, 5, truncate=True) is None
    with pytest.raises(DataError, match="every example of 'd.jsonl' is longer"):
        encode_rows(ds, tok, SFTDataConfig(path="x", max_length=4), "'d.jsonl'")


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "the day was", "answer": "good"}],
     "data.response_column: 'd.jsonl' has columns ['prompt', 'answer'], which fit no format"),
    ([{"prompt": "the day was", "response": ""}], "data.response_column 'response': row 0"),
    ([{"prompt": "", "response": "good"}], "data.prompt_column 'prompt': row 0 is an empty prompt"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], "row 0 has no assistant turn"),
    ([{"messages": "the day was good"}], "data.messages_column 'messages': row 0 is str"),
])
def test_bad_rows_name_the_column(tok, tmp_path, rows, message):
    ds = ft.load_table(write_jsonl(tmp_path / "d.jsonl", rows), "train", "data.path")
    with pytest.raises(DataError) as e:
        encode_rows(ds, tok, SFTDataConfig(path="x"), "'d.jsonl'")
    assert message in str(e.value)


def test_missing_or_empty_files_name_the_key(tmp_path, tiny_policy_dir):
    (tmp_path / "empty.jsonl").write_text("")
    missing = sft_cfg(tiny_policy_dir, str(tmp_path / "nope.jsonl"), tmp_path / "a")
    with pytest.raises(DataError, match="data.path: file .*nope.jsonl.* not found"):
        run_sft(missing)
    empty = sft_cfg(tiny_policy_dir, str(tmp_path / "empty.jsonl"), tmp_path / "b")
    with pytest.raises(DataError, match="empty.jsonl"):
        run_sft(empty)


@pytest.mark.parametrize("override, message", [
    ("data.heldout_fraction=1.5", "data.heldout_fraction: expected a number in [0, 1)"),
    ("train.micro_batch_size=0", "train.micro_batch_size: expected an integer >= 1"),
    ("model.ref_name_or_path=x", "model.ref_name_or_path: expected null (not used by `rlhf-ppo sft`)"),
    ("data.pack=true", "data.pack: unknown key"),
    ("data.path=null", "data.path: expected a .json"),
])
def test_bad_config_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs" / "sft_tiny.yaml", [override], cls=SFTConfig)
    assert message in str(e.value)


# --------------------------------------------------------------------------- CLI

def test_cli_sft_runs_the_example_config_and_refuses_bad_keys(tmp_path, tiny_policy_dir, cli):
    from transformers import AutoModelForCausalLM

    config = ROOT / "configs" / "sft_tiny.yaml"
    overrides = [f"output_dir={tmp_path}", f"model.name_or_path={tiny_policy_dir}",
                 f"data.path={ROOT / 'configs' / 'data' / 'sft_tiny.jsonl'}", "train.max_steps=3"]
    out = cli("sft", "--config", config, *overrides)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == [1, 2, 3]  # train.max_steps
    evals = {m["stage"]: m["heldout_loss"] for m in lines if "heldout_loss" in m}
    assert evals.keys() == {"before", "after"} and evals["after"] < evals["before"]
    # the closing line reports this run
    done = out.stdout.splitlines()[-1]
    assert done.startswith("done: ") and "steps 3," in done, done
    assert f"heldout_loss_before {round(evals['before'], 4)}," in done, done
    assert f"heldout_loss_after {round(evals['after'], 4)}," in done, done
    assert f"output {tmp_path / 'final'}," in done, done
    # the run's config: the overrides over the --config file
    assert load_config(tmp_path / "config.yaml", cls=SFTConfig).to_dict() == \
        load_config(config, overrides, cls=SFTConfig).to_dict()
    # the trained weights are saved
    initial = AutoModelForCausalLM.from_pretrained(tiny_policy_dir).state_dict()
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "final").state_dict()
    assert any(not torch.equal(v, final[k]) for k, v in initial.items())
    metrics = (tmp_path / "metrics.jsonl").read_text()
    out = cli("sft", "--config", config, *overrides)
    assert out.returncode == 2  # the folder holds a run now
    assert "holds a run (metrics.jsonl, final, config.yaml)" in out.stderr
    out = cli("sft", "--config", config, *overrides, "overwrite=true", "train.lrr=1")
    assert out.returncode == 2 and "train.lrr: unknown key" in out.stderr
    assert (tmp_path / "metrics.jsonl").read_text() == metrics  # refused: the run is untouched


def test_overwrite_clears_only_the_runs_files(tmp_path):
    for name in ("metrics.jsonl", "config.yaml", "notes.txt"):
        (tmp_path / name).write_text("x")
    (tmp_path / "final").mkdir()
    from rlhf_ppo.runs import FINETUNE_RUN_FILES, clear_run, prepare_output_dir

    with pytest.raises(ConfigError, match="holds a run"):
        prepare_output_dir(str(tmp_path), False, FINETUNE_RUN_FILES)
    prepare_output_dir(str(tmp_path), True, FINETUNE_RUN_FILES)  # allowed; the caller clears
    clear_run(tmp_path, FINETUNE_RUN_FILES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_renamed_keys_still_work_with_a_warning(tmp_path):
    """`train.lr` moved to the shared `optim` section, `data.eval_*` became `data.heldout_*`:
    the old keys keep working (with a FutureWarning naming the new one); both at once in one
    file or among the overrides is an error; an override under the old name replaces the
    file's value under the new one."""
    old = ["data.path=x.jsonl", "train.lr=0.01", "train.scheduler=cosine",
           "data.eval_fraction=0.2", "train.eval_batch_size=7", f"output_dir={tmp_path}"]
    with pytest.warns(FutureWarning, match="train.lr is deprecated .* use optim.lr"):
        cfg = load_config(None, old, cls=SFTConfig)
    assert (cfg.optim.lr, cfg.optim.scheduler) == (0.01, "cosine")
    assert (cfg.data.heldout_fraction, cfg.train.heldout_batch_size) == (0.2, 7)
    with pytest.raises(ConfigError, match="train.lr: renamed to optim.lr, and both are set"):
        load_config(None, ["train.lr=0.01", "optim.lr=0.02"], cls=SFTConfig)
    with pytest.warns(FutureWarning, match="train.lr is deprecated"):
        cfg = load_config(ROOT / "configs" / "sft_tiny.yaml", ["train.lr=0.01"], cls=SFTConfig)
    assert cfg.optim.lr == 0.01


def test_cli_sft_with_bf16_autocast(tmp_path, tiny_policy_dir, cli, fresh_accelerate_state,
                                    monkeypatch):
    # fresh_accelerate_state: accelerate fixes the precision once per process
    from safetensors import safe_open

    import rlhf_ppo.sft as sft_module

    dtypes = set()  # of the first decoder layer's MLP output, over every forward
    load_model = sft_module.load_model

    def spy(cfg):
        model = load_model(cfg)
        model.model.layers[0].mlp.register_forward_hook(lambda m, a, out: dtypes.add(out.dtype))
        return model
    monkeypatch.setattr(sft_module, "load_model", spy)
    out = cli("sft", "--config", ROOT / "configs" / "sft_tiny.yaml", f"output_dir={tmp_path}",
              f"model.name_or_path={tiny_policy_dir}", "mixed_precision=bf16", "train.max_steps=4")
    assert out.returncode == 0, out.stderr[-2000:]
    assert torch.bfloat16 in dtypes  # autocast: the matmuls ran in bf16
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = {m["stage"]: m["heldout_loss"] for m in lines if "heldout_loss" in m}
    assert evals["after"] < evals["before"]
    # ... the weights the optimizer updates, and the save, stay float32
    with safe_open(str(tmp_path / "final" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    assert load_config(tmp_path / "config.yaml", cls=SFTConfig).mixed_precision == "bf16"


def test_packing_refused_for_a_model_whose_attention_mixes_packed_examples(tmp_path, reviews):
    """BLOOM's ALiBi reads the attention mask, not the position ids: packed examples would
    attend to each other, so data.packing is refused for it (and works for the tiny Llama)."""
    import transformers

    tok = builtin.build_word_tokenizer()
    bloom = transformers.BloomForCausalLM(transformers.BloomConfig(
        vocab_size=len(tok), hidden_size=32, n_layer=2, n_head=4, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    bloom.save_pretrained(tmp_path / "bloom")
    tok.save_pretrained(tmp_path / "bloom")
    cfg = sft_cfg(str(tmp_path / "bloom"), reviews, tmp_path / "out", data=dict(packing=True),
                  train=dict(max_steps=1))
    with pytest.raises(ConfigError, match="data.packing"):
        run_sft(cfg)
