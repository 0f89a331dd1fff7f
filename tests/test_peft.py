"""LoRA: one copy of the base weights, the reference as the adapter-disabled base (or the frozen
SFT adapter), adapter and merged saving, resume."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf_ppo import PPOTrainer, load_config
from rlhf_ppo.models import reference_logprobs

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
SMALL = ["ppo.batch_size=8", "ppo.micro_batch_size=4", "generation.max_new_tokens=8",
         "peft.enabled=true", "peft.r=8", "optim.lr=1e-2"]


def lora_config(out, *overrides):
    return load_config(TINY, [f"output_dir={out}", *SMALL, *overrides])


def batch(trainer):
    """A fixed rollout of the trainer's first prompts."""
    from rlhf_ppo.rollout import generate

    torch.manual_seed(0)
    r = generate(trainer.unwrapped.policy, trainer.sampler.prompts[:6], trainer.tokenizer,
                 trainer.cfg.generation)
    return r.input_ids, r.attention_mask, r.prompt_length, r.response_mask.bool()


def policy_logprobs(trainer, ids, am, P):
    with torch.no_grad():
        trainer.unwrapped.eval()
        return trainer.unwrapped(ids, am, P)[0]


def test_reference_is_the_base_without_adapter_and_base_weights_exist_once(tmp_path):
    trainer = PPOTrainer(lora_config(tmp_path, "iterations=2"))
    ac = trainer.unwrapped
    base = AutoModelForCausalLM.from_pretrained(ac.policy.peft_config["default"].base_model_name_or_path)
    assert not list(trainer.ref.parameters())  # the reference owns no weights of its own
    trained = {n: p.numel() for n, p in ac.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or n.startswith("value_head") for n in trained)
    # everything that is not trained is the base model, once
    frozen = sum(p.numel() for p in ac.parameters()) - sum(trained.values())
    assert frozen == sum(p.numel() for p in base.parameters())
    ids, am, P, mask = batch(trainer)
    trainer.train()
    with torch.no_grad():
        expected = reference_logprobs(base, ids, am, P)
        got = trainer.ref(ids, am, P)
    torch.testing.assert_close(got[mask], expected[mask])
    # ... while the trained policy has moved away from it
    assert (policy_logprobs(trainer, ids, am, P)[mask] - expected[mask]).abs().max() > 1e-3


def make_sft_adapter(base_dir, out):
    """A LoRA 'SFT' adapter with non-zero weights, so the SFT model differs from the base."""
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(7)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                            init_lora_weights=False))
    model.save_pretrained(out)
    return out


def test_sft_adapter_stays_the_reference_while_its_copy_trains(tmp_path):
    from peft import PeftModel

    from rlhf_ppo.builtin import resolve_model

    base_dir = resolve_model("builtin:tiny")
    sft = make_sft_adapter(base_dir, tmp_path / "sft")
    trainer = PPOTrainer(lora_config(tmp_path / "run", "iterations=2", f"peft.adapter_path={sft}"))
    ids, am, P, mask = batch(trainer)
    sft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), sft)
    bare = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        sft_lp = reference_logprobs(sft_model, ids, am, P)
        bare_lp = reference_logprobs(bare, ids, am, P)
    assert (sft_lp[mask] - bare_lp[mask]).abs().max() > 1e-2  # the SFT adapter matters
    torch.testing.assert_close(trainer.ref(ids, am, P)[mask], sft_lp[mask])
    torch.testing.assert_close(policy_logprobs(trainer, ids, am, P)[mask], sft_lp[mask])
    trainer.train()
    torch.testing.assert_close(trainer.ref(ids, am, P)[mask], sft_lp[mask])  # still the SFT model
    assert (policy_logprobs(trainer, ids, am, P)[mask] - sft_lp[mask]).abs().max() > 1e-3
    assert trainer.unwrapped.policy.active_adapter == "default"


def test_saved_adapter_and_merged_model_reproduce_the_policy(tmp_path):
    from peft import PeftModel

    trainer = PPOTrainer(lora_config(tmp_path, "iterations=2", "peft.save_merged=true"))
    trainer.train()
    ids, am, P, mask = batch(trainer)
    expected = policy_logprobs(trainer, ids, am, P)
    base_dir = trainer.unwrapped.policy.peft_config["default"].base_model_name_or_path
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir),
                                        tmp_path / "final")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "final" / "merged")
    # the adapter names its base as the config did (portable), not the resolved cache path ...
    saved = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "builtin:tiny" != base_dir
    # ... and load_policy resolves it again
    from rlhf_ppo import load_policy

    loaded = load_policy(tmp_path / "final")
    with torch.no_grad():
        torch.testing.assert_close(reference_logprobs(loaded, ids, am, P)[mask], expected[mask])
        torch.testing.assert_close(reference_logprobs(adapter, ids, am, P)[mask], expected[mask])
        torch.testing.assert_close(reference_logprobs(merged, ids, am, P)[mask], expected[mask],
                                   atol=1e-5, rtol=1e-4)


