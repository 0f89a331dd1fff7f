"""One file of agent code written for TRL 1.12's ``GRPOTrainer`` (``trl_agent_env.py``: an
``environment_factory`` class, a standalone tool and a reward function that reads the
environments) trained by TRL and by rlhf_ppo, unchanged, on the same prompts and the same tiny
local model, printing the same facts on both sides:

    # TRL 1.12 in its own venv (this side does not import rlhf_ppo)
    python3 -m venv /tmp/trlv && /tmp/trlv/bin/pip install torch==2.13.0 \\
        && /tmp/trlv/bin/pip install trl==1.12.0
    /tmp/trlv/bin/python scripts/bench/trl_agent_compat.py --side trl
    # rlhf_ppo (this side does not import TRL)
    .venv/bin/python scripts/bench/trl_agent_compat.py --side rlhf_ppo

Each side prints the rendered prompt of the first row, the tool schemas it offered, the first
episode's transcript, the tool calls, the rewards (the reward function prints what it was given),
and one JSON line ``TRL_AGENT_COMPAT {...}`` that it also writes to ``--out/SIDE.json``. When the
other side's file is there, it compares the two: same tool schemas, same rendered prompt, same
transcript.

**The model** (``--out/model``, built by whichever side runs first, with transformers only): a
1-layer Qwen2 whose tokenizer is bytes plus Qwen's special tokens and a few added tokens, with
TRL's copy of Qwen2.5's chat template (``QWEN2_5_TEMPLATE``, equal to
``trl.chat_template_utils.qwen2_5_chat_template``, so TRL's ``add_response_schema`` knows how to
parse its tool calls). A random tiny model almost never writes a well-formed tool call, so this
one is *scripted by its weights*: attention and MLP write nothing (``o_proj`` and ``down_proj``
are zero), so the next-token logits depend on the current token only, and the weights make the
assistant header's last token (``\\n``) lead to ``CALL``, one call of the environment's ``add``,
then ``<|im_end|>``, with a logit margin of about 30 (sampling at temperature 1 picks that path
with probability ~1 - 1e-11). Both trainers load the same folder, so both are scripted the same
way, by the model and nothing else. Every model turn, the one after the tool result included,
is the same call: TRL's ``max_tool_calling_iterations=1`` and rlhf_ppo's ``agent.max_turns=2``
both give two model turns, the first one's call runs and the second one's does not. A model that
only sees its current token cannot write two different calls in one turn (each needs its own
``<tool_call>`` token, whose successor would have to differ), so the standalone tool
``multiply`` is offered in the prompt's schemas on both sides but never called.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENV_FILE = HERE / "trl_agent_env.py"
# every model turn, as the chat template renders an assistant message with this call
CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
# the scripted chain of tokens: the assistant header's "\n", then these added tokens, then EOS.
# <tool_call> and </tool_call> must be single tokens: transformers' response parser (which TRL
# uses) only takes a control token generated as its own id as a delimiter.
CHAIN = ["<tool_call>", '\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n', "</tool_call>"]
assert "".join(CHAIN) == CALL
ROWS = [  # the dataset: a chat prompt and the column `target` that Env.reset reads
    {"prompt": [{"role": "user", "content": "Add two numbers."}], "target": 5},
    {"prompt": [{"role": "user", "content": "Use the tools."}], "target": 7},
]
QWEN2_5_TEMPLATE = "\n".join([
    '{%- if tools %}',
    "    {{- '<|im_start|>system\\n' }}",
    "    {%- if messages[0]['role'] == 'system' %}",
    "        {{- messages[0]['content'] }}",
    '    {%- else %}',
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant"
    ".' }}",
    '    {%- endif %}',
    '    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the us'
    'er query.\\n\\nYou are provided with function signatures within <tools></tools> XM'
    'L tags:\\n<tools>" }}',
    '    {%- for tool in tools %}',
    '        {{- "\\n" }}',
    '        {{- tool | tojson }}',
    '    {%- endfor %}',
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with functio'
    'n name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"n'
    'ame\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end'
    '|>\\n" }}',
    '{%- else %}',
    "    {%- if messages[0]['role'] == 'system' %}",
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}",
    '    {%- else %}',
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are"
    " a helpful assistant.<|im_end|>\\n' }}",
    '    {%- endif %}',
    '{%- endif %}',
    '{%- for message in messages %}',
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.fi'
    'rst) or (message.role == "assistant" and not message.tool_calls) %}',
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>"
    "' + '\\n' }}",
    '    {%- elif message.role == "assistant" %}',
    "        {{- '<|im_start|>' + message.role }}",
    '        {%- if message.content %}',
    "            {{- '\\n' + message.content }}",
    '        {%- endif %}',
    '        {%- for tool_call in message.tool_calls %}',
    '            {%- if tool_call.function is defined %}',
    '                {%- set tool_call = tool_call.function %}',
    '            {%- endif %}',
    '            {{- \'\\n<tool_call>\\n{"name": "\' }}',
    '            {{- tool_call.name }}',
    '            {{- \'", "arguments": \' }}',
    '            {{- tool_call.arguments | tojson }}',
    "            {{- '}\\n</tool_call>' }}",
    '        {%- endfor %}',
    "        {{- '<|im_end|>\\n' }}",
    '    {%- elif message.role == "tool" %}',
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") '
    '%}',
    "            {{- '<|im_start|>user' }}",
    '        {%- endif %}',
    "        {{- '\\n<tool_response>\\n' }}",
    '        {{- message.content }}',
    "        {{- '\\n</tool_response>' }}",
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}',
    "            {{- '<|im_end|>\\n' }}",
    '        {%- endif %}',
    '    {%- endif %}',
    '{%- endfor %}',
    '{%- if add_generation_prompt %}',
    "    {{- '<|im_start|>assistant\\n' }}",
    '{%- endif %}',
    '',
])


# ---------------------------------------------------------------- the shared model and data

def build_tokenizer():
    """Bytes as tokens (no merges), Qwen's special tokens, and CHAIN's strings as added tokens,
    carrying QWEN2_5_TEMPLATE."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    bytes_only = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    bytes_only.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bytes_only.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=bytes_only, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>"])
    tok.add_tokens([AddedToken(s, normalized=False, special=False) for s in CHAIN])
    tok.chat_template = QWEN2_5_TEMPLATE
    return tok


