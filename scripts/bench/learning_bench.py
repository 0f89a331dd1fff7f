"""Learning-quality benchmark: rlhf_ppo against TRL 1.12's PPO on the same task, models, prompts
and matched settings, over several KL coefficients and seeds.

Both trainers maximise ``J = score - kl_coef * KL``, so the figure of merit of a run is J of its
final policy, measured by ``rlhf-ppo evaluate`` against the task's SFT (reference) model on the
task's prompts (same prompts, samples and seeds for every run). Each run (trainer/variant,
kl_coef, seed) is a fresh subprocess with one torch thread: ``rlhf-ppo train`` for rlhf_ppo,
``scripts/bench/trl_learn.py`` (run with the TRL venv's python) for TRL, then ``rlhf-ppo evaluate``.

    python3 -m venv trl-venv && trl-venv/bin/pip install torch==2.13.0 \\
        && trl-venv/bin/pip install trl==1.12.0                    # the TRL side's venv
    export RLHF_PPO_TRL_PYTHON=$PWD/trl-venv/bin/python              # or --trl-python PATH
    python scripts/bench/learning_bench.py                          # quickstart task, defaults
    python scripts/bench/learning_bench.py --no-trl                 # rlhf_ppo alone (no TRL venv)
    python scripts/bench/learning_bench.py --iterations 3 --seeds 0 --kl-coefs 0.5 --output-dir runs/lb
    python scripts/bench/learning_bench.py --variants shipped= \\
        "separate=model.critic=separate model.critic_init=reward"
    python scripts/bench/learning_bench.py --trl-variants default= matched=clip,critic_lr
    python scripts/bench/learning_bench.py --task forecast          # scripts/bench/forecast_task.py
    python scripts/bench/learning_bench.py --policy SFT --reward RM --prompts p.jsonl --config ppo.yaml
    python scripts/bench/learning_bench.py --report-only --output-dir runs/learning_bench/quickstart

Outputs in ``--output-dir`` (default ``runs/learning_bench/TASK``): ``runs.jsonl`` (one line per
finished run; runs already there are skipped, so an interrupted benchmark resumes; ``--fresh``
starts over), ``table.md`` (per-run figures and, per kl_coef, mean J +- std, min J, mean score and
KL, seconds per iteration and diverged runs per trainer/variant), ``frontier.png`` (score against
KL), ``meta.json`` (command, versions, TRL settings) and ``runs/LABEL/klK/seedS/`` per run.

A run is flagged *diverged* when training produced a non-finite value, when its final KL exceeds
10x the median KL of the other seeds of its setting, or when its J is below the reference's (the
reference's J is its score, its KL being 0: the run ended worse than not training).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the sibling scripts (benchmark.py, the task builders)
    sys.path.insert(0, str(HERE))
from benchmark import TRL_PYTHON_ENV, resolve_trl_python  # noqa: E402  (stdlib only)

DIVERGED_KL_FACTOR = 10.0
"""a run whose final KL exceeds this many times the median KL of the other seeds is diverged"""
DIVERGED_KL_FLOOR = 0.1
"""the median KL is taken as at least this (nats), so near-zero medians do not flag every run"""
QUICKSTART_EVAL_SAMPLES = 32


# --------------------------------------------------------------------------- tasks

def build_quickstart(folder: Path, seed: int = 0) -> dict:
    """The quickstart's corpus, base model, SFT model and reward model under ``folder`` (a stage
    with ``STAGE/.complete`` is reused), and its PPO config from ``stage_configs(...)["ppo"]``, so
    the benchmark follows whatever the quickstart ships."""
    import torch
    import yaml

    from rlhf_ppo import builtin
    from rlhf_ppo import quickstart as qs
    from rlhf_ppo.config import config_from_dict
    from rlhf_ppo.reward_training import RewardTrainConfig, run_reward_training
    from rlhf_ppo.sft import SFTConfig, run_sft

    torch.set_num_threads(1)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = qs.write_corpus(folder / "data", seed=seed)
    if not (folder / "base" / ".complete").is_file():
        tok = builtin.build_word_tokenizer(qs.review_vocab())
        shutil.rmtree(folder / "base", ignore_errors=True)
        builtin.build_tiny_model(folder / "base", seed=seed, tokenizer=tok, **qs.MODEL)
        (folder / "base" / ".complete").write_text(json.dumps({"vocab_size": len(tok)}) + "\n")
    stages = qs.stage_configs(folder, data)
    for name, cls, run in (("sft", SFTConfig, run_sft),
                           ("reward", RewardTrainConfig, run_reward_training)):
        if (folder / name / ".complete").is_file():
            continue
        cfg = dict(stages[name], seed=seed)
        summary = run(config_from_dict(cfg, cls))
        (folder / name / "stage.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        (folder / name / ".complete").write_text(json.dumps(_jsonable(summary), indent=1) + "\n")
    ppo = {k: v for k, v in stages["ppo"].items() if k != "output_dir"}
    ev = stages["eval"]
    return {"policy": str(folder / "sft" / "final"), "reward": str(folder / "reward" / "final"),
            "prompts": data["prompts"], "ppo": ppo,
            "eval": {"num_prompts": ev["num_prompts"],
                     "samples_per_prompt": QUICKSTART_EVAL_SAMPLES,
                     "max_new_tokens": ev["generation"]["max_new_tokens"],
                     # reported beside the reward model's score (weight 0: not summed)
                     "extra_sources": [{"function": "rlhf_ppo.quickstart:sentiment_reward",
                                        "weight": 0.0}]}}


TASKS = {"quickstart": build_quickstart, "forecast": "forecast_task:build"}
"""task name -> builder ``build(folder, seed=0) -> dict``, or "module:function" in scripts/"""


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def resolve_builder(name: str):
    """The builder of task ``name`` (a "module:function" string is imported from scripts/)."""
    if name not in TASKS:
        raise SystemExit(f"--task: unknown task {name!r}; expected one of {', '.join(TASKS)} "
                         "(or a custom task: --policy --reward --prompts --config)")
    builder = TASKS[name]
    if callable(builder):
        return builder
    module, _, fn = builder.partition(":")
    try:
        return getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"--task {name}: could not load its builder {builder!r} from "
                         f"{HERE}/{module}.py ({type(e).__name__}: {e})") from e


def custom_task(args) -> dict:
    """A task from --policy, --reward, --prompts and --config (an rlhf_ppo PPO config YAML)."""
    import yaml

    missing = [f"--{k}" for k in ("policy", "reward", "prompts", "config") if not getattr(args, k)]
    if missing:
        raise SystemExit(f"a custom task needs --policy, --reward, --prompts and --config; "
                         f"missing {' '.join(missing)}")
    from rlhf_ppo.config import Config

    # in the current layout; a key named as before the ``ppo`` sections warns, as `train` would
    ppo = Config.upgrade(yaml.safe_load(Path(args.config).read_text()) or {})
    ppo.pop("output_dir", None)
    ppo.setdefault("model", {})["name_or_path"] = args.policy
    ppo.setdefault("reward", {})["sources"] = [{"model": args.reward}]
    ppo.setdefault("data", {})["path"] = args.prompts
    n_prompts = sum(1 for line in open(args.prompts) if line.strip())
    max_new = ppo.get("generation", {}).get("max_new_tokens", 32)
    return {"policy": args.policy, "reward": args.reward, "prompts": args.prompts, "ppo": ppo,
            "eval": {"num_prompts": min(n_prompts, 64), "samples_per_prompt": 8,
                     "max_new_tokens": max_new}}


# --------------------------------------------------------------------------- TRL settings

def full_config(cfg: dict) -> dict:
    """``cfg`` (a nested rlhf_ppo PPO config dict, possibly partial, in the current layout or
    the one before the ``ppo`` sections, as a task module may still write it) validated and
    completed with rlhf_ppo's defaults, as a plain nested dict in the current layout."""
    from rlhf_ppo.config import config_from_dict, upgrade_quietly

    return config_from_dict(upgrade_quietly(cfg)).to_dict()


