"""Prompt datasets: local file formats, chat templates, length filtering, errors, sharding, padding.

Token ids are derived by hand: the built-in word tokenizer is a WordLevel model whose id for a
word is that word's index in ``builtin.VOCAB_WORDS`` (and it adds no BOS/EOS to plain text).
"""

import json
import logging

import pytest
import torch

from rlhf_ppo import builtin
from rlhf_ppo.config import DataConfig
from rlhf_ppo.data import DataError, Prompt, PromptSampler, left_pad, load_prompts


def vocab_ids(text: str) -> list[int]:
    """Hand tokenization: word-level ids are positions in builtin.VOCAB_WORDS."""
    return [builtin.VOCAB_WORDS.index(w) for w in text.split()]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


ROWS = [
    {"prompt": "the movie was", "label": 1, "tag": "x"},
    {"prompt": "i think the book is", "label": 0, "tag": "y"},
]


def check_rows(prompts, tok):
    assert [p.text for p in prompts] == ["the movie was", "i think the book is"]
    # the=17 movie=20 was=31 ; i=38 think=72 the=17 book=24 is=32 (indices in VOCAB_WORDS)
    assert prompts[0].input_ids == [17, 20, 31]
    assert prompts[1].input_ids == [38, 72, 17, 24, 32]
    for p in prompts:
        assert p.input_ids == vocab_ids(p.text)
        assert p.input_ids == tok(p.text)["input_ids"]
        assert p.messages is None
    assert prompts[0].extra == {"label": 1, "tag": "x"}
    assert prompts[1].extra == {"label": 0, "tag": "y"}


# --------------------------------------------------------------------------- local formats

def test_vocab_ids_helper_matches_vocabulary():
    assert builtin.VOCAB_WORDS[17] == "the" and builtin.VOCAB_WORDS[9] == "good"


def test_load_jsonl(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    check_rows(load_prompts(DataConfig(path=path), tok), tok)


def test_load_json_list(tmp_path, tok):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(ROWS))
    check_rows(load_prompts(DataConfig(path=str(path)), tok), tok)


def test_load_csv(tmp_path, tok):
    path = tmp_path / "p.csv"
    path.write_text("prompt,label,tag\nthe movie was,1,x\ni think the book is,0,y\n")
    check_rows(load_prompts(DataConfig(path=str(path)), tok), tok)


def test_load_parquet(tmp_path, tok):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    path = tmp_path / "p.parquet"
    pd.DataFrame(ROWS).to_parquet(path)
    check_rows(load_prompts(DataConfig(path=str(path)), tok), tok)


def test_custom_prompt_column_and_uppercase_suffix(tmp_path, tok):
    path = write_jsonl(tmp_path / "P.JSONL", [{"text": "the day", "prompt": "ignored"}])
    prompts = load_prompts(DataConfig(path=path, prompt_column="text"), tok)
    assert len(prompts) == 1
    assert prompts[0].text == "the day"
    assert prompts[0].input_ids == [17, 23]  # the=17 day=23
    # the other column (even one named "prompt") is an extra column
    assert prompts[0].extra == {"prompt": "ignored"}


# --------------------------------------------------------------------------- chat prompts

def test_chat_messages_rendered_with_template(tmp_path, tok):
    single = [{"role": "user", "content": "the movie was"}]
    multi = [{"role": "user", "content": "the movie"},
             {"role": "assistant", "content": "good"},
             {"role": "user", "content": "and the book"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": single, "label": 3},
                                                 {"messages": multi, "label": 4}])
    prompts = load_prompts(DataConfig(path=path, prompt_column="messages"), tok)
    assert len(prompts) == 2
    # CHAT_TEMPLATE: "<role> : <content> " per message, then "assistant :" as generation prompt
    assert prompts[0].text == "user : the movie was assistant :"
    assert prompts[1].text == "user : the movie assistant : good user : and the book assistant :"
    for p, msgs in zip(prompts, [single, multi], strict=True):
        assert p.text == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert p.messages == msgs
        assert p.input_ids == tok(p.text, add_special_tokens=False)["input_ids"]
        assert p.input_ids == vocab_ids(p.text)
    assert [p.extra for p in prompts] == [{"label": 3}, {"label": 4}]


