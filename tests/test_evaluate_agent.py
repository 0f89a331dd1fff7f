"""`rlhf-ppo evaluate` on multi-turn rollouts: both models run the same environment / tools, the
summary reports success, turns, tool calls and tool errors per episode, and samples.jsonl and the
report keep whole transcripts with the model's (trained) spans apart from the observations.

As in test_agent_rollout.py, the tiny random model's token choices are fixed by replacing
``rlhf_ppo.rollout.draw`` with a script; the script restarts for every sampling call (each model,
each batch), so both models write the same turns and the counts follow from the script alone."""

import json
import re
from pathlib import Path

import pytest
import torch
from test_report import chromium, dump_dom

from rlhf_ppo.config import load_config
from rlhf_ppo.eval_config import EvalConfig, effective_config
from rlhf_ppo.evaluate import run_evaluate
from rlhf_ppo.report import transcript_html

GOOD, EOS = 9, 3  # the tiny vocabulary's "good" and "<eos>"
REVIEW, MOVIE, ABOUT = 80, 20, 79  # "review", "movie", "about": text-protocol markers and a tool name

# Each prompt row says how many turns its episode lasts and whether the last step is won.
PROMPTS = [{"prompt": "our city was", "turns": 1, "win": True},
           {"prompt": "this song is", "turns": 2, "win": False},
           {"prompt": "that game was", "turns": 3, "win": True},  # cut by agent.max_turns=2
           {"prompt": "my food is", "turns": 2, "win": True}]

ENV_SOURCE = '''
class Game:
    """Answers every turn with "user : the movie"; ends after row["turns"] steps, the last one
    rewarded 1 when row["win"] (else 0), the others 0.5 (a cut episode's last reward is positive
    but it is no success). Logs each reset, to show both models ran it."""

    def reset(self, row):
        self.row, self.steps = row, 0
        with open(LOG, "a") as f:
            f.write(row["prompt"] + "\\n")

    def step(self, text):
        self.steps += 1
        done = self.steps >= self.row["turns"]
        return "user : the movie", (float(self.row["win"]) if done else 0.5), done
'''

TOOL_SOURCE = '''
def movie() -> str:
    """Gives a review of the movie."""
    return "great fun"
'''

