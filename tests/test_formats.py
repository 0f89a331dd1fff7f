"""Dataset formats (TRL's conventions, docs/data.md) for PPO prompts, SFT and reward training, on
small files in tests/data/ laid out as the public datasets are: the detected format is logged,
UltraFeedback's repeated user turn appears once, Anthropic HH transcripts become the chat text PPO
scores, chat prompts ending with the assistant's turn are refused (or that turn dropped), and a
dataset that fits no format is a clear error.

Token ids are derived by hand: the built-in word tokenizer's id for a word is its index in
``builtin.VOCAB_WORDS``; its chat template renders ``<role> : <content> `` per message and
``assistant :`` as the generation prompt, and it adds no BOS to plain text.
"""

import json
import logging
from pathlib import Path

import pytest
from rollouts import rollout_of  # tests/rollouts.py

from rlhf_ppo import builtin, formats
from rlhf_ppo import finetune as ft
from rlhf_ppo.config import DataConfig, ModelConfig, RewardSource
from rlhf_ppo.data import DataError, Prompt, Rows, load_prompts, render_prompt
from rlhf_ppo.reward_training import PairFormatter, RewardDataConfig, encode_pairs
from rlhf_ppo.rewards import ModelReward
from rlhf_ppo.sft import IGNORE_INDEX, SFTDataConfig, encode_rows

DATA = Path(__file__).resolve().parent / "data"
W = {w: i for i, w in enumerate(builtin.VOCAB_WORDS)}
EOS, X = W["<eos>"], IGNORE_INDEX


def ids(text: str) -> list[int]:
    return [W[w] for w in text.split()]


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines()]


def table(name: str):
    return ft.load_table(str(DATA / name), "train", "data.path")


@pytest.fixture(scope="module")
def plain_tok():
    """The word tokenizer without a chat template."""
    t = builtin.build_word_tokenizer()
    t.chat_template = None
    return t


def prompts_of(name: str, tok, **kw) -> list[Prompt]:
    return load_prompts(DataConfig(path=str(DATA / name), **kw), tok)


def pairs_of(name: str, tok, **kw):
    return encode_pairs(table(name), PairFormatter(tok), RewardDataConfig(path="x", **kw), name)


def sft_of(name: str, tok, **kw):
    return encode_rows(table(name), tok, SFTDataConfig(path="x", **kw), name)


def format_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "rlhf_ppo.formats" and r.levelno == logging.INFO]


# --------------------------------------------------------------------------- unit pieces

def test_parse_hh_turns_and_the_prompt_cue():
    text = "\n\nHuman: review the book .\n\nAssistant: the book was good .\n\nHuman: and the song ?" \
           "\n\nAssistant:"
    assert formats.is_hh(text) and not formats.is_hh("Human and Assistant: no")
    assert formats.parse_hh(text) == [
        {"role": "user", "content": "review the book ."},
        {"role": "assistant", "content": "the book was good ."},
        {"role": "user", "content": "and the song ?"},
        {"role": "assistant", "content": ""}]
    assert formats.hh_prompt(text) == formats.parse_hh(text)[:-1]  # the empty cue is dropped


@pytest.mark.parametrize("a, b, prompt", [
    ("the answer is blue", "the answer is black", "the answer is"),  # back to a word boundary
    ("Q: hi\n\nA: yes", "Q: hi\n\nA: no", "Q: hi\n\nA:"),
    ("yes", "no", ""),
    ("same", "same", ""),
    ("the day was", "the day was good", "the day"),  # each side keeps a word
])
def test_text_prefix_cuts_at_a_word_boundary(a, b, prompt):
    assert a[:formats.text_prefix(a, b)] == prompt


def test_join_conversation_keeps_repeated_turns_once_and_refuses_two_user_turns():
    u, a = {"role": "user", "content": "the game was"}, {"role": "assistant", "content": "fun"}
    assert formats.join_conversation([u], [u, a], 0, "c") == ([u, a], 1)
    assert formats.join_conversation([u], [a], 0, "c") == ([u, a], 1)
    other = {"role": "user", "content": "the day was"}
    with pytest.raises(DataError, match="c: row 3 starts with a user turn .* right after the prompt's"):
        formats.join_conversation([u], [other, a], 3, "c")