def test_chat_messages_without_template_is_an_error(tmp_path, tok):
    tok2 = builtin.build_word_tokenizer()
    tok2.chat_template = None
    path = write_jsonl(tmp_path / "chat.jsonl",
                       [{"messages": [{"role": "user", "content": "the day"}]}])
    with pytest.raises(DataError, match="chat template") as e:
        load_prompts(DataConfig(path=path, prompt_column="messages"), tok2)
    assert "data.prompt_column" in str(e.value) and "row 0" in str(e.value)


# --------------------------------------------------------------------------- long prompts

LONG_ROWS = [
    {"prompt": "the movie was good"},        # 4 tokens: too long for max 3
    {"prompt": "the day"},                   # 2 tokens
    {"prompt": "i think the book is good"},  # 6 tokens: too long
    {"prompt": "the movie was"},             # exactly 3 tokens: kept
]


def test_long_prompts_dropped_and_count_logged(tmp_path, tok, caplog):
    path = write_jsonl(tmp_path / "long.jsonl", LONG_ROWS)
    with caplog.at_level(logging.WARNING, logger="rlhf_ppo.data"):
        prompts = load_prompts(DataConfig(path=path, max_prompt_length=3), tok)
    assert [p.text for p in prompts] == ["the day", "the movie was"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING
                and r.name == "rlhf_ppo.data"]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert "dropped 2 of 4" in msg  # rows 0 and 2 are longer than 3 tokens
    assert "max_prompt_length=3" in msg


def test_no_warning_when_nothing_dropped(tmp_path, tok, caplog):
    path = write_jsonl(tmp_path / "ok.jsonl", LONG_ROWS)
    with caplog.at_level(logging.WARNING, logger="rlhf_ppo.data"):
        prompts = load_prompts(DataConfig(path=path, max_prompt_length=6), tok)
    assert len(prompts) == 4
    assert not [r for r in caplog.records if r.name == "rlhf_ppo.data"]


def test_truncate_long_prompts_keeps_last_tokens(tmp_path, tok):
    path = write_jsonl(tmp_path / "long.jsonl", LONG_ROWS)
    prompts = load_prompts(DataConfig(path=path, max_prompt_length=3,
                                      truncate_long_prompts=True), tok)
    assert len(prompts) == 4
    # the LAST 3 tokens: "the movie was good" -> "movie was good"; "i think the book is good" ->
    # "book is good"; shorter prompts untouched
    assert [p.text for p in prompts] == ["movie was good", "the day", "book is good",
                                         "the movie was"]
    assert prompts[0].input_ids == [20, 31, 9]   # movie=20 was=31 good=9
    assert prompts[2].input_ids == [24, 32, 9]   # book=24 is=32 good=9
    for p in prompts:
        assert len(p.input_ids) <= 3
        assert p.input_ids == vocab_ids(p.text)


def test_truncate_chat_prompt_keeps_last_tokens(tmp_path, tok):
    msgs = [{"role": "user", "content": "the movie was good"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": msgs}])
    prompts = load_prompts(DataConfig(path=path, prompt_column="messages", max_prompt_length=4,
                                      truncate_long_prompts=True), tok)
    # "user : the movie was good assistant :" -> last 4 tokens "was good assistant :"
    assert prompts[0].input_ids == vocab_ids("was good assistant :")
    assert prompts[0].text == "was good assistant :"
    assert prompts[0].messages == msgs


def test_every_prompt_too_long(tmp_path, tok):
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "the movie was good"},
                                                 {"prompt": "i think the book is good"}])
    with pytest.raises(DataError, match=r"data\.max_prompt_length=3") as e:
        load_prompts(DataConfig(path=path, max_prompt_length=3), tok)
    assert "long.jsonl" in str(e.value)


# --------------------------------------------------------------------------- errors

def test_missing_file(tmp_path, tok):
    path = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"data\.path") as e:
        load_prompts(DataConfig(path=path), tok)
    assert "nope.jsonl" in str(e.value) and "not found" in str(e.value)


