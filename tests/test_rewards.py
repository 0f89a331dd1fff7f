"""Reward sources: built-in functions, function loading, FunctionReward/ModelReward, the weighted
sum and score post-processing."""

import dataclasses
import math
import sys
import textwrap

import pytest
import torch

from rlhf_ppo import builtin
from rlhf_ppo.config import RewardConfig, RewardSource
from rlhf_ppo.data import Prompt, left_pad
from rlhf_ppo.models import ModelLoadError
from rlhf_ppo.rewards import (
    FunctionReward,
    ModelReward,
    RewardError,
    RewardSum,
    function_style,
    keyword_share,
    load_function,
    response_length,
    score_sequences,
)
from rlhf_ppo.rollout import Rollout

EOS = builtin.VOCAB_WORDS.index("<eos>")  # 3
PAD = builtin.VOCAB_WORDS.index("<pad>")  # 0


def make_rollout(tok, prompt_texts, response_words, stopped, response_texts=None, extras=None,
                 fill_after_stop=None):
    """A hand-built Rollout: prompts left-padded, responses (+ EOS when stopped) right-padded.

    ``fill_after_stop``: token id written into the padded response slots (default: pad id), the
    mask stays 0 there.
    """
    extras = extras or [{} for _ in prompt_texts]
    prompts = [Prompt(t, tok(t)["input_ids"], extra=e)
               for t, e in zip(prompt_texts, extras, strict=True)]
    p_ids, p_mask = left_pad([p.input_ids for p in prompts], tok.pad_token_id)
    resp = [tok(w)["input_ids"] + ([tok.eos_token_id] if s else [])
            for w, s in zip(response_words, stopped, strict=True)]
    R = max(len(r) for r in resp)
    fill = tok.pad_token_id if fill_after_stop is None else fill_after_stop
    r_ids = torch.full((len(resp), R), fill, dtype=torch.long)
    r_mask = torch.zeros((len(resp), R), dtype=torch.long)
    for i, r in enumerate(resp):
        r_ids[i, :len(r)] = torch.tensor(r)
        r_mask[i, :len(r)] = 1
    return Rollout(
        input_ids=torch.cat([p_ids, r_ids], 1), attention_mask=torch.cat([p_mask, r_mask], 1),
        prompt_length=p_ids.shape[1], response_mask=r_mask,
        stopped=torch.tensor(stopped, dtype=torch.bool), prompts=prompts,
        response_texts=list(response_texts if response_texts is not None else response_words))


def unpadded_rows(rollout):
    """Each row's real tokens: its prompt tokens then its valid response tokens (EOS included)."""
    return [rollout.input_ids[i][rollout.attention_mask[i].bool()]
            for i in range(rollout.input_ids.shape[0])]


@torch.no_grad()
def manual_score(model, ids: torch.Tensor) -> float:
    """Score of one unpadded sequence: backbone, then the score head on the last position."""
    hidden = model.base_model(input_ids=ids[None]).last_hidden_state  # (1, L, H)
    return model.score(hidden[0, -1]).item()


# --------------------------------------------------------------------------- built-in functions

def test_keyword_share_hand_values():
    out = keyword_share([""] * 6, ["good movie great", "", "bad day", "GOOD!", "Nice,  fun",
                                   "   "])
    # good, great positive of 3 -> 2/3; empty -> 0; none -> 0; "good" "!" -> 1/2;
    # "nice" "," "fun" -> 2/3; whitespace only -> no tokens -> 0
    assert out == pytest.approx([2 / 3, 0.0, 0.0, 0.5, 2 / 3, 0.0])


def test_keyword_share_custom_words():
    out = keyword_share(["x", "y"], ["the movie was bad", "good great"], words=["bad", "movie"])
    # 2 of 4 words ("movie", "bad"); the default positive words no longer count -> 0
    assert out == pytest.approx([0.5, 0.0])


def test_response_length():
    assert response_length(["a"] * 3, ["good movie great", "", " the  day "]) == [3.0, 0.0, 2.0]


# --------------------------------------------------------------------------- load_function

def test_load_function_from_module():
    assert load_function("rlhf_ppo.rewards:keyword_share") is keyword_share


def test_load_function_from_file(tmp_path):
    f = tmp_path / "my_reward.py"
    f.write_text("def double_len(prompts, responses, **kw):\n"
                 "    return [2.0 * len(r) for r in responses]\n")
    fn = load_function(f"{f}:double_len")
    assert fn([], ["ab", "abcd"]) == [4.0, 8.0]


def test_load_function_missing_file(tmp_path):
    missing = tmp_path / "nope.py"
    with pytest.raises(RewardError, match="not found") as e:
        load_function(f"{missing}:fn", key="reward.sources[2].function")
    assert "reward.sources[2].function" in str(e.value) and "nope.py" in str(e.value)


def test_load_function_missing_function(tmp_path):
    with pytest.raises(RewardError, match="no function 'nope'") as e:
        load_function("rlhf_ppo.rewards:nope")
    assert "rlhf_ppo.rewards" in str(e.value)
    f = tmp_path / "r.py"
    f.write_text("not_callable = 3\n")
    with pytest.raises(RewardError, match="no function 'not_callable'"):
        load_function(f"{f}:not_callable")
    with pytest.raises(RewardError, match="no function 'other'"):
        load_function(f"{f}:other")


