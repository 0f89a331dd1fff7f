"""Verifiable rewards: reward functions for responses whose final answer can be checked against a
reference column of the dataset (math word problems such as GSM8K, short-answer QA).

Use them as ``reward.sources: [{function: "rlhf_ppo.verifiable:math_answer"}]``. They are
rlhf_ppo-style functions ``fn(prompts, responses, **kwargs) -> list[float]``; the reference
answers arrive as the dataset column named by ``answer_column`` (default ``answer``).

- :func:`math_answer`: ``correct`` (1.0) when the response's final answer
  (:func:`extract_answer`) equals the reference (:func:`answers_match`), else ``wrong`` (0.0);
- :func:`exact_match`: normalised string equality of the whole response (or, with
  ``extract=True``, of its final answer) with the reference;
- :func:`format_reward`: ``correct`` when the response has the expected answer format (default:
  exactly one final-answer marker, ``\\boxed{...}`` or ``#### <number>``), or matches ``pattern``.

The final answer of a response (:func:`extract_answer`), first rule that applies:

1. the content of the last complete ``\\boxed{...}`` (braces balanced, nested braces kept);
2. else the first number on the line after the last ``####`` (GSM8K's answer marker; that
   line's text when it holds no number);
3. else the last number in the text: integers, decimals, negatives, thousands separators
   (``1,234``), fractions (``3/4``), an optional ``$`` before and ``%`` after; a sentence's
   trailing period is not part of it.

So "I first thought 42 but the answer is \\boxed{41}" answers 41, not 42.

Comparison (:func:`answers_match`): both sides through :func:`parse_number`; when both are numbers
they match within a relative tolerance of 1e-6 (absolute 1e-9), else their normalised strings
(:func:`normalize_text`: stripped, lower case, no spaces, no trailing period) must be equal. The
reference may be any type the dataset loader gave the column (int, float, str); a string holding
``####`` (a GSM8K answer with its worked solution) is compared by its part after the last ``####``.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

REL_TOL = 1e-6
"""relative tolerance of the numeric comparison"""
ABS_TOL = 1e-9
"""absolute tolerance of the numeric comparison"""

# --------------------------------------------------------------------------- extraction

_BOXED = re.compile(r"\\boxed\s*\{")
_HASHES = "####"
_MINUS = "-\u2212"  # ASCII hyphen-minus and the Unicode minus sign
# An unsigned number: 1,234,567 (thousands separators, only in groups of three), 1234, 12.5, .5
_UNSIGNED = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+"
_NUMBER = re.compile(
    r"(?<![\w./])"                      # not inside a word, after a decimal point or a slash
    rf"(?:[{_MINUS}]\s?)?"              # -5, - 5
    r"(?:\\?\$\s?)?"                    # $5, \$5
    rf"(?:[{_MINUS}])?"                 # $-5
    rf"(?:{_UNSIGNED})"
    rf"(?:\s?/\s?(?:{_UNSIGNED}))?"     # 3/4
    r"(?:\s?\\?%)?"                     # 50%, 50\%
)


def _boxed_contents(text: str) -> list[str]:
    """The contents of the complete ``\\boxed{...}`` groups of ``text``, in order of their start.
    Braces nest; escaped braces (``\\{``, ``\\}``) do not count. An unclosed group is left out."""
    found = []
    for m in _BOXED.finditer(text):
        depth, i = 1, m.end()
        while i < len(text):
            c = text[i]
            if c == "\\":
                i += 2  # an escaped character (\{, \}, \\) never opens or closes a group
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    found.append(text[m.end():i].strip())
                    break
            i += 1
    return found


def _numbers(text: str) -> list[str]:
    return [m.group(0).strip() for m in _NUMBER.finditer(text)]


def extract_answer(text: str) -> str | None:
    """The final answer of a response, as it is written (e.g. ``"$1,234"``, ``"3/4"``,
    ``"\\frac{1}{2}"``), or None when the text has none. First rule that applies:

    1. the content of the last complete ``\\boxed{...}`` (balanced braces, nested ones kept;
       stripped; may be empty);
    2. else the first number on the line after the last ``####`` (the next non-empty line when
       ``####`` ends its line); when that line holds no number, the line itself (stripped);
    3. else the last number in the text (integers, decimals, negatives, thousands separators
       ``1,234``, fractions ``3/4``, optional ``$`` before and ``%`` after; not a trailing
       period).
    """
    if not isinstance(text, str):
        return None
    boxed = _boxed_contents(text)
    if boxed:
        return boxed[-1]
    if _HASHES in text:
        line = text.rsplit(_HASHES, 1)[1].strip().split("\n", 1)[0].strip()
        nums = _numbers(line)
        if nums:
            return nums[0]
        if line:
            return line
    nums = _numbers(text)
    return nums[-1] if nums else None


# --------------------------------------------------------------------------- parsing

_PLAIN = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?", re.I)
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_FRAC = re.compile(r"([+-]?)\\[dt]?frac\s*(?:\{([^{}]+)\}|(\d))\s*(?:\{([^{}]+)\}|(\d))")


def _plain_number(s: str) -> float | None:
    """A decimal number (sign, thousands separators, exponent allowed), whole string."""
    s = s.strip()
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if not _PLAIN.fullmatch(s):
        return None
    v = float(s)
    return v if math.isfinite(v) else None


def reference_answer(value: Any) -> Any:
    """The answer part of a reference: for a string holding ``####`` (a GSM8K answer with its
    worked solution), the text after the last ``####``, stripped; anything else as is."""
    if isinstance(value, str) and _HASHES in value:
        return value.rsplit(_HASHES, 1)[1].strip()
    return value


