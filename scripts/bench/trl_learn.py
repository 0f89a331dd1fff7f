"""The TRL side of ``scripts/bench/learning_bench.py``: TRL 1.12's PPO (``trl.experimental.ppo``) trained
on the same models and prompt ids as an rlhf_ppo run, saving the final policy for
``rlhf-ppo evaluate``. Run with the python of a venv that has ``trl==1.12.0`` (this file does not
import rlhf_ppo):

    trl-venv/bin/python scripts/bench/trl_learn.py --policy SFT --reward RM \\
        --prompt-ids prompt_ids.jsonl --settings trl_settings.json --seed 0 --kl-coef 0.5 \\
        --output-dir runs/x/train

``--settings`` is a JSON object of ``PPOConfig`` keyword arguments (``learning_bench.trl_settings``
maps an rlhf_ppo config to it); ``--seed`` and ``--kl-coef`` override its ``seed`` and
``kl_coef``. ``--prompt-ids`` holds one JSON list of token ids per line (the prompts as rlhf_ppo's
``load_prompts`` encodes them). The value model is initialised from the reward model, as TRL's
examples do; the reference (a second load of the policy) and the reward model are frozen.

Two optional departures from stock TRL, to isolate differences from rlhf_ppo:
``--clip-grad-norm X`` clips the global gradient norm before each optimizer step (TRL 1.12's PPO
never clips: ``max_grad_norm`` is unused), ``--critic-lr X`` gives the value model its own
learning rate (a second AdamW parameter group; TRL has one learning rate).

Outputs in ``--output-dir``: ``final/`` (the policy and tokenizer, ``save_pretrained``),
``metrics.jsonl`` (TRL's logged metrics per iteration plus ``time/iteration`` and ``grad_norm``),
``result.json`` (also printed as the last stdout line, prefixed ``TRL_LEARN_RESULT``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path


def repeat_to_batches(rows: list, batch: int, cap: int = 100_000) -> list:
    """``rows`` repeated so that TRL's DataLoader (shuffle, ``drop_last=True``) yields full
    batches and, where the length stays under ``cap``, every prompt equally often per pass:
    ``lcm(len(rows), batch)`` rows (rlhf_ppo draws batches from consecutive permutations of the
    prompts, which gives each prompt the same share). With fewer rows than ``batch`` prompts TRL
    would yield no batch at all and loop forever."""
    n = len(rows)
    if n == 0:
        raise SystemExit("--prompt-ids: no prompts")
    total = n * batch // math.gcd(n, batch)
    if total > cap:
        total = max(n, batch)
    return [rows[i % n] for i in range(math.ceil(total / n) * n)]


class Recorder:
    """Per-iteration wall time, gradient norms (before any clipping) and optimizer steps, and
    TRL's logged metrics, written to ``metrics.jsonl``."""

    def __init__(self, path: Path):
        self.path, self.iter_s, self.steps, self.grad_norms = path, [], [], []
        self._steps, self._norms, self.rows = 0, [], []
        self.start = time.perf_counter()

    def begin(self) -> None:
        self.start = time.perf_counter()

    def pre_step(self, params, max_norm: float | None):
        import torch

        def hook(*_args):
            grads = [p for p in params if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm else float("inf"))
            self._norms.append(float(norm))
        return hook

    def post_step(self, *_args) -> None:
        self._steps += 1

    def log(self, logs: dict) -> None:
        if "episode" in logs:  # an iteration's metrics (not the end-of-training summary)
            self.rows.append(dict(logs))

    def step_end(self) -> None:
        now = time.perf_counter()
        self.iter_s.append(now - self.start)
        self.start = now
        self.steps.append(self._steps)
        norm = sum(self._norms) / len(self._norms) if self._norms else float("nan")
        self.grad_norms.append(norm)
        self._steps, self._norms = 0, []

    def write(self) -> list[dict]:
        rows = []
        for i, t in enumerate(self.iter_s):
            row = {"iteration": i + 1, **(self.rows[i] if i < len(self.rows) else {}),
                   "time/iteration": t, "grad_norm": self.grad_norms[i],
                   "optimizer_steps": self.steps[i]}
            rows.append(row)
        with open(self.path, "w") as f:
            for row in rows:
                f.write(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v)
                                        else v) for k, v in row.items()}) + "\n")
        return rows