@pytest.mark.parametrize("spec", ["keyword_share", "rlhf_ppo.rewards:", ":keyword_share", ""])
def test_load_function_bad_spec(spec):
    with pytest.raises(RewardError, match="expected 'package.module:function'") as e:
        load_function(spec, key="reward.sources[0].function")
    assert "reward.sources[0].function" in str(e.value)


def test_load_function_module_not_found():
    with pytest.raises(RewardError, match="cannot import module 'no_such_module_xyz'"):
        load_function("no_such_module_xyz:fn")


def test_load_function_file_that_fails_to_import(tmp_path):
    f = tmp_path / "broken.py"
    f.write_text("raise RuntimeError('boom at import')\n")
    with pytest.raises(RewardError, match="boom at import") as e:
        load_function(f"{f}:fn", key="reward.sources[0].function")
    assert "reward.sources[0].function" in str(e.value) and "broken.py" in str(e.value)
    g = tmp_path / "syntax.py"
    g.write_text("def fn(:\n")
    with pytest.raises(RewardError, match="SyntaxError"):
        load_function(f"{g}:fn")


@pytest.mark.parametrize("kind,body,err", [
    ("runtime", "raise RuntimeError('boom at import')\n", "boom at import"),
    ("syntax", "def fn(:\n", "SyntaxError"),
], ids=["raises-at-import", "syntax-error"])
def test_load_function_module_that_fails_to_import(tmp_path, monkeypatch, kind, body, err):
    # A dotted module that raises while importing must fail like a file path does: with a
    # RewardError naming the config key, not a raw exception from inside the module.
    name = f"rlhf_ppo_test_broken_{kind}"
    (tmp_path / f"{name}.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(RewardError, match=err) as e:
        load_function(f"{name}:fn", key="reward.sources[0].function")
    assert "reward.sources[0].function" in str(e.value)


# --------------------------------------------------------------------------- FunctionReward

REWARD_MODULE = textwrap.dedent("""
    import math

    import numpy as np
    import torch


    def capture(prompts, responses, sink, scale=1.0, **kwargs):
        sink.append({"prompts": prompts, "responses": responses, "scale": scale, **kwargs})
        return [scale * len(r.split()) for r in responses]


    def boom(prompts, responses, **kwargs):
        raise ValueError("kaboom")


    def too_few(prompts, responses, **kwargs):
        return [1.0]


    def with_string(prompts, responses, **kwargs):
        return [1.0, "2", 3.0]


    def with_none(prompts, responses, **kwargs):
        return [1.0, None, 3.0]


    def with_bool(prompts, responses, **kwargs):
        return [1.0, True, 3.0]


    def with_nan(prompts, responses, **kwargs):
        return [1.0, 2.0, math.nan]


    def with_inf(prompts, responses, **kwargs):
        return [1.0, -math.inf, 3.0]


    def scalar(prompts, responses, **kwargs):
        return 1.0


    def as_tensor(prompts, responses, **kwargs):
        return torch.tensor([[0.5], [1.5], [-2.0]], dtype=torch.float64)


    def as_numpy(prompts, responses, **kwargs):
        return np.array([0.25, 1.0, -3.0], dtype=np.float32)


    def as_numpy_int(prompts, responses, **kwargs):
        return np.array([1, 2, 3])
""")


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("fn") / "reward_fns.py"
    f.write_text(REWARD_MODULE)
    return str(f)


@pytest.fixture(scope="module")
def fn_rollout(tok):
    return make_rollout(
        tok, ["the movie was", "i think the book is", "today"],
        ["good great", "bad", "very nice fun day"], [True, True, False],
        response_texts=["good great", "bad", "very nice fun day"],
        extras=[{"label": 1, "tag": "x"}, {"label": 0, "tag": "y"}, {"label": 1, "tag": "z"}])


def function_sum(tok, model_cfg, *sources, **cfg):
    return RewardSum(RewardConfig(sources=list(sources), **cfg), model_cfg, tok)


def test_rollout_helper(fn_rollout):
    # P = 5 ("i think the book is"); R = 4 ("very nice fun day", not stopped: no EOS)
    # row 0: 2 pads, the=17 movie=20 was=31 | good=9 great=10 <eos>, 1 pad
    assert fn_rollout.prompt_length == 5
    assert fn_rollout.response_mask.sum(-1).tolist() == [3, 2, 4]
    assert fn_rollout.input_ids[0].tolist() == [PAD, PAD, 17, 20, 31, 9, 10, EOS, PAD]


def test_function_receives_prompts_columns_kwargs_and_stopped(tok, model_cfg, reward_file,
                                                             fn_rollout):
    sink = []
    rs = function_sum(tok, model_cfg, RewardSource(function=f"{reward_file}:capture",
                                                   kwargs={"sink": sink, "scale": 2.0}))
    total, metrics = rs(fn_rollout)
    # scale 2 * word counts (2, 1, 4)
    assert total.tolist() == [4.0, 2.0, 8.0]
    assert metrics == {"reward/source0_mean": pytest.approx(14.0 / 3)}
    assert len(sink) == 1
    got = sink[0]
    assert got["prompts"] == ["the movie was", "i think the book is", "today"]
    assert got["responses"] == ["good great", "bad", "very nice fun day"]
    assert got["scale"] == 2.0
    assert got["label"] == [1, 0, 1]
    assert got["tag"] == ["x", "y", "z"]
    assert got["stopped"] == [True, True, False]
    assert set(got) == {"prompts", "responses", "scale", "label", "tag", "stopped"}


def test_function_that_raises_names_source(tok, model_cfg, reward_file, fn_rollout):
    rs = function_sum(tok, model_cfg, RewardSource(function=f"{reward_file}:boom"))
    with pytest.raises(RewardError, match=r"reward\.sources\[0\]") as e:
        rs(fn_rollout)
    assert "kaboom" in str(e.value) and "ValueError" in str(e.value)


def test_second_source_error_names_its_index(tok, model_cfg, reward_file, fn_rollout):
    rs = function_sum(tok, model_cfg, RewardSource(function="rlhf_ppo.rewards:keyword_share"),
                      RewardSource(function=f"{reward_file}:boom"))
    with pytest.raises(RewardError, match=r"reward\.sources\[1\]") as e:
        rs(fn_rollout)
    assert "reward.sources[0]" not in str(e.value)


def test_bad_function_spec_names_config_key(tok, model_cfg):
    with pytest.raises(RewardError, match=r"reward\.sources\[0\]\.function"):
        function_sum(tok, model_cfg, RewardSource(function="rlhf_ppo.rewards:nope"))


@pytest.mark.parametrize("fn,match", [
    ("too_few", "returned 1 scores for 3 responses"),
    ("with_string", "score 1 is str"),
    ("with_none", "score 1 is NoneType"),
    ("with_bool", "score 1 is bool"),
    ("scalar", "returned float"),
])
def test_function_bad_return_values(tok, model_cfg, reward_file, fn_rollout, fn, match):
    rs = function_sum(tok, model_cfg, RewardSource(function=f"{reward_file}:{fn}"))
    with pytest.raises(RewardError, match=match) as e:
        rs(fn_rollout)
    assert "reward.sources[0]" in str(e.value) and fn in str(e.value)


@pytest.mark.parametrize("fn,bad", [("with_nan", 2), ("with_inf", 1)])
def test_function_nonfinite_scores_pass_through_and_are_named(tok, model_cfg, reward_file,
                                                              fn_rollout, fn, bad):
    # NaN / inf are numbers: the trainer's on_nonfinite policy handles them (tests/test_checkpoint)
    rs = function_sum(tok, model_cfg, RewardSource(function=f"{reward_file}:{fn}"))
    total, _ = rs(fn_rollout)
    assert not torch.isfinite(total[bad]) and torch.isfinite(total[[i for i in range(3) if i != bad]]).all()
    assert rs.nonfinite_sources == [f"reward.sources[0] ({reward_file}:{fn})"]


@pytest.mark.parametrize("fn,expected", [("as_tensor", [0.5, 1.5, -2.0]),
                                         ("as_numpy", [0.25, 1.0, -3.0]),
                                         ("as_numpy_int", [1.0, 2.0, 3.0])])
def test_function_tensor_and_array_returns(tok, model_cfg, reward_file, fn_rollout, fn, expected):
    rs = function_sum(tok, model_cfg, RewardSource(function=f"{reward_file}:{fn}"))
    total, _ = rs(fn_rollout)
    assert total.dtype == torch.float32
    assert total.tolist() == expected


# --------------------------------------------------------------------------- TRL-style functions

TRL_MODULE = textwrap.dedent("""
    import math


    def trl_capture(completions, **kwargs):
        # TRL's usual signature: everything by keyword; `sink` comes from the config kwargs
        kwargs.pop("sink").append({"completions": completions, **kwargs})
        return [float(len(c.split())) for c in completions]


    def chat_capture(prompts, completions, sink, **kwargs):
        sink.append({"prompts": prompts, "completions": completions, **kwargs})
        return [1.0 if c[0]["content"].startswith("good") else 0.0 for c in completions]


    def count_ids(completion_ids, **kwargs):
        # like TRL's own repetition-penalty reward: completion_ids by keyword
        return [float(len(ids)) for ids in completion_ids]


    def skip_bad(completions, **kwargs):
        # TRL's accuracy_reward returns None for the rows it cannot judge
        return [None if "bad" in c else 1.0 for c in completions]


    def nan_for_bad(completions, **kwargs):
        return [math.nan if "bad" in c else 1.0 for c in completions]


    def equals_answer(completions, answer, **kwargs):
        return [1.0 if len(c.split()) == a else 0.0 for c, a in zip(completions, answer)]


    def keyword_only(*, completions, stopped):
        return [0.5 if s else -0.5 for s in stopped]


    async def async_len(completions, **kwargs):
        return [float(len(c)) for c in completions]


    def two_texts(prompts, responses):
        return [float(len(r)) for r in responses]


    def one_arg(x):
        return [0.0]


    def no_args():
        return [0.0]


    def prompts_only(prompts):
        return [0.0]


    def positional_only(completions, /, **kwargs):
        return [0.0]
""")


@pytest.fixture(scope="module")
def trl_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("trl_fn") / "trl_fns.py"
    f.write_text(TRL_MODULE)
    return str(f)


def chat_version(rollout):
    """``rollout`` with chat prompts: each prompt's text as one user message."""
    prompts = [Prompt(p.text, p.input_ids, messages=[{"role": "user", "content": p.text}],
                      extra=p.extra) for p in rollout.prompts]
    return dataclasses.replace(rollout, prompts=prompts)


# fn_rollout's response tokens: good=9 great=10 <eos> | bad=51 <eos> | very nice fun day (no stop)
COMPLETION_IDS = [[9, 10, EOS], [51, EOS], [46, 15, 14, 23]]


@pytest.mark.parametrize("name,style", [
    ("trl_capture", "trl"), ("chat_capture", "trl"), ("count_ids", "trl"), ("skip_bad", "trl"),
    ("equals_answer", "trl"), ("keyword_only", "trl"), ("async_len", "trl"),
    ("two_texts", "rlhf_ppo"),
])
def test_function_style_from_signature(trl_file, name, style):
    assert function_style(load_function(f"{trl_file}:{name}"))[0] == style
    assert function_style(keyword_share) == ("rlhf_ppo", None)  # **kwargs: every keyword
    assert function_style(lambda *args, **kw: None)[0] == "rlhf_ppo"
    assert function_style(lambda **kw: None)[0] == "trl"


def test_trl_function_gets_keywords_as_trl_passes_them(tok, model_cfg, trl_file, fn_rollout):
    sink = []
    rs = function_sum(tok, model_cfg, RewardSource(function=f"{trl_file}:trl_capture",
                                                   kwargs={"sink": sink, "scale": 2.0}))
    total, metrics = rs(fn_rollout)
    assert total.tolist() == [2.0, 1.0, 4.0]  # words per completion
    assert metrics == {"reward/source0_mean": pytest.approx(7 / 3)}
    (got,) = sink
    # TRL's trainer extras (tested in test_trl_reward_functions_get_trainer_state_...)
    assert {got.pop(k).__class__.__name__ for k in ("trainer_state", "log_metric", "log_extra")} == {
        "TrainerState", "method"}
    assert got == {
        "prompts": ["the movie was", "i think the book is", "today"],  # plain-text prompts: str
        "completions": ["good great", "bad", "very nice fun day"],
        "completion_ids": COMPLETION_IDS,  # the valid response tokens, the stop token included
        "label": [1, 0, 1], "tag": ["x", "y", "z"],  # dataset columns
        "stopped": [True, True, False],
        "scale": 2.0,  # config kwargs
    }


def test_trl_function_with_chat_prompts_gets_messages(tok, model_cfg, trl_file, fn_rollout):
    sink = []
    rs = function_sum(tok, model_cfg, RewardSource(function=f"{trl_file}:chat_capture",
                                                   kwargs={"sink": sink}))
    chat = chat_version(fn_rollout)
    total, _ = rs(chat)
    assert total.tolist() == [1.0, 0.0, 0.0]  # the content of the assistant message starts "good"
    (got,) = sink
    assert {"trainer_state", "log_metric", "log_extra"} <= set(got)
    got = {k: v for k, v in got.items() if k not in ("trainer_state", "log_metric", "log_extra")}
    assert got == {
        "prompts": [[{"role": "user", "content": "the movie was"}],
                    [{"role": "user", "content": "i think the book is"}],
                    [{"role": "user", "content": "today"}]],
        "completions": [[{"role": "assistant", "content": "good great"}],
                        [{"role": "assistant", "content": "bad"}],
                        [{"role": "assistant", "content": "very nice fun day"}]],
        "completion_ids": COMPLETION_IDS,
        "label": [1, 0, 1], "tag": ["x", "y", "z"], "stopped": [True, True, False],
    }
    # the prompts are copies: a function that edits them leaves the dataset's messages alone
    got["prompts"][0][0]["content"] = "edited"
    assert chat.prompts[0].messages == [{"role": "user", "content": "the movie was"}]


def test_own_style_with_chat_prompts_still_gets_texts(tok, model_cfg, reward_file, fn_rollout):
    sink = []
    rs = function_sum(tok, model_cfg, RewardSource(function=f"{reward_file}:capture",
                                                   kwargs={"sink": sink}))
    total, _ = rs(chat_version(fn_rollout))
    assert total.tolist() == [2.0, 1.0, 4.0]
    (got,) = sink
    assert got == {"prompts": ["the movie was", "i think the book is", "today"],
                   "responses": ["good great", "bad", "very nice fun day"], "scale": 1.0,
                   "label": [1, 0, 1], "tag": ["x", "y", "z"], "stopped": [True, True, False]}


def test_trl_function_of_completion_ids(tok, model_cfg, trl_file, fn_rollout):
    rs = function_sum(tok, model_cfg, RewardSource(function=f"{trl_file}:count_ids"))
    assert rs(fn_rollout)[0].tolist() == [3.0, 2.0, 4.0]


def test_trl_keyword_only_and_async_functions(tok, model_cfg, trl_file, fn_rollout):
    # without **kwargs a function gets only what it names; a coroutine function is awaited
    rs = function_sum(tok, model_cfg, RewardSource(function=f"{trl_file}:keyword_only"),
                      RewardSource(function=f"{trl_file}:async_len", weight=0.5))
    # stopped: 0.5, 0.5, -0.5; characters: 10, 3, 17
    assert rs(fn_rollout)[0].tolist() == [5.5, 2.0, 8.0]


def test_trl_none_scores_are_left_out_of_the_weighted_sum(tok, model_cfg, trl_file, fn_rollout):
    rs = function_sum(tok, model_cfg, RewardSource(function=f"{trl_file}:skip_bad", weight=2.0),
                      RewardSource(function="rlhf_ppo.rewards:response_length"))
    raw, scored = rs.score_sources(fn_rollout)
    assert scored.tolist() == [[True, False, True], [True, True, True]]
    assert math.isnan(raw[0, 1]) and raw[0, [0, 2]].tolist() == [1.0, 1.0]
    total, metrics = rs(fn_rollout)
    # 2 * 1 + 2 words | (None skipped) 1 word | 2 * 1 + 4 words, as TRL's nansum
    assert total.tolist() == [4.0, 1.0, 6.0]
    assert metrics == {"reward/source0_mean": 1.0, "reward/source1_mean": pytest.approx(7 / 3)}
    assert rs.nonfinite_sources == []


@pytest.mark.parametrize("fn", ["skip_bad", "nan_for_bad"])
def test_trl_response_no_source_scores_is_nan(tok, model_cfg, trl_file, fn_rollout, fn):
    # TRL treats None and NaN alike; a response no function scored has no score (TRL: NaN too):
    # the trainer's on_nonfinite policy decides, and names why
    rs = function_sum(tok, model_cfg, RewardSource(function=f"{trl_file}:{fn}"))
    total, metrics = rs(fn_rollout)
    assert total[[0, 2]].tolist() == [1.0, 1.0] and math.isnan(total[1])
    assert metrics == {"reward/source0_mean": 1.0}
    assert rs.nonfinite_sources == ["1 of 3 responses that no reward source scored (every one "
                                    "returned None)"]


def test_trl_dataset_columns_keep_the_loaders_types(tmp_path, tok, model_cfg, trl_file):
    # a CSV column of numbers arrives as int (the type `datasets` inferred), not as text
    from rlhf_ppo.config import DataConfig
    from rlhf_ppo.data import load_prompts

    csv = tmp_path / "prompts.csv"
    csv.write_text("prompt,answer\nthe movie was,2\ntoday,1\n")
    prompts = load_prompts(DataConfig(path=str(csv), max_prompt_length=16), tok)
    assert [p.extra for p in prompts] == [{"answer": 2}, {"answer": 1}]
    assert all(type(p.extra["answer"]) is int for p in prompts)
    rollout = make_rollout(tok, [p.text for p in prompts], ["good great", "good great"],
                           [True, True], extras=[p.extra for p in prompts])
    rs = function_sum(tok, model_cfg, RewardSource(function=f"{trl_file}:equals_answer"))
    assert rs(rollout)[0].tolist() == [1.0, 0.0]


def test_trl_function_missing_a_column_names_it(tok, model_cfg, trl_file, fn_rollout):
    rs = function_sum(tok, model_cfg, RewardSource(function=f"{trl_file}:equals_answer"))
    with pytest.raises(RewardError, match=r"reward\.sources\[0\].*needs the argument\(s\) answer"
                       r".*\['label', 'tag'\]"):
        rs(fn_rollout)


@pytest.mark.parametrize("name", ["one_arg", "no_args", "prompts_only", "positional_only"])
def test_bad_signature_shows_both_styles(tok, model_cfg, trl_file, name):
    with pytest.raises(RewardError) as e:
        function_sum(tok, model_cfg, RewardSource(function="rlhf_ppo.rewards:keyword_share"),
                     RewardSource(function=f"{trl_file}:{name}"))
    msg = str(e.value)
    assert msg.startswith(f"reward.sources[1].function ({trl_file}:{name}): the signature {name}(")
    assert "fn(prompts, responses, **kwargs) -> list[float]" in msg
    assert "fn(completions, **kwargs) -> list[float | None]" in msg


# --------------------------------------------------------------------------- RewardSum

def test_weighted_sum_of_two_sources(tok, model_cfg):
    rollout = make_rollout(tok, ["the day", "the day", "the day"],
                           ["good movie great", "bad day", ""], [True, True, True])
    rs = function_sum(tok, model_cfg,
                      RewardSource(function="rlhf_ppo.rewards:keyword_share", weight=2.0),
                      RewardSource(function="rlhf_ppo.rewards:response_length", weight=-0.5))
    total, metrics = rs(rollout)
    # keyword_share: 2/3, 0, 0; response_length: 3, 2, 0
    # 2 * 2/3 - 0.5 * 3 = -1/6 ; 2 * 0 - 0.5 * 2 = -1 ; 0
    assert total.tolist() == pytest.approx([-1 / 6, -1.0, 0.0], abs=1e-6)
    assert metrics["reward/source0_mean"] == pytest.approx(2 / 9)   # (2/3 + 0 + 0) / 3
    assert metrics["reward/source1_mean"] == pytest.approx(5 / 3)   # (3 + 2 + 0) / 3


def test_process_missing_stop_penalty_only_where_not_stopped(tok, model_cfg):
    rs = function_sum(tok, model_cfg, RewardSource(function="rlhf_ppo.rewards:keyword_share"),
                      missing_stop_penalty=0.75)
    raw = torch.tensor([1.0, 2.0, 3.0, 4.0])
    out = rs.process(raw, torch.tensor([True, False, True, False]))
    assert out.tolist() == [1.0, 1.25, 3.0, 3.25]
    assert raw.tolist() == [1.0, 2.0, 3.0, 4.0]  # input untouched


def test_process_defaults_are_identity(tok, model_cfg):
    rs = function_sum(tok, model_cfg, RewardSource(function="rlhf_ppo.rewards:keyword_share"))
    out = rs.process(torch.tensor([1.0, -7.0]), torch.tensor([False, False]))
    assert out.tolist() == [1.0, -7.0]


def test_process_penalty_normalize_clip(tok, model_cfg):
    rs = function_sum(tok, model_cfg, RewardSource(function="rlhf_ppo.rewards:keyword_share"),
                      missing_stop_penalty=1.0, normalize=True, clip=0.5)
    out = rs.process(torch.tensor([1.0, 2.0, 3.0, 4.0]),
                     torch.tensor([True, False, True, False]))
    # penalty -> [1, 1, 3, 3]; mean 2, population std 1 -> [-1, -1, 1, 1]; clip 0.5
    assert out.tolist() == pytest.approx([-0.5, -0.5, 0.5, 0.5])


def test_process_running_normalisation(tok, model_cfg):
    rs = function_sum(tok, model_cfg, RewardSource(function="rlhf_ppo.rewards:keyword_share"),
                      normalize=True)
    first = rs.process(torch.tensor([1.0, 1.0, 3.0, 3.0]), torch.ones(4, dtype=torch.bool))
    assert first.tolist() == pytest.approx([-1.0, -1.0, 1.0, 1.0])  # mean 2, std 1
    second = rs.process(torch.tensor([5.0, 5.0, 5.0, 5.0]), torch.ones(4, dtype=torch.bool))
    # running stats over all 8 values [1, 1, 3, 3, 5, 5, 5, 5]: mean 28/8 = 3.5,
    # var = 120/8 - 3.5^2 = 2.75 -> (5 - 3.5) / sqrt(2.75)
    assert second.tolist() == pytest.approx([1.5 / math.sqrt(2.75)] * 4, rel=1e-5)


# --------------------------------------------------------------------------- ModelReward

@pytest.fixture(scope="module")
def word_rm(tok, model_cfg, tiny_reward_dir):
    rs = RewardSum(RewardConfig(sources=[RewardSource(model=tiny_reward_dir, weight=1.0)]),
                   model_cfg, tok)
    return rs


@pytest.fixture(scope="module")
def ref_word_model(tiny_reward_dir):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(tiny_reward_dir).eval()


def model_rollout(tok, fill_after_stop=None):
    return make_rollout(
        tok, ["the movie was", "i think the book is", "today"],
        ["good great", "bad", "very nice fun day"], [True, True, False],
        fill_after_stop=fill_after_stop)


def test_model_reward_same_tokenizer(tok, word_rm, ref_word_model):
    (weight, source), = word_rm.sources
    assert isinstance(source, ModelReward)
    assert source.same_tokenizer is True
    assert word_rm.model_sources() == [source]
    rollout = model_rollout(tok)
    total, metrics = word_rm(rollout)
    rows = unpadded_rows(rollout)
    # prompt tokens + response tokens, EOS included for stopped rows
    assert rows[0].tolist() == [17, 20, 31, 9, 10, EOS]   # the movie was | good great <eos>
    # i=38 think=72 the=17 book=24 is=32 | bad=51 <eos>
    assert rows[1].tolist() == [38, 72, 17, 24, 32, 51, EOS]
    expected = [manual_score(ref_word_model, r) for r in rows]
    assert total.tolist() == pytest.approx(expected, abs=1e-5)
    # also equals HF's own forward on the unpadded sequence (reads the last token)
    hf = [ref_word_model(input_ids=r[None]).logits[0, 0].item() for r in rows]
    assert total.tolist() == pytest.approx(hf, abs=1e-5)
    assert metrics["reward/source0_mean"] == pytest.approx(sum(expected) / 3, abs=1e-5)
    # the rows really score differently (the comparison is not vacuous)
    assert len({round(x, 4) for x in expected}) == 3


@pytest.mark.parametrize("fill", [EOS, builtin.VOCAB_WORDS.index("bad")], ids=["eos", "word"])
def test_model_reward_reads_last_mask_position(tok, word_rm, ref_word_model, fill):
    # The slots after each stop hold `fill` ids with attention mask 0. fill=EOS simulates
    # pad == EOS; fill=a word id checks that the score is read at the last attention-mask
    # position (the first EOS), not at the last non-pad token id. Either way the scores must
    # equal the unpadded single-sequence computation.
    rollout = model_rollout(tok, fill_after_stop=fill)
    assert rollout.input_ids[1, -3:].tolist() == [EOS, fill, fill]
    assert rollout.attention_mask[1, -3:].tolist() == [1, 0, 0]
    total, _ = word_rm(rollout)
    expected = [manual_score(ref_word_model, r) for r in unpadded_rows(rollout)]
    assert total.tolist() == pytest.approx(expected, abs=1e-5)


def test_model_reward_batch_size_chunks(tok, model_cfg, tiny_reward_dir, ref_word_model):
    rs = RewardSum(RewardConfig(sources=[RewardSource(model=tiny_reward_dir, weight=-2.0)],
                                batch_size=2), model_cfg, tok)
    rollout = model_rollout(tok)
    total, _ = rs(rollout)
    expected = [-2.0 * manual_score(ref_word_model, r) for r in unpadded_rows(rollout)]
    assert total.tolist() == pytest.approx(expected, abs=1e-5)


@pytest.fixture(scope="module")
def char_rm(tok, model_cfg, char_reward_dir):
    return RewardSum(RewardConfig(sources=[RewardSource(model=char_reward_dir)]), model_cfg, tok)


def test_model_reward_other_tokenizer_retokenizes_text(tok, char_rm, char_reward_dir):
    from transformers import AutoModelForSequenceClassification

    (_, source), = char_rm.sources
    assert source.same_tokenizer is False
    assert source.tokenizer.chat_template is None
    rollout = make_rollout(tok, ["the movie was", "i think the book is", "today"],
                           ["good great", "bad", "very nice fun day"], [True, True, False],
                           response_texts=[" good great!", " bad.", " very nice fun day"])
    total, _ = char_rm(rollout)
    # no chat template: prompt and response tokens decoded together by the policy tokenizer
    # (special tokens dropped), then one token per character
    texts = ["the movie was good great", "i think the book is bad", "today very nice fun day"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789 .,!?:'")
    char_ids = [[4 + chars.index(c) for c in t] for t in texts]  # 4 special tokens come first
    ref = AutoModelForSequenceClassification.from_pretrained(char_reward_dir).eval()
    expected = [manual_score(ref, torch.tensor(ids)) for ids in char_ids]
    assert total.tolist() == pytest.approx(expected, abs=1e-5)
    assert len({round(x, 4) for x in expected}) == 3


def test_model_reward_other_tokenizer_with_chat_template(tmp_path, tok, model_cfg):
    # A reward model whose word vocabulary is ordered differently (so not the policy's tokenizer)
    # but which has a chat template: prompt messages + the response as an assistant turn.
    from transformers import AutoModelForSequenceClassification

    words = builtin.SPECIAL_TOKENS + list(reversed(builtin.VOCAB_WORDS[4:]))
    rm_tok = builtin.build_word_tokenizer(words)
    folder = builtin.build_tiny_model(tmp_path / "rm", seed=3, task="reward", tokenizer=rm_tok)
    rs = RewardSum(RewardConfig(sources=[RewardSource(model=str(folder))]), model_cfg, tok)
    (_, source), = rs.sources
    assert source.same_tokenizer is False
    msgs = [{"role": "user", "content": "the movie was"}]
    rollout = make_rollout(tok, ["the day", "today"], ["good", "bad bad"], [True, False],
                           response_texts=["good", "bad bad"])
    rollout.prompts[0].messages = msgs
    total, _ = rs(rollout)
    # template "<role> : <content> " per message (no generation prompt)
    texts = ["user : the movie was assistant : good ", "user : today assistant : bad bad "]
    ref = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    expected = [manual_score(ref, torch.tensor([words.index(w) for w in t.split()]))
                for t in texts]
    assert total.tolist() == pytest.approx(expected, abs=1e-5)


def test_score_sequences_padding_side_invariant(ref_word_model):
    seqs = [[17, 20, 31, 9, 10, EOS], [38, 72, EOS], [23, 14, 12, 15, 9, 11, 16, EOS], [9]]
    L = max(len(s) for s in seqs)
    left_ids, left_mask = left_pad(seqs, PAD)
    right_ids = torch.full((len(seqs), L), PAD, dtype=torch.long)
    right_mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        right_ids[i, :len(s)] = torch.tensor(s)
        right_mask[i, :len(s)] = 1
    with torch.no_grad():
        left = score_sequences(ref_word_model, left_ids, left_mask)
        right = score_sequences(ref_word_model, right_ids, right_mask)
    alone = [manual_score(ref_word_model, torch.tensor(s)) for s in seqs]
    assert left.shape == (4,)
    assert left.tolist() == pytest.approx(right.tolist(), abs=1e-5)
    assert left.tolist() == pytest.approx(alone, abs=1e-5)
    assert right.tolist() == pytest.approx(alone, abs=1e-5)


def test_reward_model_with_two_labels_rejected(tmp_path, tok, model_cfg):
    from transformers import LlamaForSequenceClassification

    wtok = builtin.build_word_tokenizer()
    config = builtin.tiny_llama_config(len(wtok), num_labels=2)
    assert config.num_labels == 2
    folder = tmp_path / "rm2"
    LlamaForSequenceClassification(config).save_pretrained(folder)
    wtok.save_pretrained(folder)
    with pytest.raises(ModelLoadError, match="num_labels=2") as e:
        RewardSum(RewardConfig(sources=[RewardSource(model=str(folder))]), model_cfg, tok)
    assert "reward.sources[0].model" in str(e.value)


def test_reward_model_missing_folder(tmp_path, tok, model_cfg):
    missing = str(tmp_path / "no_rm")
    with pytest.raises(ModelLoadError, match=r"reward\.sources\[0\]\.model") as e:
        RewardSum(RewardConfig(sources=[RewardSource(model=missing)]), model_cfg, tok)
    assert "no_rm" in str(e.value)


def test_function_reward_class_directly(reward_file, fn_rollout):
    sink = []
    fr = FunctionReward(RewardSource(function=f"{reward_file}:capture", kwargs={"sink": sink}),
                        "reward.sources[4]")
    assert fr(fn_rollout).tolist() == [2.0, 1.0, 4.0]  # word counts, scale 1
    fr_bad = FunctionReward(RewardSource(function=f"{reward_file}:too_few"), "reward.sources[4]")
    with pytest.raises(RewardError, match=r"reward\.sources\[4\]"):
        fr_bad(fn_rollout)


def test_function_without_var_kwargs_gets_only_named_arguments(tok, model_cfg, tmp_path,
                                                               fn_rollout):
    (tmp_path / "plain.py").write_text(
        "def score(prompts, responses):\n    return [float(len(r)) for r in responses]\n"
        "def with_stopped(prompts, responses, stopped):\n"
        "    return [float(s) for s in stopped]\n")
    rs = function_sum(tok, model_cfg, RewardSource(function=f"{tmp_path / 'plain.py'}:score"))
    total, _ = rs(fn_rollout)
    assert total.tolist() == [float(len(r)) for r in fn_rollout.response_texts]
    rs = function_sum(tok, model_cfg,
                      RewardSource(function=f"{tmp_path / 'plain.py'}:with_stopped"))
    assert rs(fn_rollout)[0].tolist() == [float(s) for s in fn_rollout.stopped.tolist()]


def test_module_reward_from_the_working_directory(tok, model_cfg, tmp_path, monkeypatch,
                                                  fn_rollout):
    (tmp_path / "my_cwd_rewards.py").write_text(
        "def const(prompts, responses, **kw):\n    return [2.5] * len(responses)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", ".")])
    rs = function_sum(tok, model_cfg, RewardSource(function="my_cwd_rewards:const"))
    assert rs(fn_rollout)[0].tolist() == [2.5] * len(fn_rollout.response_texts)


