"""Test helpers: a rollout built by hand, as rollout.generate lays one out (for the tests that
score text), and a recorder of the experience batches the PPO update receives."""

import torch

from rlhf_ppo.data import Prompt, left_pad
from rlhf_ppo.rollout import Rollout


def rollout_of(tok, prompts: list[Prompt], responses: list[str]) -> Rollout:
    """A rollout as rollout.generate builds it: prompts left-padded, responses + EOS (stopped)."""
    p_ids, p_mask = left_pad([p.input_ids for p in prompts], tok.pad_token_id)
    resp = [tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in responses]
    R = max(len(r) for r in resp)
    r_ids = torch.full((len(resp), R), tok.pad_token_id)
    r_mask = torch.zeros((len(resp), R), dtype=torch.long)
    for i, r in enumerate(resp):
        r_ids[i, :len(r)], r_mask[i, :len(r)] = torch.tensor(r), 1
    return Rollout(input_ids=torch.cat([p_ids, r_ids], 1), attention_mask=torch.cat([p_mask, r_mask], 1),
                   prompt_length=p_ids.shape[1], response_mask=r_mask,
                   stopped=torch.ones(len(resp), dtype=torch.bool), prompts=prompts,
                   response_texts=tok.batch_decode(r_ids, skip_special_tokens=True))


def record_updates(trainer) -> list[tuple]:
    """Wrap ``trainer.update`` so every call's ``(batch, value_loss_scale)`` is appended to the
    returned list before the real update runs."""
    calls: list[tuple] = []
    update = trainer.update

    def recorded(batch, value_loss_scale=1.0):
        calls.append((batch, value_loss_scale))
        return update(batch, value_loss_scale)

    trainer.update = recorded
    return calls