def trl_settings(cfg: dict) -> dict:
    """TRL 1.12 ``trl.experimental.ppo.PPOConfig`` keyword arguments matching the rlhf_ppo PPO
    config ``cfg`` (nested dict; missing keys take rlhf_ppo's defaults).

    Batches: TRL's rollout batch is ``local_batch_size = per_device_train_batch_size *
    gradient_accumulation_steps``, split into ``num_mini_batches`` minibatches, each walked in
    micro-batches of ``per_device_train_batch_size``; but its accelerator steps the optimizer only
    every ``gradient_accumulation_steps`` micro-batches, i.e. once per ``num_mini_batches``
    minibatches when accumulation is used. The only setting with one optimizer step per minibatch
    (rlhf_ppo's) is ``per_device_train_batch_size = ppo.batch_size``, no accumulation: each
    minibatch is then one micro-batch of ``batch_size / num_minibatches`` sequences and its loss
    the token mean over that minibatch, as rlhf_ppo's ``token-mean`` (whose micro-batch size
    changes memory, not the gradient). Raises ValueError for what TRL cannot run at all."""
    full = full_config(cfg)
    p, o, g, r, m = full["ppo"], full["optim"], full["generation"], full["reward"], full["model"]
    adv, critic, kl = p["advantages"], p["critic"], p["kl"]
    if kl["estimator"] not in ("k1", "k3"):
        raise ValueError(f"ppo.kl.estimator={kl['estimator']!r}: TRL supports k1 and k3 only")
    sources = r["sources"]
    if len(sources) != 1 or not sources[0].get("model") or sources[0].get("weight", 1.0) != 1.0:
        raise ValueError("reward.sources: TRL's PPO takes exactly one reward model (weight 1)")
    if full["peft"]["enabled"]:
        raise ValueError("peft.enabled: the TRL side of this benchmark trains full models only")
    steps_per_iter = p["ppo_epochs"] * p["num_minibatches"]
    return dict(
        total_episodes=full["iterations"] * p["batch_size"],
        per_device_train_batch_size=p["batch_size"],
        gradient_accumulation_steps=1,
        num_mini_batches=p["num_minibatches"],
        local_rollout_forward_batch_size=g["batch_size"] or p["batch_size"],
        num_ppo_epochs=p["ppo_epochs"],
        learning_rate=o["lr"],
        weight_decay=o["weight_decay"],
        adam_beta1=o["adam_betas"][0],
        adam_beta2=o["adam_betas"][1],
        adam_epsilon=o["adam_eps"],
        lr_scheduler_type=o["scheduler"],
        # TRL steps its scheduler once per iteration; rlhf_ppo counts optimizer steps
        warmup_steps=math.ceil(o["warmup_steps"] / steps_per_iter),
        max_grad_norm=float(o["max_grad_norm"] or 0.0),
        cliprange=p["loss"]["clip_range"],
        cliprange_value=critic["value_clip"] if critic["value_clip"] is not None else 1e10,
        vf_coef=critic["vf_coef"],
        gamma=adv["gamma"],
        lam=adv["lam"],
        kl_coef=kl["coef"],
        kl_estimator=kl["estimator"],
        whiten_rewards=False,
        response_length=g["max_new_tokens"],
        temperature=g["temperature"],
        stop_token="eos",
        missing_eos_penalty=r["missing_stop_penalty"],
        num_sample_generations=0,
        save_strategy="no",
        report_to="none",
        bf16=False,
        fp16=False,
        gradient_checkpointing=m["gradient_checkpointing"],
        seed=full["seed"],
    )