# --------------------------------------------------------------------------- PPO prompts

@pytest.mark.parametrize("name, texts, fmt", [
    ("prompt_only.jsonl", ["the movie was", "i think the food is"],
     "prompt-only (standard): prompt 'prompt'"),
    ("prompt_only_conversational.jsonl",
     ["user : review the movie . assistant :",
      "user : review the book . assistant : the book was good . user : and the song ? assistant :"],
     "prompt-only (conversational): prompt 'prompt'"),
    ("prompt_completion.jsonl", ["the movie was", "i think the food is"],
     "prompt-completion (standard): prompt 'prompt'"),
    ("conversational_prompt_completion.jsonl",
     ["user : review the movie . assistant :",
      "user : review the book . assistant : the book was good . user : and the song ? assistant :"],
     "prompt-completion (conversational): prompt 'prompt'"),
    ("implicit_preference.jsonl",
     ["user : review the movie . assistant :",
      "user : review the book . assistant : the book was good . user : and the song ? assistant :"],
     "implicit-prompt preference (conversational): chosen 'chosen', rejected 'rejected'"),
    ("implicit_preference_text.jsonl", ["the movie was", "i think the food is"],
     "implicit-prompt preference (standard): chosen 'chosen', rejected 'rejected'"),
])
def test_ppo_prompts_of_every_format_and_the_logged_format(tok, caplog, name, texts, fmt):
    with caplog.at_level(logging.INFO, logger="rlhf_ppo.formats"):
        prompts = prompts_of(name, tok)
    assert [p.text for p in prompts] == texts
    for p in prompts:
        assert p.input_ids == ids(p.text)
    lines = format_lines(caplog)
    assert len(lines) == 1 and lines[0] == f"{str(DATA / name)!r}: {fmt}"


def test_ppo_implicit_prompt_keeps_the_pair_for_reward_functions(tok):
    p = prompts_of("implicit_preference.jsonl", tok)[0]
    assert p.messages == [{"role": "user", "content": "review the movie ."}]
    assert p.extra == rows("implicit_preference.jsonl")[0]


def test_ppo_hh_prompts_are_parsed_into_chat_messages(tok, plain_tok):
    want = ["user : review the movie . assistant :",
            "user : review the book . assistant : the book was good . user : and the song ? assistant :",
            "user : i think the food was good assistant :"]
    hh = prompts_of("hh_prompts.jsonl", tok)
    assert [p.text for p in hh] == want
    assert hh[1].messages == formats.hh_prompt(rows("hh_prompts.jsonl")[1]["prompt"])
    # The prompts of Anthropic HH pairs (their common start) are the same.
    assert [p.text for p in prompts_of("hh_rlhf.jsonl", tok)] == want
    # A tokenizer without a chat template keeps the transcript as text.
    raw = prompts_of("hh_prompts.jsonl", plain_tok)
    assert [p.text for p in raw] == [r["prompt"] for r in rows("hh_prompts.jsonl")]
    assert [p.text for p in prompts_of("hh_rlhf.jsonl", plain_tok)] == [p.text for p in raw]


def test_ppo_ultrafeedback_string_prompt_is_a_user_turn(tok, caplog):
    """UltraFeedback's ``prompt`` is a string beside conversational chosen / rejected; reward
    training lays the pair out as a chat, so PPO's prompt is that user turn, chat-formatted."""
    with caplog.at_level(logging.INFO, logger="rlhf_ppo.formats"):
        prompts = prompts_of("ultrafeedback_binarized.jsonl", tok)
    assert prompts[0].text == "user : the game was assistant :"
    assert prompts[0].messages == [{"role": "user", "content": "the game was"}]
    assert "preference (conversational, the string prompts read as user turns): prompt 'prompt'" \
        in format_lines(caplog)[0]