def test_lora_learns_and_resumes_exactly(tmp_path):
    # The tiny model's token preferences live in its (tied) output layer: adapt it too.
    learn = ["ppo.batch_size=16", "ppo.micro_batch_size=8", "optim.lr=2e-2",
             "peft.target_modules=[q_proj,v_proj,up_proj,down_proj,lm_head]"]
    full = PPOTrainer(lora_config(tmp_path / "full", "iterations=12", *learn)).train()
    first = sum(m["score_mean"] for m in full[:3]) / 3
    assert sum(m["score_mean"] for m in full[-3:]) / 3 > first + 0.3
    PPOTrainer(lora_config(tmp_path / "part", "iterations=6", *learn)).train()
    PPOTrainer(lora_config(tmp_path / "part", "iterations=12", "resume_from=latest", *learn)).train()
    lines = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    strip = lambda m: {k: v for k, v in m.items() if not k.startswith(("time/", "tokens_per"))}
    assert [strip(m) for m in lines] == [strip(m) for m in full]


def test_reference_checkpoint_with_lora_is_refused(tmp_path):
    from rlhf_ppo.models import ModelLoadError

    with pytest.raises(ModelLoadError, match="model.ref_name_or_path"):
        PPOTrainer(lora_config(tmp_path, "model.ref_name_or_path=builtin:tiny"))


def test_critic_adapter_shares_the_base_trains_and_resumes(tmp_path):
    """model.critic=separate with LoRA: a second adapter of the same base plus a value head."""
    from peft import PeftModel

    from rlhf_ppo.builtin import resolve_model

    crit = ["model.critic=separate", "optim.critic_lr=5e-2"]
    trainer = PPOTrainer(lora_config(tmp_path / "full", "iterations=4", *crit))
    ac = trainer.unwrapped
    base = AutoModelForCausalLM.from_pretrained(resolve_model("builtin:tiny"))
    policy_ids = {id(p) for p in ac.policy_parameters()}
    critic_ids = {id(p) for p in ac.critic_parameters()}
    named = {id(p): n for n, p in ac.named_parameters() if p.requires_grad}
    assert not policy_ids & critic_ids and policy_ids | critic_ids == set(named)
    assert all(".default." in named[i] for i in policy_ids)
    assert all(".critic." in named[i] or named[i].startswith("value_head") for i in critic_ids)
    frozen = sum(p.numel() for p in ac.parameters() if not p.requires_grad)
    assert frozen == sum(p.numel() for p in base.parameters())  # the base exists once
    before = {n: p.detach().clone() for n, p in ac.named_parameters() if p.requires_grad}
    history = trainer.train()
    ids, am, P, mask = batch(trainer)  # after training: it draws from the global generator
    moved = {n for n, p in ac.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert any(".critic." in n for n in moved) and any(".default." in n for n in moved)
    assert history[-1]["explained_variance"] != 0.0
    with torch.no_grad():  # the reference is still the bare base
        torch.testing.assert_close(trainer.ref(ids, am, P)[mask],
                                   reference_logprobs(base, ids, am, P)[mask])
    # the saved policy adapter reproduces the policy; the critic adapter is saved beside it
    final = tmp_path / "full" / "final"
    assert (final / "critic" / "adapter_model.safetensors").is_file()
    assert (final / "critic" / "value_head.safetensors").is_file()
    assert not (final / "value_head.safetensors").exists()
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
        resolve_model("builtin:tiny")), final)
    with torch.no_grad():
        torch.testing.assert_close(reference_logprobs(adapter, ids, am, P)[mask],
                                   policy_logprobs(trainer, ids, am, P)[mask])
    # resuming restores both adapters and the head exactly
    PPOTrainer(lora_config(tmp_path / "part", "iterations=2", "save_every=2", *crit)).train()
    PPOTrainer(lora_config(tmp_path / "part", "iterations=4", "resume_from=latest", *crit)).train()
    lines = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    strip = lambda m: {k: v for k, v in m.items() if not k.startswith(("time/", "tokens_per"))}
    assert [strip(m) for m in lines] == [strip(m) for m in history]


def test_critic_adapter_refuses_a_critic_checkpoint(tmp_path):
    from rlhf_ppo.models import ModelLoadError

    with pytest.raises(ModelLoadError, match="model.critic_name_or_path"):
        PPOTrainer(lora_config(tmp_path, "model.critic=separate",
                               "model.critic_name_or_path=builtin:tiny"))
