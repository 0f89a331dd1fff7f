"""Padding-free packed forward passes give the padded path's numbers (rlhf_ppo/packing.py)."""

import pytest
import torch
import transformers

from rlhf_ppo.config import ModelConfig
from rlhf_ppo.models import ActorCritic, ReferenceModel, load_causal_lm, load_sequence_classifier
from rlhf_ppo.packing import attention_weight, check_packing, pack, packed_positions
from rlhf_ppo.rewards import score_sequences

V = 50
SMALL = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
ARCHS = {
    "llama": (transformers.LlamaConfig, dict(intermediate_size=64, num_key_value_heads=2)),
    "qwen2": (transformers.Qwen2Config, dict(intermediate_size=64, num_key_value_heads=2)),
    "gpt2": (transformers.GPT2Config, dict(n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                           bos_token_id=1, eos_token_id=2)),
    "gpt_neox": (transformers.GPTNeoXConfig, dict(intermediate_size=64)),
    "gemma2": (transformers.Gemma2Config, dict(intermediate_size=64, num_key_value_heads=2,
                                               head_dim=8, sliding_window=4)),
}


def _config(arch, **extra):
    cls, kw = ARCHS[arch]
    args = {**SMALL, **kw, **extra, "pad_token_id": 0}
    if arch == "gpt2":
        args = {k: v for k, v in args.items()
                if k not in ("hidden_size", "num_hidden_layers", "num_attention_heads")}
    return cls(**args)


def _saved(tmp_path, arch, task="causal-lm", seed=0):
    """A random-init model of ``arch`` saved and loaded back through rlhf_ppo's loaders."""
    torch.manual_seed(seed)
    if task == "causal-lm":
        model = transformers.AutoModelForCausalLM.from_config(_config(arch))
    else:
        model = transformers.AutoModelForSequenceClassification.from_config(
            _config(arch, num_labels=1))
    folder = tmp_path / f"{arch}-{task}"
    model.save_pretrained(folder)
    cfg = ModelConfig(name_or_path=str(folder))
    if task == "causal-lm":
        return load_causal_lm(str(folder), cfg, "model.name_or_path")
    return load_sequence_classifier(str(folder), cfg, "reward.sources[0].model", trainable=True)


