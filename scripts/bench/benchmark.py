"""Where a PPO iteration's time goes, and rlhf_ppo against TRL 1.12's PPO on the same models.

One run (this process) prints one JSON line: seconds per iteration (median over the iterations
after the first), the phases (``rollout``: generation; ``ref_and_reward``: old log-probs and
values, reference log-probs, reward scores; ``update``: rewards, GAE and the PPO epochs), generated
and training tokens/s, peak RSS (and on GPU peak memory, the update's model FLOPs utilisation and
generation against the memory-bandwidth limit), then the *bare phases* timed in the same process
on the same models: one ``generate`` of the batch, one reference forward, one reward forward and
one forward+backward+optimizer step per minibatch, and their sum (the floor an iteration could
reach without PPO's own work).

    python scripts/bench/make_bench_models.py --out bench_models
    python scripts/bench/benchmark.py --policy bench_models/small/policy --reward bench_models/small/reward \\
        --batch 16 --mini-batches 2 --epochs 1 --prompt-len 16 --response-len 32 --iters 6
    # the same against TRL 1.12 (separate venv), A B A B, each run in a fresh process:
    python3 -m venv trl-venv && trl-venv/bin/pip install torch==2.13.0 \\
        && trl-venv/bin/pip install trl==1.12.0
    python scripts/bench/benchmark.py ... --critic separate --compare-trl --trl-python trl-venv/bin/python
    # the README table: tiny/small/medium x {rlhf_ppo separate, rlhf_ppo shared, TRL}:
    export RLHF_PPO_TRL_PYTHON=$PWD/trl-venv/bin/python
    python scripts/bench/benchmark.py --table bench_models --compare-trl

(``--compare-trl PYTHON`` also names the interpreter; without one, ``--trl-python`` or
``$RLHF_PPO_TRL_PYTHON``.)

Every run also prints ``prompt_len_mean`` and ``response_len_mean`` (tokens per row, means over
all iterations) and ``padding_share``: the share of the token positions that the update's
gradient forwards computed that were padding (mean over iterations). rlhf_ppo reports it from
``trainer.step()``'s metrics (per micro-batch: ``input_ids.numel()`` against
``attention_mask.sum()``); TRL's is counted the same way on every call of its module-level
``forward`` with gradients (the policy and the value model on the same ``query_responses``, mask
``query_responses != pad_token_id``). The markdown table has them as its last three columns.

Workloads (``--workload``):

* ``fixed`` (default): responses are exactly ``--response-len`` tokens on both sides: the
  benchmark models' tokenizer has no EOS (``make_bench_models.py``), and for other models
  rlhf_ppo gets ``generation.min_new_tokens = response_len`` while TRL runs with
  ``stop_token=None``. Prompts are exactly ``--prompt-len`` tokens.
* ``variable``: long-tailed prompt and response lengths; ``--prompt-len`` and ``--response-len``
  are the maxima. A length is ``round(exp(N(log(m), sigma)))`` clipped to ``[--min-len, max]``,
  median ``m = max(--min-len, --median-frac * max)`` (defaults: ``--median-frac 0.25 --sigma
  0.75 --min-len 2``; the mean is about a third of the maximum, the longest rows reach it).
  Prompt lengths are drawn once (seeded by ``--seed``) and written into the shared prompt file;
  a response's target length is a function of its prompt's token ids alone (:func:`target_length`:
  a SHA-256 of ``--seed`` and the ids seeds the draw), the same in both trainers. Both sides run
  on copies of the model folders whose tokenizer's EOS is ``--eos-token`` (default ``<unk>``, an
  existing special token that never occurs in a prompt: :func:`with_eos`), and each row
  samples the EOS at step ``target - 1`` and never before, while sampling: in TRL's
  ``generate`` (and the bare ``generate``) through a logits processor (:func:`stop_processor`,
  installed by trl_bench.py's copy of TRL's module-level ``generate``), in rlhf_ppo's native
  loop through a stand-in for its ``draw`` (:class:`StopsWhileSampling`). So generation ends
  per row as with real stops: ``generate`` computes every row until the batch's longest is
  done, the native loop drops finished rows from its batch. Each trainer's own stop-token
  handling does the rest (rlhf_ppo ``generation.min_new_tokens = 0``, TRL
  ``stop_token="eos"``). After sampling, a row that is still longer than its target (rlhf_ppo's
  ``generation.backend: transformers``, which has no such hook) is cut: the EOS written at
  ``target - 1``, padding after it (:func:`cut_rollout`, and trl_bench.py's
  ``PhaseClock.cut``); after stops while sampling this changes nothing. ``natural_stops``
  counts rows that ended before their target (none: the EOS is forbidden before it). Both sides
  take the prompts in file order (rlhf_ppo ``data.shuffle = false``, TRL an unshuffled data
  loader cycling through the file), so they see the same rows in the same batches and their
  ``prompt_len_mean`` and ``target_len_mean`` agree. The rlhf_ppo side checks every iteration
  that the trainer's mean response length is that of the targets. Tokens/s and FLOPs count the
  mean lengths.
* ``natural``: real models (``real_models.py``): responses end at the tokenizer's EOS (rlhf_ppo
  without ``min_new_tokens``, TRL ``stop_token="eos"``), up to ``--response-len`` tokens;
  ``--prompts FILE`` names the prompt file and ``--prompt-len`` must cover its longest prompt.
  Prompts are taken in file order on both sides, as in ``variable``; the sampled responses
  differ (each side samples its own).

In the variable and natural workloads the bare phases run on one rollout as the trainer samples
(and cuts) it, with its real attention masks, padded to the batch's longest prompt and response.

rlhf_ppo variants (``--critics``, comparison mode): ``shared`` (a value head on the policy, the
default), ``separate`` (TRL's layout: a critic initialised from the reward model), each with any
of ``+ckpt`` (gradient checkpointing), ``+lora`` (a LoRA adapter of rank ``--lora-r`` on the
attention and MLP projections; TRL still trains all weights), ``+pack`` / ``+nopack``
(``ppo.forward.packing`` on / off). ``--packing`` and ``--micro-batch-tokens`` set
``ppo.forward.packing`` and ``ppo.forward.micro_batch_tokens`` for every rlhf_ppo variant, and only
when given (otherwise the library's defaults; a library without these keys refuses them).

The variable-workload table and the real-model rows (SmolLM2-135M-Instruct, 2 threads):

    python scripts/bench/make_bench_models.py --out bench_models
    python scripts/bench/benchmark.py --table bench_models --workload variable \\
        --prompt-len 64 --response-len 128 --critics separate shared shared+nopack \\
        --compare-trl trl-venv/bin/python
    python scripts/bench/real_models.py --out real_models
    python scripts/bench/benchmark.py --policy real_models/smollm2-135m/policy \\
        --reward real_models/smollm2-135m/reward --prompts real_models/smollm2-135m/prompts.jsonl \\
        --workload natural --prompt-len 48 --response-len 64 --batch 8 --iters 6 \\
        --critics shared separate shared+lora --compare-trl trl-venv/bin/python
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRL_PYTHON_ENV = "RLHF_PPO_TRL_PYTHON"
TRL_VENV_HOWTO = ("python3 -m venv trl-venv && trl-venv/bin/pip install torch==2.13.0 "
                  "&& trl-venv/bin/pip install trl==1.12.0")
"""how to make the TRL venv (TRL runs in its own venv: its transformers and accelerate pins)"""
PHASES = ("rollout", "ref_and_reward", "update")
# Dense bf16 peak (TFLOP/s) and memory bandwidth (TB/s) from the data sheets, by device name.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""the rlhf_ppo LoRA variant's target modules: attention and MLP projections (Llama names)"""
DEVICE_PEAKS = {"H200": (989.0, 4.8), "H100": (989.0, 3.35), "A100": (312.0, 2.0)}


