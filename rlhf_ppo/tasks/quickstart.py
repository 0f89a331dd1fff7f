"""``rlhf-ppo quickstart``: the whole alignment pipeline, offline, on a built-in miniature task.

The package writes a corpus of short movie reviews (each sentence positive or negative), SFTs a
small Llama built from a config on all of them, trains a reward model on preference pairs (the
more positive review of two is chosen), runs PPO toward positive reviews, and evaluates the PPO
policy against the SFT reference with an HTML report. Each stage runs through the stage runner
(:mod:`.stages`): a stage whose config is unchanged since an earlier run is reused, so a second
run is fast, and a changed one runs again with every stage after it.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

from ..config import Config
from ..evaluate import EvalConfig, run_evaluate
from ..reward_training import RewardTrainConfig, run_reward_training
from ..sft import SFTConfig, run_sft
from ..trainer import PPOTrainer
from .stages import Stage, command_stage, run_pipeline
from .tiny import SPECIAL_TOKENS, build_tiny_model, build_word_tokenizer

# --------------------------------------------------------------------------- the corpus

TITLES = ["the night train", "blue river", "the last summer", "city of glass", "the old house",
          "a quiet storm", "the red door", "north road", "the long winter", "paper moon",
          "the silver key", "a distant shore", "the lost garden", "iron heart", "the green hill",
          "midnight sun", "the broken bridge", "a small wonder", "the hidden valley", "wild rain"]
SUBJECTS = ["the movie", "the film", "the acting", "the story", "the plot", "the music",
            "the ending", "the cast", "the script", "the camera work", "the dialogue", "the pace"]
POSITIVE = ["great", "wonderful", "brilliant", "moving", "funny", "beautiful", "excellent",
            "charming", "delightful", "superb", "clever", "warm"]
NEGATIVE = ["boring", "dull", "awful", "terrible", "slow", "weak", "silly", "messy", "bland",
            "poor", "flat", "tedious"]
INTENS = ["", "really ", "very ", "truly "]
POS_TEMPLATES = ["{s} was {i}{a} .", "i loved {s} .", "{s} felt {a} and {b} .",
                 "what a {a} film .", "i would watch it again .", "{s} is {i}{a} ."]
NEG_TEMPLATES = ["{s} was {i}{a} .", "i hated {s} .", "{s} felt {a} and {b} .",
                 "what a {a} film .", "i would not watch it again .", "{s} is {i}{a} ."]
PROMPT = "review of {title} :"


def review_vocab() -> list[str]:
    """Every word the corpus can use, after the special tokens."""
    words: list[str] = []
    texts = TITLES + SUBJECTS + POSITIVE + NEGATIVE + INTENS + POS_TEMPLATES + NEG_TEMPLATES
    for text in texts + [PROMPT]:
        for w in text.replace("{", " {").split():
            if not w.startswith("{") and w not in words:
                words.append(w)
    return SPECIAL_TOKENS + words


def review_sentence(rng: random.Random, positive: bool) -> str:
    """One sentence of the given sentiment."""
    words = POSITIVE if positive else NEGATIVE
    a, b = rng.sample(words, 2)
    template = rng.choice(POS_TEMPLATES if positive else NEG_TEMPLATES)
    return template.format(s=rng.choice(SUBJECTS), i=rng.choice(INTENS), a=a, b=b)


def review(rng: random.Random, positive_share: float) -> tuple[str, float]:
    """A review of 2-3 sentences, each positive with probability ``positive_share``; returns
    the text and its share of positive sentences (the hidden "true" score)."""
    flags = [rng.random() < positive_share for _ in range(rng.choice([2, 3]))]
    return " ".join(review_sentence(rng, f) for f in flags), sum(flags) / len(flags)


def sentiment(text: str) -> float:
    """Share of sentiment words in ``text`` that are positive, in [-1, 1]: (pos - neg) / (pos +
    neg), 0 without any. The hidden truth the reward model should learn (used for reporting)."""
    tokens = re.findall(r"[a-z]+", text.lower())
    pos = sum(t in POSITIVE or t in ("loved",) for t in tokens) + text.count("would watch")
    neg = sum(t in NEGATIVE or t in ("hated",) for t in tokens) + text.count("would not watch")
    return (pos - neg) / (pos + neg) if pos + neg else 0.0


def repetition_pair(rng: random.Random) -> tuple[str, str]:
    """(chosen, rejected) of equal sentiment: distinct sentences beat one sentence repeated, so
    the reward model does not pay for "i loved it. i loved it. i loved it."."""
    positive, n = rng.random() < 0.5, rng.choice([2, 3])
    sentences: list[str] = []
    while len(sentences) < n:
        x = review_sentence(rng, positive)
        if x not in sentences:
            sentences.append(x)
    return " ".join(sentences), " ".join([sentences[0]] * n)


def corruption_pair(rng: random.Random) -> tuple[str, str]:
    """(chosen, rejected): a review beats the same review with two words dropped, repeated or
    swapped, so the reward model pays for well-formed text, not just for positive words."""
    text, _ = review(rng, rng.random())
    words = text.split()
    for _ in range(2):
        i = rng.randrange(len(words) - 1)
        edit = rng.choice(["drop", "repeat", "swap"])
        if edit == "drop":
            del words[i]
        elif edit == "repeat":
            words.insert(i, words[i])
        else:
            words[i], words[i + 1] = words[i + 1], words[i]
    return text, " ".join(words)


def corpus_paths(folder: str | Path) -> dict[str, str]:
    """The files :func:`write_corpus` writes into ``folder``, by name: ``sft``, ``pairs``,
    ``prompts`` (known before they are written, so the stage configs can name them)."""
    return {k: str(Path(folder) / f"{k}.jsonl") for k in ("sft", "pairs", "prompts")}


def write_corpus(folder: str | Path, n_sft: int = 3000, n_pairs: int = 4000, seed: int = 0,
                 repetition_share: float = 0.2, corruption_share: float = 0.2) -> dict:
    """Write ``sft.jsonl`` (prompt, response), ``pairs.jsonl`` (prompt, chosen, rejected) and
    ``prompts.jsonl`` (prompt) into ``folder``; returns their paths. The chosen review is the more
    positive one, or (``repetition_share`` of the pairs) the one without a repeated sentence, or
    (``corruption_share``) the one without broken grammar."""
    rng = random.Random(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {k: Path(v) for k, v in corpus_paths(folder).items()}
    with open(paths["sft"], "w") as f:
        for _ in range(n_sft):  # every sentiment mix, so the SFT model writes both kinds
            text, _ = review(rng, rng.random())
            f.write(json.dumps({"prompt": PROMPT.format(title=rng.choice(TITLES)),
                                "response": text}) + "\n")
    with open(paths["pairs"], "w") as f:
        written = 0
        while written < n_pairs:
            prompt = PROMPT.format(title=rng.choice(TITLES))
            kind = rng.random()
            if kind < repetition_share:
                chosen, rejected = repetition_pair(rng)
            elif kind < repetition_share + corruption_share:
                chosen, rejected = corruption_pair(rng)
                if chosen == rejected:
                    continue
            else:
                (a, sa), (b, sb) = review(rng, rng.random()), review(rng, rng.random())
                if sa == sb:
                    continue
                chosen, rejected = (a, b) if sa > sb else (b, a)
            f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
            written += 1
    with open(paths["prompts"], "w") as f:
        for title in TITLES:
            f.write(json.dumps({"prompt": PROMPT.format(title=title)}) + "\n")
    return {k: str(v) for k, v in paths.items()}


# --------------------------------------------------------------------------- the pipeline

MODEL = dict(hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
"""The quickstart's small Llama (~0.2M parameters), built from a config with random weights."""