def parse_number(value: Any) -> float | None:
    """``value`` as a float, or None when it is not a number.

    Numbers (int, float, numpy scalars) are taken as they are (None for NaN / inf and for
    bools). A string is, after :func:`reference_answer` (the part after the last ``####``),
    stripped of surrounding spaces, a trailing period, ``$`` / ``\\$``, ``%`` / ``\\%``, LaTeX
    thin spaces (``\\,``, ``\\!``) and ``{,}`` separators, and a leading ``x =`` (the part after
    the last ``=``), then read as one of: a decimal number (``-12.5``, ``1,234``, ``1e3``), a
    fraction ``a/b``, or a simple LaTeX fraction ``\\frac{a}{b}`` (also ``\\dfrac``, ``\\tfrac``,
    ``\\frac34``, a sign before it). Anything else (words, units, expressions) is None.
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, numbers.Number) and not isinstance(value, str):
        try:
            v = float(value)
        except (TypeError, ValueError, OverflowError):  # complex, a huge int
            return None
        return v if math.isfinite(v) else None
    if not isinstance(value, str):
        return None
    s = str(reference_answer(value)).strip()
    if "=" in s:
        s = s.rsplit("=", 1)[1]
    s = (s.replace("\u2212", "-").replace("\\$", "").replace("$", "").replace("\\%", "")
         .replace("%", "").replace("{,}", ",").replace("\\,", "").replace("\\!", "")
         .replace("\\left", "").replace("\\right", ""))
    s = s.strip().rstrip(".").strip()
    if s.startswith("(") and s.endswith(")"):
        s = s[1:-1].strip()
    if not s:
        return None
    v = _plain_number(s)
    if v is not None:
        return v
    m = _FRAC.fullmatch(s)
    if m:
        sign, num, den = m.group(1), m.group(2) or m.group(3), m.group(4) or m.group(5)
        return _ratio(_plain_number(num), _plain_number(den), negative=sign == "-")
    if s.count("/") == 1:
        num, den = s.split("/")
        negative = num.strip().startswith("-")
        return _ratio(_plain_number(num.strip().lstrip("+-")), _plain_number(den),
                      negative=negative)
    return None


def _ratio(num: float | None, den: float | None, negative: bool = False) -> float | None:
    if num is None or den is None or den == 0:
        return None
    v = num / den
    return -v if negative else v


# --------------------------------------------------------------------------- comparison

def normalize_text(value: Any) -> str:
    """The string compared by :func:`exact_match` and by :func:`answers_match` when a side is not
    a number: stripped, lower case, without spaces and without a trailing period. A whole float
    (``42.0``) is written as an integer (``"42"``)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    s = re.sub(r"\s+", "", str(value).strip().lower())
    return s[:-1] if s.endswith(".") else s


def answers_match(predicted: Any, reference: Any) -> bool:
    """Whether an extracted answer equals a reference.

    Numerically (:func:`parse_number` on both; ``math.isclose`` with ``rel_tol=1e-6``,
    ``abs_tol=1e-9``) when both are numbers, else by :func:`normalize_text`. A reference string
    holding ``####`` counts by its part after the last ``####``. None (no answer, or a missing
    reference) never matches.
    """
    if predicted is None or reference is None:
        return False
    reference = reference_answer(reference)
    p, r = parse_number(predicted), parse_number(reference)
    if p is not None and r is not None:
        return math.isclose(p, r, rel_tol=REL_TOL, abs_tol=ABS_TOL)
    return normalize_text(predicted) == normalize_text(reference)