def test_ppo_refuses_a_chat_prompt_ending_with_the_assistant_turn(tok):
    with pytest.raises(DataError) as e:
        prompts_of("assistant_last_prompts.jsonl", tok)
    msg = str(e.value)
    assert msg.startswith("data.prompt_column 'prompt': row 1 is a chat prompt whose last turn is "
                          "the assistant's ('the book was good .')")
    assert "remove that turn from the data" in msg
    # A conversation dataset read as prompts: the same error for its first row.
    with pytest.raises(DataError, match="column 'messages': row 0 is a chat prompt whose last turn"):
        prompts_of("language_modeling_messages.jsonl", tok)


def test_ppo_drops_the_final_assistant_turn_when_asked(tok):
    from rlhf_ppo.config import load_config

    cfg = load_config(None, [f"data.path={DATA / 'assistant_last_prompts.jsonl'}",
                             "data.drop_final_assistant_turn=true"])
    prompts = load_prompts(cfg.data, tok)
    assert [p.text for p in prompts] == ["user : review the movie . assistant :",
                                         "user : review the book . assistant :"]
    assert prompts[1].messages == [{"role": "user", "content": "review the book ."}]
    with pytest.raises(DataError, match="or set data.drop_final_assistant_turn=true to drop it"):
        load_prompts(DataConfig(path=str(DATA / "assistant_last_prompts.jsonl")), tok)
    # render_prompt, the one place prompts get a generation prompt, takes the same switch.
    msgs = rows("assistant_last_prompts.jsonl")[1]["prompt"]
    assert render_prompt(msgs, tok, 1, "p", drop_final_assistant=True)[0] == \
        "user : review the book . assistant :"


def test_ppo_no_format_error_names_the_file_columns_and_formats(tok):
    with pytest.raises(DataError) as e:
        prompts_of("language_modeling_text.jsonl", tok)
    msg = str(e.value)
    assert msg.startswith(f"data.prompt_column: {str(DATA / 'language_modeling_text.jsonl')!r} has "
                          "columns ['text'], which fit no format `rlhf-ppo train` reads; accepted: "
                          "prompt-only ('prompt' = data.prompt_column")
    assert "implicit-prompt preference" in msg and "docs/data.md" in msg
    # An explicitly configured prompt column that is missing is not replaced by another one.
    with pytest.raises(DataError, match="data.prompt_column: .* has columns \\['chosen', 'rejected'\\]"):
        prompts_of("implicit_preference.jsonl", tok, prompt_column="question")


# --------------------------------------------------------------------------- SFT

def test_sft_language_modeling_text_learns_every_token(tok, caplog):
    with caplog.at_level(logging.INFO, logger="rlhf_ppo.formats"):
        exs = sft_of("language_modeling_text.jsonl", tok)
    assert exs[0].input_ids == ids("the movie was great and fun .") + [EOS]
    assert exs[0].labels == exs[0].input_ids
    assert format_lines(caplog) == ["language_modeling_text.jsonl: language modeling (standard): text 'text'"]
    # A configured text column is read under its own name.
    body = Rows([{"body": r["text"]} for r in rows("language_modeling_text.jsonl")], ["body"])
    assert encode_rows(body, tok, SFTDataConfig(path="x", text_column="body"), "b")[1].input_ids == \
        ids("i think the food is really good !") + [EOS]


def test_sft_prompt_completion_reads_trls_completion_column(tok, caplog):
    with caplog.at_level(logging.INFO, logger="rlhf_ppo.formats"):
        exs = sft_of("prompt_completion.jsonl", tok)
    assert exs[0].input_ids == ids("the movie was great and fun .") + [EOS]
    assert exs[0].labels == [X] * 3 + ids("great and fun .") + [EOS]
    assert format_lines(caplog) == ["prompt_completion.jsonl: prompt-completion (standard): "
                                    "prompt 'prompt', completion 'completion'"]


def test_sft_conversational_prompt_completion_learns_the_completion_only(tok):
    exs = sft_of("conversational_prompt_completion.jsonl", tok)
    assert exs[0].input_ids == ids("user : review the movie . assistant : the movie was great .") + [EOS]
    assert exs[0].labels == [X] * 8 + ids("the movie was great .") + [EOS]
    # The prompt's own assistant turn is context: only the completion carries the loss.
    assert exs[1].input_ids == ids("user : review the book . assistant : the book was good . user : "
                                   "and the song ? assistant : the song was fun !") + [EOS]
    assert exs[1].labels == [X] * 21 + ids("the song was fun !") + [EOS]