def build_model(folder: Path) -> None:
    """The scripted 1-layer Qwen2 and its tokenizer, saved to ``folder`` (see the module
    docstring). Its logits at a token t are ``lm_head @ rmsnorm(embed[t])``: each chain token
    gets a dimension of its own (its embedding is that unit vector, 8 after the norm), and
    ``lm_head`` maps that dimension to the next chain token with weight 4 (logit 32)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = build_tokenizer()
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    chain = [tok.convert_tokens_to_ids("Ċ")] + tok.convert_tokens_to_ids(CHAIN) + [tok.eos_token_id]
    with torch.no_grad():
        for layer in model.model.layers:  # the residual stream stays the token's embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        emb[:, :len(chain)] = 0.0  # dimensions 0..len(chain)-1 belong to the chain's tokens
        for dim, (token, successor) in enumerate(zip(chain[:-1], chain[1:])):
            emb[token] = 0.0
            emb[token, dim] = 1.0
            head[successor, dim] = 4.0
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def prepare(out: Path) -> tuple[Path, Path]:
    """``(model folder, rows .jsonl)`` under ``out``; the model is built once and reused."""
    model = out / "model"
    if not (model / "config.json").exists():
        build_model(model)
    rows = out / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return model, rows


def schema_names(schemas: list[dict]) -> list[str]:
    return [s["function"]["name"] for s in schemas]


def report(side: str, facts: dict, out: Path) -> None:
    """Print ``facts`` as one JSON line, write it to ``out/SIDE.json`` and, when the other side's
    file is there, compare the schemas, the rendered prompt and the first transcript."""
    print(f"TRL_AGENT_COMPAT {json.dumps(facts)}", flush=True)
    (out / f"{side}.json").write_text(json.dumps(facts, indent=1))
    other = out / ("rlhf_ppo.json" if side == "trl" else "trl.json")
    if not other.exists():
        return
    theirs = json.loads(other.read_text())
    for key in ("tool_schemas", "rendered_prompt", "transcript"):
        print(f"same {key} as the {theirs['side']} side ({other}): {facts[key] == theirs[key]}")


def show(facts: dict) -> None:
    print(f"--- {facts['side']}: rendered prompt of row 0 (what the model reads)")
    print(facts["rendered_prompt"])
    print(f"--- {facts['side']}: tool schemas offered: {schema_names(facts['tool_schemas'])}")
    print(f"--- {facts['side']}: first episode after the prompt (model turns and tool results)")
    print(facts["transcript"])
    print("---")


# ---------------------------------------------------------------- TRL 1.12

def run_trl(args) -> dict:
    """Two GRPO steps of TRL's GRPOTrainer with ``environment_factory=Env``, ``tools=[multiply]``
    and ``reward_funcs=[reward]`` on CPU; the generate calls are recorded to show the prompt as
    rendered and the transcript."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import get_json_schema
    from trl import GRPOConfig, GRPOTrainer
    from trl.chat_template_utils import qwen2_5_chat_template

    sys.path.insert(0, str(HERE))
    from trl_agent_env import Env, multiply, reward

    assert QWEN2_5_TEMPLATE == qwen2_5_chat_template, "QWEN2_5_TEMPLATE differs from TRL's copy"
    folder, rows = prepare(args.out)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    calls = record_generate(model)
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(), max_steps=args.steps, per_device_train_batch_size=4,
        num_generations=2, max_completion_length=args.max_tokens, max_tool_calling_iterations=1,
        learning_rate=1e-5, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True,
        bf16=False, use_vllm=False, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    trainer = GRPOTrainer(model=model, processing_class=tok, args=config,
                          train_dataset=datasets.load_dataset("json", data_files=str(rows))["train"],
                          environment_factory=Env, tools=[multiply], reward_funcs=[reward])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    # the tool loop's generate call continues row 0 after its first turn and the tool results
    first_in = calls[0][0]
    second_in, second_out = next(c for c in calls[1:] if c[0][:len(first_in)] == first_in)
    transcript = tok.decode(second_in[len(first_in):] + until_eos(second_out, tok.eos_token_id))
    return {
        "side": "trl", "steps": trainer.state.global_step,
        "tool_schemas": [get_json_schema(t) for t in trainer.tools],
        "rendered_prompt": tok.decode(first_in, skip_special_tokens=False),
        "transcript": transcript,
        "tool_calls_per_episode": [h.get("tools/call_frequency") for h in logs],
        "tool_failures": [h.get("tools/failure_frequency") for h in logs],
        "reward_mean": [h["reward"] for h in logs],
        "rewards_per_source": [{k: v for k, v in h.items() if k.startswith("rewards/") and
                                k.endswith("/mean")} for h in logs],
        "environments_after_last_step": [{"target": e.target, "total": e.total, "calls": e.calls}
                                         for e in trainer.environments],
        "get_reward_after_last_step": [e.get_reward() for e in trainer.environments]}


