"""A second offline PPO learning task, unlike the quickstart's: weather forecasts that must match
the condition the prompt asks for.

Prompt: ``forecast for <city> on <day> , <condition> :``, the condition one of sunny, rainy,
snowy, windy and foggy. Response: 2-3 short sentences on temperature, sky, wind, what to expect
and what to do (``temperatures will be freezing . remember to wear thick boots .``), each one
written for one condition: the requested one (consistent) or another (inconsistent). Which
response is better depends on the prompt: the same text is right for a snowy prompt and wrong
for a sunny one, so the policy has to read the condition; there are no words that are good
everywhere.

* ``sft.jsonl``: 6,000 forecasts of every consistency mix (each sentence consistent with
  probability p ~ U(0, 1)), so the SFT model is far from the optimum;
* ``pairs.jsonl`` (prompt, chosen, rejected, kind): 9,000 pairs; 50% prefer the more consistent
  forecast (half ``minimal``: one sentence differs; half ``same_prompt``: two random mixes), 25%
  distinct sentences over the same forecast with a sentence repeated (``repetition``: ``A . A
  .``, ``A . B . A .``, ``A . A . A .``, ``A . B . B .``), 25% a forecast over the same one with
  two words dropped, repeated, swapped or replaced by a filler of another slot (``corruption``),
  so that the reward model does not pay for degenerate text. (With the quickstart's 60/20/20
  and 6,000 pairs, PPO policies repeated sentences, "the sky will be overcast . the sky will be
  overcast .", in 17% of their answers; with 50/25/25 and 9,000, 0-4%.)
* ``prompts.jsonl``: 30 prompts, 6 per condition.

:func:`consistency` is the hidden truth (the reward model never sees it); :func:`truth_reward`
reports it as a weight-0 reward source: ``{function: scripts/bench/forecast_task.py:truth_reward,
weight: 0}``; :func:`form_reward` (1 for an answer of distinct corpus sentences, else 0) the
same way, to catch broken or repetitive text. :func:`build` writes the corpus, builds the base
model (the quickstart's size), runs SFT and trains the reward model (two stages), and returns
the PPO config and evaluation settings; :func:`stage_configs` says what differs from the
quickstart and why.

    python scripts/bench/forecast_task.py runs/forecast          # ~80 s on 2 CPU cores; again: ~2 s
    python scripts/bench/forecast_task.py runs/forecast --fresh  # rebuild every stage
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path

# --------------------------------------------------------------------------- the corpus

CONDITIONS = ["sunny", "rainy", "snowy", "windy", "foggy"]
CITIES = ["paris", "oslo", "lima", "cairo", "tokyo", "madrid", "dublin", "quito", "nairobi",
          "berlin", "sydney", "denver", "lisbon", "vienna", "seoul", "boston", "havana", "perth",
          "geneva", "austin"]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
PROMPT = "forecast for {city} on {day} , {condition} :"
TIMES = ["morning", "afternoon", "evening", "night"]

# Per condition, the fillers of each slot. Words used by one condition only are its keywords
# (see KEYWORDS); a word shared by two conditions ("wear", "on") is neutral.
LEXICON: dict[str, dict[str, list[str]]] = {
    "sunny": dict(temp=["warm", "hot", "balmy"], sky=["clear", "bright", "cloudless"],
                  wind=["light", "soft"], feature=["sunshine", "blue skies"],
                  advice=["wear sunscreen", "bring sunglasses", "enjoy the sun"]),
    "rainy": dict(temp=["cool", "damp"], sky=["grey", "overcast"], wind=["moderate", "wet"],
                  feature=["showers", "heavy rain", "drizzle"],
                  advice=["take an umbrella", "wear a raincoat"]),
    "snowy": dict(temp=["freezing", "icy"], sky=["white", "pale"], wind=["bitter", "biting"],
                  feature=["snow", "flurries", "deep drifts"],
                  advice=["wear thick boots", "drive slowly on ice"]),
    "windy": dict(temp=["chilly", "brisk"], sky=["restless", "streaky"],
                  wind=["strong", "fierce", "gusty"], feature=["gales", "strong gusts"],
                  advice=["hold on to your hat", "secure loose objects"]),
    "foggy": dict(temp=["mild", "clammy"], sky=["hazy", "murky", "dim"], wind=["still", "calm"],
                  feature=["thick fog", "mist", "low visibility"],
                  advice=["drive with your lights on", "allow extra travel time"]),
}
TEMPLATES = ["temperatures will be {temp} .", "it will feel {temp} in the {time} .",
             "the sky will be {sky} .", "skies will stay {sky} all day .", "winds will be {wind} .",
             "expect {feature} in the {time} .", "there will be {feature} .", "{advice} .",
             "remember to {advice} ."]


def _words(text: str) -> list[str]:
    return text.replace("{", " {").replace("}", "} ").split()


NEUTRAL = {w for t in TEMPLATES + TIMES for w in _words(t) if not w.startswith("{")} | {
    "a", "an", "the", "to", "on", "with", "your"}


def _keywords() -> dict[str, frozenset[str]]:
    own = {c: {w for fillers in LEXICON[c].values() for f in fillers for w in f.split()} | {c}
           for c in CONDITIONS}
    return {c: frozenset(w for w in own[c] - NEUTRAL
                         if not any(w in own[o] for o in CONDITIONS if o != c))
            for c in CONDITIONS}


KEYWORDS = _keywords()
"""condition -> the words that only it uses (its name included): what :func:`consistency` counts."""
CONDITION_OF = {w: c for c, ws in KEYWORDS.items() for w in ws}


def forecast_vocab() -> list[str]:
    """Every word the corpus can use, after the special tokens."""
    from rlhf_ppo import builtin

    words: list[str] = []
    texts = CITIES + DAYS + CONDITIONS + TIMES + TEMPLATES + [PROMPT]
    texts += [f for lex in LEXICON.values() for fillers in lex.values() for f in fillers]
    for text in texts:
        for w in _words(text):
            if not w.startswith("{") and w not in words:
                words.append(w)
    return builtin.SPECIAL_TOKENS + words


def prompt_condition(prompt: str) -> str | None:
    """The condition a prompt asks for: the last condition word in it (None without one)."""
    found = [w for w in prompt.lower().replace(":", " ").replace(",", " ").split()
             if w in CONDITIONS]
    return found[-1] if found else None


def sentence(rng: random.Random, condition: str, template: str | None = None,
             when: str | None = None) -> str:
    """One sentence written for ``condition`` (on ``template``, at time of day ``when``, when
    given)."""
    lex = LEXICON[condition]
    template = template if template is not None else rng.choice(TEMPLATES)
    when = when if when is not None else rng.choice(TIMES)
    return template.format(time=when, **{k: rng.choice(v) for k, v in lex.items()})


def forecast(rng: random.Random, condition: str, share: float) -> list[str]:
    """2-3 sentences, each for ``condition`` with probability ``share``, else for another
    condition drawn at random."""
    return [s for s, _ in _forecast(rng, condition, share)]


def _forecast(rng: random.Random, condition: str, share: float
              ) -> list[tuple[str, tuple[str, str, str]]]:
    others = [c for c in CONDITIONS if c != condition]
    rows = []
    for _ in range(rng.choice([2, 3])):
        c = condition if rng.random() < share else rng.choice(others)
        template, when = rng.choice(TEMPLATES), rng.choice(TIMES)
        rows.append((sentence(rng, c, template, when), (c, template, when)))
    return rows


def minimal_pair(rng: random.Random, condition: str) -> tuple[str, str]:
    """(chosen, rejected) that differ in one sentence only, written on the same template for the
    requested condition in one and for another condition in the other."""
    rows = _forecast(rng, condition, rng.random())
    i = rng.randrange(len(rows))
    _, (c, template, when) = rows[i]
    other = rng.choice([x for x in CONDITIONS if x not in (condition, c)])
    good = [s for s, _ in rows]
    bad = list(good)
    good[i] = sentence(rng, condition, template, when) if c != condition else good[i]
    bad[i] = sentence(rng, other, template, when)
    return " ".join(good), " ".join(bad)


def consistency(prompt: str, response: str) -> float:
    """How well ``response`` matches the condition ``prompt`` asks for, in [-1, 1]: the mean over
    the response's sentences (split at "."; a trailing fragment counts) of (m - o) / (m + o), m
    and o the sentence's keywords of the requested and of other conditions, 0 for a sentence
    without keywords. A clean response with c consistent of n sentences scores (2c - n) / n. 0
    for an empty response or a prompt without a condition."""
    wanted = prompt_condition(prompt)
    parts = [words for words in (s.split() for s in response.lower().split(".")) if words]
    if wanted is None or not parts:
        return 0.0
    total = 0.0
    for words in parts:
        tags = [CONDITION_OF[w] for w in words if w in CONDITION_OF]
        m = sum(t == wanted for t in tags)
        total += (2 * m - len(tags)) / len(tags) if tags else 0.0
    return total / len(parts)


def truth_reward(prompts: list[str], responses: list[str], **kwargs) -> list[float]:
    """:func:`consistency` of each response to its prompt: the hidden truth, reported beside the
    learned reward model's score (weight 0)."""
    return [consistency(p, r) for p, r in zip(prompts, responses)]