def test_sft_ultrafeedback_conversation_has_the_user_turn_once(tok, caplog):
    with caplog.at_level(logging.INFO, logger="rlhf_ppo.formats"):
        exs = sft_of("ultrafeedback_binarized.jsonl", tok)
    assert exs[0].input_ids == ids("user : the game was assistant : great fun .") + [EOS]
    assert format_lines(caplog) == ["ultrafeedback_binarized.jsonl: language modeling "
                                    "(conversational): messages 'messages'"]


def test_sft_refuses_a_prompt_ending_with_the_assistant_turn(tok, tmp_path):
    row = {"prompt": [{"role": "user", "content": "the day was"},
                      {"role": "assistant", "content": "good"}],
           "completion": [{"role": "assistant", "content": "fun"}]}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match="data.prompt_column 'prompt': row 0 is a chat prompt whose "
                                        "last turn is the assistant's"):
        encode_rows(ft.load_table(str(path), "train", "data.path"), tok, SFTDataConfig(path="x"), "d")
    row["completion"] = "fun"  # a text completion: the prompt is rendered with the generation prompt
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match="row 0 is a chat prompt whose last turn is the assistant's"):
        encode_rows(ft.load_table(str(path), "train", "data.path"), tok, SFTDataConfig(path="x"), "d")


def test_sft_no_format_error_names_the_file_columns_and_formats(tok):
    with pytest.raises(DataError) as e:
        sft_of("hh_rlhf.jsonl", tok)
    assert str(e.value) == (
        "data.path: hh_rlhf.jsonl has columns ['chosen', 'rejected'], which fit no format "
        "`rlhf-ppo sft` reads; accepted: language modeling ('text' = data.text_column, or "
        "'messages' = data.messages_column), prompt-completion ('prompt' = data.prompt_column and "
        "'response' or 'completion' = data.response_column) (docs/data.md)")


# --------------------------------------------------------------------------- reward pairs

def test_reward_ultrafeedback_pair_has_the_user_turn_once(tok, caplog):
    with caplog.at_level(logging.INFO, logger="rlhf_ppo.formats"):
        pairs = pairs_of("ultrafeedback_binarized.jsonl", tok)
    assert pairs[0].chosen == ids("user : the game was assistant : great fun .") + [EOS]
    assert pairs[0].rejected == ids("user : the game was assistant : so boring .") + [EOS]
    assert pairs[0].chosen.count(W["user"]) == 1
    assert format_lines(caplog) == ["ultrafeedback_binarized.jsonl: preference (conversational): "
                                    "prompt 'prompt', chosen 'chosen', rejected 'rejected'"]


def test_reward_hh_pairs_are_chat_formatted(tok, caplog):
    with caplog.at_level(logging.INFO, logger="rlhf_ppo.formats"):
        pairs = pairs_of("hh_rlhf.jsonl", tok)
    assert pairs[0].chosen == ids("user : review the movie . assistant : the movie was great and "
                                  "fun .") + [EOS]
    assert pairs[0].rejected == ids("user : review the movie . assistant : the movie was boring .") + [EOS]
    assert pairs[1].chosen == ids("user : review the book . assistant : the book was good . user : and "
                                  "the song ? assistant : the song was great !") + [EOS]
    assert format_lines(caplog) == [
        "hh_rlhf.jsonl: implicit-prompt preference (Anthropic HH transcripts, parsed into chat "
        "messages): chosen 'chosen', rejected 'rejected'"]


def test_reward_hh_pairs_without_a_chat_template_split_at_the_common_start(plain_tok):
    row = rows("hh_rlhf.jsonl")[0]
    prompt = "\n\nHuman: review the movie .\n\nAssistant:"
    assert formats.preference_row(None, row["chosen"], row["rejected"], chat=False) == \
        (prompt, row["chosen"][len(prompt):], row["rejected"][len(prompt):])
    pairs = pairs_of("hh_rlhf.jsonl", plain_tok)
    assert pairs[0].chosen == plain_tok(prompt)["input_ids"] + \
        plain_tok(row["chosen"][len(prompt):], add_special_tokens=False)["input_ids"] + [EOS]