@pytest.mark.parametrize("name,content", [("empty.jsonl", ""), ("empty.json", "[]"),
                                          ("empty.csv", "prompt,label\n")])
def test_empty_dataset(tmp_path, tok, name, content):
    # datasets itself fails on these zero-row files; the error must still be a DataError naming
    # data.path and the file
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=r"data\.path") as e:
        load_prompts(DataConfig(path=str(path)), tok)
    assert name in str(e.value)


def test_empty_parquet(tmp_path, tok):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    path = tmp_path / "empty.parquet"
    pd.DataFrame({"prompt": pd.Series([], dtype=object)}).to_parquet(path)
    with pytest.raises(DataError, match=r"data\.path") as e:
        load_prompts(DataConfig(path=str(path)), tok)
    assert "empty.parquet" in str(e.value)


def test_missing_column_lists_available_columns(tmp_path, tok):
    path = write_jsonl(tmp_path / "cols.jsonl", [{"text": "the day", "label": 1}])
    with pytest.raises(DataError, match=r"data\.prompt_column") as e:
        load_prompts(DataConfig(path=path), tok)
    msg = str(e.value)
    assert "'prompt'" in msg and "cols.jsonl" in msg
    assert "'text'" in msg and "'label'" in msg


@pytest.mark.parametrize("bad,type_name", [(5, "int"), ({"a": 1}, "dict"), (None, "NoneType"),
                                           (["the", "day"], "list")])
def test_non_string_prompt(tmp_path, tok, bad, type_name):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "the day"}, {"prompt": bad}])
    with pytest.raises(DataError, match=r"data\.prompt_column") as e:
        load_prompts(DataConfig(path=path), tok)
    msg = str(e.value)
    assert "row 1" in msg and type_name in msg and "'prompt'" in msg


@pytest.mark.parametrize("empty", ["", "   "])
def test_empty_string_prompt(tmp_path, tok, empty):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "the day"}, {"prompt": empty}])
    with pytest.raises(DataError, match=r"data\.prompt_column 'prompt': row 1 is an empty"):
        load_prompts(DataConfig(path=path), tok)


# --------------------------------------------------------------------------- PromptSampler

def make_prompts(n):
    return [Prompt(text=f"p{i}", input_ids=[i], extra={"i": i}) for i in range(n)]


def idx(batch):
    return [p.extra["i"] for p in batch]


def take(sampler, n_batches):
    return [idx(sampler.next_batch()) for _ in range(n_batches)]


def test_sampler_deterministic_for_same_seed():
    prompts = make_prompts(10)
    a = take(PromptSampler(prompts, batch_size=3, seed=7), 8)
    b = take(PromptSampler(prompts, batch_size=3, seed=7), 8)
    c = take(PromptSampler(prompts, batch_size=3, seed=8), 8)
    assert a == b
    assert a != c
    # shuffled: not the identity order (seeded, so this is deterministic)
    assert sum(a, [])[:10] != list(range(10))


def test_sampler_full_pass_visits_each_prompt_once():
    prompts = make_prompts(10)
    s = PromptSampler(prompts, batch_size=5, seed=0)
    first_pass = sum(take(s, 2), [])
    assert sorted(first_pass) == list(range(10))
    # the order is the documented permutation for seed + epoch 0
    assert first_pass == torch.randperm(10, generator=torch.Generator().manual_seed(0)).tolist()


def test_sampler_wraps_into_new_permutation():
    prompts = make_prompts(10)
    s = PromptSampler(prompts, batch_size=4, seed=5)
    flat = sum(take(s, 5), [])  # 20 prompts = two full passes
    first, second = flat[:10], flat[10:]
    assert sorted(first) == list(range(10)) and sorted(second) == list(range(10))
    assert first == torch.randperm(10, generator=torch.Generator().manual_seed(5)).tolist()
    assert second == torch.randperm(10, generator=torch.Generator().manual_seed(6)).tolist()
    assert first != second
    # batch 3 straddles the passes: 2 from pass 0, 2 from pass 1
    assert flat[8:12] == first[8:] + second[:2]
    assert s.epoch == 1