def trl_unmatched(cfg: dict) -> list[str]:
    """What of ``cfg`` the TRL run does not (or cannot) reproduce, one sentence each."""
    from rlhf_ppo import estimators

    full = full_config(cfg)
    p, o, g, r, m = full["ppo"], full["optim"], full["generation"], full["reward"], full["model"]
    adv, loss, critic, kl = p["advantages"], p["loss"], p["critic"], p["kl"]
    # TRL always whitens; null `advantages.whiten` is the estimator's rule (the registry's)
    whitens = estimators.get(p["advantage_estimator"]).whitens(adv["whiten"])
    notes = []
    if o["critic_lr"] not in (None, o["lr"]):
        notes.append(f"optim.critic_lr={o['critic_lr']:g}: TRL has one learning rate (optim.lr="
                     f"{o['lr']:g}) for policy and value model (TRL variant flag critic_lr adds "
                     "a second optimizer parameter group instead)")
    if m["critic"] == "shared":
        notes.append("model.critic=shared: rlhf_ppo's value head sits on the policy (zero-init); "
                     "TRL trains a separate value model initialised from the reward model")
    elif m.get("critic_init", "policy") != "reward" and not m["critic_name_or_path"]:
        notes.append("model.critic=separate starts rlhf_ppo's critic from the policy; TRL's value "
                     "model starts from the reward model")
    if o["max_grad_norm"]:
        notes.append(f"optim.max_grad_norm={o['max_grad_norm']:g}: TRL 1.12's PPO never clips "
                     "gradients (max_grad_norm is passed but unused; TRL variant flag clip "
                     "clips the global norm before each optimizer step, as rlhf_ppo)")
    if o["warmup_steps"]:
        notes.append("optim.warmup_steps counts optimizer steps in rlhf_ppo, iterations in TRL "
                     "(rounded up)")
    if o["scheduler"] != "constant":
        notes.append(f"optim.scheduler={o['scheduler']}: TRL steps it once per iteration, "
                     "rlhf_ppo once per optimizer step")
    for key, value, neutral in (("ppo.loss.entropy_coef", loss["entropy_coef"], 0.0),
                                ("ppo.kl.adaptive", kl["adaptive"], False),
                                ("ppo.advantages.whiten", whitens, True),
                                ("ppo.loss.aggregation", loss["aggregation"], "token-mean"),
                                ("ppo.early_stop_kl", p["early_stop_kl"], None),
                                ("ppo.critic.warmup", critic["warmup"], 0),
                                ("ppo.critic.lam", critic["lam"], None),
                                ("ppo.advantages.lam_length_alpha", adv["lam_length_alpha"], None),
                                ("optim.separate_grad_clip", o.get("separate_grad_clip"), False),
                                ("reward.normalize", r["normalize"], False),
                                ("reward.clip", r["clip"], None),
                                ("generation.top_k", g["top_k"], 0),
                                ("generation.top_p", g["top_p"], 1.0),
                                ("generation.min_new_tokens", g["min_new_tokens"], 0),
                                ("generation.repetition_penalty", g["repetition_penalty"], 1.0),
                                ("generation.stop_token_ids", g["stop_token_ids"], []),
                                ("generation.stop_strings", g["stop_strings"], []),
                                ("model.ref_name_or_path", m["ref_name_or_path"], None),
                                ("mixed_precision", full["mixed_precision"], None)):
        if value != neutral:
            notes.append(f"{key}={value!r}: no TRL equivalent, TRL runs without it")
    if critic["scale_value_loss"]:
        notes.append("ppo.critic.scale_value_loss=true: rlhf_ppo divides the value loss by the "
                     "returns' variance when above 1; TRL does not")
    if critic["value_clip"] is None:
        notes.append("ppo.critic.value_clip=null: TRL always clips; cliprange_value=1e10 instead")
    notes.append("TRL adds the score one position after the EOS (the first padding token) when "
                 "a response stopped early, and trains the value there; rlhf_ppo adds it on the "
                 "EOS token itself")
    notes.append("TRL ends a response at its first pad token as well as at EOS (it finds the "
                 "length from pad ids); rlhf_ppo only at EOS")
    return notes


# --------------------------------------------------------------------------- run plan

def parse_variants(items: list[str], what: str) -> list[tuple[str, list[str]]]:
    """``NAME=OVERRIDES`` items, the overrides space- or comma-separated, into (name, list)."""
    out = []
    for item in items:
        name, sep, rest = item.partition("=")
        if not sep or not name or "/" in name:
            raise SystemExit(f"{what}: expected NAME=OVERRIDES (e.g. shipped= or "
                             f"'separate=model.critic=separate'), got {item!r}")
        parts = [x for x in rest.replace(",", " ").split() if x]
        if any(n == name for n, _ in out):
            raise SystemExit(f"{what}: variant {name!r} given twice")
        out.append((name, parts))
    return out


TRL_FLAGS = ("clip", "critic_lr")


def fmt_coef(x: float) -> str:
    return f"{x:g}"


def run_config(task: dict, overrides: list[str], kl_coef: float, seed: int, iterations: int,
               output_dir: Path) -> dict:
    """The rlhf_ppo config (nested dict) of one run: the task's, the variant's overrides (with
    ``{reward}`` / ``{policy}`` replaced by the task's models), then the run's own settings;
    in the current layout whatever layout the task's config has."""
    from rlhf_ppo.config import apply_overrides, upgrade_quietly

    cfg = upgrade_quietly(task["ppo"])  # a copy: the task's config is not changed
    items = [o.replace("{reward}", task["reward"]).replace("{policy}", task["policy"])
             for o in overrides]
    apply_overrides(cfg, items)
    cfg.update(output_dir=str(output_dir), overwrite=True, seed=seed, sample_every=0,
               iterations=iterations)
    cfg.setdefault("ppo", {}).setdefault("kl", {})["coef"] = kl_coef
    return cfg