# --------------------------------------------------------------------------- shared helpers

def resolve_trl_python(path: str | None, flag: str = "--trl-python", otherwise: str = "") -> str:
    """The python of the TRL venv: ``path`` (a command-line option), else ``$RLHF_PPO_TRL_PYTHON``;
    exits with how to make the venv when neither names an interpreter that exists (``otherwise``:
    another way out, appended to the message)."""
    import shutil

    path = path or os.environ.get(TRL_PYTHON_ENV)
    if path and shutil.which(path) is not None:
        return path
    msg = (f"{flag} {path}: no such interpreter" if path else
           f"a TRL comparison needs the python of a venv with trl==1.12.0 ({flag} PATH or "
           f"${TRL_PYTHON_ENV})")
    raise SystemExit(f"{msg}. Make the venv with\n    {TRL_VENV_HOWTO}\nthen pass {flag} "
                     f"trl-venv/bin/python (or set {TRL_PYTHON_ENV})"
                     + (f", {otherwise}" if otherwise else ""))


def load_avg() -> list[float]:
    """The 1/5/15-minute load averages (``uptime``), rounded."""
    return [round(x, 2) for x in os.getloadavg()]


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (``ru_maxrss`` is in KB on Linux)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# --------------------------------------------------------------------------- workloads

def lognormal_length(rng: random.Random, max_len: int, median_frac: float, sigma: float,
                     min_len: int) -> int:
    """One length of the variable workload: ``exp(N(log(median), sigma))`` rounded, clipped to
    ``[min(min_len, max_len), max_len]``, with ``median = max(min_len, median_frac * max_len)``."""
    lo = min(min_len, max_len)
    median = max(lo, median_frac * max_len)
    return int(min(max_len, max(lo, round(rng.lognormvariate(math.log(median), sigma)))))


def prompt_lengths(args) -> list[int]:
    """The ``--n-prompts`` prompt lengths of the variable workload (seeded by ``--seed``)."""
    rng = random.Random(f"prompt-lengths:{args.seed}")
    return [lognormal_length(rng, args.prompt_len, args.median_frac, args.sigma, args.min_len)
            for _ in range(args.n_prompts)]


def target_length(prompt_ids, args) -> int:
    """The response length of the variable workload for the prompt ``prompt_ids`` (its token
    ids, no padding): a log-normal draw from an RNG seeded with a SHA-256 of ``--seed`` and the
    ids. A function of the prompt alone, so both trainers cut a prompt's responses alike whatever
    order they sample prompts in (``random.Random`` draws the same in both venvs)."""
    key = f"{args.seed}:" + ",".join(str(int(i)) for i in prompt_ids)
    rng = random.Random(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))
    return lognormal_length(rng, args.response_len, args.median_frac, args.sigma, args.min_len)


def stop_processor(targets: list[int], eos_id: int, context_length: int):
    """A transformers ``LogitsProcessor`` for ``generate`` in the variable workload: row ``i``
    samples the EOS at step ``targets[i] - 1`` (forced) and never before, so ``generate`` stops
    each row at its target and the whole call when the longest row is done, as with real stops.
    ``context_length``: the prompt columns of ``input_ids``."""
    import torch
    from transformers import LogitsProcessor

    class StopAtTargets(LogitsProcessor):
        def __call__(self, input_ids, scores):
            t = input_ids.shape[1] - context_length
            last = torch.as_tensor(targets, device=scores.device) - 1
            scores = scores.clone()
            scores[t < last, eos_id] = float("-inf")
            now = t == last
            scores[now] = float("-inf")
            scores[now, eos_id] = 0.0
            return scores

    return StopAtTargets()


class StopsWhileSampling:
    """The variable workload's stops inside rlhf_ppo's native sampling loop: for one
    ``trainer.sample`` call it stands in for ``rlhf_ppo.rollout.draw`` (one call per decoding
    step), so that row ``i`` draws the EOS at step ``targets[i] - 1`` and never before. The loop
    then treats the row as stopped and drops it from the batch, as after a real stop; this class
    follows the drop (the batch shrinks by exactly the rows that drew their EOS)."""

    def __init__(self, targets: list[int], eos_id: int):
        import rlhf_ppo.rollout as rollout_module

        self.module, self.draw = rollout_module, rollout_module.draw
        self.targets, self.eos_id, self.t = targets, eos_id, 0
        self.active, self.done = list(range(len(targets))), set()

    def __enter__(self):
        self.module.draw = self
        return self

    def __exit__(self, *exc) -> None:
        self.module.draw = self.draw

    def __call__(self, probs, method=None):
        if probs.shape[0] < len(self.active):  # the loop dropped the rows that stopped
            self.active = [r for r in self.active if r not in self.done]
        if probs.shape[0] != len(self.active):
            raise RuntimeError("the sampling loop's rows are out of step with the targets")
        probs = probs.clone()
        probs[:, self.eos_id] = 0.0
        tok = self.draw(probs, method)
        for b, row in enumerate(self.active):
            if self.t == self.targets[row] - 1:
                tok[b] = self.eos_id
                self.done.add(row)
        self.t += 1
        return tok


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja")


