"""Random-init Llama models for ``scripts/bench/benchmark.py``, built from configs (nothing is downloaded).

Each size is written as two folders under ``OUT/SIZE``: ``policy`` (``LlamaForCausalLM``) and
``reward`` (``LlamaForSequenceClassification``, one output, the same shape), with a word-level
tokenizer of ``w0 w1 ...`` words that has **no EOS token**: no sampled token can end a response,
so every trainer generates exactly ``response_len`` tokens and runs stay comparable. (The
benchmark's variable workload runs on copies of these folders whose EOS is ``<unk>``, see
``benchmark.py``'s ``with_eos``; these folders stay EOS-free.)

    python scripts/bench/make_bench_models.py --out bench_models                 # tiny, small, medium
    python scripts/bench/make_bench_models.py --out bench_models --sizes gpu-0.5b --dtype bfloat16

| size | params | vocab | hidden | layers | heads (kv) | intermediate |
|---|---|---|---|---|---|---|
| tiny | ~0.25M | 4096 | 48 | 2 | 4 (2) | 128 |
| small | ~5M | 8192 | 256 | 4 | 4 (2) | 688 |
| medium | ~34M | 8192 | 512 | 10 | 8 (4) | 1408 |
| gpu-0.5b | ~0.49B | 151936 | 896 | 24 | 14 (2) | 4864 (Qwen2.5-0.5B's shape) |
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# Embeddings are tied (as in small open models); sizes are counted with the tied matrix once.
SIZES: dict[str, dict] = {
    "tiny": dict(vocab_size=4096, hidden_size=48, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    "small": dict(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2),
    "medium": dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=10,
                   num_attention_heads=8, num_key_value_heads=4),
    "gpu-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                     num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2),
}
SPECIAL = ["<pad>", "<unk>", "<bos>"]  # no EOS on purpose: responses never stop early


def bench_tokenizer(vocab_size: int):
    """Whitespace word-level tokenizer over ``<pad> <unk> <bos> w0 w1 ...`` (``vocab_size``
    entries), left-padding, without an EOS token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIAL + [f"w{i}" for i in range(vocab_size - len(SPECIAL))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<bos>")
    fast.padding_side = "left"
    return fast


def llama_config(size: str, max_positions: int = 4096):
    """The ``LlamaConfig`` of a benchmark size (no EOS id, tied embeddings)."""
    from transformers import LlamaConfig

    if size not in SIZES:
        raise ValueError(f"--sizes: unknown size {size!r}; expected one of {', '.join(SIZES)}")
    return LlamaConfig(**SIZES[size], max_position_embeddings=max_positions,
                       tie_word_embeddings=True, pad_token_id=0, bos_token_id=2,
                       eos_token_id=None)


def count_params(model) -> int:
    """Parameters, tied matrices counted once."""
    return sum(p.numel() for p in model.parameters())


def build(size: str, out: Path, seed: int = 0, dtype: str = "float32", device: str = "cpu") -> dict:
    """Write ``out/size/policy`` and ``out/size/reward``; return a summary dict. ``device``:
    where the weights are initialised (``cuda`` is much faster for the 0.5B model; its random
    numbers differ from the CPU's)."""
    import torch
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    folder = out / size
    config = llama_config(size)
    tok = bench_tokenizer(config.vocab_size)
    torch_dtype = getattr(torch, dtype)
    summary = {"size": size, "folder": str(folder)}
    for name, cls, s in (("policy", LlamaForCausalLM, seed), ("reward", LlamaForSequenceClassification,
                                                               seed + 1)):
        torch.manual_seed(s)
        cfg = llama_config(size)
        if name == "reward":
            cfg.num_labels = 1
        with torch.device(device):
            model = cls(cfg).to(torch_dtype)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.eos_token_id = None
        model.save_pretrained(folder / name)
        tok.save_pretrained(folder / name)
        summary[f"{name}_params"] = count_params(model)
        del model
    (folder / "bench.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_models", help="output folder")
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small", "medium"],
                        choices=list(SIZES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="dtype the weights are saved in")
    parser.add_argument("--device", default="cpu", help="where to initialise the weights")
    args = parser.parse_args()
    for size in args.sizes:
        print(json.dumps(build(size, Path(args.out), args.seed, args.dtype, args.device)),
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