def eval_config(task: dict, policy: str, output_dir: Path, eval_seed: int) -> dict:
    """The ``rlhf-ppo evaluate`` config of one final policy against the task's SFT model."""
    data = dict(task["ppo"].get("data", {}), path=task["prompts"], shuffle=False)
    generation = dict(task["ppo"].get("generation", {}),
                      max_new_tokens=task["eval"]["max_new_tokens"])
    sources = [{"model": task["reward"]}] + list(task["eval"].get("extra_sources", []))
    return {"output_dir": str(output_dir), "policy": policy, "reference": task["policy"],
            "num_prompts": task["eval"]["num_prompts"],
            "samples_per_prompt": task["eval"]["samples_per_prompt"],
            "seed": eval_seed, "plot_training": False, "data": data, "generation": generation,
            "reward": {"sources": sources}}


def write_prompt_ids(task: dict, path: Path) -> int:
    """The task's prompts as rlhf_ppo tokenizes them (``load_prompts`` with the policy's
    ``load_tokenizer``: special tokens, chat templates and length filter included), one JSON list
    of ids per line, so TRL trains on exactly the same prompt ids. Returns the count."""
    from rlhf_ppo.config import DataConfig, ModelConfig
    from rlhf_ppo.data import load_prompts
    from rlhf_ppo.models import load_tokenizer

    full = full_config(task["ppo"])
    data = DataConfig(**dict(full["data"], path=task["prompts"]))
    model = full["model"]
    tok = load_tokenizer(ModelConfig(name_or_path=task["policy"], tokenizer=model["tokenizer"],
                                     trust_remote_code=model["trust_remote_code"]))
    prompts = load_prompts(data, tok)
    with open(path, "w") as f:
        for p in prompts:
            f.write(json.dumps(p.input_ids) + "\n")
    return len(prompts)


@dataclasses.dataclass
class Run:
    trainer: str          # "rlhf_ppo" or "trl"
    variant: str
    options: list[str]    # rlhf_ppo overrides, or TRL flags
    kl_coef: float
    seed: int
    iterations: int
    eval_seed: int

    @property
    def label(self) -> str:
        return f"{self.trainer}/{self.variant}"

    @property
    def key(self) -> str:
        return json.dumps([self.label, self.options, self.kl_coef, self.seed, self.iterations,
                           self.eval_seed])

    def folder(self, out: Path) -> Path:
        return out / "runs" / f"{self.trainer}_{self.variant}" / f"kl{fmt_coef(self.kl_coef)}" \
            / f"seed{self.seed}"


def plan_runs(variants, trl_variants, kl_coefs, seeds, iterations, eval_seed) -> list[Run]:
    """Every run, seeds outermost, then kl_coef, then trainers alternating (so runs of both
    trainers share the machine's slow and fast periods)."""
    runs = []
    for seed in seeds:
        for kl in kl_coefs:
            for name, opts in variants:
                runs.append(Run("rlhf_ppo", name, opts, kl, seed, iterations, eval_seed))
            for name, opts in trl_variants:
                runs.append(Run("trl", name, opts, kl, seed, iterations, eval_seed))
    return runs


# --------------------------------------------------------------------------- running

def child_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               PYTHONUNBUFFERED="1")
    return env


def rlhf_ppo_command(*args: str) -> list[str]:
    exe = Path(sys.executable).parent / "rlhf-ppo"
    return [str(exe), *args] if exe.is_file() else [sys.executable, "-m", "rlhf_ppo", *args]


def _call(cmd: list[str], log: Path) -> tuple[int, float]:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env())
    return rc, time.perf_counter() - t0