def with_eos(src: str, dst: Path, eos_token: str) -> str:
    """A copy of the model folder ``src`` at ``dst`` whose tokenizer's EOS is ``eos_token`` (an
    existing token): weights and configs are symlinked, the tokenizer is saved anew. The variable
    workload runs both trainers on such copies of the policy and reward folders."""
    from transformers import AutoTokenizer

    dst.mkdir(parents=True, exist_ok=True)
    for f in Path(src).resolve().iterdir():
        if f.name not in TOKENIZER_FILES:
            (dst / f.name).symlink_to(f)
    tok = AutoTokenizer.from_pretrained(src)
    if eos_token not in tok.get_vocab():
        raise SystemExit(f"--eos-token {eos_token!r} is not a token of {src}'s tokenizer")
    tok.eos_token = eos_token
    tok.save_pretrained(dst)
    return str(dst)


def write_prompts(path: Path, tokenizer_dir: str, n: int, prompt_len: int, seed: int = 0,
                  lengths: list[int] | None = None) -> Path:
    """A JSONL prompt file of ``n`` prompts that each tokenize to exactly ``prompt_len`` tokens
    (random words of the tokenizer's vocabulary), or to ``lengths[i]`` tokens (the variable
    workload). Special tokens (the EOS included) never occur in a prompt."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    special = set(tok.all_special_ids)
    vocab = [w for w, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
             if i not in special and not w.startswith("<") and w.strip() == w and w]
    rng = random.Random(seed)
    with open(path, "w") as f:
        for row in range(n):
            prompt_len = lengths[row] if lengths else prompt_len
            for _attempt in range(100):
                text = " ".join(rng.choice(vocab) for _ in range(prompt_len))
                if len(tok(text)["input_ids"]) == prompt_len:
                    break
            else:
                raise SystemExit(f"--prompt-len: could not make a prompt of exactly {prompt_len} "
                                 f"tokens with the tokenizer of {tokenizer_dir}")
            f.write(json.dumps({"prompt": text}) + "\n")
    return path


def has_eos(tokenizer_dir: str) -> bool:
    """True when the tokenizer (or model config) names an EOS token that could end a response."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir).eos_token_id is not None


def model_shape(policy_dir: str) -> dict:
    """Sizes used by the FLOPs and bandwidth estimates: parameters, layers, hidden, vocab."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(policy_dir).get_text_config()
    kv = getattr(c, "num_key_value_heads", c.num_attention_heads)
    head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    H, inter, n_layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    per_layer = H * H * 2 + H * kv * head * 2 + 3 * H * inter + 2 * H  # attn, MLP, 2 norms
    tied = getattr(c, "tie_word_embeddings", False)
    embed = c.vocab_size * H
    return {"layers": n_layers, "hidden": H, "vocab": c.vocab_size,
            "nonembed_params": n_layers * per_layer + H,
            "params": n_layers * per_layer + H + embed * (1 if tied else 2)}


def update_model_flops(shape: dict, batch: int, epochs: int, prompt_len: int, response_len: int,
                       critic: str) -> float:
    """Model FLOPs of the update phase: forward + backward (3x forward) of every trained model
    over every sequence of every epoch. A forward of L tokens costs ``2 N L`` for the
    non-embedding weights, ``2 layers L^2 H`` for causal attention (QK^T and AV, half masked), and
    ``2 H V R`` for the LM head on the R response positions (the only logits PPO needs). A
    separate critic adds its backbone; its one-output head is negligible."""
    L, R = prompt_len + response_len, response_len
    backbone = 2 * shape["nonembed_params"] * L + 2 * shape["layers"] * L * L * shape["hidden"]
    forward = backbone + 2 * shape["hidden"] * shape["vocab"] * R
    if critic == "separate":
        forward += backbone
    return 3.0 * forward * batch * epochs


def device_peaks(args) -> tuple[float | None, float | None]:
    """(peak TFLOP/s, peak TB/s) from the flags, else from the CUDA device's name, else None."""
    import torch

    flops, bw = args.peak_tflops, args.peak_tbps
    if torch.cuda.is_available() and (flops is None or bw is None):
        name = torch.cuda.get_device_name()
        for key, (f, b) in DEVICE_PEAKS.items():
            if key in name:
                flops, bw = flops or f, bw or b
                break
    return flops, bw


def summarize(args, iter_s: list[float], phases: list[dict], shape: dict, bytes_per_param: int,
              cpu_s: list[float] | None = None, lengths: dict | None = None) -> dict:
    """The figures both sides print, from per-iteration seconds and phase seconds. The first
    iteration (warm-up: allocations, lazy init, optimizer state) is left out of every median.
    ``lengths`` (:func:`workload_lengths`): in the variable and natural workloads, tokens/s and
    FLOPs count the mean prompt and response lengths (real tokens; the FLOPs' attention term
    then is an estimate), and generated tokens are the mean response length (rows stop at their
    lengths while sampling)."""
    import torch

    keep = slice(1, None) if len(iter_s) > 1 else slice(None)
    med = lambda xs: round(statistics.median(xs[keep]), 4)  # noqa: E731
    out = {"s_per_iter": med(iter_s), "s_per_iter_all": [round(x, 4) for x in iter_s]}
    if cpu_s:  # process CPU seconds: a steadier measure than wall time on a shared machine
        out["cpu_s_per_iter"] = med(cpu_s)
    for k in PHASES:
        out[k] = med([p[k] for p in phases])
    out["other"] = med([t - sum(p[k] for k in PHASES) for t, p in zip(iter_s, phases)])
    B, P, R, E = args.batch, args.prompt_len, args.response_len, args.epochs
    generated = R
    if lengths and args.workload != "fixed":
        P, R = lengths["prompt_len_mean"], lengths["response_len_mean"]
        generated = R  # responses stop at their lengths while sampling
    out["gen_tokens_per_s"] = round(B * generated / out["rollout"], 1)
    out["train_tokens_per_s"] = round(B * (P + R) * E / out["update"], 1)
    out["peak_rss_mb"] = peak_rss_mb()
    out["params"] = shape["params"]
    if torch.cuda.is_available():
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        peak_flops, peak_bw = device_peaks(args)
        flops = update_model_flops(shape, B, E, P, R, args.critic)
        out["update_tflops"] = round(flops / out["update"] / 1e12, 2)
        if peak_flops:
            out["update_mfu"] = round(flops / out["update"] / (peak_flops * 1e12), 4)
        # Each decode step reads every weight once (the batch shares the read): the bound on
        # generated tokens/s is batch * bandwidth / weight bytes (KV-cache reads come on top).
        if peak_bw:
            bound = B * peak_bw * 1e12 / (shape["params"] * bytes_per_param)
            out["gen_bw_bound_tokens_per_s"] = round(bound, 1)
            out["gen_bw_fraction"] = round(out["gen_tokens_per_s"] / bound, 4)
    return out


