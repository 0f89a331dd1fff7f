"""The built-in calculator task (rlhf_ppo.tasks.calculator): the demonstrations with and without
the tool, the tool's answers, where a tool result sits in the tokens, and the pipeline end to end
(a smoke run whose rollouts call the tool, reading its results without training them; the
learning check, PPO with the tool above the SFT model, is slow)."""

import json

import pytest
import torch

from rlhf_ppo.agent_rollout import build_agent, generate_multiturn
from rlhf_ppo.config import AgentConfig, GenerationConfig
from rlhf_ppo.data import Prompt
from rlhf_ppo.tasks import calculator as C
from rlhf_ppo.tasks import reasoning as R


def read(path):
    return [json.loads(line) for line in open(path)]


# --------------------------------------------------------------------------- the tool and the data

def test_the_tool_answers_each_step_exactly():
    calc = C.Calculator()
    calc.reset(prompt="q : 7 + 6 - 4 =", answer=9)
    assert [calc.calc(), calc.calc(), calc.calc()] == [7 + 6, 7 + 6 - 4, 7 + 6 - 4]
    calc.reset(prompt="q : 9 - 9 + 3 =")  # a new episode starts from the first step again
    assert calc.calc() == 0 and calc.calc() == 3


def test_tool_form_turns_each_worked_step_into_a_call_and_its_result():
    worked = "7 + 6 = 13 . 13 - 4 = 9 . #### 9"
    assert C.tool_form(worked) == ("7 + 6 = call calc end result 13 . "
                                   "13 - 4 = call calc end result 9 . #### 9")


def test_demonstrations_use_the_tool_for_a_share_and_are_exact_there(tmp_path):
    kw = dict(seed=0, n_sft=2000, n_test=100, noise=0.2, tool_share=0.5)
    tool = read(C.write_task(tmp_path / "tool", tool=True, **kw)["sft"])
    plain = read(C.write_task(tmp_path / "plain", tool=False, **kw)["sft"])
    calls = [r for r in tool if "call" in r["response"]]
    assert 0.45 < len(calls) / len(tool) < 0.55
    slips = 0
    for t, p in zip(tool, plain):
        assert t["prompt"] == p["prompt"]
        if "call" in t["response"]:  # every step through the tool, the chain exact
            assert t["response"].count("call calc end result") == 2
            assert t["response"] == C.tool_form(R.chain(R.parse_prompt(t["prompt"]))[0])
            # --no-tool: the same demonstration, each call replaced by its worked step
            assert p["response"] == t["response"].replace("call calc end result ", "")
        else:  # the reasoning task's noisy chain, the same in both
            assert t["response"] == p["response"]
            slips += t["response"].split()[-1] != str(R.solve(R.parse_prompt(t["prompt"])))
    no_tool = len(tool) - len(calls)
    assert 0.3 < slips / no_tool < 0.4  # 1 - 0.8^2 of the worked chains end wrong
    # the reasoning task's held-out split, and every word in the vocabulary
    reasoning = R.write_task(tmp_path / "r", seed=0, n_sft=0, n_test=100)
    assert read(reasoning["prompts_test"]) == read(tmp_path / "tool" / "prompts_test.jsonl")
    vocab = set(C.calculator_vocab())
    assert all(set((r["prompt"] + " " + r["response"]).split()) <= vocab for r in tool)


def test_a_tool_using_demonstration_tokenizes_word_by_word():
    tok = C.build_tokenizer()
    response = "7 + 6 = call calc end result 13 . 13 - 4 = call calc end result 9 . #### 9"
    ids = tok(response, add_special_tokens=False)["input_ids"]
    words = response.split()
    assert ids == [C.calculator_vocab().index(w) for w in words] and tok.decode(ids) == response
    # what the tool appends after a call: the template's text, two words
    assert tok(C.RESULT_TEMPLATE.format(content=13), add_special_tokens=False)["input_ids"] == \
        [C.calculator_vocab().index("result"), C.calculator_vocab().index("13")]
    assert len(C.calculator_vocab()) == len(R.reasoning_vocab()) + 4
    assert C.calculator_vocab()[: len(R.reasoning_vocab())] == R.reasoning_vocab()