def sentiment_reward(prompts: list[str], responses: list[str], **kwargs) -> list[float]:
    """:func:`sentiment` of each response: the corpus's hidden truth, reported beside the
    learned reward model's score (weight 0) to show that PPO did not just fool the model."""
    return [sentiment(r) for r in responses]


def stage_configs(out: Path, data: dict) -> dict[str, dict]:
    """The config (as a dict) of every stage; each is also written as ``STAGE/stage.yaml`` so a
    user can rerun one stage alone (``rlhf-ppo sft --config .../sft/stage.yaml``)."""
    train = dict(micro_batch_size=32, heldout_batch_size=128)
    optim = dict(scheduler="constant", warmup_steps=0)
    return {
        "sft": dict(
            output_dir=str(out / "sft"), overwrite=True, threads=1,
            model=dict(name_or_path=str(out / "base")),
            data=dict(path=data["sft"], heldout_fraction=0.05, max_length=48),
            train=dict(train, epochs=2, batch_size=32), optim=dict(optim, lr=3e-3)),
        "reward": dict(
            output_dir=str(out / "reward"), overwrite=True, threads=1,
            model=dict(name_or_path=str(out / "sft" / "final")),
            data=dict(path=data["pairs"], heldout_fraction=0.1, max_length=48),
            train=dict(train, epochs=3, batch_size=32), optim=dict(optim, lr=1e-3)),
        "ppo": dict(
            output_dir=str(out / "ppo"), overwrite=True, threads=1, iterations=40, sample_every=10,
            # A critic started from the reward model, trained toward Monte-Carlo returns (critic
            # lambda 1), its gradient clipped apart from the policy's: the best of the critics on
            # the learning benchmark against TRL (docs/critic.md).
            model=dict(name_or_path=str(out / "sft" / "final"), critic="separate",
                       critic_init="reward"),
            reward=dict(sources=[dict(model=str(out / "reward" / "final"))]),
            data=dict(path=data["prompts"]),
            generation=dict(max_new_tokens=28),
            ppo=dict(batch_size=32, num_minibatches=2, ppo_epochs=2, kl=dict(coef=0.5),
                     critic=dict(vf_coef=0.5, lam=1.0), forward=dict(micro_batch_size=16)),
            optim=dict(lr=5e-4, critic_lr=3e-3, separate_grad_clip=True)),
        "eval": dict(
            output_dir=str(out / "eval"), threads=1, policy=str(out / "ppo" / "final"),
            reference=str(out / "sft" / "final"), metrics_path=str(out / "ppo" / "metrics.jsonl"),
            num_prompts=len(TITLES), samples_per_prompt=8,
            data=dict(path=data["prompts"], shuffle=False),
            generation=dict(max_new_tokens=28),
            reward=dict(sources=[dict(model=str(out / "reward" / "final")),
                                 dict(function="rlhf_ppo.tasks.quickstart:sentiment_reward",
                                      weight=0.0)])),
    }


