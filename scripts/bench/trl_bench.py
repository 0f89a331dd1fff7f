"""The TRL side of ``scripts/bench/benchmark.py``: TRL 1.12's PPO (``trl.experimental.ppo``) on the same
models, prompts and shape, printing the same JSON line. Run with the python of a venv that has
``trl==1.12.0`` (it does not import rlhf_ppo):

    python3 -m venv trl-venv && trl-venv/bin/pip install torch==2.13.0 \\
        && trl-venv/bin/pip install trl==1.12.0
    trl-venv/bin/python scripts/bench/trl_bench.py --policy bench_models/small/policy \\
        --reward bench_models/small/reward --prompts prompts.jsonl --iters 6

The same work per iteration as rlhf_ppo: ``batch`` prompts, responses of exactly
``response_len`` tokens in the fixed workload (``stop_token=None``: TRL clears the policy's EOS;
in the variable and natural workloads ``stop_token="eos"``, see benchmark.py's docstring: the
variable workload's cut to each row's target length is made in the wrapper of
``batch_generation``, :meth:`PhaseClock.cut`, and the prompts are taken in file order), one
generation call
for the whole batch, ``num_mini_batches`` optimizer steps per epoch (``per_device_train_batch_size
= batch`` with no gradient accumulation: each minibatch is one micro-batch and one step), a value
model and a reward model both loaded from the reward folder, no sample generations, saving or
reporting. Phases are timed by wrapping TRL's module-level ``batch_generation`` (rollout) and
``forward`` (its first call with gradients starts the update), and the iteration ends at the
``on_step_end`` callback. The ``forward`` wrapper also counts the padding share of the update
(token positions of ``query_responses`` in its calls with gradients, against those that are not
``pad_token_id``, TRL's own attention mask); the ``batch_generation`` wrapper records the mean
prompt and response lengths (a response up to and including its first EOS).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark as bench  # noqa: E402  (shared helpers only; no rlhf_ppo import)


def generate_with_stops(args, eos_id: int):
    """TRL 1.12's module-level ``generate`` (``trl/experimental/ppo/ppo_trainer.py``) with one
    addition: ``bench.stop_processor``, so each row samples the EOS at its target length
    (``bench.target_length`` of its prompt) and ``generate`` stops when every row has."""
    import torch
    from transformers import LogitsProcessorList

    def generate(lm_backbone, queries, pad_token_id, generation_config):
        context_length = queries.shape[1]
        targets = [bench.target_length(row[row != pad_token_id].tolist(), args) for row in queries]
        attention_mask = queries != pad_token_id
        input_ids = torch.masked_fill(queries, ~attention_mask, 0)
        output = lm_backbone.generate(
            input_ids=input_ids, attention_mask=attention_mask,
            generation_config=generation_config, return_dict_in_generate=True,
            output_scores=True, eos_token_id=eos_id, pad_token_id=pad_token_id,
            logits_processor=LogitsProcessorList(
                [bench.stop_processor(targets, eos_id, context_length)]))
        logits = torch.stack(output.scores, 1)
        return torch.cat((queries, output.sequences[:, context_length:]), dim=1), logits

    return generate


class PhaseClock:
    """Timestamps of one TRL iteration: start, generation start/end, first gradient forward,
    end. ``on_step_end`` closes an iteration and opens the next."""

    def __init__(self, args=None, eos_id: int | None = None):
        self.iter_s, self.cpu_s, self.phases, self.optimizer_steps = [], [], [], []
        self.args, self.eos_id = args, eos_id
        self.prompt_lens, self.response_lens, self.target_lens, self.shares = [], [], [], []
        self.natural_stops = 0
        self._steps = 0
        self._reset(time.perf_counter())

    def _reset(self, now: float) -> None:
        self.start, self.cpu_start, self.gen = now, time.process_time(), [None, None]
        self.update_start = None
        self.positions = [0, 0]  # token positions the gradient forwards computed, real ones

    def wrap_generation(self, fn):
        def timed(model, queries, batch_size, pad_token_id, *rest, **kwargs):
            bench._sync()
            self.gen[0] = time.perf_counter()
            out = fn(model, queries, batch_size, pad_token_id, *rest, **kwargs)
            bench._sync()
            self.gen[1] = time.perf_counter()
            return self.cut(queries, *out, pad_token_id)
        return timed

    def cut(self, queries, query_responses, logits, pad_id: int):
        """Record the rows' prompt and response lengths (up to and including the first EOS);
        in the variable workload first cut each response to its target (benchmark.target_length
        of its prompt): the EOS at ``target - 1``, padding after it, the columns past the
        longest response dropped (as ``generate`` returns when every row stopped), the
        generation logits likewise. TRL's own stop-token handling does the rest."""
        import torch

        P = queries.shape[1]
        resp = query_responses[:, P:].clone()
        W = resp.shape[1]
        lengths = torch.full((len(resp),), W, dtype=torch.long, device=resp.device)
        if self.eos_id is not None:
            is_eos = resp == self.eos_id
            lengths = torch.where(is_eos.any(1), is_eos.float().argmax(1).long() + 1, lengths)
        if self.args.workload == "variable":
            targets = torch.tensor([bench.target_length(row[row != pad_id].tolist(), self.args)
                                    for row in queries], device=resp.device)
            self.natural_stops += int((lengths < targets).sum())
            self.target_lens.append(float(targets.float().mean()))
            cut = targets < lengths
            rows = cut.nonzero().squeeze(1)
            resp[rows, targets[rows] - 1] = self.eos_id
            lengths = torch.minimum(lengths, targets)
            R = int(lengths.max())
            after = torch.arange(R, device=resp.device)[None, :] >= lengths[:, None]
            resp = resp[:, :R].masked_fill(after, pad_id)
            query_responses = torch.cat([query_responses[:, :P], resp], 1)
            logits = logits[:, :R]
        self.prompt_lens.append(float((queries != pad_id).sum(1).float().mean()))
        self.response_lens.append(float(lengths.float().mean()))
        return query_responses, logits

    def wrap_forward(self, fn):
        import torch

        def timed(model, query_responses, pad_token_id, *rest, **kwargs):
            if torch.is_grad_enabled():
                if self.update_start is None:
                    bench._sync()
                    self.update_start = time.perf_counter()
                # the update's forward (policy and value model on the same sequences): its
                # attention mask is TRL's `query_responses != pad_token_id`
                self.positions[0] += query_responses.numel()
                self.positions[1] += int((query_responses != pad_token_id).sum())
            return fn(model, query_responses, pad_token_id, *rest, **kwargs)
        return timed

    def count_step(self, *_args) -> None:
        self._steps += 1

    def step_end(self) -> None:
        bench._sync()
        now = time.perf_counter()
        self.iter_s.append(now - self.start)
        self.cpu_s.append(time.process_time() - self.cpu_start)
        self.phases.append({"rollout": self.gen[1] - self.gen[0],
                            "ref_and_reward": self.update_start - self.gen[1],
                            "update": now - self.update_start})
        self.optimizer_steps.append(self._steps)
        computed, real = self.positions
        self.shares.append(1.0 - real / computed if computed else float("nan"))
        self._steps = 0
        self._reset(now)


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    header = bench.run_header(args, "trl")
    header["critic"] = "separate"  # TRL's PPO always trains a separate value model
    import trl
    header["versions"] = {"trl": trl.__version__, "transformers": __import__("transformers").__version__,
                          "torch": torch.__version__}
    header["load_avg_start"] = bench.load_avg()
    dtype = getattr(torch, args.dtype)
    tok = AutoTokenizer.from_pretrained(args.policy, padding_side="left")
    fixed = args.workload == "fixed"
    if not fixed and tok.eos_token_id is None:
        raise SystemExit(f"--workload {args.workload}: the tokenizer of {args.policy} has no EOS")
    if tok.eos_token is None:
        # TRL reads eos_token_id (to count missing EOS, for missing_eos_penalty, unused here);
        # with stop_token=None nothing stops on it, so responses stay exactly response_len.
        tok.eos_token = tok.unk_token
    if tok.pad_token_id == tok.eos_token_id and not fixed:
        raise SystemExit("the pad token is the EOS: TRL's forward would mask every EOS")
    rows = [json.loads(line)["prompt"] for line in open(args.prompts)]
    ids = [tok(text)["input_ids"] for text in rows]
    if fixed and any(len(x) != args.prompt_len for x in ids):
        raise SystemExit(f"--prompts: every prompt must be {args.prompt_len} tokens")
    if any(len(x) > args.prompt_len for x in ids):  # rlhf_ppo would drop them
        raise SystemExit(f"--prompts: a prompt is longer than --prompt-len {args.prompt_len} "
                         f"({max(len(x) for x in ids)} tokens)")
    dataset = Dataset.from_dict({"input_ids": ids})
    policy = AutoModelForCausalLM.from_pretrained(args.policy, dtype=dtype)
    if args.static_cache:  # TRL's generation config leaves it unset: the model's is used
        policy.generation_config.cache_implementation = "static"
    ref = AutoModelForCausalLM.from_pretrained(args.policy, dtype=dtype)
    value = AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1, dtype=dtype)
    reward = AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1, dtype=dtype)

    clock = PhaseClock(args, None if fixed else tok.eos_token_id)
    if args.workload == "variable":  # rows stop at their targets while TRL generates
        trl_ppo.generate = generate_with_stops(args, tok.eos_token_id)
    trl_ppo.batch_generation = clock.wrap_generation(trl_ppo.batch_generation)
    trl_ppo.forward = clock.wrap_forward(trl_ppo.forward)

    class StepClock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock._reset(time.perf_counter())

        def on_step_end(self, *a, **k):
            clock.step_end()

    with tempfile.TemporaryDirectory() as tmp:
        config = PPOConfig(
            output_dir=tmp, seed=args.seed, report_to="none", save_strategy="no",
            logging_strategy="no", disable_tqdm=True, bf16=False, fp16=False,
            use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
            per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
            num_mini_batches=args.mini_batches, num_ppo_epochs=args.epochs,
            local_rollout_forward_batch_size=args.batch,
            total_episodes=args.iters * args.batch, response_length=args.response_len,
            stop_token=None if fixed else "eos", stop_token_id=None, missing_eos_penalty=None,
            temperature=1.0,
            num_sample_generations=0, learning_rate=3e-6, kl_coef=0.05,
        )
        trainer = PPOTrainer(args=config, processing_class=tok, model=policy, ref_model=ref,
                             reward_model=reward, value_model=value, train_dataset=dataset,
                             eval_dataset=dataset.select(range(min(len(dataset), args.batch))),
                             callbacks=[StepClock()])
        if not fixed:
            # The prompts in file order, as rlhf_ppo takes them with data.shuffle=false (cycling
            # through the file): both sides see the same rows in the same batches.
            from torch.utils.data import DataLoader

            cycled = Dataset.from_dict({"input_ids": [ids[i % len(ids)]
                                                      for i in range(args.iters * args.batch)]})
            trainer.dataloader = trainer.accelerator.prepare(DataLoader(
                cycled, batch_size=args.batch, shuffle=False, collate_fn=trainer.data_collator,
                drop_last=True))
        inner = trainer.optimizer.optimizer  # accelerate steps it only on real optimizer steps
        inner.register_step_post_hook(clock.count_step)
        trainer.train()
    if len(clock.iter_s) != args.iters:
        raise SystemExit(f"TRL ran {len(clock.iter_s)} iterations, expected {args.iters}")
    if set(clock.optimizer_steps) != {args.mini_batches * args.epochs}:
        raise SystemExit(f"TRL took {clock.optimizer_steps} optimizer steps per iteration, "
                         f"expected {args.mini_batches * args.epochs}")
    if fixed and set(clock.response_lens) != {float(args.response_len)}:
        raise SystemExit(f"TRL's responses were {clock.response_lens} tokens long on average, "
                         f"expected exactly {args.response_len}")
    bytes_per_param = torch.finfo(dtype).bits // 8
    lengths = bench.workload_lengths(clock.prompt_lens, clock.response_lens, clock.shares,
                                     clock.target_lens, clock.natural_stops)
    result = {**header, **lengths,
              **bench.summarize(args, clock.iter_s, clock.phases, bench.model_shape(args.policy),
                                bytes_per_param, clock.cpu_s, lengths)}
    result["threads_after"] = torch.get_num_threads()  # TRL/accelerate must not have changed it
    result["load_avg_end"] = bench.load_avg()
    return result


def main(argv=None) -> int:
    args = bench.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if not args.prompts:
        raise SystemExit("--prompts FILE is required (benchmark.py writes one)")
    args.critic = "separate"
    print(json.dumps(run_trl(args)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