# --------------------------------------------------------------------------- the pipeline

# enough SFT (every demonstration through the tool, no slips) that the model writes the calls
SMOKE = {"data": {"n_sft": 1500, "noise": 0.0, "tool_share": 1.0},
         "sft": {"train.max_steps": 45, "data.heldout_fraction": 0.02},
         "ppo": {"iterations": 2, "ppo.batch_size": 16, "ppo.num_minibatches": 1,
                 "ppo.forward.micro_batch_size": 16, "ppo.ppo_epochs": 1},
         "eval": {"num_prompts": 8, "samples_per_prompt": 2, "bootstrap_samples": 100}}


def observed_spans(ids: list[int], action: list[int], tok) -> list[tuple[int, list[str]]]:
    """``(start, words)`` of each run of tokens the model read but did not sample."""
    spans, start = [], None
    for i, a in enumerate(action + [1]):
        if a == 0 and start is None:
            start = i
        elif a == 1 and start is not None:
            spans.append((start, tok.convert_ids_to_tokens(ids[start:i])))
            start = None
    return spans


def test_pipeline_smoke_rollouts_call_the_tool_and_read_its_results_untrained(tmp_path, capsys):
    out = tmp_path / "run"
    s = C.run_calculator(out, stage_overrides=SMOKE)
    assert s["ppo"]["iterations"] == 2 and "tool calls per episode: sft" in capsys.readouterr().out
    metrics = read(out / "ppo" / "metrics.jsonl")
    assert all(m["agent/tool_calls"] > 0 and m["agent/observation_tokens"] > 0 for m in metrics)
    assert s["eval"]["policy"]["agent"]["tool_calls"]["mean"] > 0
    # a rollout of the PPO policy: each call is answered by `result N` (N the tool's exact value),
    # read (attention 1) but not trained (action 0); the model's own tokens are trained
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(out / "ppo" / "final")
    tok = AutoTokenizer.from_pretrained(out / "ppo" / "final")
    agent = build_agent(AgentConfig(**C.agent_section()), tok)
    rows = read(out / "data" / "prompts_test.jsonl")[:16]
    prompts = [Prompt(r["prompt"], tok(r["prompt"], add_special_tokens=False)["input_ids"], None,
                      {"answer": r["answer"]}) for r in rows]
    torch.manual_seed(0)
    try:
        rollout = generate_multiturn(model, prompts, tok, GenerationConfig(max_new_tokens=28), agent)
    finally:
        agent.close()
    P = rollout.prompt_length
    answered = 0
    for b, row in enumerate(rows):
        ids = rollout.input_ids[b, P:].tolist()
        attention = rollout.attention_mask[b, P:].tolist()
        action = rollout.response_mask[b].tolist()  # (B, R): the response region only
        n = sum(attention)
        assert attention == [1] * n + [0] * (len(ids) - n)
        calc = C.Calculator()
        calc.reset(prompt=row["prompt"])
        spans = observed_spans(ids[:n], action[:n], tok)
        for start, words in spans:
            assert words[0] == "result"  # every observation is the tool's answer to a call
            if tok.convert_ids_to_tokens(ids[start - 3:start]) == ["call", "calc", "end"]:
                assert words == ["result", str(calc.calc())][: len(words)]  # the last may be cut
                answered += 1
        # one result per call (a call right at the token limit gets none)
        assert len(spans) <= int(rollout.episode_stats["tool_calls"][b]) <= len(spans) + 1
    assert answered > 0

@pytest.mark.slow
def test_ppo_with_the_tool_beats_the_sft_model(tmp_path):
    s = C.run_calculator(tmp_path / "run")
    ev = s["eval"]
    sft, ppo = ev["reference"]["accuracy"]["mean"], ev["policy"]["accuracy"]["mean"]
    assert ppo > sft + 0.1 and ev["accuracy_diff"]["ci_low"] > 0.05
    assert ev["policy"]["agent"]["tool_calls"]["mean"] > ev["reference"]["agent"]["tool_calls"]["mean"]