def _tail(path: Path, n: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _mean(xs) -> float | None:
    xs = [x for x in xs if _finite(x)]
    return sum(xs) / len(xs) if xs else None


def rlhf_metrics(path: Path) -> dict:
    """Seconds per iteration and the critic's health from an rlhf_ppo metrics.jsonl."""
    rows = [json.loads(line) for line in open(path) if line.strip()] if path.is_file() else []
    nonfinite = any(isinstance(v, float) and not math.isfinite(v)
                    for r in rows for k, v in r.items()
                    if k in ("score_mean", "kl", "policy_loss", "value_loss", "grad_norm")) \
        or any(r.get("nonfinite_skipped") for r in rows)
    last = rows[-5:]
    vl = [r.get("value_loss") for r in rows]
    return {"train_iterations": len(rows),
            "s_per_iter": _mean(r.get("time/iteration") for r in rows),
            "explained_variance_last5": _mean(r.get("explained_variance") for r in last),
            "value_loss_last5": _mean(r.get("value_loss") for r in last),
            "value_loss_max": max((x for x in vl if _finite(x)), default=None),
            "grad_norm_last5": _mean(r.get("grad_norm") for r in last),
            "train_score_last5": _mean(r.get("score_mean") for r in last),
            "train_kl_last5": _mean(r.get("kl") for r in last),
            "nonfinite": nonfinite}


def execute(run: Run, ctx: dict) -> dict:
    """Train and evaluate one run; returns its runs.jsonl row (``status`` ok, nonfinite or
    failed)."""
    out, task = ctx["out"], ctx["task"]
    folder = run.folder(out)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    row = {"task": ctx["task_name"], "label": run.label, "trainer": run.trainer,
           "variant": run.variant, "options": run.options, "kl_coef": run.kl_coef,
           "seed": run.seed, "iterations": run.iterations, "eval_seed": run.eval_seed,
           "key": run.key, "run_dir": str(folder)}
    import yaml

    cfg = run_config(task, run.options if run.trainer == "rlhf_ppo" else [], run.kl_coef,
                     run.seed, run.iterations, folder / "train")
    if run.trainer == "rlhf_ppo":
        (folder / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        rc, seconds = _call(rlhf_ppo_command("train", "--config", str(folder / "config.yaml")),
                            folder / "train.log")
        row.update(rlhf_metrics(folder / "train" / "metrics.jsonl"))
        policy = folder / "train" / "final"
    else:
        settings = trl_settings(cfg)
        (folder / "trl_settings.json").write_text(json.dumps(settings, indent=1) + "\n")
        cmd = [ctx["trl_python"], str(HERE / "trl_learn.py"), "--policy", task["policy"],
               "--reward", task["reward"], "--prompt-ids", str(ctx["prompt_ids"]),
               "--settings", str(folder / "trl_settings.json"), "--seed", str(run.seed),
               "--kl-coef", repr(run.kl_coef), "--output-dir", str(folder / "train")]
        full = full_config(cfg)
        if "critic_lr" in run.options:
            cmd += ["--critic-lr", repr(full["optim"]["critic_lr"] or full["optim"]["lr"])]
        if "clip" in run.options and full["optim"]["max_grad_norm"]:
            cmd += ["--clip-grad-norm", repr(full["optim"]["max_grad_norm"])]
        rc, seconds = _call(cmd, folder / "train.log")
        result_path = folder / "train" / "result.json"
        result = json.loads(result_path.read_text()) if result_path.is_file() else {}
        row.update({k: result.get(k) for k in (
            "s_per_iter", "train_iterations", "optimizer_steps_per_iter", "value_loss_last5",
            "value_loss_max", "grad_norm_last5", "train_score_last5", "train_kl_last5")})
        row["nonfinite"] = bool(result.get("nonfinite"))
        policy = folder / "train" / "final"
    row["train_seconds"] = round(seconds, 1)
    if rc != 0:
        log = (folder / "train.log").read_text(errors="replace")
        if "NonFiniteError" in log or row.get("nonfinite"):
            row.update(status="nonfinite", nonfinite=True, score=None, kl=None, ref_score=None)
            return row
        row.update(status="failed", error=f"training exited with {rc}; "
                                          f"{folder / 'train.log'}:\n{_tail(folder / 'train.log')}")
        return row
    ev = eval_config(task, str(policy), folder / "eval", run.eval_seed)
    (folder / "eval.yaml").write_text(yaml.safe_dump(ev, sort_keys=False))
    rc, seconds = _call(rlhf_ppo_command("evaluate", "--config", str(folder / "eval.yaml")),
                        folder / "eval.log")
    row["eval_seconds"] = round(seconds, 1)
    summary_path = folder / "eval" / "summary.json"
    if rc != 0 or not summary_path.is_file():
        status = "nonfinite" if row.get("nonfinite") else "failed"
        row.update(status=status, score=None, kl=None, ref_score=None,
                   error=f"evaluate exited with {rc}; {folder / 'eval.log'}:\n"
                         f"{_tail(folder / 'eval.log')}")
        return row
    s = json.loads(summary_path.read_text())
    row.update(status="nonfinite" if row.get("nonfinite") else "ok",
               score=s["policy"]["score"]["mean"], kl=s["kl"]["mean"],
               ref_score=s["reference"]["score"]["mean"], win_rate=s["win_rate"]["mean"],
               response_length=s["policy"]["response_length"],
               stop_rate=s["policy"]["stop_rate"])
    sources = s["policy"].get("sources") or []
    if len(sources) > 1:  # the task's weight-0 "truth" source (quickstart: true sentiment)
        row["truth"] = sources[1]["mean"]
        row["ref_truth"] = s["reference"]["sources"][1]["mean"]
    return row


# --------------------------------------------------------------------------- statistics

def objective(row: dict) -> float | None:
    """J = score - kl_coef * KL of a run (None when it has no finite score or KL)."""
    if not (_finite(row.get("score")) and _finite(row.get("kl"))):
        return None
    return row["score"] - row["kl_coef"] * row["kl"]


def annotate(rows: list[dict]) -> list[dict]:
    """Copies of ``rows`` with ``J`` and ``diverged`` / ``diverged_reason``: non-finite training,
    KL above 10x the median KL of the setting's other seeds (median taken as at least 0.1), or a
    J below the reference's (its score: its KL is 0), i.e. worse than not training."""
    out = []
    for row in rows:
        r = dict(row, J=objective(row))
        reasons = []
        if r.get("nonfinite") or r.get("status") == "nonfinite":
            reasons.append("non-finite")
        others = [o["kl"] for o in rows if o is not row and o["label"] == row["label"]
                  and o["kl_coef"] == row["kl_coef"] and _finite(o.get("kl"))]
        if _finite(r.get("kl")) and others:
            ref = max(statistics.median(others), DIVERGED_KL_FLOOR)
            if r["kl"] > DIVERGED_KL_FACTOR * ref:
                reasons.append(f"KL {r['kl']:.3g} > {DIVERGED_KL_FACTOR:g}x median {ref:.3g}")
        # The reference's own J is its score (KL 0): a policy below it is worse than no training
        if _finite(r.get("J")) and _finite(r.get("ref_score")) and r["J"] < r["ref_score"]:
            reasons.append("J below the reference's")
        r["diverged"] = bool(reasons)
        r["diverged_reason"] = "; ".join(reasons)
        out.append(r)
    return out


def aggregate(rows: list[dict]) -> list[dict]:
    """Per (label, kl_coef), in first-seen label order and increasing kl_coef: ``n`` runs,
    ``n_j`` with a finite J, ``J_mean``, ``J_std`` (sample std; 0 for one run), ``J_min``,
    ``score_mean``, ``kl_mean``, ``s_per_iter``, ``diverged`` (count), ``ref_score``."""
    rows = annotate(rows)
    labels = list(dict.fromkeys(r["label"] for r in rows))
    groups = []
    for label in labels:
        for kl in sorted({r["kl_coef"] for r in rows if r["label"] == label}):
            g = [r for r in rows if r["label"] == label and r["kl_coef"] == kl]
            js = [r["J"] for r in g if r["J"] is not None]
            groups.append({
                "label": label, "kl_coef": kl, "n": len(g), "n_j": len(js),
                "J_mean": sum(js) / len(js) if js else None,
                "J_std": statistics.stdev(js) if len(js) > 1 else (0.0 if js else None),
                "J_min": min(js) if js else None,
                "score_mean": _mean(r.get("score") for r in g),
                "kl_mean": _mean(r.get("kl") for r in g),
                "s_per_iter": _mean(r.get("s_per_iter") for r in g),
                "diverged": sum(r["diverged"] for r in g),
                "ref_score": _mean(r.get("ref_score") for r in g),
                "seeds": sorted(r["seed"] for r in g)})
    return groups


# --------------------------------------------------------------------------- report

def _f(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown_report(rows: list[dict], header: list[str]) -> str:
    """table.md: the header lines, one table per kl_coef over trainers/variants, then every run."""
    ann = annotate(rows)
    groups = aggregate(rows)
    lines = list(header) + [""]
    for kl in sorted({g["kl_coef"] for g in groups}):
        lines += [f"### kl_coef {fmt_coef(kl)}", "",
                  "| trainer/variant | mean J ± std | min J | mean score | mean KL | s/iter | "
                  "diverged | n |", "|---|---|---|---|---|---|---|---|"]
        for g in (g for g in groups if g["kl_coef"] == kl):
            lines.append(f"| {g['label']} | {_f(g['J_mean'])} ± {_f(g['J_std'])} | "
                         f"{_f(g['J_min'])} | {_f(g['score_mean'])} | {_f(g['kl_mean'])} | "
                         f"{_f(g['s_per_iter'], 2)} | {g['diverged']} | {g['n']} |")
        lines.append("")
    has_truth = any("truth" in r for r in ann)
    lines += ["### Runs", "",
              "| trainer/variant | kl_coef | seed | J | score | KL | ref score | "
              + ("truth (ref) | " if has_truth else "")
              + "s/iter | train s | EV last5 | value loss last5 (max) | grad norm last5 | "
              "diverged |",
              "|---|---|---|---|---|---|---|" + ("---|" if has_truth else "")
              + "---|---|---|---|---|---|"]
    for r in sorted(ann, key=lambda r: (r["label"], r["kl_coef"], r["seed"])):
        truth = (f"{_f(r.get('truth'))} ({_f(r.get('ref_truth'))}) | " if has_truth else "")
        lines.append(
            f"| {r['label']} | {fmt_coef(r['kl_coef'])} | {r['seed']} | {_f(r['J'])} | "
            f"{_f(r.get('score'))} | {_f(r.get('kl'))} | {_f(r.get('ref_score'))} | {truth}"
            f"{_f(r.get('s_per_iter'), 2)} | {_f(r.get('train_seconds'), 0)} | "
            f"{_f(r.get('explained_variance_last5'))} | {_f(r.get('value_loss_last5'))} "
            f"({_f(r.get('value_loss_max'))}) | {_f(r.get('grad_norm_last5'))} | "
            f"{r['diverged_reason'] or 'no'} |")
    return "\n".join(lines) + "\n"


COLOURS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
           "tab:pink", "tab:olive", "tab:cyan", "tab:gray"]


def plot_frontier(rows: list[dict], path: Path, title: str) -> Path:
    """frontier.png: x = KL, y = score; per trainer/variant a colour, a small dot per run, a large
    marker per (variant, kl_coef) mean, joined in kl_coef order; the reference at KL 0 as a black
    star."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    ann = [r for r in annotate(rows) if _finite(r.get("score")) and _finite(r.get("kl"))]
    groups = aggregate(rows)
    fig = Figure(figsize=(8, 5.5), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    labels = list(dict.fromkeys(g["label"] for g in groups))
    for i, label in enumerate(labels):
        colour = COLOURS[i % len(COLOURS)]
        mine = [r for r in ann if r["label"] == label]
        ax.scatter([r["kl"] for r in mine], [r["score"] for r in mine], s=14, color=colour,
                   alpha=0.45, linewidths=0)
        div = [r for r in mine if r["diverged"]]
        if div:
            ax.scatter([r["kl"] for r in div], [r["score"] for r in div], s=40, color=colour,
                       marker="x", linewidths=1)
        gs = [g for g in groups if g["label"] == label and g["kl_mean"] is not None
              and g["score_mean"] is not None]
        ax.plot([g["kl_mean"] for g in gs], [g["score_mean"] for g in gs], color=colour,
                marker="o", markersize=9, linewidth=1.5, label=label)
        for g in gs:
            ax.annotate(f"β={fmt_coef(g['kl_coef'])}", (g["kl_mean"], g["score_mean"]),
                        textcoords="offset points", xytext=(6, 4), fontsize=8, color=colour)
    refs = [r["ref_score"] for r in ann if _finite(r.get("ref_score"))]
    if refs:
        ax.scatter([0.0], [sum(refs) / len(refs)], marker="*", s=220, color="black",
                   label="reference (SFT)", zorder=5)
    # Diverged runs (KL of 100+) would squeeze every other point against the axis: the view ends
    # past the healthy runs, and the diverged ones are counted in the title instead.
    healthy = [r["kl"] for r in ann if not r["diverged"]]
    off = [r for r in ann if r["diverged"] and healthy and r["kl"] > 1.25 * max(healthy)]
    if off:
        ax.set_xlim(-0.03 * max(healthy), 1.25 * max(healthy))
        title += f"\n{len(off)} diverged run(s) beyond the right edge: " + ", ".join(
            f"{label} {sum(r['label'] == label for r in off)}"
            for label in dict.fromkeys(r["label"] for r in off))
    ax.set_xlabel("KL(policy ‖ reference), nats per response")
    ax.set_ylabel("reward-model score")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    return path


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in open(path) if line.strip()]


def write_report(rows: list[dict], out: Path, meta: dict, command: str) -> str:
    """table.md and frontier.png in ``out`` from ``rows`` (finished runs); returns the table."""
    ok = [r for r in rows if r.get("status") in ("ok", "nonfinite")]
    seeds = sorted({r["seed"] for r in ok})
    iters = sorted({r["iterations"] for r in ok})
    task = meta.get("task") or ", ".join(sorted({r.get("task", "?") for r in ok}))
    header = [f"# Learning benchmark: {task}", "",
              f"- command: `{command}`"]
    if meta.get("command") and meta["command"] != command:
        header.append(f"- runs made by: `{meta['command']}`")
    v = meta.get("versions", {})
    if v:
        header.append("- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()))
    header.append(f"- seeds {seeds}, iterations {iters}, eval seed "
                  f"{sorted({r.get('eval_seed') for r in ok})}; J = score - kl_coef * KL of the "
                  "final policy (`rlhf-ppo evaluate` against the SFT reference)")
    if meta.get("eval"):
        e = meta["eval"]
        header.append(f"- evaluation: {e.get('num_prompts')} prompts x "
                      f"{e.get('samples_per_prompt')} samples, {e.get('max_new_tokens')} new "
                      "tokens, reward-model score; KL = k1 estimate of KL(policy || reference)")
    if meta.get("jobs"):
        header.append(f"- {meta['jobs']} runs in parallel, one torch thread each "
                      "(s/iter: mean wall seconds per iteration, on a shared machine)")
    header.append(f"- diverged: non-finite training, final KL > {DIVERGED_KL_FACTOR:g}x the "
                  f"median KL of the setting's other seeds (at least {DIVERGED_KL_FLOOR:g}), "
                  "or J below the reference's (its score, KL 0: worse than not training)")
    if meta.get("trl_settings"):
        header += ["", "TRL settings (kl_coef and seed per run): `"
                   + json.dumps(meta["trl_settings"]) + "`"]
    if meta.get("trl_unmatched"):
        header += ["", "Not matched on the TRL side:"] + [f"- {n}" for n in meta["trl_unmatched"]]
    if meta.get("variants"):
        header += ["", "Variants: " + "; ".join(
            f"{lab}: `{' '.join(opts)}`" if opts else
            f"{lab}: {'stock TRL' if lab.startswith('trl/') else 'the task config as is'}"
            for lab, opts in meta["variants"])]
    table = markdown_report(ok, header)
    (out / "table.md").write_text(table)
    plot_frontier(ok, out / "frontier.png",
                  f"{task}: score vs KL, seeds {', '.join(map(str, seeds))}, "
                  f"{'/'.join(map(str, iters))} iterations (dots: runs, large: means, x: diverged)")
    return table


# --------------------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="quickstart", help=f"one of {', '.join(TASKS)}")
    p.add_argument("--policy", help="custom task: SFT policy folder (also the reference)")
    p.add_argument("--reward", help="custom task: reward model folder")
    p.add_argument("--prompts", help="custom task: prompts .jsonl (column `prompt`)")
    p.add_argument("--config", help="custom task: rlhf_ppo PPO config YAML")
    p.add_argument("--kl-coefs", type=float, nargs="+",
                   help="default: 0.2x, 1x and 5x the task config's ppo.kl.coef")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--iterations", type=int, help="default: the task config's")
    p.add_argument("--variants", nargs="+", default=["shipped="], metavar="NAME=OVERRIDES",
                   help="rlhf_ppo variants: dotted overrides of the task config, space- or "
                        "comma-separated; {reward} and {policy} name the task's models")
    p.add_argument("--trl-variants", nargs="+", default=["default="], metavar="NAME=FLAGS",
                   help=f"TRL variants; flags among {', '.join(TRL_FLAGS)}: clip = clip the "
                        "gradient norm as rlhf_ppo (TRL's PPO does not), critic_lr = rlhf_ppo's "
                        "critic learning rate for the value model")
    p.add_argument("--trl", action=argparse.BooleanOptionalAction, default=True,
                   help="also run TRL (default on)")
    p.add_argument("--trl-python", default=None, metavar="PATH",
                   help=f"python of a venv with trl==1.12.0, for --trl (default: "
                        f"${TRL_PYTHON_ENV})")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (each one thread)")
    p.add_argument("--output-dir", type=Path, help="default: runs/learning_bench/TASK")
    p.add_argument("--eval-seed", type=int, default=0)
    p.add_argument("--eval-prompts", type=int, help="default: the task's")
    p.add_argument("--eval-samples", type=int, help="samples per prompt; default: the task's")
    p.add_argument("--fresh", action="store_true", help="ignore (and back up) runs.jsonl")
    p.add_argument("--report-only", action="store_true",
                   help="only rewrite table.md and frontier.png from runs.jsonl")
    args = p.parse_args(argv)
    args.custom = any(getattr(args, k) for k in ("policy", "reward", "prompts", "config"))
    if args.custom:
        args.task = "custom"
    if args.output_dir is None:
        args.output_dir = Path("runs/learning_bench") / args.task
    if args.jobs < 1:
        p.error("--jobs: expected >= 1")
    return args


def versions(trl_python: str | None) -> dict:
    import torch
    import transformers

    v = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import rlhf_ppo

        v["rlhf_ppo"] = getattr(rlhf_ppo, "__version__", "?")
    except ImportError:
        pass
    if trl_python:
        code = ("import json, trl, transformers, torch; print(json.dumps({'trl': trl.__version__, "
                "'trl venv transformers': transformers.__version__, "
                "'trl venv torch': torch.__version__}))")
        try:
            res = subprocess.run([trl_python, "-c", code], capture_output=True, text=True,
                                 timeout=300, env=child_env())
            v.update(json.loads(res.stdout.strip().splitlines()[-1]))
        except (OSError, subprocess.SubprocessError, ValueError, IndexError) as e:
            v["trl"] = f"unknown ({type(e).__name__})"
    return v


def main(argv=None) -> int:
    args = parse_args(argv)
    command = shlex.join([Path(sys.argv[0]).name if argv is None else "learning_bench.py",
                          *(sys.argv[1:] if argv is None else argv)])
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    runs_path, meta_path = out / "runs.jsonl", out / "meta.json"
    if args.report_only:
        rows = read_rows(runs_path)
        if not rows:
            raise SystemExit(f"--report-only: no runs in {runs_path}")
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        print(write_report(rows, out, meta, command))
        print(f"wrote {out / 'table.md'} and {out / 'frontier.png'}")
        return 0

    import torch

    torch.set_num_threads(1)
    if args.trl:  # without the TRL python: exits with how to make its venv
        args.trl_python = resolve_trl_python(
            args.trl_python, otherwise="or pass --no-trl to run rlhf_ppo alone")
    variants = parse_variants(args.variants, "--variants")
    trl_variants = parse_variants(args.trl_variants, "--trl-variants") if args.trl else []
    for name, flags in trl_variants:
        bad = [f for f in flags if f not in TRL_FLAGS]
        if bad:
            raise SystemExit(f"--trl-variants {name}: unknown flags {bad}; expected {TRL_FLAGS}")

    t0 = time.perf_counter()
    if args.custom:
        task = custom_task(args)
    else:
        print(f"building task {args.task} in {out / 'task'} (finished stages are reused)",
              flush=True)
        task = dict(resolve_builder(args.task)(out / "task", seed=0))
        print(f"task ready in {time.perf_counter() - t0:.0f} s", flush=True)
    task["eval"] = dict(task["eval"])
    if args.eval_prompts:
        task["eval"]["num_prompts"] = args.eval_prompts
    if args.eval_samples:
        task["eval"]["samples_per_prompt"] = args.eval_samples
    base = full_config(task["ppo"])
    kl0 = base["ppo"]["kl"]["coef"]
    kl_coefs = args.kl_coefs or [round(kl0 * f, 10) for f in (0.2, 1.0, 5.0)]
    iterations = args.iterations or base["iterations"]
    runs = plan_runs(variants, trl_variants, kl_coefs, args.seeds, iterations, args.eval_seed)

    prompt_ids = out / "prompt_ids.jsonl"
    n_prompts = write_prompt_ids(task, prompt_ids)
    trl_cfg = run_config(task, [], kl_coefs[0], args.seeds[0], iterations, out / "x")
    meta = {"task": args.task, "command": command, "versions": versions(
                args.trl_python if args.trl else None),
            "eval": task["eval"], "jobs": args.jobs, "prompts": n_prompts,
            "variants": [(f"rlhf_ppo/{n}", o) for n, o in variants]
            + [(f"trl/{n}", o) for n, o in trl_variants]}
    if args.trl:
        meta["trl_settings"] = {k: v for k, v in trl_settings(trl_cfg).items()
                                if k not in ("kl_coef", "seed")}
        meta["trl_unmatched"] = trl_unmatched(trl_cfg)
    meta_path.write_text(json.dumps(_jsonable(meta), indent=1) + "\n")

    if args.fresh and runs_path.is_file():
        runs_path.replace(out / "runs.jsonl.old")
    done = {r["key"] for r in read_rows(runs_path) if r.get("status") in ("ok", "nonfinite")}
    todo = [r for r in runs if r.key not in done]
    print(f"{len(runs)} runs ({len(runs) - len(todo)} already in {runs_path}), {args.jobs} at a "
          f"time; kl_coefs {[fmt_coef(k) for k in kl_coefs]}, seeds {args.seeds}, "
          f"{iterations} iterations", flush=True)
    if args.trl:
        for note in meta["trl_unmatched"]:
            print(f"  TRL, not matched: {note}", flush=True)
    ctx = {"out": out, "task": task, "task_name": args.task, "prompt_ids": prompt_ids,
           "trl_python": args.trl_python}
    lock, failed, counter = threading.Lock(), [], [0]

    def work(run: Run) -> None:
        try:
            row = execute(run, ctx)
        except Exception as e:  # a bug in this script: report it, keep the other runs going
            row = {"label": run.label, "kl_coef": run.kl_coef, "seed": run.seed,
                   "status": "failed", "error": f"{type(e).__name__}: {e}"}
        row["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
        with lock:
            counter[0] += 1
            head = f"[{counter[0]}/{len(todo)}] {run.label} kl_coef={fmt_coef(run.kl_coef)} " \
                   f"seed={run.seed}:"
            if row["status"] == "failed":
                failed.append(row)
                print(f"{head} FAILED: {row.get('error')}", flush=True)
                return
            with open(runs_path, "a") as f:
                f.write(json.dumps(_jsonable(row)) + "\n")
            j = objective(row)
            print(f"{head} J {_f(j)} score {_f(row.get('score'))} KL {_f(row.get('kl'))} (ref "
                  f"score {_f(row.get('ref_score'))}), {_f(row.get('s_per_iter'), 3)} s/iter, "
                  f"train {row.get('train_seconds')} s, eval {row.get('eval_seconds')} s"
                  + (" NON-FINITE" if row.get("nonfinite") else ""), flush=True)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(work, todo))
    keys = {r.key for r in runs}
    rows = [r for r in read_rows(runs_path) if r.get("key") in keys]
    if rows:
        print()
        print(write_report(rows, out, meta, command))
        for r in annotate(rows):
            if r["diverged"]:
                print(f"DIVERGED: {r['label']} kl_coef={fmt_coef(r['kl_coef'])} seed={r['seed']}:"
                      f" {r['diverged_reason']}")
        print(f"wrote {out / 'table.md'}, {out / 'frontier.png'} and {runs_path} "
              f"({time.perf_counter() - t0:.0f} s)")
    if failed:
        print(f"{len(failed)} runs failed (not recorded; rerun to retry)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