def repetition_pair(rng: random.Random, condition: str) -> tuple[str, str]:
    """(chosen, rejected) of equal consistency (every sentence for the requested condition half
    the time, else each for another one): 2-3 distinct sentences beat, in turn, the same forecast
    with one sentence replaced by a copy of another (``A . A .``, ``A . B . A .``), every
    sentence replaced by the first (``A . A . A .``) or a copy of one appended (``A . B . B .``)."""
    consistent, n = rng.random() < 0.5, rng.choice([2, 3])
    others = [c for c in CONDITIONS if c != condition]
    sentences: list[str] = []
    while len(sentences) < n:
        x = sentence(rng, condition if consistent else rng.choice(others))
        if x not in sentences:
            sentences.append(x)
    how = rng.choice(["replace", "first", "append"])
    if how == "first":
        repeated = [sentences[0]] * n
    elif how == "append":
        repeated = sentences + [rng.choice(sentences)]
    else:
        i, j = rng.sample(range(n), 2)
        repeated = list(sentences)
        repeated[i] = sentences[j]
    return " ".join(sentences), " ".join(repeated)


FILLER_WORDS = sorted({w for lex in LEXICON.values() for fillers in lex.values()
                       for f in fillers for w in f.split()})
"""Every word of every filler (the words a corrupted forecast may put in the wrong place)."""


