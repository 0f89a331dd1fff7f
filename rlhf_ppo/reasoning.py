"""Compatibility module: the built-in reasoning task moved to :mod:`rlhf_ppo.tasks.reasoning`. Its
names stay importable here (saved configs and evaluate's older default name
``rlhf_ppo.reasoning:correct``), and ``python -m rlhf_ppo.reasoning`` still runs the task."""

from .tasks.reasoning import (
    MAX_NEW_TOKENS,
    MAX_NUMBER,
    MAX_OPERAND,
    MODEL,
    PROMPT,
    STEP,
    TASK,
    WORDS,
    all_problems,
    apply,
    apply_overrides,
    build_base,
    build_tokenizer,
    chain,
    correct,
    extract_answer,
    is_correct,
    main,
    parse_prompt,
    pass_at_k,
    prompt_text,
    reasoning_stages,
    reasoning_vocab,
    run_reasoning,
    solve,
    stage_configs,
    summary_text,
    task_paths,
    write_task,
)

__all__ = [
    "MAX_NEW_TOKENS", "MAX_NUMBER", "MAX_OPERAND", "MODEL", "PROMPT", "STEP", "TASK", "WORDS",
    "all_problems", "apply", "apply_overrides", "build_base", "build_tokenizer", "chain", "correct",
    "extract_answer", "is_correct", "main", "parse_prompt", "pass_at_k", "prompt_text",
    "reasoning_stages", "reasoning_vocab", "run_reasoning", "solve", "stage_configs",
    "summary_text", "task_paths", "write_task",
]

if __name__ == "__main__":
    raise SystemExit(main())