def run_header(args, side: str) -> dict:
    import torch

    rlhf = side != "trl"
    return {"side": side, "critic": args.critic, "static_cache": args.static_cache,
            "workload": args.workload, "lora": args.lora and rlhf,
            "packing": args.packing if rlhf else None,
            "micro_batch_tokens": args.micro_batch_tokens if rlhf else None,
            "gradient_checkpointing": args.gradient_checkpointing and side != "trl",
            "backend": "transformers" if side == "trl" else args.backend,
            "policy": args.label or args.policy, "batch": args.batch,
            "mini_batches": args.mini_batches, "epochs": args.epochs,
            "prompt_len": args.prompt_len, "response_len": args.response_len, "iters": args.iters,
            "threads": torch.get_num_threads(), "dtype": args.dtype,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "optimizer_steps_per_iter": args.mini_batches * args.epochs}


# --------------------------------------------------------------------------- the rlhf_ppo side

def rlhf_config(args, prompts: Path, output_dir: str):
    """The PPO config of the benchmark shape (TRL's defaults for the algorithm's numbers)."""
    from rlhf_ppo.config import config_from_dict

    B, M = args.batch, args.mini_batches
    model = {"name_or_path": args.policy, "dtype": args.dtype, "critic": args.critic,
             "gradient_checkpointing": args.gradient_checkpointing}
    if args.critic == "separate":  # TRL's value model also starts from the reward model
        model["critic_name_or_path"] = args.reward
    forward = {"micro_batch_size": args.micro_batch or B // M,
               "inference_batch_size": args.inference_batch or B}
    # Set only when given: the library's defaults otherwise (and code without these keys works).
    if args.packing is not None:
        forward["packing"] = args.packing == "on"
    if args.micro_batch_tokens is not None:
        forward["micro_batch_tokens"] = args.micro_batch_tokens
    ppo = {"batch_size": B, "num_minibatches": M, "ppo_epochs": args.epochs, "forward": forward}
    extra = {}
    if args.lora:
        extra["peft"] = {"enabled": True, "r": args.lora_r, "alpha": 2 * args.lora_r,
                         "target_modules": list(LORA_TARGETS)}
    # fixed: exactly response_len tokens (EOS forbidden until then, for models that have one);
    # variable and natural: EOS may end a response (variable: the benchmark cuts it, see
    # cut_rollout), as with TRL's stop_token="eos".
    min_new = args.response_len if args.workload == "fixed" and has_eos(args.policy) else 0
    return config_from_dict({**extra,
        "output_dir": output_dir, "seed": args.seed, "iterations": args.iters,
        "mixed_precision": "no", "model": model,
        "reward": {"sources": [{"model": args.reward}], "batch_size": B},
        # variable and natural: the prompts in file order (trl_bench.py takes them so too)
        "data": {"path": str(prompts), "max_prompt_length": args.prompt_len,
                 "shuffle": args.workload == "fixed"},
        "generation": {"max_new_tokens": args.response_len,
                       "min_new_tokens": min_new,
                       "backend": args.backend,
                       "cache_implementation": "static" if args.static_cache else None},
        "ppo": ppo,
        "optim": {"lr": 3e-6},
    })


def cut_rollout(rollout, targets, eos_id: int, pad_id: int, tokenizer):
    """The rollout as if each row's response had ended with an EOS at its target length
    ``targets`` ``(B,)``: a row longer than its target gets the EOS at ``target - 1`` and padding
    after it (a row that stopped earlier by itself is kept). ``input_ids``, ``attention_mask``,
    ``response_mask``, ``stopped``, ``response_texts`` and the recorded per-token tensors
    (masked past the stop) stay consistent, and the columns past the longest response are
    dropped, as ``rollout.generate`` does after a real stop. Returns ``(rollout, lengths)``."""
    import torch

    from rlhf_ppo.rollout import decode_responses

    P = rollout.prompt_length
    resp = rollout.input_ids[:, P:].clone()
    lengths = rollout.response_mask.sum(1)
    targets = targets.to(lengths.device)
    cut = targets < lengths
    rows = cut.nonzero().squeeze(1)
    resp[rows, targets[rows] - 1] = eos_id
    new_len = torch.minimum(lengths, targets)
    R = int(new_len.max())
    mask = (torch.arange(R, device=resp.device)[None, :] < new_len[:, None]).to(
        rollout.response_mask.dtype)
    resp = resp[:, :R].masked_fill(mask == 0, pad_id)
    recorded = {k: getattr(rollout, k)[:, :R] * mask for k in ("logprobs", "entropy", "values")
                if getattr(rollout, k) is not None}
    return dataclasses.replace(
        rollout, input_ids=torch.cat([rollout.input_ids[:, :P], resp], 1),
        attention_mask=torch.cat([rollout.attention_mask[:, :P],
                                  mask.to(rollout.attention_mask.dtype)], 1),
        response_mask=mask, stopped=rollout.stopped | cut,
        response_texts=decode_responses(resp, new_len, tokenizer), **recorded), new_len