def corrupt(rng: random.Random, text: str, condition: str | None = None, edits: int = 2) -> str:
    """``text`` with ``edits`` edits, each a word dropped, repeated, swapped with the next one
    (the quickstart's three) or replaced by a filler word of another slot (``the sky will be
    boots .``, ``there will be warm .``): half the time one of ``condition``'s, when given, so
    that a keyword of the requested condition in the wrong place is no better than broken text."""
    words = text.split()
    own = sorted({w for fillers in LEXICON[condition].values() for f in fillers
                  for w in f.split()}) if condition else FILLER_WORDS
    for _ in range(edits):
        i = rng.randrange(len(words) - 1)
        edit = rng.choice(["drop", "repeat", "swap", "replace"])
        if edit == "drop":
            del words[i]
        elif edit == "repeat":
            words.insert(i, words[i])
        elif edit == "swap":
            words[i], words[i + 1] = words[i + 1], words[i]
        else:
            words[i] = rng.choice(own if rng.random() < 0.5 else FILLER_WORDS)
    return " ".join(words)


def _sentence_set() -> frozenset[str]:
    slots = ("temp", "sky", "wind", "feature", "advice")
    found = set()
    for template in TEMPLATES:
        slot = next(k for k in slots if "{" + k + "}" in template)
        for lex in LEXICON.values():
            for filler in lex[slot]:
                for when in TIMES:
                    found.add(" ".join(template.format(time=when, **{slot: filler}).split()[:-1]))
    return frozenset(found)