def test_reward_implicit_prompt_pairs(tok):
    conv = pairs_of("implicit_preference.jsonl", tok)
    assert conv[1].rejected == ids("user : review the book . assistant : the book was good . user : and "
                                   "the song ? assistant : the song was dull .") + [EOS]
    text = pairs_of("implicit_preference_text.jsonl", tok)
    assert (text[0].chosen, text[0].rejected) == (ids("the movie was great and fun .") + [EOS],
                                                  ids("the movie was boring .") + [EOS])


def test_reward_refuses_a_prompt_ending_with_the_assistant_turn(tok, tmp_path):
    row = {"prompt": [{"role": "user", "content": "the day was"},
                      {"role": "assistant", "content": "good"}],
           "chosen": [{"role": "assistant", "content": "fun"}],
           "rejected": [{"role": "assistant", "content": "bad"}]}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match="data.chosen_column 'chosen': row 0 is a chat prompt whose "
                                        "last turn is the assistant's"):
        encode_pairs(ft.load_table(str(path), "train", "data.path"), PairFormatter(tok),
                     RewardDataConfig(path="x"), "d")


def test_reward_no_format_error_names_the_file_columns_and_formats(tok):
    with pytest.raises(DataError) as e:
        pairs_of("prompt_completion.jsonl", tok)
    assert str(e.value) == (
        "data.chosen_column: prompt_completion.jsonl has columns ['prompt', 'completion'], which fit "
        "no format `rlhf-ppo reward` reads; accepted: preference ('prompt' = data.prompt_column, "
        "'chosen' = data.chosen_column, 'rejected' = data.rejected_column) or implicit-prompt "
        "preference ('chosen' and 'rejected' holding the whole conversation) (docs/data.md)")


# --------------------------------------------------------------------------- reward = PPO's scoring



def _final_answer(cell) -> str:
    return (formats.parse_hh(cell) if isinstance(cell, str) else cell)[-1]["content"]


@pytest.mark.parametrize("name", ["hh_rlhf.jsonl", "ultrafeedback_binarized.jsonl"])
@pytest.mark.parametrize("reward_tokenizer", ["same", "char", "char+chat"])
def test_reward_pairs_are_what_model_reward_scores_in_ppo(tok, char_reward_dir, tmp_path_factory,
                                                          name, reward_tokenizer):
    """Each pair side is laid out exactly as PPO's ModelReward presents the rollout of the same
    prompt (PPO's load_prompts on the same file) and response: same tokenizer (the rollout's ids),
    or another one (re-tokenized text, with or without a chat template)."""
    folder = tmp_path_factory.mktemp("rm")
    if reward_tokenizer == "same":
        rm_dir = str(builtin.build_tiny_model(folder, task="reward"))
    elif reward_tokenizer == "char":
        rm_dir = char_reward_dir
    else:
        char = builtin.build_char_tokenizer()
        char.chat_template = builtin.CHAT_TEMPLATE
        rm_dir = str(builtin.build_tiny_model(folder, task="reward", tokenizer=char,
                                              bos_token_id=None, eos_token_id=None))
    reward = ModelReward(RewardSource(model=rm_dir), "reward.sources[0]", ModelConfig(), tok, 4)
    prompts = prompts_of(name, tok)
    data = rows(name)
    f = PairFormatter(reward.tokenizer, tok)
    pairs = encode_pairs(table(name), f, RewardDataConfig(path="x"), name)
    assert len(pairs) == len(data) == len(prompts) > 0  # one pair per row: every row is compared
    for side in ("chosen", "rejected"):
        rollout = rollout_of(tok, prompts, [_final_answer(r[side]) for r in data])
        want_ids, want_mask = reward._inputs(rollout)
        for i, pair in enumerate(pairs):
            assert getattr(pair, side) == want_ids[i][want_mask[i].bool()].tolist()