CORPUS = dict(n_sft=3000, n_pairs=4000, seed=0, repetition_share=0.2, corruption_share=0.2)
"""The corpus :func:`run_quickstart` writes (arguments of :func:`write_corpus`)."""


def build_base(folder: str | Path) -> Path:
    """The random-init Llama of :data:`MODEL` (seed 0) and the word tokenizer over
    :func:`review_vocab`, saved into ``folder`` (replacing what it held)."""
    tok = build_word_tokenizer(review_vocab())
    shutil.rmtree(folder, ignore_errors=True)
    return build_tiny_model(folder, seed=0, tokenizer=tok, **MODEL)


def quickstart_stages(out: Path) -> list[Stage]:
    """The quickstart's stages under ``out``, in order: data, base, sft, reward, ppo, eval."""
    data = corpus_paths(out / "data")
    configs = stage_configs(out, data)

    def write_data(cfg: dict[str, Any]) -> dict[str, Any]:
        return write_corpus(out / "data", **cfg)

    def base(cfg: dict[str, Any]) -> dict[str, Any]:
        build_base(out / "base")
        return {"vocab_size": len(cfg["vocab"]), **cfg["model"]}

    return [
        Stage("data", dict(CORPUS), write_data),
        Stage("base", {"model": MODEL, "vocab": review_vocab()}, base),
        command_stage("sft", configs["sft"], SFTConfig, run_sft),
        command_stage("reward", configs["reward"], RewardTrainConfig, run_reward_training),
        command_stage("ppo", configs["ppo"], Config, lambda cfg: ppo_summary(PPOTrainer(cfg).train())),
        command_stage("eval", configs["eval"], EvalConfig, run_evaluate),
    ]


def run_quickstart(output_dir: str | Path = "runs/quickstart",
                   fresh: bool = False) -> dict[str, dict[str, Any]]:
    """Corpus, base model, SFT, reward model, PPO and evaluation under ``output_dir``; a stage
    finished by an earlier run with the same config is reused, unless ``fresh`` (which first
    deletes ``output_dir``). Prints the figures and returns every stage's summary by name."""
    out = Path(output_dir)
    return run_pipeline(out, quickstart_stages(out), fresh, "quickstart", summary_text)


def ppo_summary(history: list[dict]) -> dict:
    """First-5 and last-5 iteration means of the score, and the last-5 KL, of a PPO history."""
    head, tail = history[:5], history[-5:]
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)
    return {"iterations": len(history), "score_first5": mean(head, "score_mean"),
            "score_last5": mean(tail, "score_mean"), "kl_last5": mean(tail, "kl")}


def summary_text(out: Path, s: dict[str, dict], seconds: float) -> str:
    """The lines :func:`run_quickstart` prints at the end."""
    ev = s["eval"]
    pol, ref, diff = ev["policy"]["score"], ev["reference"]["score"], ev["score_diff"]
    truth = lambda side: ev[side]["sources"][1]["mean"]
    f = lambda x: f"{x:.3f}"
    held = lambda stage, key: s[stage][f"heldout_{key}"]
    lines = [
        f"quickstart done in {seconds:.0f} s ({out})",
        f"  sft:      held-out loss {f(held('sft', 'loss_before'))} -> {f(held('sft', 'loss_after'))}",
        f"  reward:   held-out pair accuracy {f(held('reward', 'accuracy_before'))} -> "
        f"{f(held('reward', 'accuracy'))}",
        f"  ppo:      score {f(s['ppo']['score_first5'])} (first 5 iterations) -> "
        f"{f(s['ppo']['score_last5'])} (last 5), kl {f(s['ppo']['kl_last5'])}",
        f"  evaluate: reward-model score policy {f(pol['mean'])} [{f(pol['ci_low'])}, {f(pol['ci_high'])}]"
        f" vs reference {f(ref['mean'])} [{f(ref['ci_low'])}, {f(ref['ci_high'])}]",
        f"            difference {f(diff['mean'])} [{f(diff['ci_low'])}, {f(diff['ci_high'])}], "
        f"win rate {f(ev['win_rate']['mean'])}, true sentiment {f(truth('reference'))} -> "
        f"{f(truth('policy'))}, kl {f(ev['kl']['mean'])}",
        f"  report:   {out / 'eval' / 'report.html'}",
    ]
    return "\n".join(lines)
