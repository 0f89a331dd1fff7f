"""Generation, stop-token truncation and where the score lands."""

import dataclasses

import pytest
import torch

from rlhf_ppo import ops
from rlhf_ppo.config import GenerationConfig, ModelConfig, load_config
from rlhf_ppo.data import Prompt
from rlhf_ppo.models import ActorCritic, load_causal_lm, load_tokenizer
from rlhf_ppo.rollout import (
    decode_responses,
    draw,
    find_stops,
    generate,
    hf_generation_config,
    off_policy_settings,
    warp_scores,
)

PAD, EOS, STOP2 = 0, 3, 7


def test_find_stops_first_stop_token_included():
    responses = torch.tensor([
        [5, 6, EOS, 9, EOS],   # stops at index 2 -> length 3 (the stop token is kept)
        [EOS, 5, 6, 7, 8],     # stops at once -> length 1
        [5, 6, 8, 9, 10],      # never stops -> full length 5, not stopped
        [5, STOP2, 6, EOS, 0],  # an extra stop id at index 1 -> length 2
    ])
    lengths, stopped = find_stops(responses, [EOS, STOP2])
    assert lengths.tolist() == [3, 1, 5, 2]
    assert stopped.tolist() == [True, True, False, True]


def _tiny(tiny_policy_dir):
    cfg = ModelConfig(name_or_path=tiny_policy_dir)
    return load_causal_lm(tiny_policy_dir, cfg, "model"), load_tokenizer(cfg)


def test_find_stops_with_stop_strings(tiny_policy_dir):
    _, tok = _tiny(tiny_policy_dir)
    ids = torch.tensor([tok("good fun ! the day", add_special_tokens=False)["input_ids"],
                        tok("good fun and the day", add_special_tokens=False)["input_ids"]])
    lengths, stopped = find_stops(ids, [tok.eos_token_id], ["!"], tok)
    assert lengths.tolist() == [3, 5] and stopped.tolist() == [True, False]
    texts = decode_responses(ids, lengths, tok, ["!"])
    # the decoder's cleanup glues "fun !" into "fun!", so the cut leaves "good fun"
    assert texts == ["good fun", "good fun and the day"]


@pytest.mark.parametrize("backend", ["native", "transformers"])
def test_generate_masks_everything_after_the_first_stop(tiny_policy_dir, backend):
    model, tok = _tiny(tiny_policy_dir)
    torch.manual_seed(0)
    prompts = [Prompt(t, tok(t)["input_ids"]) for t in
               ["the movie was", "i think that the food is", "today"] * 6]
    r = generate(model, prompts, tok, GenerationConfig(max_new_tokens=12, batch_size=5,
                                                       backend=backend))
    B, R = r.response_mask.shape
    assert r.input_ids.shape == (B, r.prompt_length + R) and R <= 12
    resp = r.response_ids
    lengths = r.response_mask.sum(-1)
    assert r.stopped.any() and (~r.stopped).any()  # both cases occur with this seed
    for i in range(B):
        n = int(lengths[i])
        assert r.response_mask[i, :n].all() and not r.response_mask[i, n:].any()
        assert (resp[i, n:] == tok.pad_token_id).all()
        valid = resp[i, :n].tolist()
        if r.stopped[i]:
            assert valid[-1] == tok.eos_token_id and tok.eos_token_id not in valid[:-1]
        else:
            assert n == 12 and tok.eos_token_id not in valid
    # attention mask: left-padded prompt, then exactly the valid response tokens
    assert torch.equal(r.attention_mask[:, r.prompt_length:], r.response_mask)
    assert r.attention_mask[:, :r.prompt_length].sum(-1).tolist() == [len(p.input_ids)
                                                                        for p in prompts]
    # the score lands on the stop token itself (or the last token when there is none)
    scores = torch.arange(1, B + 1, dtype=torch.float32)
    rewards = ops.shape_rewards(scores, torch.zeros(B, R), r.response_mask, kl_coef=0.1)
    for i in range(B):
        n = int(lengths[i])
        assert rewards[i, n - 1] == scores[i] and rewards[i].sum() == scores[i]


@pytest.mark.parametrize("backend", ["native", "transformers"])
def test_sampling_ignores_model_generation_defaults(tiny_policy_dir, backend):
    """Pure sampling even when the checkpoint's generation_config asks for top_k=1 (greedy)."""
    model, tok = _tiny(tiny_policy_dir)
    model.generation_config.top_k = 1
    model.generation_config.do_sample = False
    torch.manual_seed(0)
    prompts = [Prompt("the movie was", tok("the movie was")["input_ids"])] * 16
    r = generate(model, prompts, tok, GenerationConfig(max_new_tokens=4, backend=backend))
    distinct = {tuple(row.tolist()) for row in r.response_ids}
    assert len(distinct) > 8  # greedy would give one response
    assert hf_generation_config(GenerationConfig(), tok, [3]).top_k == 0