SENTENCES = _sentence_set()
"""Every sentence the corpus can write (without its final " .")."""


def _sentences(text: str) -> list[str] | None:
    """The sentences of ``text`` (spacing normalised, without "."), or None when it does not end
    with "."."""
    parts = [" ".join(s.split()) for s in text.lower().split(".")]
    return None if parts[-1] else parts[:-1]


def is_forecast(text: str) -> bool:
    """Whether ``text`` is one or more sentences that the corpus can write, each ending with "."
    (spacing aside; repeated sentences allowed)."""
    body = _sentences(text)
    return bool(body) and all(s in SENTENCES for s in body)


def well_formed(response: str) -> float:
    """1.0 when ``response`` is a forecast (:func:`is_forecast`) without a repeated sentence, else
    0.0: a check for broken or repetitive text, which the reward model should not pay for
    (reported beside the score, like :func:`consistency`)."""
    body = _sentences(response)
    return float(is_forecast(response) and len(set(body)) == len(body))


def form_reward(prompts: list[str], responses: list[str], **kwargs) -> list[float]:
    """:func:`well_formed` of each response (a weight-0 evaluation source)."""
    return [well_formed(r) for r in responses]


def _write_if_changed(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, and not at all when it already holds it (so a
    rebuild, or two builds of one folder at once, never see a half-written file)."""
    if path.is_file() and path.read_text() == text:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


CONSISTENCY_KINDS = ("minimal", "same_prompt", "cross_prompt")
"""The pair kinds whose chosen side is the more consistent forecast."""


def write_corpus(folder: Path, n_sft: int = 6000, n_pairs: int = 9000, seed: int = 0,
                 repetition_share: float = 0.25, corruption_share: float = 0.25,
                 cross_share: float = 0.0, minimal_share: float = 0.5,
                 prompts_per_condition: int = 6,
                 warmup_kinds: tuple[str, ...] = ("minimal",)) -> dict[str, str]:
    """Write into ``folder`` (deterministic in ``seed``) and return the paths of:

    * ``sft.jsonl`` (prompt, response): ``n_sft`` forecasts, each sentence consistent with
      probability p ~ U(0, 1), so every consistency mix;
    * ``pairs.jsonl`` (prompt, chosen, rejected, kind): ``n_pairs`` pairs, ``repetition``
      (``repetition_share``), ``corruption`` (``corruption_share``) and, for the rest, the more
      consistent forecast (by :func:`consistency`) chosen: ``minimal`` (``minimal_share`` of
      them: one sentence differs, on the same template) or ``same_prompt`` (two forecasts of
      random mixes for one prompt); with ``cross_share`` > 0, that share of them is
      ``cross_prompt``: two forecasts for different prompts, each prompt inside its side's text
      and the prompt column empty, which ties the reward model's score levels of the conditions
      together (off by default: the separate critic handles the levels, see
      :func:`stage_configs`, and these pairs cost consistency accuracy);
    * ``warmup_pairs.jsonl``: the pairs of ``warmup_kinds`` alone (the reward model's warmup);
    * ``prompts.jsonl``: ``prompts_per_condition`` prompts per condition, distinct (city, day)
      pairs, the conditions in turn.
    """
    rng = random.Random(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {k: folder / f"{k}.jsonl" for k in ("sft", "pairs", "warmup_pairs", "prompts")}

    def prompt() -> tuple[str, str]:
        c = rng.choice(CONDITIONS)
        return PROMPT.format(city=rng.choice(CITIES), day=rng.choice(DAYS), condition=c), c

    rows: dict[str, list[dict]] = {k: [] for k in paths}
    for _ in range(n_sft):  # every consistency mix, so the SFT model writes all kinds
        p, c = prompt()
        rows["sft"].append({"prompt": p, "response": " ".join(forecast(rng, c, rng.random()))})
    while len(rows["pairs"]) < n_pairs:
        p, c = prompt()
        u = rng.random()
        if u < repetition_share:
            kind = "repetition"
            chosen, rejected = repetition_pair(rng, c)
        elif u < repetition_share + corruption_share:
            kind = "corruption"
            chosen = " ".join(forecast(rng, c, rng.random()))
            rejected = corrupt(rng, chosen, c)
            if not well_formed(chosen) or is_forecast(rejected):  # e.g. "warm" -> "hot"
                continue
        elif rng.random() < cross_share:
            kind = "cross_prompt"
            q, d = prompt()
            a, b = (" ".join(forecast(rng, x, rng.random())) for x in (c, d))
            sa, sb = consistency(p, a), consistency(q, b)
            if sa == sb:
                continue
            a, b = f"{p} {a}", f"{q} {b}"
            chosen, rejected = (a, b) if sa > sb else (b, a)
            p = ""
        elif rng.random() < minimal_share:
            kind = "minimal"
            chosen, rejected = minimal_pair(rng, c)
        else:
            kind = "same_prompt"
            a, b = (" ".join(forecast(rng, c, rng.random())) for _ in range(2))
            sa, sb = consistency(p, a), consistency(p, b)
            if sa == sb:
                continue
            chosen, rejected = (a, b) if sa > sb else (b, a)
        if chosen == rejected:
            continue
        row = {"prompt": p, "chosen": chosen, "rejected": rejected, "kind": kind}
        rows["pairs"].append(row)
        if kind in warmup_kinds:
            rows["warmup_pairs"].append(row)
    # Prompts: each condition equally often, distinct (city, day) pairs, in a fixed mixed order.
    cells = rng.sample([(city, day) for city in CITIES for day in DAYS],
                       prompts_per_condition * len(CONDITIONS))
    rows["prompts"] = [{"prompt": PROMPT.format(city=city, day=day,
                                                condition=CONDITIONS[i % len(CONDITIONS)])}
                       for i, (city, day) in enumerate(cells)]
    for k, path in paths.items():
        _write_if_changed(path, "".join(json.dumps(r) + "\n" for r in rows[k]))
    return {k: str(v) for k, v in paths.items()}


# --------------------------------------------------------------------------- the pipeline

MODEL = dict(hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
"""The quickstart's small Llama (~0.2M parameters with this vocabulary)."""
MAX_NEW_TOKENS = 32
"""A 3-sentence forecast is at most 25 tokens (the longest sentence, 8), plus EOS."""


def stage_configs(out: Path, data: dict[str, str]) -> dict[str, dict]:
    """SFT, reward-model (two stages) and PPO configs (as dicts); PPO's has no ``output_dir``.
    What differs from the quickstart (``rlhf_ppo.tasks.quickstart.stage_configs``), and why:

    * ``sft``: 3 epochs of 6,000 forecasts (~560 steps; quickstart: 2 of 3,000, 180 steps). After
      180 steps the SFT model barely read the condition (log p(response | its condition) -
      log p(response | another one): 0.09 nats; after 540 steps: 1.9-2.5), and reward models
      started from it stayed at chance on the consistency pairs.
    * ``reward_warmup`` (the ``minimal`` consistency pairs alone, 3 epochs; repeated from its
      last model, up to ``WARMUP_ROUNDS`` rounds, while its held-out accuracy is below
      ``WARMUP_TARGET``), then ``reward`` (every pair, 2 epochs, from the warmed-up model).
      Whether a keyword is good depends on the prompt only, so each keyword's average gradient
      is zero and the model has to find the keyword-condition interaction from noise. Trained on
      the whole mix from the start, the reward model learnt the repetition pairs and stayed at
      chance on the consistency pairs (0.47-0.58 in 7 of 8 runs of 3-8 epochs); on all the
      consistency pairs it sat at chance for a random 100-300 steps first; on the minimal pairs
      (one sentence differs, on the same template) it reads the condition within ~50 steps
      (held-out 0.995-1.0 after 3 epochs, every run since) and keeps it while learning the rest.
    * ``ppo``: the quickstart's settings (a separate critic initialised from the reward model,
      ``model.critic: separate, critic_init: reward``, toward Monte-Carlo returns,
      ``ppo.critic.lam: 1.0``, ``optim.separate_grad_clip: true``), with 32 new tokens.
      Bradley-Terry pairs leave each prompt's
      score level free, and the reward model's levels differ by condition (mean score of the
      SFT corpus's forecasts: windy -4.1, foggy +2.7). The quickstart's zero-initialised shared
      value head explains little of the return (explained variance ~0.0-0.3 over the 40
      iterations), so early on whole conditions get negative advantages: with earlier versions
      of this reward model, 3 of 4 runs collapsed those conditions into "feel feel feel ..." or
      empty answers (KL 20-95). With the final reward models (seeds 0 and 1) the shared head
      stayed stable, but learnt less (training score +5.0/+6.1 against +7.1/+8.3 with the
      separate critic, whose explained variance reaches 0.5-0.9).
    """
    from rlhf_ppo.quickstart import stage_configs as quickstart_stages

    # The quickstart's stages (its paths are this task's: OUT/sft/final, OUT/reward/final) with
    # the changes above, so the PPO settings stay the quickstart's whatever it ships.
    q = quickstart_stages(out, {"sft": data["sft"], "pairs": data["warmup_pairs"],
                                "prompts": data["prompts"]})
    q["sft"]["train"]["epochs"] = 3
    warmup = dict(q["reward"], output_dir=str(out / "reward_warmup"))
    reward = copy.deepcopy(warmup)
    reward.update(output_dir=str(out / "reward"),
                  model=dict(name_or_path=str(out / "reward_warmup" / "final")))
    reward["data"]["path"] = data["pairs"]
    reward["train"]["epochs"] = 2
    ppo = {k: v for k, v in q["ppo"].items() if k not in ("output_dir", "overwrite")}
    ppo["generation"]["max_new_tokens"] = MAX_NEW_TOKENS
    return {"sft": q["sft"], "reward_warmup": warmup, "reward": reward, "ppo": ppo}


WARMUP_TARGET = 0.95
"""The warmup stage repeats (from its last model) until its held-out accuracy reaches this..."""
WARMUP_ROUNDS = 4
"""... or it has run this many rounds."""


def _done(folder: Path, key: dict) -> dict | None:
    """The summary in ``folder/.complete`` when it was written for the same ``key``."""
    marker = folder / ".complete"
    if not marker.is_file():
        return None
    done = json.loads(marker.read_text())
    return done if done.get("key") == key else None


def _finish(folder: Path, key: dict, summary: dict) -> dict:
    from rlhf_ppo.checkpoint import json_safe

    summary = dict(summary, key=key)
    (folder / ".complete").write_text(json.dumps(json_safe(summary), indent=1) + "\n")
    return summary


def build(folder: Path, seed: int = 0, fresh: bool = False, **corpus) -> dict:
    """Corpus, base model, SFT and reward model under ``folder``; ``corpus``: keyword arguments
    of :func:`write_corpus`. A stage whose ``STAGE/.complete`` was written for the same seed,
    corpus arguments, config and data file (its SHA-256) is reused unless ``fresh`` or a stage
    before it was redone.

    Returns ``policy`` (the SFT model folder), ``reward`` (the reward model folder), ``prompts``
    (``prompts.jsonl``), ``ppo`` (the PPO config as a nested dict, without ``output_dir``),
    ``eval`` (``num_prompts``, ``samples_per_prompt``, ``max_new_tokens``) and ``stages`` (each
    stage's summary, with ``seconds`` for the stages run now; ``warmup``: the last warmup
    round's, with its ``stage`` name)."""
    import torch
    import yaml

    from rlhf_ppo import builtin
    from rlhf_ppo.config import config_from_dict
    from rlhf_ppo.reward_training import RewardTrainConfig, run_reward_training
    from rlhf_ppo.sft import SFTConfig, run_sft

    torch.set_num_threads(1)  # tiny models: one thread is fastest
    out = Path(folder)
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    data = write_corpus(out / "data", seed=seed, **corpus)
    configs = stage_configs(out, data)
    configs["base"] = dict(MODEL, vocab=forecast_vocab())
    stages: dict[str, dict] = {}
    redone = False

    def stage(name: str, cls=None, run=None) -> dict:
        nonlocal redone
        data_file = configs[name].get("data", {}).get("path")
        key = {"seed": seed, "corpus": corpus, "config": configs[name],
               "data_sha256": data_file and hashlib.sha256(Path(data_file).read_bytes()).hexdigest()}
        previous = None if redone else _done(out / name, key)
        if previous is not None:
            stages[name] = previous
            return previous
        redone = True
        t0 = time.perf_counter()
        if name == "base":
            tok = builtin.build_word_tokenizer(forecast_vocab())
            shutil.rmtree(out / "base", ignore_errors=True)
            builtin.build_tiny_model(out / "base", seed=seed, tokenizer=tok, **MODEL)
            summary = {"vocab_size": len(tok), **MODEL}
        else:
            cfg = dict(configs[name], seed=seed)
            summary = dict(run(config_from_dict(cfg, cls)))
            (out / name / "stage.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        summary["seconds"] = round(time.perf_counter() - t0, 1)
        stages[name] = _finish(out / name, key, summary)
        return stages[name]

    stage("base")
    stage("sft", SFTConfig, run_sft)
    # A safety net: on all the consistency pairs the warmup sat at chance for a random number of
    # steps; on the minimal pairs one round has sufficed so far.
    warmup = "reward_warmup"
    for i in range(2, WARMUP_ROUNDS + 2):
        if stage(warmup, RewardTrainConfig, run_reward_training)["eval_accuracy"] >= WARMUP_TARGET \
                or i > WARMUP_ROUNDS:
            break
        previous, warmup = warmup, f"reward_warmup_{i}"
        configs[warmup] = dict(configs["reward_warmup"], output_dir=str(out / warmup),
                               model=dict(name_or_path=str(out / previous / "final")))
    configs["reward"]["model"] = dict(name_or_path=str(out / warmup / "final"))
    stages["warmup"] = dict(stages[warmup], stage=warmup)
    stage("reward", RewardTrainConfig, run_reward_training)
    n_prompts = sum(1 for _ in open(data["prompts"]))
    return {"policy": str(out / "sft" / "final"), "reward": str(out / "reward" / "final"),
            "prompts": data["prompts"], "ppo": configs["ppo"],
            "eval": {"num_prompts": n_prompts, "samples_per_prompt": 32,
                     "max_new_tokens": MAX_NEW_TOKENS},
            "stages": stages}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh", action="store_true", help="rebuild every stage")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    task = build(args.output_dir, args.seed, args.fresh)
    seconds = time.perf_counter() - t0
    s = task["stages"]
    f = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    print(f"forecast task built in {seconds:.0f} s ({args.output_dir})\n"
          f"  sft:    held-out loss {f(s['sft']['eval_loss_before'])} -> "
          f"{f(s['sft']['eval_loss_after'])}\n"
          f"  reward: held-out pair accuracy {f(s['reward']['eval_accuracy_before'])} -> "
          f"{f(s['reward']['eval_accuracy'])} (the warmup stage, {s['warmup']['stage']}, on the "
          f"minimal pairs: {f(s['warmup']['eval_accuracy'])})\n"
          f"  policy  {task['policy']}\n  reward  {task['reward']}\n  prompts {task['prompts']}",
          flush=True)


if __name__ == "__main__":
    main()