def test_length_target_hand_values():
    from rlhf_ppo.rewards import length_target

    # 10 words -> 0; 5 words -> -5/10; none -> -1; 15 words -> -5/10
    texts = [" ".join(["w"] * 10), "a b c d e", "", " ".join(["w"] * 15)]
    assert length_target([], texts, target=10) == [0.0, -0.5, -1.0, -0.5]


def test_repeated_words_hand_values():
    from rlhf_ppo.rewards import repeated_words

    texts = ["a b c", "very very very very", "The sea, the SEA!", ""]
    # 0 repeats of 3; 3 repeats of 4; "the sea the sea": 2 repeats of 4; empty
    assert repeated_words([], texts) == [0.0, -0.75, -0.5, 0.0]


TRL_CALLBACKS_FN = '''
SEEN = []


def scheduled(completions, trainer_state, log_metric, log_extra, **kwargs):
    """A TRL 1.12 reward function that reads the step and logs a metric and an extra column."""
    SEEN.append((trainer_state.global_step, trainer_state.max_steps))
    log_metric("long_share", sum(len(c) > 3 for c in completions) / len(completions))
    log_metric("long_share", 1.0)
    log_extra("note", ["x"] * len(completions))
    return [float(trainer_state.global_step)] * len(completions)
'''


def test_trl_reward_functions_get_trainer_state_log_metric_and_log_extra(tmp_path, monkeypatch):
    """TRL's GRPOTrainer passes trainer_state, log_metric and log_extra to reward functions: a
    function written for it runs unchanged; log_metric's values are the mean of one iteration."""
    from test_trainer import tiny_config

    from rlhf_ppo import PPOTrainer

    (tmp_path / "trl_sched.py").write_text(TRL_CALLBACKS_FN)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("trl_sched", None)
    trainer = PPOTrainer(tiny_config(tmp_path / "run", "iterations=3", "ppo.batch_size=4",
                                     "reward.sources=[{function: 'trl_sched:scheduled'}]"))
    history = trainer.train()
    import trl_sched as module

    assert module.SEEN == [(0, 3), (1, 3), (2, 3)]  # updates done before each scoring, of 3
    assert [m["score_mean"] for m in history] == [0.0, 1.0, 2.0]
    for m in history:  # the mean of (share of long completions, 1.0)
        assert 0.5 <= m["reward/long_share"] <= 1.0
