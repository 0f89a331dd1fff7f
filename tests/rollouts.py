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


def multiturn_rollout(prompts: list[Prompt], turns: list[list[tuple[list[int], bool]]],
                      pad_id: int, turn_rewards: list[dict[int, float]] | None = None,
                      tokenizer=None) -> Rollout:
    """A multi-turn rollout built by hand: row ``b``'s response region is the segments
    ``turns[b]`` in order, each ``(token ids, trained)``: the model's turns (trained: response
    mask 1) and the environment's tokens between them (read, attention 1, response mask 0),
    then padding (both masks 0). ``turn_rewards[b]``: ``{response column: reward}``."""
    p_ids, p_mask = left_pad([p.input_ids for p in prompts], pad_id)
    R = max(sum(len(ids) for ids, _ in row) for row in turns)
    B = len(turns)
    r_ids = torch.full((B, R), pad_id)
    r_attn = torch.zeros((B, R), dtype=torch.long)
    r_mask = torch.zeros((B, R), dtype=torch.long)
    for b, row in enumerate(turns):
        t = 0
        for ids, trained in row:
            r_ids[b, t:t + len(ids)], r_attn[b, t:t + len(ids)] = torch.tensor(ids), 1
            r_mask[b, t:t + len(ids)] = int(trained)
            t += len(ids)
    rewards = None
    if turn_rewards is not None:
        rewards = torch.zeros(B, R)
        for b, placed in enumerate(turn_rewards):
            for t, value in placed.items():
                rewards[b, t] = value
    texts = [tokenizer.decode([i for ids, trained in row if trained for i in ids])
             if tokenizer is not None else "" for row in turns]
    return Rollout(input_ids=torch.cat([p_ids, r_ids], 1),
                   attention_mask=torch.cat([p_mask, r_attn], 1), prompt_length=p_ids.shape[1],
                   response_mask=r_mask, stopped=torch.ones(B, dtype=torch.bool),
                   prompts=list(prompts), response_texts=texts, turn_rewards=rewards)