def test_sampler_batch_larger_than_dataset():
    prompts = make_prompts(3)
    batch = idx(PromptSampler(prompts, batch_size=7, seed=1).next_batch())
    assert len(batch) == 7
    for start in (0, 3):  # two complete passes, then one prompt of the third
        assert sorted(batch[start:start + 3]) == [0, 1, 2]


@pytest.mark.parametrize("n", [10, 7])
def test_sampler_two_ranks_disjoint_and_cover(n):
    prompts = make_prompts(n)
    r0 = PromptSampler(prompts, batch_size=1, seed=3, rank=0, world_size=2)
    r1 = PromptSampler(prompts, batch_size=1, seed=3, rank=1, world_size=2)
    # each rank gets floor(n/2) per pass; with n odd the pass's last prompt is skipped, so the
    # ranks stay in step
    a = sum(take(r0, n // 2), [])
    b = sum(take(r1, n // 2), [])
    assert len(set(a)) == len(a) and len(set(b)) == len(b)
    assert not set(a) & set(b)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(3)).tolist()
    usable = perm[: 2 * (n // 2)]
    assert sorted(a + b) == sorted(usable)
    assert a == usable[0::2] and b == usable[1::2]
    assert r0.epoch == r1.epoch == 0
    take(r0, 1), take(r1, 1)
    assert r0.epoch == r1.epoch == 1  # both wrap at the same step


def test_sampler_no_shuffle_keeps_order():
    prompts = make_prompts(5)
    s = PromptSampler(prompts, batch_size=3, seed=123, shuffle=False)
    assert take(s, 4) == [[0, 1, 2], [3, 4, 0], [1, 2, 3], [4, 0, 1]]
    r1 = PromptSampler(prompts, batch_size=2, seed=0, shuffle=False, rank=1, world_size=2)
    assert take(r1, 3) == [[1, 3], [1, 3], [1, 3]]


def test_sampler_iter_yields_batches():
    prompts = make_prompts(4)
    it = iter(PromptSampler(prompts, batch_size=2, seed=0, shuffle=False))
    assert [idx(next(it)) for _ in range(3)] == [[0, 1], [2, 3], [0, 1]]


# --------------------------------------------------------------------------- left_pad

def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8], [9, 10]], pad_id=99)
    assert ids.dtype == torch.long and mask.dtype == torch.long
    assert ids.tolist() == [[5, 6, 7], [99, 99, 8], [99, 9, 10]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]


def test_left_pad_empty_sequence_and_pad_zero():
    ids, mask = left_pad([[], [0, 4]], pad_id=0)
    # token id 0 equal to the pad id is still a real token: the mask comes from lengths
    assert ids.tolist() == [[0, 0], [0, 4]]
    assert mask.tolist() == [[0, 0], [1, 1]]


def test_json_files_read_without_datasets(tmp_path, tok):
    """JSON / JSON Lines are read with the standard library: a column-oriented .json, JSON Lines
    in a .json file, and rows that lack a column (None there, as datasets would give)."""
    columnar = tmp_path / "cols.json"
    columnar.write_text(json.dumps({"prompt": ["the movie was", "i think the book is"],
                                    "label": [1, 0], "tag": ["x", "y"]}))
    check_rows(load_prompts(DataConfig(path=str(columnar)), tok), tok)
    lines = tmp_path / "lines.json"
    lines.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    check_rows(load_prompts(DataConfig(path=str(lines)), tok), tok)
    ragged = write_jsonl(tmp_path / "ragged.jsonl", [{"prompt": "the movie was", "label": 1},
                                                     {"prompt": "the day", "tag": "y"}])
    prompts = load_prompts(DataConfig(path=ragged), tok)
    assert [p.extra for p in prompts] == [{"label": 1, "tag": None}, {"label": None, "tag": "y"}]


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "the day"}\n{"prompt": "the \n', "line 2 is not valid JSON"),
    ('{"prompt": "the day"}\n[1, 2]\n', "row 1 is list, expected a JSON object"),
    ("\n\n", "has no rows"),
])
def test_bad_json_lines_name_the_file_and_line(tmp_path, tok, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=r"data\.path") as e:
        load_prompts(DataConfig(path=str(path)), tok)
    assert message in str(e.value) and "bad.jsonl" in str(e.value)
