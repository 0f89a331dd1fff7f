"""Generation, stop-token truncation and where the score lands."""

import torch

from rlhf_ppo import ops
from rlhf_ppo.config import GenerationConfig, ModelConfig
from rlhf_ppo.data import Prompt
from rlhf_ppo.models import load_causal_lm, load_tokenizer
from rlhf_ppo.rollout import (
    decode_responses,
    find_stops,
    generate,
    hf_generation_config,
    off_policy_settings,
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


def test_generate_masks_everything_after_the_first_stop(tiny_policy_dir):
    model, tok = _tiny(tiny_policy_dir)
    torch.manual_seed(0)
    prompts = [Prompt(t, tok(t)["input_ids"]) for t in
               ["the movie was", "i think that the food is", "today"] * 6]
    r = generate(model, prompts, tok, GenerationConfig(max_new_tokens=12, batch_size=5))
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


def test_sampling_ignores_model_generation_defaults(tiny_policy_dir):
    """Pure sampling even when the checkpoint's generation_config asks for top_k=1 (greedy)."""
    model, tok = _tiny(tiny_policy_dir)
    model.generation_config.top_k = 1
    model.generation_config.do_sample = False
    torch.manual_seed(0)
    prompts = [Prompt("the movie was", tok("the movie was")["input_ids"])] * 16
    r = generate(model, prompts, tok, GenerationConfig(max_new_tokens=4))
    distinct = {tuple(row.tolist()) for row in r.response_ids}
    assert len(distinct) > 8  # greedy would give one response
    assert hf_generation_config(GenerationConfig(), tok, [3]).top_k == 0


def test_off_policy_settings_are_named():
    assert off_policy_settings(GenerationConfig()) == []
    found = off_policy_settings(GenerationConfig(top_k=5, top_p=0.9, min_new_tokens=2,
                                                 repetition_penalty=1.1))
    assert found == ["top_k=5", "top_p=0.9", "min_new_tokens=2", "repetition_penalty=1.1"]