def record_generate(model) -> list[tuple[list[int], list[int]]]:
    """Wrap ``model.generate`` to record (row 0's prompt ids without padding, row 0's new ids)."""
    calls, generate = [], model.generate

    def recording(*a, **kw):
        out = generate(*a, **kw)
        ids, mask = kw["input_ids"][0], kw["attention_mask"][0].bool()
        seq = out.sequences if hasattr(out, "sequences") else out
        calls.append((ids[mask].tolist(), seq[0, ids.shape[0]:].tolist()))  # prompts left-padded
        return out

    model.generate = recording
    return calls


def until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[:ids.index(eos) + 1] if eos in ids else ids


# ---------------------------------------------------------------- rlhf_ppo

def run_rlhf_ppo(args) -> dict:
    """Two PPO iterations of rlhf_ppo on the same file's class, tool and reward through a config,
    the chat protocol with the model's template; ``PPOTrainer.sample`` is wrapped to keep the
    rollouts."""
    from rlhf_ppo.config import load_config
    from rlhf_ppo.trainer import PPOTrainer

    folder, rows = prepare(args.out)
    spec = str(ENV_FILE)
    cfg = load_config(None, [
        f"output_dir={args.out / 'rlhf_ppo_run'}", f"iterations={args.steps}", "seed=0",
        f"model.name_or_path={folder}", f"data.path={rows}", "data.prompt_column=prompt",
        "data.max_prompt_length=2048", f"agent.environment={spec}:Env", f"agent.tools=[{spec}:multiply]",
        "agent.protocol=chat", "agent.max_turns=2", f"agent.max_total_tokens={args.max_tokens}",
        f"generation.max_new_tokens={args.max_tokens}", f"reward.sources=[{{function: '{spec}:reward'}}]",
        "ppo.batch_size=4", "ppo.samples_per_prompt=2", "ppo.num_minibatches=1", "ppo.ppo_epochs=1",
        "ppo.forward.micro_batch_size=4", "optim.lr=1e-5", "threads=1"])
    trainer = PPOTrainer(cfg)
    rollouts, sample = [], trainer.sample
    trainer.sample = lambda prompts: rollouts.append(sample(prompts)) or rollouts[-1]
    history = trainer.train()
    tok, first = trainer.tokenizer, rollouts[0]
    P = first.prompt_length
    prompt_ids = first.input_ids[0, :P][first.attention_mask[0, :P].bool()].tolist()
    region = first.input_ids[0, P:][first.attention_mask[0, P:].bool()].tolist()
    return {
        "side": "rlhf_ppo", "steps": len(history), "tool_schemas": trainer.agent.schemas,
        "rendered_prompt": tok.decode(prompt_ids), "transcript": tok.decode(region),
        "tool_calls_per_episode": [h["agent/tool_calls"] for h in history],
        "tool_errors_per_episode": [h["agent/tool_errors"] for h in history],
        "turns_per_episode": [h["agent/turns"] for h in history],
        "score_mean": [h["score_mean"] for h in history],  # the reward sources: `reward`
        # Env.get_reward(), which rlhf_ppo adds on each rollout's last model token
        "get_reward_per_rollout": [r.turn_rewards.sum(-1).tolist() for r in rollouts],
        "environments_last_rollout": [{"target": e.target, "total": e.total, "calls": e.calls}
                                      for e in rollouts[-1].environments]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", choices=["trl", "rlhf_ppo"], required=True)
    ap.add_argument("--out", type=Path, default=Path("runs/trl_agent_compat"),
                    help="the shared model folder, rows.jsonl and each side's facts (SIDE.json)")
    ap.add_argument("--steps", type=int, default=2, help="GRPO steps (TRL) or PPO iterations")
    ap.add_argument("--max-tokens", type=int, default=256,
                    help="the response region: model turns and tool results (both sides)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    facts = run_trl(args) if args.side == "trl" else run_rlhf_ppo(args)
    show(facts)
    report(args.side, facts, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