# --------------------------------------------------------------------------- reward functions

def _references(fn: str, responses: Sequence[str], answer: Any, answer_column: str,
                kwargs: dict) -> list:
    """The reference column ``answer_column`` (which arrives as ``answer`` when it is named so),
    one value per response; a ValueError naming the column and the columns that did arrive when
    it is missing."""
    arrived = dict(kwargs)
    if answer is not None:
        arrived["answer"] = answer
    if answer_column not in arrived:
        columns = sorted(k for k in arrived if k != "stopped")
        raise ValueError(f"{fn}: no dataset column {answer_column!r} (answer_column) with the "
                         f"reference answers; the columns that arrived are {columns}. Set "
                         "answer_column in the reward source's kwargs to the dataset column "
                         "holding the answers")
    refs = arrived[answer_column]
    try:
        refs = None if isinstance(refs, (str, bytes, dict)) else list(refs)
    except TypeError:
        refs = None
    if refs is None or len(refs) != len(responses):
        got = (f"a {type(arrived[answer_column]).__name__}, not a list" if refs is None
               else f"{len(refs)} values")
        raise ValueError(f"{fn}: column {answer_column!r} has {got} for {len(responses)} "
                         "responses; expected one reference answer per response")
    return refs


def math_answer(prompts: list[str], responses: list[str], answer: Any = None,
                answer_column: str = "answer", correct: float = 1.0, wrong: float = 0.0,
                **kwargs) -> list[float]:
    """``correct`` for each response whose final answer (:func:`extract_answer`: last
    ``\\boxed{}``, else after the last ``####``, else the last number) matches the reference in
    column ``answer_column`` (:func:`answers_match`: numerically within 1e-6 relative, else as
    normalised strings), else ``wrong``. A response with no answer, or a row without a reference
    (None), scores ``wrong``."""
    refs = _references("math_answer", responses, answer, answer_column, kwargs)
    return [float(correct) if answers_match(extract_answer(r), ref) else float(wrong)
            for r, ref in zip(responses, refs)]


def exact_match(prompts: list[str], responses: list[str], answer: Any = None,
                answer_column: str = "answer", extract: bool = False, correct: float = 1.0,
                wrong: float = 0.0, **kwargs) -> list[float]:
    """``correct`` when the response equals the reference in column ``answer_column`` as
    normalised strings (:func:`normalize_text`: stripped, lower case, no spaces, no trailing
    period), else ``wrong``. With ``extract=True`` the response's final answer
    (:func:`extract_answer`) is compared instead of the whole response, with the reference's part
    after its last ``####`` when it has one. Strings only: use :func:`math_answer` to compare
    numbers (``1,234`` vs ``1234``)."""
    refs = _references("exact_match", responses, answer, answer_column, kwargs)
    scores = []
    for r, ref in zip(responses, refs):
        if extract:
            r, ref = extract_answer(r), reference_answer(ref)
        ok = r is not None and ref is not None and normalize_text(r) == normalize_text(ref)
        scores.append(float(correct) if ok else float(wrong))
    return scores


_HASH_ANSWER = re.compile(rf"####\s*(?:{_NUMBER.pattern})")


@lru_cache(maxsize=32)
def _compiled(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"format_reward: pattern {pattern!r} is not a valid regular "
                         f"expression: {e}") from None


def has_answer_format(text: str) -> bool:
    """The default format of :func:`format_reward`: exactly one final-answer marker, that is one
    complete ``\\boxed{...}`` or one ``#### <number>``, not both and neither twice."""
    if not isinstance(text, str):
        return False
    return len(_boxed_contents(text)) + len(_HASH_ANSWER.findall(text)) == 1


def format_reward(prompts: list[str], responses: list[str], pattern: str | None = None,
                  correct: float = 1.0, wrong: float = 0.0, **kwargs) -> list[float]:
    """``correct`` for each response in the expected format, else ``wrong``.

    Without ``pattern``: :func:`has_answer_format` (exactly one ``\\boxed{...}`` or one
    ``#### <number>``). With ``pattern``: the response matches the regular expression anywhere
    (``re.search``; anchor it with ``^...$`` and set flags inline, e.g. ``(?s)`` so that ``.``
    crosses lines). Needs no dataset column."""
    if pattern is None:
        return [float(correct) if has_answer_format(r) else float(wrong) for r in responses]
    regex = _compiled(pattern)
    return [float(correct) if isinstance(r, str) and regex.search(r) else float(wrong)
            for r in responses]
