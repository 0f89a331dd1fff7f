"""The built-in tiny assets: a word-level tokenizer, a tiny random-init Llama and a prompt
dataset, all made locally from configs, so the default run downloads nothing.

The library reaches them by name (``builtin:tiny``, ``builtin:tiny-reward``) through
:mod:`rlhf_ppo.assets`, which builds each once into a cache folder with the builders here
(``save_pretrained``) and then loads it back through the same code path as any local model, so
the default run exercises real loading. The quickstart and the reasoning task build their own
vocabularies and models with the same builders.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..assets import POSITIVE_WORDS

SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>"]
PUNCT = [".", ",", "!", "?", ":"]
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
    save_everywhere(model, folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_everywhere(model, folder: Path) -> None:
    """``model``'s config, generation config and weights (``model.safetensors``) in ``folder``,
    written by whichever process calls it. ``save_pretrained`` writes the weights on global rank 0
    only once ``torch.distributed`` is initialised, so a built-in asset built first by another
    rank (under torchrun / accelerate launch, or on a second machine) would be a folder without
    weights."""
    from safetensors.torch import save_file

    model.config.architectures = [type(model).__name__]  # as save_pretrained records them
    model.config.dtype = next(model.parameters()).dtype
    model.config.save_pretrained(folder)
    if model.can_generate():
        model.generation_config.save_pretrained(folder)
    # a tied tensor once, under its first name (the input embeddings, not lm_head), as
    # save_pretrained stores it: a score-head model loaded from this folder needs the embeddings
    weights, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            weights[name] = tensor.contiguous()
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})


def tiny_prompts(n: int = 256, seed: int = 0) -> list[dict]:
    """Short review openings such as "i think the movie is" (deterministic)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        rows.append({"prompt": rng.choice(STEMS).format(s=rng.choice(SUBJECTS))})
    return rows


def build_tiny_reward_model(folder: str | Path) -> Path:
    """``builtin:tiny-reward``: the tiny Llama with a one-label score head (seed 1)."""
    return build_tiny_model(folder, seed=1, task="reward")


def write_tiny_prompts(folder: str | Path) -> Path:
    """``builtin:tiny``'s dataset: :func:`tiny_prompts` as ``folder/prompts.jsonl``."""
    path = Path(folder) / "prompts.jsonl"
    with open(path, "w") as f:
        for row in tiny_prompts():
            f.write(json.dumps(row) + "\n")
    return path