def _mean(xs):
    xs = [x for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


def run(args) -> dict:
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    settings = json.loads(Path(args.settings).read_text())
    settings.update(seed=args.seed, kl_coef=args.kl_coef)
    transformers.set_seed(args.seed)  # TRL seeds torch only; its minibatch order uses numpy's RNG
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = AutoTokenizer.from_pretrained(args.policy, padding_side="left")
    if tok.pad_token_id is None:  # as rlhf_ppo's load_tokenizer: reuse EOS
        tok.pad_token = tok.eos_token
    if tok.eos_token_id is None:
        raise SystemExit(f"{args.policy}: the tokenizer has no EOS token; stop_token='eos' needs one")
    if tok.pad_token_id == tok.eos_token_id:
        print("warning: pad == EOS: TRL takes the first pad id as the end of a response, so a "
              "stopped response loses its EOS from the scored length", flush=True)
    ids = [json.loads(line) for line in open(args.prompt_ids) if line.strip()]
    if any(tok.pad_token_id in x for x in ids):
        raise SystemExit("--prompt-ids: a prompt contains the pad id; TRL masks pad ids out")
    batch = settings["per_device_train_batch_size"] * settings.get("gradient_accumulation_steps", 1)
    dataset = Dataset.from_dict({"input_ids": repeat_to_batches(ids, batch)})

    policy = AutoModelForCausalLM.from_pretrained(args.policy, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(args.policy, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1,
                                                               dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1,
                                                                dtype=torch.float32)
    for frozen in (ref, reward):
        frozen.eval()
        frozen.requires_grad_(False)
    for model in (value, reward):  # TRL reads pad ids itself; keep the configs consistent
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tok.pad_token_id

    optimizers = (None, None)
    if args.critic_lr is not None:
        optimizer = torch.optim.AdamW(
            [{"params": list(policy.parameters()), "lr": settings["learning_rate"]},
             {"params": list(value.parameters()), "lr": args.critic_lr}],
            lr=settings["learning_rate"], betas=(settings.get("adam_beta1", 0.9),
                                                 settings.get("adam_beta2", 0.999)),
            eps=settings.get("adam_epsilon", 1e-8), weight_decay=settings.get("weight_decay", 0.0))
        optimizers = (optimizer, None)  # TRL builds the (constant/linear/...) scheduler on it

    recorder = Recorder(out / "metrics.jsonl")

    class Record(TrainerCallback):
        def on_train_begin(self, *a, **k):
            recorder.begin()

        def on_log(self, _args, _state, _control, logs=None, **k):
            recorder.log(logs or {})

        def on_step_end(self, *a, **k):
            recorder.step_end()

    with tempfile.TemporaryDirectory() as tmp:
        config = PPOConfig(output_dir=tmp, use_cpu=not torch.cuda.is_available(),
                           logging_strategy="steps", logging_steps=1, disable_tqdm=True,
                           dataloader_num_workers=0, **settings)
        trainer = PPOTrainer(args=config, processing_class=tok, model=policy, ref_model=ref,
                             reward_model=reward, value_model=value, train_dataset=dataset,
                             eval_dataset=dataset.select(range(min(len(dataset), 4))),
                             optimizers=optimizers, callbacks=[Record()])
        inner = trainer.optimizer.optimizer  # accelerate steps it only on real optimizer steps
        params = [p for g in inner.param_groups for p in g["params"]]
        inner.register_step_pre_hook(recorder.pre_step(params, args.clip_grad_norm))
        inner.register_step_post_hook(recorder.post_step)
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
        final_policy = trainer.accelerator.unwrap_model(trainer.model).policy
        final_policy.save_pretrained(out / "final")
        tok.save_pretrained(out / "final")

    rows = recorder.write()
    expected_iters = math.ceil(settings["total_episodes"] / batch)
    expected_steps = settings["num_ppo_epochs"] * settings["num_mini_batches"]
    if len(rows) != expected_iters:
        raise SystemExit(f"TRL ran {len(rows)} iterations, expected {expected_iters}")
    if set(recorder.steps) != {expected_steps}:
        raise SystemExit(f"TRL took {recorder.steps} optimizer steps per iteration, expected "
                         f"{expected_steps}")
    finite_weights = all(bool(torch.isfinite(p).all()) for p in final_policy.parameters())
    watched = ("objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg")
    nonfinite = (not finite_weights) or any(
        isinstance(r.get(k), float) and not math.isfinite(r[k]) for r in rows for k in watched) \
        or any(not math.isfinite(x) for x in recorder.grad_norms)
    last = rows[-5:]
    value_losses = [r.get("loss/value_avg") for r in rows]
    return {
        "s_per_iter": sum(recorder.iter_s) / len(recorder.iter_s),
        "train_seconds": seconds,
        "train_iterations": len(rows),
        "optimizer_steps_per_iter": expected_steps,
        "nonfinite": nonfinite,
        "value_loss_last5": _mean(r.get("loss/value_avg") for r in last),
        "value_loss_max": max((v for v in value_losses if isinstance(v, float)
                               and math.isfinite(v)), default=None),
        "grad_norm_last5": _mean(recorder.grad_norms[-5:]),
        "train_score_last5": _mean(r.get("objective/scores") for r in last),
        "train_kl_last5": _mean(r.get("objective/kl") for r in last),
        "clip_grad_norm": args.clip_grad_norm, "critic_lr": args.critic_lr,
        "group_lrs": [g["lr"] for g in inner.param_groups],
        "settings": settings, "threads": torch.get_num_threads(),
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__},
        "final": str(out / "final"),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", required=True, help="SFT policy folder (also the reference)")
    p.add_argument("--reward", required=True, help="reward model folder (also the value model's init)")
    p.add_argument("--prompt-ids", required=True, help="one JSON list of prompt token ids per line")
    p.add_argument("--settings", required=True, help="JSON file of PPOConfig keyword arguments")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--kl-coef", type=float, required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--clip-grad-norm", type=float, help="clip the global gradient norm (TRL does not)")
    p.add_argument("--critic-lr", type=float, help="the value model's own learning rate")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import torch

    torch.set_num_threads(args.threads)
    result = run(args)
    Path(args.output_dir, "result.json").write_text(json.dumps(result, indent=1) + "\n")
    print("TRL_LEARN_RESULT " + json.dumps({k: result[k] for k in (
        "s_per_iter", "train_seconds", "train_iterations", "nonfinite")}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