class SampleWatch:
    """Wraps ``trainer.sample``: records each rollout's mean prompt and response lengths and, in
    the variable workload, cuts the rollout to its rows' target lengths (:func:`cut_rollout`)."""

    def __init__(self, trainer, args):
        self.trainer, self.args, self.sample = trainer, args, trainer.sample
        self.prompt_lens, self.response_lens, self.target_lens = [], [], []
        self.natural_stops = 0  # rows that stopped (sampled the EOS) before their target
        trainer.sample = self

    def __call__(self, prompts):
        import torch

        tok = self.trainer.tokenizer
        if self.args.workload == "variable" and self.trainer.cfg.generation.backend == "native":
            k = self.trainer.cfg.ppo.samples_per_prompt  # the rows trainer.sample makes
            rows = [target_length(q.input_ids, self.args) for q in prompts for _ in range(k)]
            with StopsWhileSampling(rows, tok.eos_token_id):
                rollout = self.sample(prompts)
        else:
            rollout = self.sample(prompts)
        if self.args.workload == "variable":  # a no-op after StopsWhileSampling
            targets = torch.tensor([target_length(p.input_ids, self.args) for p in rollout.prompts])
            self.natural_stops += int((rollout.response_mask.sum(1) < targets).sum())
            rollout, _ = cut_rollout(rollout, targets, tok.eos_token_id, tok.pad_token_id, tok)
            self.target_lens.append(float(targets.float().mean()))
        self.prompt_lens.append(statistics.mean(len(p.input_ids) for p in rollout.prompts))
        self.response_lens.append(float(rollout.response_mask.sum(1).float().mean()))
        return rollout


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, repeats: int) -> tuple[float, float]:
    """Median wall and process-CPU seconds of ``repeats`` calls of ``fn`` (after one untimed
    warm-up call)."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        _sync()
        t, c = time.perf_counter(), time.process_time()
        fn()
        _sync()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def bare_phases(trainer, args) -> dict:
    """Time the work no PPO implementation can skip, on the trainer's own models: one
    ``generate`` of the batch, one reference forward, one reward forward (inference mode,
    logits only where needed), and per minibatch one forward + backward + optimizer step of the
    trained model(s) with a stand-in loss. Fixed workload: the forwards run on the generated
    sequences with an all-ones mask (every token is real). Variable and natural workloads: on
    one rollout as the trainer samples it (variable: cut to the targets), i.e. the real
    attention masks, padded to the batch's longest prompt and response."""
    import torch

    from rlhf_ppo.data import left_pad
    from rlhf_ppo.rollout import hf_generation_config, stop_token_ids

    cfg, tok, dev = trainer.cfg, trainer.tokenizer, trainer.accelerator.device
    ac = trainer.unwrapped
    policy, ref = ac.policy, trainer.ref.lm
    reward = trainer.rewards.model_sources()[0].model
    prompts = trainer.sampler.next_batch()
    ids, mask = left_pad([p.input_ids for p in prompts], tok.pad_token_id)
    ids, mask = ids.to(dev), mask.to(dev)
    gen_cfg = hf_generation_config(cfg.generation, tok, stop_token_ids(cfg.generation, tok))
    P, R = ids.shape[1], cfg.generation.max_new_tokens
    out = {}

    stops = {}
    if args.workload == "variable":  # rows stop at their targets, as in the PPO iterations
        stops = {"logits_processor": [stop_processor(
            [target_length(p.input_ids, args) for p in prompts], tok.eos_token_id, P)],
            "eos_token_id": tok.eos_token_id}

    def gen():
        policy.eval()
        with torch.inference_mode():
            seq = policy.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg,
                                  **stops)
        policy.train()
        return seq

    out["generate"] = _timed(gen, args.bare_repeats)
    if args.workload == "fixed":  # every sequence is P + R real tokens
        seq = gen()
        seq_mask = torch.ones_like(seq)
    else:  # this workload's real shapes: a rollout as the trainer samples (and cuts) it
        rollout = trainer.sample(prompts)
        seq, seq_mask = rollout.input_ids.to(dev), rollout.attention_mask.to(dev)
        P, R = rollout.prompt_length, seq.shape[1] - rollout.prompt_length
    with torch.inference_mode():
        out["ref_forward"] = _timed(lambda: ref(input_ids=seq, attention_mask=seq_mask,
                                                logits_to_keep=R + 1), args.bare_repeats)
        out["reward_forward"] = _timed(lambda: reward(input_ids=seq, attention_mask=seq_mask),
                                       args.bare_repeats)
    optimizer = trainer.optimizer.optimizer  # the torch AdamW inside accelerate's wrapper
    mini = args.batch // args.mini_batches

    def train_step(rows):
        mb, mb_mask = seq[rows], seq_mask[rows]
        o = policy(input_ids=mb, attention_mask=mb_mask, logits_to_keep=R + 1,
                   output_hidden_states=ac.critic is None)
        logp = torch.log_softmax(o.logits[:, :-1].float(), -1).gather(
            -1, mb[:, P:].unsqueeze(-1)).squeeze(-1)
        if ac.critic is None:
            values = ac.value_head(o.hidden_states[-1][:, P - 1:-1].float())
        else:
            h = ac.critic.base_model(input_ids=mb, attention_mask=mb_mask).last_hidden_state
            values = ac.critic.score(h[:, P - 1:-1].float())
        loss = -logp.mean() + values.float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def update():
        for _ in range(args.epochs):
            for rows in torch.randperm(args.batch, device=seq.device).split(mini):
                train_step(rows)

    out["update"] = _timed(update, args.bare_repeats)
    wall = {k: round(v[0], 4) for k, v in out.items()}
    wall["sum"] = round(sum(wall.values()), 4)
    wall["cpu_sum"] = round(sum(v[1] for v in out.values()), 4)
    return wall


def workload_lengths(prompt_lens: list[float], response_lens: list[float], shares: list[float],
                     target_lens: list[float] = (), natural_stops: int | None = None) -> dict:
    """The workload figures both sides print, means over all iterations: prompt and response
    tokens per row, the update's padding share and (variable) the mean target length."""
    out = {"prompt_len_mean": round(statistics.mean(prompt_lens), 3),
           "response_len_mean": round(statistics.mean(response_lens), 3),
           "padding_share": round(statistics.mean(shares), 4)}
    if target_lens:
        out["target_len_mean"] = round(statistics.mean(target_lens), 3)
        out["natural_stops"] = natural_stops
    return out


def prepare_workload(args, tmp: Path) -> None:
    """Point ``args`` at this workload's models and prompt file (in ``tmp``), once: comparison
    mode prepares them and passes them to every run (with ``--prepared``). Variable: copies of
    the model folders whose EOS is ``--eos-token``, and (unless ``--prompts`` names a file)
    prompts of log-normal lengths; fixed: prompts of exactly ``--prompt-len`` tokens; natural:
    ``--prompts`` is required."""
    if args.prepared:
        return
    if args.workload == "natural" and not args.prompts:
        raise SystemExit("--workload natural needs --prompts FILE (e.g. real_models.py's)")
    lengths = None
    if args.workload == "variable":
        args.policy = with_eos(args.policy, tmp / "policy", args.eos_token)
        args.reward = with_eos(args.reward, tmp / "reward", args.eos_token)
        lengths = prompt_lengths(args)
    if not args.prompts:
        args.prompts = str(write_prompts(tmp / "prompts.jsonl", args.policy, args.n_prompts,
                                         args.prompt_len, args.seed, lengths))
    args.prepared = True