SMALL = ["num_prompts=4", "samples_per_prompt=2", "batch_size=2", "generation.max_new_tokens=8",
         "bootstrap_samples=200", "data.max_prompt_length=16", "data.shuffle=false",
         "reference=builtin:tiny", "agent.protocol=text"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def scripted(monkeypatch, tokens: list[int]) -> list[int]:
    """Make the sampler choose ``tokens`` in order (every row the same; the last one repeats),
    from the start again for every evaluate sampling call; returns a list of the calls' sizes."""
    import rlhf_ppo.evaluate as ev

    queue, calls = [], []

    def draw(probs, method=None):
        tok = queue.pop(0) if len(queue) > 1 else queue[0]
        return torch.full((probs.shape[0],), tok, dtype=torch.long, device=probs.device)

    def sample_rollout(model, prompts, *args, **kwargs):
        queue[:] = tokens
        calls.append(len(prompts))
        return original(model, prompts, *args, **kwargs)
    original = ev.sample_rollout
    monkeypatch.setattr("rlhf_ppo.rollout.draw", draw)
    monkeypatch.setattr(ev, "sample_rollout", sample_rollout)
    return calls


def evaluate(out: Path, *overrides: str) -> tuple[dict, list[dict], str]:
    cfg = load_config(None, ["policy=builtin:tiny", f"output_dir={out}", *SMALL, *overrides],
                      cls=EvalConfig)
    summary = run_evaluate(cfg)
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return summary, rows, (out / "report.html").read_text()


@pytest.fixture
def game(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    log = tmp_path / "resets.log"
    (tmp_path / "game.py").write_text(f"LOG = {str(log)!r}\n" + ENV_SOURCE)
    return [f"data.path={data}", f"agent.environment={tmp_path / 'game.py'}:Game"], log


def test_environment_episodes_are_counted_on_both_sides(tmp_path, game, monkeypatch):
    overrides, log = game
    calls = scripted(monkeypatch, [GOOD])  # every turn: "good good" (max_tokens_per_turn=2)
    summary, rows, page = evaluate(tmp_path / "out", *overrides, "agent.max_tokens_per_turn=2",
                                   "agent.max_total_tokens=20", "agent.max_turns=2")
    # 2 batches of 2 prompts x 2 samples, each sampled by the policy and by the reference
    assert calls == [4, 4, 4, 4]
    # every episode of both models reset its own environment: 16 resets, 2 per prompt per model
    assert sorted(log.read_text().splitlines()) == sorted([p["prompt"] for p in PROMPTS] * 4)
    # per prompt (turns, success): (1, won), (2, lost: reward 0), (2, cut at max_turns: not done),
    # (2, won). Means over the 8 episodes (each prompt twice): turns (1+2+2+2)/4 = 1.75,
    # success 2/4 = 0.5, no tools: 0 calls, 0 errors
    assert summary["success_from"] == "environment"
    for side in ("policy", "reference"):
        agent = summary[side]["agent"]
        assert agent["turns"]["mean"] == 1.75
        assert agent["success_rate"]["mean"] == 0.5
        assert agent["tool_calls"]["mean"] == agent["tool_errors"]["mean"] == 0.0
        assert agent["turns"]["ci_low"] <= 1.75 <= agent["turns"]["ci_high"]
        assert [r[f"{side}_turns"] for r in rows] == [1, 1, 2, 2, 2, 2, 2, 2]
        assert [r[f"{side}_success"] for r in rows] == [1, 1, 0, 0, 0, 0, 1, 1]
    # whole transcripts, span by span along the action mask
    turn, obs = {"text": "good good", "trained": True}, {"text": "user : the movie", "trained": False}
    assert rows[0]["policy_transcript"] == [turn]  # done after one step: no observation
    for r in rows[2:]:
        assert r["policy_transcript"] == r["reference_transcript"] == [turn, obs, turn]
    assert rows[2]["policy_response"] == "good good user : the movie good good"
    # the model's tokens only: response length 2 per turn
    assert [r["policy_length"] for r in rows] == [2, 2, 4, 4, 4, 4, 4, 4]
    # the report marks the model's spans and the observation exactly
    (row,) = re.findall(r'<tr data-index="1000000".*?</tr>', page)  # prompt 1, sample 0
    spans = ("<span class=turn>good good</span><span class=obs>user : the movie</span>"
             "<span class=turn>good good</span>")
    assert transcript_html(rows[2]["policy_transcript"]) == spans
    assert row.count(spans) == 2  # the policy's cell and the reference's
    assert "success rate (per episode, CI, from the environment)" in page
    assert "model turns per episode (CI)" in page
    binary = chromium()
    if binary is not None:  # the page works in a browser (its script, filter, images)
        body = dump_dom(binary, (tmp_path / "out" / "report.html").resolve().as_uri()
                        + "#q=user%20%3A%20the%20movie", tmp_path / "profile")
        assert (body["data-js-errors"], body["data-sample-rows"]) == ("0", "8")
        assert body["data-visible-rows"] == "6"  # the two one-turn episodes have no observation


def test_tool_calls_and_errors_are_counted(tmp_path, monkeypatch):
    tools = tmp_path / "tools.py"
    tools.write_text(TOOL_SOURCE)
    # turn 1 calls `movie` (answered), turn 2 calls the unknown tool `good` (an error observation),
    # turn 3 ends without a call: 3 turns, 2 calls, 1 error in every episode
    scripted(monkeypatch, [REVIEW, MOVIE, ABOUT, REVIEW, GOOD, ABOUT, EOS])
    summary, rows, page = evaluate(
        tmp_path / "out", f"agent.tools=[{tools}:movie]", "agent.call_open=review",
        "agent.call_close=about", "agent.result_template= user {content} assistant ",
        "agent.max_total_tokens=40")
    assert summary["success_from"] is None  # tools without an environment or an answer checker
    for side in ("policy", "reference"):
        agent = summary[side]["agent"]
        assert "success_rate" not in agent
        assert (agent["turns"]["mean"], agent["tool_calls"]["mean"],
                agent["tool_errors"]["mean"]) == (3.0, 2.0, 1.0)
    spans = rows[0]["policy_transcript"]
    assert [s["trained"] for s in spans] == [True, False, True, False, True]
    assert [s["text"] for s in spans[:3]] == ["review movie about", "user great fun assistant",
                                              "review good about"]
    assert spans[3]["text"].startswith("user <unk>")  # "Error: unknown tool 'good'..." in tiny words
    assert spans[4]["text"] == "<eos>"  # the sampled stop token is a trained token, shown
    assert "tool errors per episode (CI)" in page and "success rate" not in page


def test_accuracy_is_the_success_when_answers_are_checked(tmp_path, game, monkeypatch):
    overrides, _ = game
    checker = tmp_path / "check.py"
    checker.write_text("def right(prompts, responses, answer):\n"
                       "    return [float(len(r.split()) > 2) for r in responses]\n")
    scripted(monkeypatch, [GOOD])
    summary, rows, _ = evaluate(tmp_path / "out", *overrides, "agent.max_tokens_per_turn=2",
                                "agent.max_total_tokens=20", "agent.max_turns=2",
                                "accuracy_column=win", f"accuracy_function={checker}:right")
    # correct: the transcript has more than 2 words, i.e. more than one turn (prompts 1, 2, 3)
    assert summary["success_from"] == "accuracy_function"
    assert summary["policy"]["agent"]["success_rate"]["mean"] == 0.75
    assert summary["policy"]["accuracy"]["mean"] == 0.75


def test_agent_section_comes_from_the_run_key_by_key(tmp_path):
    run = ({"agent": {"environment": "game.py:Game", "max_turns": 5}}, Path("run/config.yaml"))
    cfg = load_config(None, ["policy=x", "agent.max_turns=2"], cls=EvalConfig)
    merged, origins = effective_config(cfg, run)
    assert (merged.agent.environment, merged.agent.max_turns) == ("game.py:Game", 2)
    assert origins["agent"] == ("max_turns from the evaluate config; the rest from the PPO run's "
                                "config run/config.yaml")
    # a single-turn run: no agent section in the settings (the summary reads as before)
    _, origins = effective_config(load_config(None, ["policy=x"], cls=EvalConfig),
                                  ({"data": {}}, Path("run/config.yaml")))
    assert set(origins) == {"data", "reward", "generation"}


def test_a_ppo_config_file_brings_its_agent_section(tmp_path, caplog):
    from rlhf_ppo.eval_config import load_eval_config

    path = tmp_path / "config.yaml"
    path.write_text("iterations: 1\nagent: {environment: game.py:Game, max_turns: 3}\n")
    with caplog.at_level("INFO", logger="rlhf_ppo.evaluate"):
        cfg = load_eval_config(path, ["policy=x", "agent.max_turns=2"])
    assert (cfg.agent.environment, cfg.agent.max_turns) == ("game.py:Game", 2)
    assert f"{path} is a PPO run's config: evaluate uses its agent section(s) and ignores iterations" \
        in caplog.text
    path.write_text("iterations: 1\nagent: {max_turns: 3}\n")  # an agent section that is off
    with caplog.at_level("INFO", logger="rlhf_ppo.evaluate"):
        load_eval_config(path, ["policy=x"])
    assert "evaluate uses its (no) section(s) and ignores iterations" in caplog.text


def test_single_turn_outputs_have_no_agent_fields(tmp_path):
    cfg = load_config(None, ["policy=builtin:tiny", f"output_dir={tmp_path}", *SMALL[:6],
                             "reference=builtin:tiny", "num_prompts=1"], cls=EvalConfig)
    summary = run_evaluate(cfg)
    assert set(summary) == {"policy_path", "reference_path", "num_prompts", "samples_per_prompt",
                            "bootstrap", "policy", "reference", "win_rate", "score_diff", "kl",
                            "config", "settings_from"}
    assert set(summary["policy"]) == {"score", "sources", "response_length", "stop_rate",
                                      "distinct_1", "distinct_2"}
    assert set(summary["settings_from"]) == {"data", "reward", "generation"}
    row = json.loads((tmp_path / "samples.jsonl").read_text().splitlines()[0])
    assert not any(k.endswith(("_transcript", "_turns")) for k in row)
    page = (tmp_path / "report.html").read_text()
    assert "<span class=turn>" not in page and "tool calls per episode" not in page
