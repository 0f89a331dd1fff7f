"""Compatibility module: the built-in tiny assets moved to :mod:`rlhf_ppo.tasks.tiny`, and the
``builtin:`` / ``pypi:`` name resolution to :mod:`rlhf_ppo.assets`. The old names stay importable
here; no library module imports this one."""

from .assets import BUILTIN_PREFIX, cache_root, resolve_dataset, resolve_model
from .tasks.tiny import (
    CHAT_TEMPLATE,
    OTHER_WORDS,
    POSITIVE_WORDS,
    PUNCT,
    SPECIAL_TOKENS,
    STEMS,
    SUBJECTS,
    VOCAB_WORDS,
    build_char_tokenizer,
    build_tiny_model,
    build_word_tokenizer,
    tiny_llama_config,
    tiny_prompts,
)

__all__ = [
    "BUILTIN_PREFIX", "CHAT_TEMPLATE", "OTHER_WORDS", "POSITIVE_WORDS", "PUNCT", "SPECIAL_TOKENS",
    "STEMS", "SUBJECTS", "VOCAB_WORDS", "build_char_tokenizer", "build_tiny_model",
    "build_word_tokenizer", "cache_root", "resolve_dataset", "resolve_model", "tiny_llama_config",
    "tiny_prompts",
]