def run_rlhf(args) -> dict:
    """Build a PPOTrainer on the benchmark shape, time ``args.iters`` iterations, then the bare
    phases; return the JSON-ready figures."""
    import torch

    from rlhf_ppo import PPOTrainer

    header = run_header(args, "rlhf_ppo")
    header["load_avg_start"] = load_avg()
    with tempfile.TemporaryDirectory() as tmp:
        prepare_workload(args, Path(tmp))
        cfg = rlhf_config(args, Path(args.prompts), str(Path(tmp) / "run"))
        trainer = PPOTrainer(cfg)
        watch = SampleWatch(trainer, args)
        iter_s, cpu_s, phases, shares = [], [], [], []
        for _ in range(args.iters):
            _sync()
            t, c = time.perf_counter(), time.process_time()
            m = trainer.step()
            _sync()
            iter_s.append(time.perf_counter() - t)
            cpu_s.append(time.process_time() - c)
            phases.append({"rollout": m["time/rollout"], "ref_and_reward": m["time/score"],
                           "update": m["time/update"]})
            if m.get("ppo_steps") != args.mini_batches * args.epochs:
                raise SystemExit(f"expected {args.mini_batches * args.epochs} optimizer steps, "
                                 f"took {m.get('ppo_steps')}")
            shares.append(m["padding_share"])
            expected = {"fixed": args.response_len, "variable": watch.response_lens[-1]}
            if args.workload in expected and abs(m["response_length"]
                                                 - expected[args.workload]) > 1e-4:
                # variable: the trainer's mean must be that of the cut rows (targets, or the
                # earlier natural stops); natural: whatever the policy sampled
                raise SystemExit(f"responses were {m['response_length']} tokens long on average, "
                                 f"expected {expected[args.workload]}")
        bytes_per_param = torch.finfo(getattr(torch, args.dtype)).bits // 8
        lengths = workload_lengths(watch.prompt_lens, watch.response_lens, shares,
                                   watch.target_lens, watch.natural_stops)
        result = {**header, **lengths, **summarize(args, iter_s, phases, model_shape(args.policy),
                                                   bytes_per_param, cpu_s, lengths)}
        if args.bare_repeats > 0:  # after the peak-memory reading: bare phases do not count
            result["bare"] = bare_phases(trainer, args)
            result["ppo_over_bare"] = round(result["s_per_iter"] / result["bare"]["sum"], 3)
            result["cpu_ppo_over_bare"] = round(result["cpu_s_per_iter"] / result["bare"]["cpu_sum"], 3)
    result["load_avg_end"] = load_avg()
    return result


# --------------------------------------------------------------------------- comparison mode

def _child(cmd: list[str]) -> dict:
    """Run one benchmark process; return its JSON line (or an error record)."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith('{"side"')]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        return {"error": f"exit {proc.returncode}", "cmd": " ".join(cmd), "tail": tail}
    return json.loads(lines[-1])


def shape_flags(args) -> list[str]:
    flags = ["--batch", str(args.batch), "--mini-batches", str(args.mini_batches),
             "--epochs", str(args.epochs), "--prompt-len", str(args.prompt_len),
             "--response-len", str(args.response_len), "--iters", str(args.iters),
             "--threads", str(args.threads), "--seed", str(args.seed), "--dtype", args.dtype,
             "--n-prompts", str(args.n_prompts), "--backend", args.backend,
             "--workload", args.workload, "--median-frac", str(args.median_frac),
             "--sigma", str(args.sigma), "--min-len", str(args.min_len),
             "--eos-token", args.eos_token] + (
                 ["--static-cache"] if args.static_cache else [])
    for name in ("peak_tflops", "peak_tbps", "micro_batch", "inference_batch", "label"):
        if getattr(args, name) is not None:
            flags += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    return flags


VARIANT_OPTIONS = ("ckpt", "lora", "pack", "nopack")
"""``--critics`` entries are CRITIC[+OPTION...]: ``+ckpt`` gradient checkpointing, ``+lora`` a
LoRA adapter (``--lora-r``), ``+pack`` / ``+nopack`` ``ppo.forward.packing`` on / off"""


def parse_variant(spec: str) -> tuple[str, set[str]]:
    """``"shared+lora+nopack"`` -> ``("shared", {"lora", "nopack"})``; ValueError if malformed."""
    critic, *opts = spec.split("+")
    bad = [o for o in opts if o not in VARIANT_OPTIONS]
    if critic not in ("shared", "separate") or bad or {"pack", "nopack"} <= set(opts):
        raise ValueError(f"--critics {spec!r}: expected shared or separate, then any of "
                         f"{', '.join('+' + o for o in VARIANT_OPTIONS)} (not both +pack and "
                         "+nopack)")
    return critic, set(opts)


def variant_command(args, common: list[str], spec: str) -> tuple[str, list[str]]:
    """The name and command line of one rlhf_ppo variant of the comparison."""
    critic, opts = parse_variant(spec)
    ckpt = "ckpt" in opts or args.gradient_checkpointing
    lora = "lora" in opts or args.lora
    packing = "on" if "pack" in opts else "off" if "nopack" in opts else args.packing
    name = (f"rlhf_ppo/{critic}" + ("+ckpt" if ckpt else "") + ("+lora" if lora else "")
            + {"on": "+pack", "off": "+nopack", None: ""}[packing])
    cmd = [sys.executable, __file__, *common, "--critic", critic,
           "--bare-repeats", str(args.bare_repeats)]
    cmd += ["--gradient-checkpointing"] if ckpt else []
    cmd += ["--lora", "--lora-r", str(args.lora_r)] if lora else []
    cmd += ["--packing", packing] if packing else []
    if args.micro_batch_tokens is not None:
        cmd += ["--micro-batch-tokens", str(args.micro_batch_tokens)]
    return name, cmd


def compare(args, policy: str, reward: str, critics: list[str]) -> dict:
    """``args.rounds`` rounds of: rlhf_ppo with each variant, then TRL (A B A B), each in a fresh
    process on the same models and prompt file (:func:`prepare_workload`). Returns the pooled
    figures per variant (every run goes to stderr)."""
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        args = argparse.Namespace(**vars(args))  # the table's sizes each prepare their own
        args.policy, args.reward = policy, reward
        args.label = args.label or policy
        prepare_workload(args, Path(tmp))
        common = ["--policy", args.policy, "--reward", args.reward, "--prompts", args.prompts,
                  "--prepared", *shape_flags(args)]
        for r in range(args.rounds):
            variants = [variant_command(args, common, c) for c in critics]
            if args.compare_trl:
                variants.append(("trl", [args.compare_trl, str(HERE / "trl_bench.py"), *common]))
            for name, cmd in variants:
                res = _child(cmd)
                print(json.dumps({"variant": name, "round": r, **res}), file=sys.stderr, flush=True)
                runs.setdefault(name, []).append(res)
    return {name: pool(rs) for name, rs in runs.items()}


def pool(results: list[dict]) -> dict:
    """One variant's figures over its rounds: medians of the pooled per-iteration times."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[0]
    out = dict(ok[0])
    iters = [x for r in ok for x in r["s_per_iter_all"][1:]]
    out["s_per_iter"] = round(statistics.median(iters), 4)
    for k in (*PHASES, "other", "gen_tokens_per_s", "train_tokens_per_s", "cpu_s_per_iter",
              "padding_share", "prompt_len_mean", "response_len_mean", "target_len_mean"):
        if all(k in r for r in ok):
            out[k] = round(statistics.median([r[k] for r in ok]), 4)
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in ok)
    out["rounds"] = len(ok)
    out["load_avg"] = [r.get("load_avg_start") for r in ok] + [ok[-1].get("load_avg_end")]
    # Per round, for ratios taken within a round (the machine's speed drifts between rounds).
    out["round_s_per_iter"] = [r["s_per_iter"] for r in ok]
    out["round_cpu_s_per_iter"] = [r.get("cpu_s_per_iter") for r in ok]
    bare = [r for r in ok if "bare" in r]
    if bare:  # each run's iteration over its own bare phases, the median over rounds
        out["bare"] = {k: round(statistics.median([r["bare"][k] for r in bare]), 4)
                       for k in bare[0]["bare"]}
        for k in ("ppo_over_bare", "cpu_ppo_over_bare"):
            if all(k in r for r in bare):
                out[k] = round(statistics.median([r[k] for r in bare]), 3)
    return out