def test_off_policy_settings_are_named():
    assert off_policy_settings(GenerationConfig()) == []
    found = off_policy_settings(GenerationConfig(top_k=5, top_p=0.9, min_new_tokens=2,
                                                 repetition_penalty=1.1))
    assert found == ["top_k=5", "top_p=0.9", "min_new_tokens=2", "repetition_penalty=1.1"]


def _prompts(tok, texts):
    return [Prompt(t, tok(t)["input_ids"]) for t in texts]


TEXTS = ["the movie was", "i think that the food is really", "today", "a b c d e f"]


def test_native_greedy_equals_transformers_generate(tiny_policy_dir):
    """The native loop's cache, positions and left padding: with top_k=1 both backends pick the
    same tokens, stops included."""
    model, tok = _tiny(tiny_policy_dir)
    prompts = _prompts(tok, TEXTS * 3)
    runs = [generate(model, prompts, tok, GenerationConfig(max_new_tokens=16, top_k=1,
                                                           backend=b))
            for b in ("native", "transformers")]
    assert torch.equal(runs[0].input_ids, runs[1].input_ids)
    assert torch.equal(runs[0].response_mask, runs[1].response_mask)
    assert runs[0].response_texts == runs[1].response_texts


def test_transformers_backend_with_a_static_cache(tiny_policy_dir):
    """generation.cache_implementation reaches model.generate: a static cache gives the dynamic
    cache's greedy tokens (on CPU; on CUDA transformers also compiles the decoding step)."""
    model, tok = _tiny(tiny_policy_dir)
    prompts = _prompts(tok, TEXTS * 2)
    cfg = GenerationConfig(max_new_tokens=10, top_k=1, backend="transformers")
    assert hf_generation_config(cfg, tok, []).cache_implementation is None
    static = dataclasses.replace(cfg, cache_implementation="static")
    assert hf_generation_config(static, tok, []).cache_implementation == "static"
    runs = [generate(model, prompts, tok, c) for c in (cfg, static)]
    assert torch.equal(runs[0].response_ids, runs[1].response_ids)
    loaded = load_config(overrides=["generation.backend=transformers",
                                    "generation.cache_implementation=static"])
    assert loaded.generation.cache_implementation == "static"


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_native_records_the_full_forward_logprobs_values_and_entropy(tiny_policy_dir,
                                                                     temperature):
    """What sampling records (rows that stop early are dropped from the batch mid-way) equals a
    full forward of the finished rollout, as PPO's recompute would give it."""
    model, tok = _tiny(tiny_policy_dir)
    ac = ActorCritic(model)
    torch.nn.init.normal_(ac.value_head.weight)  # non-zero values
    torch.manual_seed(0)
    cfg = GenerationConfig(max_new_tokens=12, temperature=temperature)
    r = generate(model, _prompts(tok, TEXTS * 4), tok, cfg, record=True,
                 value_fn=ac.shared_values)
    assert r.stopped.any() and (~r.stopped).any()  # both cases, so rows left the batch
    with torch.no_grad():
        lp, ent, v = ac(r.input_ids, r.attention_mask, r.prompt_length, temperature)
    m = r.response_mask.float()
    torch.testing.assert_close(r.logprobs, lp * m, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r.entropy, ent * m, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r.values, v * m, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sync_every", [3, 8, 64])
def test_native_loop_syncing_less_often_gives_the_same_rollout(tiny_policy_dir, sync_every):
    """On an accelerator the host checks for stopped rows only every few steps: rows that stopped
    in between run on, and are cut afterwards. Greedy tokens, lengths and recorded log-probs
    equal the every-step loop (as on CPU), also when every row stops between two checks."""
    from rlhf_ppo.data import left_pad
    from rlhf_ppo.rollout import sample_native, stop_token_ids

    model, tok = _tiny(tiny_policy_dir)
    ids, mask = left_pad([p.input_ids for p in _prompts(tok, TEXTS * 3)], tok.pad_token_id)
    # greedy (deterministic), with a repetition penalty so that a random-init model's rows vary
    cfg = GenerationConfig(max_new_tokens=20, top_k=1, repetition_penalty=100.0)
    with torch.no_grad():  # greedy rows don't depend on the stops: pick stops they will meet
        free = sample_native(model, ids, mask, cfg, [], tok)["response_ids"]
    stops = stop_token_ids(cfg, tok) + sorted({int(free[i, 2 + i]) for i in range(0, 12, 3)})
    with torch.no_grad():
        runs = [sample_native(model, ids, mask, cfg, stops, tok, sync_every=n)
                for n in (1, sync_every)]
    lengths, stopped = find_stops(runs[0]["response_ids"], stops)
    assert stopped.any() and lengths.min() < lengths.max()  # rows stop at different steps
    assert runs[0].keys() == runs[1].keys()
    for key in runs[0]:
        torch.testing.assert_close(runs[1][key], runs[0][key], atol=1e-6, rtol=1e-6, msg=key)


@pytest.mark.parametrize("method", ["cdf", "race"])
def test_draw_samples_the_distribution(method):
    probs = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05, 0.0])
    batch = probs.expand(4, -1) * 3  # unnormalised
    torch.manual_seed(0)
    n = 50_000
    counts = torch.zeros(6)
    for _ in range(n // 4 // 1000):
        toks = torch.stack([draw(batch, method) for _ in range(1000)]).flatten()
        counts += torch.bincount(toks, minlength=6).float()
    freq = counts / counts.sum()
    assert counts[1] == 0 and counts[5] == 0  # zero-probability tokens never come up
    sigma = (probs * (1 - probs) / counts.sum()).sqrt()
    assert ((freq - probs).abs() <= 4 * sigma + 1e-9).all(), (freq, probs)


def test_warp_scores_equals_transformers_processors():
    """min_new_tokens, repetition penalty, temperature, top-k and top-p give the distribution
    ``generate`` samples from (prompts without padding: transformers also penalises pads)."""
    from transformers import (
        LogitsProcessorList,
        MinNewTokensLengthLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    B, V, P = 4, 50, 6
    logits = torch.randn(B, V) * 3
    ids = torch.randint(0, V, (B, P + 2))  # prompt + 2 generated tokens
    stop = [3, 7]
    cfg = GenerationConfig(temperature=0.7, top_k=20, top_p=0.8, min_new_tokens=5,
                           repetition_penalty=1.3)
    hf = LogitsProcessorList([
        MinNewTokensLengthLogitsProcessor(P, 5, stop), RepetitionPenaltyLogitsProcessor(1.3),
        TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.8)])
    expected = hf(ids, logits.clone()).softmax(-1)
    seen = torch.zeros(B, V, dtype=torch.bool).scatter_(1, ids, True)
    got = warp_scores(logits / 0.7, cfg, step=2, stop_ids=stop, seen=seen).softmax(-1)
    torch.testing.assert_close(got, expected)
    assert (got[:, stop] == 0).all()
    # past min_new_tokens the stop tokens are allowed again
    later = warp_scores(logits / 0.7, GenerationConfig(min_new_tokens=5), 5, stop)
    assert torch.equal(later, logits / 0.7)


def test_min_new_tokens_and_repetition_penalty_in_the_native_loop(tiny_policy_dir,
                                                                   monkeypatch):
    """min_new_tokens holds stops back; the repetition penalty sees exactly each row's real
    prompt tokens (not its padding) plus what it generated so far."""
    import rlhf_ppo.rollout as rollout_mod

    model, tok = _tiny(tiny_policy_dir)
    seen_at = []
    real = rollout_mod.warp_scores

    def spy(scores, cfg, step, stop_ids, seen=None):
        seen_at.append(seen.clone())
        return real(scores, cfg, step, stop_ids, seen)
    monkeypatch.setattr(rollout_mod, "warp_scores", spy)
    torch.manual_seed(0)
    prompts = _prompts(tok, TEXTS * 2)
    r = generate(model, prompts, tok, GenerationConfig(max_new_tokens=8, min_new_tokens=8,
                                                       repetition_penalty=1.5))
    assert (r.response_mask.sum(-1) == 8).all() and len(seen_at) == 8
    for i, (row, prompt) in enumerate(zip(r.response_ids.tolist(), r.prompts)):
        assert tok.eos_token_id not in row[:7]
        for t in range(8):  # no row stops, so batch position i is row i at every step
            expected = set(prompt.input_ids) | set(row[:t])
            assert set(seen_at[t][i].nonzero().flatten().tolist()) == expected, (i, t)


def test_native_stop_strings_end_rows_early(tiny_policy_dir):
    model, tok = _tiny(tiny_policy_dir)
    torch.manual_seed(0)
    cfg = GenerationConfig(max_new_tokens=24, stop_strings=["the"])
    r = generate(model, _prompts(tok, TEXTS * 4), tok, cfg, record=True)
    last = r.response_ids.gather(1, r.response_mask.sum(-1, keepdim=True) - 1).squeeze(1)
    assert (r.stopped & (last != tok.eos_token_id)).any()  # some rows stopped on the string
    for text, ids, n, stopped in zip(r.response_texts, r.response_ids, r.response_mask.sum(-1),
                                     r.stopped):
        assert "the" not in text
        # a response stopped by the string ends with the token that completes it
        full = tok.decode(ids[:n].tolist(), skip_special_tokens=False)
        if not stopped:
            assert "the" not in full
        elif ids[n - 1] != tok.eos_token_id:
            assert "the" in full
            assert "the" not in tok.decode(ids[:n - 1].tolist(), skip_special_tokens=False)
    # recorded values stop where the mask stops
    assert (r.logprobs[r.response_mask == 0] == 0).all()


def _toy_rollout(prompt_len: int, resp_len: int, rows: int, offset: int):
    from rlhf_ppo.rollout import Rollout

    ids = torch.arange(rows * (prompt_len + resp_len)).view(rows, -1) + offset
    am = torch.ones_like(ids)
    am[:, 0] = 0  # one left pad per prompt
    rm = torch.ones(rows, resp_len, dtype=torch.long)
    rm[:, -1] = 0  # one right pad per response
    return Rollout(input_ids=ids, attention_mask=am, prompt_length=prompt_len, response_mask=rm,
                   stopped=torch.ones(rows, dtype=torch.bool), prompts=[f"p{offset}"] * rows,
                   response_texts=[f"r{offset}"] * rows, logprobs=torch.full((rows, resp_len), -1.0))


def test_rollout_concat_repads_prompts_left_and_responses_right():
    from rlhf_ppo.rollout import Rollout

    a, b = _toy_rollout(2, 3, 2, 0), _toy_rollout(4, 2, 1, 100)
    c = Rollout.concat([a, b], pad_id=-1)
    assert c.prompt_length == 4 and c.response_mask.shape == (3, 3)
    # a's rows: two pad columns on the left, responses unchanged; b's row: one pad on the right
    assert c.input_ids[0].tolist() == [-1, -1] + a.input_ids[0].tolist()
    assert c.attention_mask[0].tolist() == [0, 0] + a.attention_mask[0].tolist()
    assert c.input_ids[2].tolist() == b.input_ids[0].tolist() + [-1]
    assert c.response_mask[2].tolist() == [1, 0, 0] and c.logprobs[2].tolist() == [-1.0, -1.0, 0.0]
    assert torch.equal(c.response_ids[0], a.response_ids[0]) and c.prompts == ["p0", "p0", "p100"]


def test_dynamic_sampling_keeps_informative_groups_and_refills():
    from rlhf_ppo.rollout import dynamic_sampling

    first = _toy_rollout(2, 3, 4, 0)  # groups of 2: scores (1, 1) no signal, (0, 1) signal
    extra = _toy_rollout(3, 3, 4, 1000)  # (5, 5) no signal, (2, 3) signal
    calls = []

    def resample():
        calls.append(1)
        return extra, torch.tensor([5.0, 5.0, 2.0, 3.0])
    r, s, m = dynamic_sampling(first, torch.tensor([1.0, 1.0, 0.0, 1.0]), 2, resample,
                               lambda short: short, pad_id=-1)
    assert len(calls) == 1 and s.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert r.prompts == ["p0", "p0", "p1000", "p1000"] and r.prompt_length == 3
    assert m == {"dynamic/informative_first": 0.5, "dynamic/rounds": 1.0,
                 "dynamic/informative_kept": 1.0}
    # no informative group anywhere: at most DYNAMIC_SAMPLING_ROUNDS more rounds, then the
    # batch is filled with what there is
    from rlhf_ppo.rollout import DYNAMIC_SAMPLING_ROUNDS

    calls.clear()
    flat = lambda: (calls.append(1) or extra, torch.tensor([5.0, 5.0, 4.0, 4.0]))
    r, s, m = dynamic_sampling(first, torch.tensor([1.0, 1.0, 2.0, 2.0]), 2, flat,
                               lambda short: short, pad_id=-1)
    assert len(calls) == DYNAMIC_SAMPLING_ROUNDS and len(s) == 4
    assert m["dynamic/informative_kept"] == 0.0
    # another process is short: this one samples too (the rounds stay in step)
    calls.clear()
    dynamic_sampling(first, torch.tensor([0.0, 1.0, 2.0, 3.0]), 2, resample,
                     lambda short: len(calls) == 0, pad_id=-1)
    assert len(calls) == 1
