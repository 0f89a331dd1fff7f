"""Compatibility module: the quickstart moved to :mod:`rlhf_ppo.tasks.quickstart`. Its names stay
importable here, so saved run configs that name ``rlhf_ppo.quickstart:sentiment_reward`` still
load."""

from .tasks.quickstart import (
    CORPUS,
    INTENS,
    MODEL,
    NEG_TEMPLATES,
    NEGATIVE,
    POS_TEMPLATES,
    POSITIVE,
    PROMPT,
    SUBJECTS,
    TITLES,
    build_base,
    corpus_paths,
    corruption_pair,
    ppo_summary,
    quickstart_stages,
    repetition_pair,
    review,
    review_sentence,
    review_vocab,
    run_quickstart,
    sentiment,
    sentiment_reward,
    stage_configs,
    write_corpus,
)

__all__ = [
    "CORPUS", "INTENS", "MODEL", "NEG_TEMPLATES", "NEGATIVE", "POS_TEMPLATES", "POSITIVE", "PROMPT",
    "SUBJECTS", "TITLES", "build_base", "corpus_paths", "corruption_pair", "ppo_summary",
    "quickstart_stages", "repetition_pair", "review", "review_sentence", "review_vocab",
    "run_quickstart", "sentiment", "sentiment_reward", "stage_configs", "write_corpus",
]