def round_ratio(a: dict, b: dict, key: str = "round_s_per_iter") -> float | None:
    """Median over rounds of ``a``'s figure over ``b``'s in the same round (A B A B order), or
    the ratio of the pooled figures when the rounds do not pair up."""
    xs, ys = a.get(key) or [], b.get(key) or []
    if xs and len(xs) == len(ys) and all(xs) and all(ys):
        return statistics.median([x / y for x, y in zip(xs, ys)])
    pooled = key.replace("round_", "")
    return a[pooled] / b[pooled] if a.get(pooled) and b.get(pooled) else None


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown_table(rows: list[tuple[str, dict]]) -> str:
    """The README table: one row per (size, variant) with ratios to TRL on the same size."""
    head = ("| model | trainer | s/iter | vs TRL | CPU s/iter | vs TRL | rollout | ref+reward "
            "| update | other | bare sum | iter/bare | CPU iter/bare | gen tok/s | peak RSS MB "
            "| RSS vs TRL | padding | prompt mean | response mean |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    trl = {key.split(":")[0]: r for key, r in rows if key.endswith(":trl") and "error" not in r}
    for key, r in rows:
        size, variant = key.split(":")
        if "error" in r:
            lines.append(f"| {size} | {variant} | error: {r['error']} |" + " |" * 16)
            continue
        t = trl.get(size)
        wall_r = round_ratio(r, t) if t else None
        ratio = f"{wall_r:.2f}x" if wall_r is not None else "-"
        cpu = r.get("cpu_s_per_iter")
        cpu_r = round_ratio(r, t, "round_cpu_s_per_iter") if t else None
        cpu_ratio = f"{cpu_r:.2f}x" if cpu_r is not None else "-"
        rss = f"{r['peak_rss_mb'] / t['peak_rss_mb']:.2f}x" if t else "-"
        bare = r.get("bare", {}).get("sum")
        lines.append(
            f"| {size} | {variant} | {r['s_per_iter']:.3f} | {ratio} | {cpu if cpu else '-'} "
            f"| {cpu_ratio} | {r['rollout']:.3f} "
            f"| {r['ref_and_reward']:.3f} | {r['update']:.3f} | {r['other']:.3f} "
            f"| {bare if bare is not None else '-'} "
            f"| {r['ppo_over_bare'] if 'ppo_over_bare' in r else '-'} "
            f"| {r['cpu_ppo_over_bare'] if 'cpu_ppo_over_bare' in r else '-'} "
            f"| {r['gen_tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} | {rss} "
            f"| {fmt(r.get('padding_share'), '.1%')} | {fmt(r.get('prompt_len_mean'), '.1f')} "
            f"| {fmt(r.get('response_len_mean'), '.1f')} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- entry point

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", help="policy folder (a causal LM)")
    p.add_argument("--reward", help="reward model folder (a sequence classifier, one output)")
    p.add_argument("--batch", type=int, default=16, help="rollouts per iteration")
    p.add_argument("--mini-batches", type=int, default=2, help="optimizer steps per epoch")
    p.add_argument("--epochs", type=int, default=1, help="PPO epochs per iteration")
    p.add_argument("--prompt-len", type=int, default=16,
                   help="tokens per prompt (fixed: exact; variable and natural: the maximum)")
    p.add_argument("--response-len", type=int, default=32,
                   help="tokens per response (fixed: exact; variable and natural: the maximum)")
    p.add_argument("--workload", choices=("fixed", "variable", "natural"), default="fixed",
                   help="fixed: every prompt --prompt-len and every response --response-len "
                        "tokens; variable: log-normal prompt and response lengths up to those "
                        "maxima (--median-frac, --sigma, --min-len), the same rows on both sides "
                        "(see the module docstring); natural: responses end at the tokenizer's "
                        "EOS (real models, --prompts FILE)")
    p.add_argument("--median-frac", type=float, default=0.25,
                   help="variable workload: median length as a fraction of the maximum")
    p.add_argument("--sigma", type=float, default=0.75,
                   help="variable workload: sigma of the log of the length")
    p.add_argument("--min-len", type=int, default=2,
                   help="variable workload: the shortest prompt and response")
    p.add_argument("--eos-token", default="<unk>",
                   help="variable workload: the token made the EOS of both model folders' "
                        "tokenizers (an existing special token; the bench models' <unk>)")
    p.add_argument("--iters", type=int, default=6, help="PPO iterations (the first is warm-up)")
    p.add_argument("--critic", choices=["shared", "separate"], default="shared",
                   help="rlhf_ppo's value model: a head on the policy, or its own model")
    p.add_argument("--lora", action="store_true",
                   help="rlhf_ppo side: train a LoRA adapter (peft section; attention and MLP "
                        "projections) instead of all policy weights; TRL trains all of them")
    p.add_argument("--lora-r", type=int, default=16, help="the LoRA rank (alpha = 2 r)")
    p.add_argument("--packing", choices=("on", "off"), default=None,
                   help="rlhf_ppo side: ppo.forward.packing (default: the library's default, unset)")
    p.add_argument("--micro-batch-tokens", type=int, default=None, metavar="N",
                   help="rlhf_ppo side: ppo.forward.micro_batch_tokens, a token budget per "
                        "micro-batch (default: the library's default, unset)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="rlhf_ppo side: ppo.forward.micro_batch_size, sequences per forward/backward "
                        "(default: the minibatch)")
    p.add_argument("--inference-batch", type=int, default=None,
                   help="rlhf_ppo side: ppo.forward.inference_batch_size, sequences per no-grad "
                        "forward (default: the whole batch)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--backend", choices=("native", "transformers"), default="native",
                   help="rlhf_ppo's generation.backend (--static-cache implies transformers)")
    p.add_argument("--static-cache", action="store_true",
                   help="generate with a static KV cache (on CUDA, transformers then compiles the "
                        "decoding step with torch.compile); both sides")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="rlhf_ppo side only: model.gradient_checkpointing (recompute the policy's "
                        "activations in backward: less memory, a slower update); TRL runs its "
                        "default (off). In comparison mode: every rlhf_ppo variant")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on every side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-prompts", type=int, default=256)
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="a JSONL prompt file ({\"prompt\": TEXT} rows) instead of generated "
                        "ones; required by --workload natural (real_models.py writes one)")
    p.add_argument("--prepared", action="store_true", help=argparse.SUPPRESS)  # models, prompts
    p.add_argument("--label", default=None, help=argparse.SUPPRESS)  # the policy to report
    p.add_argument("--bare-repeats", type=int, default=3,
                   help="timed repeats of each bare phase (0: skip them)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="accelerator peak for the MFU (default: from the GPU's name)")
    p.add_argument("--peak-tbps", type=float, default=None,
                   help="memory bandwidth for the generation bound (default: from the GPU's name)")
    p.add_argument("--compare-trl", nargs="?", const="", default=None, metavar="PYTHON",
                   help="also run TRL's PPO on the same models, with PYTHON (a venv with "
                        "trl==1.12.0), else --trl-python")
    p.add_argument("--trl-python", default=None, metavar="PATH",
                   help=f"python of a venv with trl==1.12.0 (default: ${TRL_PYTHON_ENV})")
    p.add_argument("--critics", nargs="+", default=None, metavar="VARIANT",
                   help="rlhf_ppo variants in comparison mode, CRITIC[+OPTION...] with CRITIC "
                        "shared or separate and options +ckpt (--gradient-checkpointing), +lora "
                        "(--lora), +pack / +nopack (--packing on / off), e.g. shared "
                        "shared+nopack separate+lora (default: --critic; table: separate and "
                        "shared)")
    p.add_argument("--rounds", type=int, default=2, help="A B A B rounds in comparison mode")
    p.add_argument("--table", default=None, metavar="MODELS_DIR",
                   help="folder of make_bench_models.py: compare on each of --sizes")
    p.add_argument("--sizes", nargs="+", default=["tiny", "small", "medium"])
    args = p.parse_args(argv)
    if not args.table and not (args.policy and args.reward):
        p.error("--policy and --reward are required (or --table MODELS_DIR)")
    if args.batch % args.mini_batches:
        p.error("--batch must be a multiple of --mini-batches")
    for spec in args.critics or []:
        try:
            parse_variant(spec)
        except ValueError as e:
            p.error(str(e))
    if args.min_len < 1:
        p.error("--min-len must be >= 1")
    if args.static_cache:  # a static cache is a model.generate option
        args.backend = "transformers"
    if args.compare_trl is not None:  # "": the interpreter comes from --trl-python or the env
        args.compare_trl = args.compare_trl or args.trl_python or os.environ.get(TRL_PYTHON_ENV, "")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.compare_trl is not None:  # before any side effect: a refused run changes nothing
        args.compare_trl = resolve_trl_python(args.compare_trl)
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.table:
        rows = []
        for size in args.sizes:
            d = Path(args.table) / size
            res = compare(args, str(d / "policy"), str(d / "reward"),
                          args.critics or ["separate", "shared"])
            rows += [(f"{size}:{name}", r) for name, r in res.items()]
            print(json.dumps({"size": size, **res}), flush=True)
        print(f"\nCPU threads {args.threads}, batch {args.batch}, {args.mini_batches} minibatches, "
              f"{args.epochs} epoch(s), prompt {args.prompt_len}, response {args.response_len}, "
              f"{args.iters} iterations x {args.rounds} rounds; load average now {load_avg()}\n")
        print(markdown_table(rows))
        return 0
    if args.compare_trl is not None:
        res = compare(args, args.policy, args.reward, args.critics or [args.critic])
        trl = res.get("trl", {})
        for name, r in res.items():
            if name != "trl" and "error" not in r and "error" not in trl:
                r["vs_trl_s_per_iter"] = round(r["s_per_iter"] / trl["s_per_iter"], 3)
                r["vs_trl_peak_rss"] = round(r["peak_rss_mb"] / trl["peak_rss_mb"], 3)
        print(json.dumps(res), flush=True)
        print(markdown_table([(f"{Path(args.policy).parent.name}:{k}", v) for k, v in res.items()]))
        return 0
    print(json.dumps(run_rlhf(args)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