def _rollout_batch(seed=0, B=6, P=7, R=9):
    """Left-padded prompts (1..P real tokens) then right-padded responses (1..R real tokens)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, P + R), generator=g)
    p_len = torch.randint(1, P + 1, (B,), generator=g)
    r_len = torch.randint(1, R + 1, (B,), generator=g)
    p_len[0], r_len[1] = P, R  # a full-width prompt and response
    cols = torch.arange(P + R)
    mask = ((cols >= P - p_len[:, None]) & (cols < P + r_len[:, None])).long()
    ids = ids * mask  # padding holds the pad id 0
    return ids, mask, P


def test_pack_layout_by_hand():
    # prompts of 2 and 1 real tokens (P=2), responses of 1 and 3 (R=3): lengths 3 and 4.
    ids = torch.tensor([[5, 6, 7, 0, 0],
                        [0, 8, 9, 10, 11]])
    mask = torch.tensor([[1, 1, 1, 0, 0],
                         [0, 1, 1, 1, 1]])
    # One row of 7 (the default, attention counted as free) ...
    p = pack(ids, mask, 2)
    assert p.input_ids.tolist() == [[8, 9, 10, 11, 5, 6, 7]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    assert p.response_index.tolist() == [5, 0, 1, 2] and p.tail == 0
    assert p.unpack(torch.tensor([1., 2., 3., 4.])).tolist() == [[1, 0, 0], [2, 3, 4]]
    # ... or, when attention is costly, rows of the longest (4): 2 x 4 x (1 + 4) = 40 positions'
    # worth against 1 x 7 x (1 + 7) = 56; the 4-token sequence fills row 0, the 3-token one row 1.
    p = pack(ids, mask, 2, attention=1.0)
    assert p.input_ids.tolist() == [[8, 9, 10, 11], [5, 6, 7, 0]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 2, 0]]
    assert p.response_tokens.tolist() == [7, 9, 10, 11]
    assert p.response_index.tolist() == [5, 0, 1, 2]  # the position before each token
    assert p.last_index.tolist() == [6, 3]
    assert p.tail == 1
    assert p.unpack(torch.tensor([1., 2., 3., 4.])).tolist() == [[1, 0, 0], [2, 3, 4]]


def test_pack_shares_rows_first_fit_decreasing():
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]])
    p = pack(torch.ones(4, 6, dtype=torch.long), mask, 5, attention=1.0)
    # lengths 6, 3, 4, 2 into rows of the longest, 6: [6], [4, 2], [3]
    assert p.input_ids.shape == (3, 6)
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]
    assert p.tail == 3
    assert packed_positions(mask, 1.0) == 18
    # attention at 0.05 per pair: rows of 8 (15 tokens / 2) cost 2 x 8 x 1.4 = 22.4, less than
    # 3 x 6 x 1.3 = 23.4 (rows of 6) or 1 x 15 x 1.75 = 26.25 (one row)
    assert packed_positions(mask, 0.05) == 16


def test_attention_weight_of_a_config():
    # SmolLM2-135M's shape: hidden 576, MLP 1536 -> 2 / (4 x 576 + 3 x 1536)
    cfg = transformers.LlamaConfig(hidden_size=576, intermediate_size=1536)
    assert attention_weight(cfg) == pytest.approx(2 / 6912)
    assert attention_weight(transformers.GPT2Config(n_embd=64)) == pytest.approx(2 / (256 + 768))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_packed_logprobs_values_and_grads_equal_padded(tmp_path, arch):
    """Log-probs, entropies and values (shared head and separate critic) per real token to 1e-5,
    and the gradient of a loss over them, packed against padded."""
    policy = _saved(tmp_path, arch)
    critic = _saved(tmp_path, arch, task="reward", seed=1)
    assert check_packing(policy, "policy") and check_packing(critic, "critic")
    ids, mask, P = _rollout_batch()
    resp = mask[:, P:].bool()
    for ac in (ActorCritic(policy), ActorCritic(policy, critic)):
        if ac.value_head is not None:
            torch.nn.init.normal_(ac.value_head.weight)  # non-zero values, so they are compared
        out, grads = {}, {}
        for packed in (False, True):
            ac.zero_grad()
            ac.pack_sequences = packed
            lp, ent, v = ac(ids, mask, P, temperature=0.7)
            (lp * resp).sum().backward(retain_graph=True)
            ((v * resp) ** 2).sum().backward()
            out[packed] = [x[resp] for x in (lp, ent, v)]
            grads[packed] = [p.grad.clone() for p in ac.parameters() if p.grad is not None]
            if packed:  # padding positions are exactly 0 on the packed path
                assert (lp[~resp] == 0).all() and (v[~resp] == 0).all()
        for a, b in zip(out[False], out[True]):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
        assert len(grads[False]) == len(grads[True]) > 0
        for a, b in zip(grads[False], grads[True]):  # to 1e-5 of each tensor's largest entry
            torch.testing.assert_close(b, a, atol=1e-5 * float(a.abs().max()), rtol=0)
        ac.pack_sequences = True
        with torch.no_grad():
            torch.testing.assert_close(ac.values(ids, mask, P)[resp], out[False][2],
                                       atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packed_reference_and_reward_scores_equal_padded(tmp_path, arch):
    """The scoring passes: reference log-probs, and reward scores on left- and right-padded
    batches (a reward model with its own tokenizer sees right-padded text)."""
    ref = ReferenceModel(_saved(tmp_path, arch))
    rm = _saved(tmp_path, arch, task="reward", seed=2)
    ids, mask, P = _rollout_batch(seed=3)
    resp = mask[:, P:].bool()
    a = ref(ids, mask, P)
    ref.pack_sequences = True
    torch.testing.assert_close(ref(ids, mask, P)[resp], a[resp], atol=1e-5, rtol=0)
    # right padding: every row's real tokens moved to the front
    right_ids, right_mask = torch.zeros_like(ids), torch.zeros_like(mask)
    for i in range(len(ids)):
        n = int(mask[i].sum())
        right_ids[i, :n], right_mask[i, :n] = ids[i][mask[i].bool()], 1
    with torch.no_grad():
        for x, m in ((ids, mask), (right_ids, right_mask)):
            torch.testing.assert_close(score_sequences(rm, x, m, pack_sequences=True),
                                       score_sequences(rm, x, m), atol=1e-5, rtol=0)


def test_architecture_without_packed_attention_falls_back(tmp_path, caplog):
    """BLOOM's ALiBi positions come from the attention mask, not the position ids: packing would
    let sequences see each other, so the check refuses it (and says so)."""
    torch.manual_seed(0)
    model = transformers.BloomForCausalLM(transformers.BloomConfig(
        vocab_size=V, hidden_size=32, n_layer=2, n_head=4, pad_token_id=0))
    with caplog.at_level("WARNING"):
        assert not check_packing(model, "model.name_or_path")
    assert "model.name_or_path (BloomForCausalLM)" in caplog.text
    assert check_packing(_saved(tmp_path, "llama"), "model.name_or_path")


def test_pack_refuses_a_row_without_a_prompt_token():
    # the first response token would be predicted by another sequence's last position
    with pytest.raises(ValueError, match="real prompt token"):
        pack(torch.ones(2, 4, dtype=torch.long), torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]]), 2)
