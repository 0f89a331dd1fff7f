"""rlhf_ppo.agents: tools, tool-call parsing, environments and their runner, on hand-written model
outputs and small example tools and environments (a calculator, TRL's IncrementEnv as its docs
write it, a guessing game sync and async). No model runs; timeouts are 0.2 s."""

import asyncio
import re
import threading

import pytest

from rlhf_ppo.agents import (
    TEXT_PROTOCOL,
    AgentRunner,
    Episode,
    MultiTurnEnvironment,
    ToolCall,
    ToolResult,
    ToolSet,
    assistant_message,
    chat_tool_suffix,
    check_tool_template,
    detect_format,
    environment_tools,
    environment_toolset,
    load_tool,
    parse_tool_calls,
    tool_messages,
    tool_schema,
)
from rlhf_ppo.errors import AgentError

TIMEOUT = 0.2

# Qwen2.5-Instruct's chat template (Hermes-style tool calls), as TRL ships it in
# trl/chat_templates/qwen2_5.jinja.
QWEN2_5_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
        ~ "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
        ~ "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, "
        ~ "\\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.'
            ~ '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first)
           or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}"""


@pytest.fixture(scope="module")
def qwen_tokenizer():
    """A tiny word-level tokenizer carrying Qwen2.5's chat template and special tokens: rendering
    a template needs no vocabulary, so nothing is downloaded."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"])}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                  unk_token="<unk>", eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = QWEN2_5_TEMPLATE
    return tok


@pytest.fixture
def release():
    """An event that hung sync calls wait on; set at teardown so their threads end."""
    event = threading.Event()
    yield event
    event.set()


# --- example tools, written as for TRL's GRPOTrainer(tools=[...]) --------------------------------

def calculator(expression: str) -> str:
    """
    Evaluates an arithmetic expression.

    Args:
        expression: Digits, spaces and + - * / ( ), e.g. "2 * (3 + 4)".

    Returns:
        The value of the expression.
    """
    if not re.fullmatch(r"[\d\s+\-*/().]+", expression):
        raise ValueError(f"not an arithmetic expression: {expression!r}")
    return str(eval(expression, {"__builtins__": {}}))


def divide(a: float, b: float) -> float:
    """
    Divides two numbers.

    Args:
        a: The dividend.
        b: The divisor.
    """
    return a / b


async def async_add(a: int, b: int) -> int:
    """
    Asynchronously adds two integers.

    Args:
        a: The first integer.
        b: The second integer.

    Returns:
        The sum of the two integers.
    """
    await asyncio.sleep(0)
    return a + b


def make_hung_sync(release):
    def wait_forever() -> str:
        """
        Never returns (until the test ends).
        """
        release.wait(10)
        return "late"
    return wait_forever


async def stall() -> str:
    """
    Never returns: awaits far beyond any timeout.
    """
    await asyncio.sleep(10)
    return "late"


def run(toolset: ToolSet, call: ToolCall, row: int | None = None) -> ToolResult:
    return asyncio.run(toolset.call(call, row=row))


# --- tools ------------------------------------------------------------------------------------

def test_tool_schema_is_transformers_get_json_schema_of_the_hints_and_docstring():
    assert tool_schema(divide) == {"type": "function", "function": {
        "name": "divide", "description": "Divides two numbers.",
        "parameters": {"type": "object", "properties": {
            "a": {"type": "number", "description": "The dividend."},
            "b": {"type": "number", "description": "The divisor."}}, "required": ["a", "b"]},
        "return": {"type": "number"}}}
    assert ToolSet([calculator, async_add]).names == ["calculator", "async_add"]


def test_a_tool_the_schema_cannot_express_is_an_error_naming_it():
    def no_docstring(x: int) -> int:
        return x

    def no_hint(x) -> int:
        """
        Args:
            x: a number.
        """
        return x

    with pytest.raises(AgentError, match=r"tool 'no_docstring': cannot build its JSON schema.*no docstring"):
        ToolSet([no_docstring])
    with pytest.raises(AgentError, match=r"tool 'no_hint': .*missing a type hint.*type hint on every"):
        tool_schema(no_hint)
    with pytest.raises(AgentError, match="tool 'divide' is given twice"):
        ToolSet([divide, divide])


def test_load_tool_from_a_file_and_a_module(tmp_path):
    (tmp_path / "mytools.py").write_text(
        'def shout(text: str) -> str:\n    """\n    Upper-cases text.\n\n    Args:\n'
        '        text: The text.\n    """\n    return text.upper()\n')
    shout = load_tool(f"{tmp_path}/mytools.py:shout")
    assert run(ToolSet([shout]), ToolCall("shout", {"text": "hi"})) == ToolResult("shout", "HI")
    assert load_tool("rlhf_ppo.agents.tools:tool_schema") is tool_schema
    with pytest.raises(AgentError, match=r"tools\[\]: file '.*nope.py' not found"):
        load_tool(f"{tmp_path}/nope.py:shout")
    with pytest.raises(AgentError, match=r"tools\[\]: expected 'package.module:function'"):
        load_tool("no_colon")


def test_toolset_runs_sync_and_async_tools_and_strs_their_values():
    tools = ToolSet([calculator, async_add, divide])
    assert run(tools, ToolCall("calculator", {"expression": "2 * (3 + 4)"})) == ToolResult("calculator", "14")
    assert run(tools, ToolCall("async_add", {"a": 2, "b": 3})) == ToolResult("async_add", "5")
    assert run(tools, ToolCall("divide", {"a": 1, "b": 4})) == ToolResult("divide", "0.25")  # str(0.25)


def test_a_tool_that_raises_is_an_observation_or_an_error_naming_tool_and_row():
    call = ToolCall("divide", {"a": 1, "b": 0})
    assert run(ToolSet([divide]), call) == ToolResult(
        "divide", "Error: tool 'divide' raised ZeroDivisionError: division by zero", error=True)
    with pytest.raises(AgentError, match=r"tool 'divide' raised ZeroDivisionError: division by zero "
                                         r"at \S*test_agents.py:\d+ in divide "
                                         r"\(row 3\)\. on_tool_error='raise' stops the run"):
        run(ToolSet([divide], on_error="raise"), call, row=3)
    with pytest.raises(AgentError, match="on_error: expected one of"):
        ToolSet([divide], on_error="ignore")


@pytest.mark.parametrize("call, message", [
    (ToolCall("sqrt", {"x": 4}), "unknown tool 'sqrt'; available tools: calculator, divide"),
    (ToolCall("divide", {"a": 1}), "tool 'divide' got bad arguments: missing 'b'. "
                                   "Expected: a (number, required), b (number, required)"),
    (ToolCall("divide", {"a": 1, "b": 2, "c": 3}), "tool 'divide' got bad arguments: unexpected 'c'. "
                                                   "Expected: a (number, required), b (number, required)"),
    (ToolCall("calculator", {"expression": 7}), "tool 'calculator' got bad arguments: 'expression' "
                                                "should be string, got int 7. Expected: expression "
                                                "(string, required)"),
    (ToolCall("divide", {"a": True, "b": 2}), "tool 'divide' got bad arguments: 'a' should be number, "
                                              "got bool True. Expected: a (number, required), "
                                              "b (number, required)"),
])
def test_unknown_tools_and_bad_arguments_say_what_was_expected(call, message):
    tools = ToolSet([calculator, divide])
    assert run(tools, call) == ToolResult(call.name, "Error: " + message, error=True)
    with pytest.raises(AgentError, match=re.escape(message + " (row 0)")):
        run(ToolSet([calculator, divide], on_error="raise"), call, row=0)


def test_a_call_whose_json_could_not_be_parsed_is_an_observation_with_the_expected_form():
    (call,) = parse_tool_calls('<tool_call>{"name": "divide", "arguments": {"a": 1,}}</tool_call>').tool_calls
    result = run(ToolSet([divide]), call)
    assert result.error and result.content.startswith(
        "Error: could not parse the tool call '<tool_call>{\"name\": \"divide\"")
    assert result.content.endswith('; expected <tool_call>{"name": "tool_name", "arguments": '
                                   '{"arg": "value"}}</tool_call>')
    assert "invalid JSON (Expecting property name enclosed in double quotes" in result.content


def test_a_hung_tool_gives_a_timeout_error(release):
    hung = make_hung_sync(release)
    tools = ToolSet([hung, stall], timeout=TIMEOUT)
    for name in ("wait_forever", "stall"):
        assert run(tools, ToolCall(name)) == ToolResult(
            name, f"Error: tool {name!r} did not return within 0.2 s (timeout)", error=True)
    with pytest.raises(AgentError, match=r"tool 'stall' did not return within 0.2 s \(timeout\) \(row 5\)"):
        run(ToolSet([stall], timeout=TIMEOUT, on_error="raise"), ToolCall("stall"), row=5)


# --- parsing ----------------------------------------------------------------------------------

def test_hermes_one_call_several_calls_a_list_and_no_call():
    one = parse_tool_calls('Let me compute.\n<tool_call>\n{"name": "calculator", "arguments": '
                           '{"expression": "2 * 7"}}\n</tool_call>')
    assert one.content == "Let me compute."
    assert one.tool_calls == [ToolCall("calculator", {"expression": "2 * 7"}, text=one.tool_calls[0].text)]
    several = parse_tool_calls('<tool_call>{"name": "divide", "arguments": {"a": 1, "b": 2}}</tool_call>\n'
                               '<tool_call>{"name": "async_add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}'
                               '</tool_call>')
    assert [(c.name, c.arguments) for c in several.tool_calls] == [
        ("divide", {"a": 1, "b": 2}), ("async_add", {"a": 1, "b": 2})]  # arguments as a JSON string too
    listed = parse_tool_calls('<tool_call>[{"name": "ping"}, {"name": "divide", "arguments": '
                              '{"a": 1, "b": 2}}]</tool_call>')  # SmolLM2 writes a list
    assert [(c.name, c.arguments, c.error) for c in listed.tool_calls] == [
        ("ping", {}, None), ("divide", {"a": 1, "b": 2}, None)]
    none = parse_tool_calls("The answer is 14.")
    assert (none.content, none.tool_calls) == ("The answer is 14.", [])


def test_hermes_malformed_calls_are_kept_with_what_was_expected():
    bad_json, no_name, unclosed = (parse_tool_calls(t).tool_calls[0] for t in [
        '<tool_call>{"name": "divide", "arguments": {"a": 1</tool_call>',
        '<tool_call>{"arguments": {}}</tool_call>',
        '<tool_call>{"name": "divide", "arguments": {}}'])
    assert bad_json.error.startswith("could not parse the tool call") and "invalid JSON" in bad_json.error
    assert 'no "name" string' in no_name.error
    assert "no closing </tool_call>" in unclosed.error
    assert all(c.name == "" for c in (bad_json, no_name, unclosed))


@pytest.mark.parametrize("format, text, content, calls", [
    ("qwen3_xml", "Sure.\n<tool_call>\n<function=divide>\n<parameter=a>\n1\n</parameter>\n"
                  "<parameter=b>\n4\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n"
                  "<function=calculator>\n<parameter=expression>\n2 * 7\n</parameter>\n</function>\n"
                  "</tool_call>",
     "Sure.", [("divide", {"a": 1, "b": 4}), ("calculator", {"expression": "2 * 7"})]),
    ("glm4", "<tool_call>divide\n<arg_key>a</arg_key>\n<arg_value>1</arg_value>\n<arg_key>b</arg_key>\n"
             "<arg_value>4</arg_value>\n</tool_call>", "", [("divide", {"a": 1, "b": 4})]),
    ("llama3", '{"name": "divide", "parameters": {"a": 1, "b": 4}}<|eot_id|>', "",
     [("divide", {"a": 1, "b": 4})]),
    ("llama3", "The answer is 14.<|eot_id|>", "The answer is 14.", []),
    ("gpt_oss", '<|channel|>commentary to=functions.divide <|constrain|>json<|message|>{"a": 1, "b": 4}'
                "<|call|>", "", [("divide", {"a": 1, "b": 4})]),
    ("gpt_oss", "<|channel|>analysis<|message|>think<|end|><|start|>assistant<|channel|>final<|message|>"
                "14<|return|>", "14", []),
    ("pythonic", "<|tool_call_start|>[divide(a=1, b=4), calculator(expression='2 * 7')]<|tool_call_end|>",
     "", [("divide", {"a": 1, "b": 4}), ("calculator", {"expression": "2 * 7"})]),
    ("text", 'I will compute. <call> calculator {"expression": "2 * 7"} </call>', "I will compute.",
     [("calculator", {"expression": "2 * 7"})]),
    ("text", "<call>ping</call> <call>divide {\"a\": 1, \"b\": 4}", "",  # last </call> eaten by the stop
     [("ping", {}), ("divide", {"a": 1, "b": 4})]),
    ("text", "no call here", "no call here", []),
])
def test_each_format_well_formed(format, text, content, calls):
    turn = parse_tool_calls(text, format)
    assert turn.content == content
    assert [(c.name, c.arguments, c.error) for c in turn.tool_calls] == [(n, a, None) for n, a in calls]


@pytest.mark.parametrize("format, text, why", [
    ("qwen3_xml", "<tool_call>divide</tool_call>", "no <function=NAME>"),
    ("glm4", "<tool_call>divide<arg_key>a</arg_key>", "no closing </tool_call>"),
    ("llama3", '{"name": "divide", "parameters": {"a": 1', "invalid JSON"),
    ("gpt_oss", "to=functions.divide<|channel|>commentary json<|message|>{a: 1}<|call|>", "invalid JSON"),
    ("pythonic", "<|tool_call_start|>[divide(1, 4)]<|tool_call_end|>", "expected name(keyword=literal"),
    ("text", "<call>divide {a: 1}</call>", "arguments are not JSON"),
    ("text", "<call>7up</call>", "no tool name"),
])
def test_each_format_malformed(format, text, why):
    (call,) = parse_tool_calls(text, format).tool_calls
    assert why in call.error and call.error.startswith("could not parse the tool call")


def test_unknown_format_is_an_error():
    with pytest.raises(AgentError, match="tool-call format 'xml': expected one of qwen3_xml, glm4"):
        parse_tool_calls("x", "xml")


def test_a_qwen_template_expresses_tools_and_writes_hermes(qwen_tokenizer):
    check_tool_template(qwen_tokenizer)
    assert detect_format(qwen_tokenizer) == "hermes"
    prompt = qwen_tokenizer.apply_chat_template([{"role": "user", "content": "2 * 7?"}],
                                                tools=ToolSet([calculator]).schemas, tokenize=False)
    assert '"name": "calculator"' in prompt and "Evaluates an arithmetic expression." in prompt


def test_a_template_without_tools_is_an_error_that_names_the_text_protocol():
    from rlhf_ppo.tasks.tiny import build_word_tokenizer

    tiny = build_word_tokenizer()
    with pytest.raises(AgentError, match=r"apply_chat_template\(tools=\.\.\.\) does not render the tool "
                                         r"schemas\. Use the text protocol \(tool-call format 'text'"):
        check_tool_template(tiny)
    tiny.chat_template = None
    with pytest.raises(AgentError, match="the tokenizer has no chat template"):
        detect_format(tiny)


def test_a_template_that_drops_tool_messages_is_an_error(qwen_tokenizer):
    """Renders the schemas and the calls but drops the tool messages (as Phi-3 and Cohere2 do)."""
    import copy

    tok = copy.deepcopy(qwen_tokenizer)
    tok.chat_template = QWEN2_5_TEMPLATE.replace("{{- message.content }}\n", "")
    with pytest.raises(AgentError, match="the chat template drops role 'tool' messages"):
        check_tool_template(tok)


def test_results_rendered_back_with_the_qwen_template_continue_the_conversation(qwen_tokenizer):
    """prompt + the model's turn + chat_tool_suffix == the template's rendering of the whole
    conversation (assistant tool calls, tool messages, the next assistant header)."""
    tools = ToolSet([calculator, divide])
    messages = [{"role": "user", "content": "What is 2 * 7, and 1 / 4?"}]
    prompt = qwen_tokenizer.apply_chat_template(messages, tools=tools.schemas, tokenize=False,
                                                add_generation_prompt=True)
    model_turn = ('<tool_call>\n{"name": "calculator", "arguments": {"expression": "2 * 7"}}\n</tool_call>\n'
                  '<tool_call>\n{"name": "divide", "arguments": {"a": 1, "b": 4}}\n</tool_call><|im_end|>')
    turn = parse_tool_calls(model_turn.removesuffix("<|im_end|>"))
    results = [run(tools, c) for c in turn.tool_calls]
    suffix = chat_tool_suffix(qwen_tokenizer, results)
    assert suffix == ("\n<|im_start|>user\n<tool_response>\n14\n</tool_response>\n<tool_response>\n0.25\n"
                      "</tool_response><|im_end|>\n<|im_start|>assistant\n")
    whole = qwen_tokenizer.apply_chat_template(
        messages + [assistant_message(turn), *tool_messages(results)], tools=tools.schemas, tokenize=False,
        add_generation_prompt=True)
    assert prompt + model_turn + suffix == whole


def test_results_rendered_back_with_the_text_protocol():
    turn = parse_tool_calls('<call> calculator {"expression": "2 * 7"}', "text")
    results = [run(ToolSet([calculator]), c) for c in turn.tool_calls]
    assert TEXT_PROTOCOL.stop_strings == ("</call>",)
    assert TEXT_PROTOCOL.render_results(results) == " <result> 14 </result> "
    error = ToolResult("sqrt", "Error: unknown tool 'sqrt'; available tools: calculator", error=True)
    assert TEXT_PROTOCOL.render_results([error]) == (" <result> Error: unknown tool 'sqrt'; available "
                                                     "tools: calculator </result> ")


# --- environments: TRL's environment_factory --------------------------------------------------

class IncrementEnv:
    """TRL's docs example (docs/source/grpo_trainer.md, "Providing an external dataset"), as a
    TRL user writes it."""

    def reset(self, target, **kwargs) -> None:  # the row's `target` column arrives as a keyword argument
        self.counter = 0
        self.target = target

    def get_reward(self) -> float:
        return float(self.counter == self.target)

    def increment(self, step: int) -> int:
        """
        Increment the internal counter.

        Args:
            step: Value to add to the counter.

        Returns:
            The updated counter value.
        """
        self.counter += step
        return self.counter


class PromptingEnv:
    """reset returns text to append to the prompt; an async tool and an async get_reward."""

    def reset(self, **kwargs) -> str:
        self.calls = 0
        return f" Use the tool on {kwargs['word']}."

    async def echo(self, text: str) -> str:
        """
        Echoes text.

        Args:
            text: The text.
        """
        self.calls += 1
        return text

    async def get_reward(self) -> float:
        return float(self.calls)

    def _helper(self) -> None:  # private: not a tool
        pass


def test_trl_environment_factory_class_runs_unchanged():
    rows = [{"prompt": [{"role": "user", "content": "Increment the counter to 3."}], "target": 3},
            {"prompt": [{"role": "user", "content": "Increment the counter to 2."}], "target": 2}]
    envs = [IncrementEnv() for _ in rows]  # one instance per rollout
    assert [m.__name__ for m in environment_tools(envs[0])] == ["increment"]
    toolsets = [environment_toolset(env, [calculator]) for env in envs]
    assert toolsets[0].names == ["calculator", "increment"]
    with AgentRunner(timeout=1.0) as runner:
        assert runner.reset_tool_environments(envs, rows) == [None, None]
        turns = [parse_tool_calls('<tool_call>{"name": "increment", "arguments": {"step": 1}}</tool_call>'
                                  '<tool_call>{"name": "increment", "arguments": {"step": 2}}</tool_call>'),
                 parse_tool_calls('<tool_call>{"name": "increment", "arguments": {"step": 5}}</tool_call>')]
        results = runner.run_tool_calls(toolsets, [t.tool_calls for t in turns])
        # within a row, in order (1 then 1+2); each row its own instance
        assert [[r.content for r in rs] for rs in results] == [["1", "3"], ["5"]]
        assert runner.get_rewards(envs) == [1.0, 0.0]


def test_reset_text_async_tools_and_async_get_reward():
    envs = [PromptingEnv(), PromptingEnv(), IncrementEnv()]
    with AgentRunner(timeout=1.0) as runner:
        assert runner.reset_tool_environments(envs[:2], [{"word": "cat"}, {"word": "dog"}]) == [
            " Use the tool on cat.", " Use the tool on dog."]
        toolsets = [environment_toolset(env) for env in envs[:2]]
        assert toolsets[0].names == ["echo"]
        results = runner.run_tool_calls(toolsets, [[ToolCall("echo", {"text": "a"})] * 2, []])
        assert results == [[ToolResult("echo", "a")] * 2, []]
        envs[2].reset(target=1)
        assert runner.get_rewards(envs + [object()]) == [2.0, 0.0, 0.0, None]


def test_bad_tool_environments_name_the_class_and_row():
    class NoReset:
        def act(self) -> None:
            """
            Acts.
            """

    class NumberReset(IncrementEnv):
        def reset(self, **kwargs):
            return 42

    class TextReward(IncrementEnv):
        def get_reward(self):
            return "good"

    with AgentRunner(timeout=1.0) as runner:
        with pytest.raises(AgentError, match=r"environment NoReset: expected a callable `reset\(\*\*row\)`"):
            runner.reset_tool_environments([NoReset()], [{}])
        with pytest.raises(AgentError, match=r"environment NumberReset.reset \(row 1\) returned int 42; "
                                             "expected a string to append to the conversation, or None"):
            runner.reset_tool_environments([IncrementEnv(), NumberReset()], [{"target": 1}] * 2)
        env = TextReward()
        env.reset(target=1)
        with pytest.raises(AgentError, match=r"environment TextReward.get_reward \(row 7\) returned reward "
                                             "str 'good'; expected a number or None"):
            runner.get_rewards([env], row_ids=[7])


# --- environments: multi-turn -----------------------------------------------------------------

class GuessEnv:
    """A guessing game: the model guesses a number; the environment says higher / lower."""

    def reset(self, row: dict) -> str:
        self.secret = row["secret"]
        return "Guess a number from 1 to 10."

    def step(self, text: str) -> tuple[str, float | None, bool]:
        found = re.search(r"\d+", text)
        if found is None:
            return "Say a number.", -0.1, False
        guess = int(found.group())
        if guess == self.secret:
            return "Correct!", 1.0, True
        return ("Higher." if guess < self.secret else "Lower."), None, False


class AsyncGuessEnv(GuessEnv):
    async def reset(self, row: dict) -> str:
        await asyncio.sleep(0)
        return GuessEnv.reset(self, row)

    async def step(self, text: str) -> tuple[str, float | None, bool]:
        await asyncio.sleep(0)
        return GuessEnv.step(self, text)


@pytest.mark.parametrize("env_class", [GuessEnv, AsyncGuessEnv])
def test_guessing_game_episodes(env_class):
    assert isinstance(env_class(), MultiTurnEnvironment)
    episodes = [Episode(env_class(), {"secret": 7}, row_id=0), Episode(env_class(), {"secret": 2}, row_id=1)]
    with AgentRunner(timeout=1.0, max_turns=5) as runner:
        assert runner.reset_episodes(episodes) == ["Guess a number from 1 to 10."] * 2
        first = runner.step_episodes(episodes, ["5", "2"])
        assert [(r.observation, r.reward, r.done) for r in first] == [("Higher.", None, False),
                                                                      ("Correct!", 1.0, True)]
        second = runner.step_episodes(episodes[:1], ["I think 7"])
        assert (second[0].observation, second[0].reward, second[0].done) == ("Correct!", 1.0, True)
    assert [(e.turns, e.done, e.truncated, e.rewards) for e in episodes] == [
        (2, True, False, [None, 1.0]), (1, True, False, [1.0])]
    with pytest.raises(AgentError, match=r"rows \[1\]: step called on an episode that has ended"):
        runner.step_episodes(episodes[1:], ["3"])


@pytest.mark.parametrize("value, message", [
    (3.0, "returned float 3.0; expected a tuple (observation: str, reward: float | None, done: bool)"),
    (("ok", 1.0), "returned tuple ('ok', 1.0); expected a tuple"),
    ((None, 1.0, True), "returned observation NoneType None; expected a tuple"),
    (("ok", "1", True), "returned reward str '1'; expected a number or None"),
    (("ok", 1.0, 1), "returned done int 1; expected a tuple"),
])
def test_a_step_of_the_wrong_type_names_the_class_row_and_what_was_expected(value, message):
    class BadStep(GuessEnv):
        def step(self, text):
            return value

    episodes = [Episode(GuessEnv(), {"secret": 1}, 0), Episode(BadStep(), {"secret": 1}, 4)]
    with AgentRunner(timeout=1.0) as runner:
        runner.reset_episodes(episodes)
        with pytest.raises(AgentError) as info:
            runner.step_episodes(episodes, ["5", "5"])
    assert str(info.value).startswith("environment BadStep.step (row 4) ")
    assert message in str(info.value)


def test_an_episode_that_never_ends_is_cut_at_the_turn_limit():
    class Endless(GuessEnv):
        def step(self, text):
            return "Again.", 0.0, False

    episode = Episode(Endless(), {"secret": 1}, row_id=2)
    with AgentRunner(timeout=1.0, max_turns=2) as runner:
        runner.reset_episodes([episode])
        assert runner.step_episodes([episode], ["1"])[0].done is False
        last = runner.step_episodes([episode], ["1"])[0]
    assert (last.done, last.truncated, episode.done, episode.truncated, episode.turns) == (True, True, True,
                                                                                          True, 2)
    episode = Episode(Endless(), {"secret": 1}, row_id=2)
    with AgentRunner(timeout=1.0, max_turns=1, on_turn_limit="raise") as runner:
        with pytest.raises(AgentError, match=r"environment Endless.step \(row 2\) did not end the "
                                             r"episode within max_turns=1 turns; expected step\(\) to "
                                             r"return done=True"):
            runner.step_episodes([episode], ["1"])


def test_a_hung_environment_gives_a_timeout_error_naming_it(release):
    class HungSync(GuessEnv):
        def step(self, text):
            release.wait(10)
            return "late", None, True

    class HungAsync(GuessEnv):
        async def reset(self, row):
            await asyncio.sleep(10)

    with AgentRunner(timeout=TIMEOUT) as runner:
        with pytest.raises(AgentError, match=r"environment HungAsync.reset \(row 0\) did not return within "
                                             r"0.2 s; expected it to return within the timeout per call"):
            runner.reset_episodes([Episode(HungAsync(), {}, 0)])
        episode = Episode(HungSync(), {"secret": 1}, 3)
        runner.reset_episodes([episode])
        with pytest.raises(AgentError, match=r"environment HungSync.step \(row 3\) did not return "
                                             r"within 0.2 s"):
            runner.step_episodes([episode], ["1"])


# --- concurrency: asserted by events, not wall clock ------------------------------------------

class Rendezvous(GuessEnv):
    """Row 0's step waits for row 1's step to have started: sequential steps would time out."""

    def __init__(self, started: asyncio.Event | None = None, waits: bool = False):
        self.started, self.waits = started, waits

    async def step(self, text):
        if self.waits:
            await self.started.wait()
        else:
            self.started.set()
        return "ok", None, True


def test_async_environments_step_concurrently():
    with AgentRunner(timeout=1.0) as runner:
        started = asyncio.Event()
        episodes = [Episode(Rendezvous(started, waits=True), {}, 0), Episode(Rendezvous(started), {}, 1)]
        results = runner.step_episodes(episodes, ["a", "b"])
    assert [r.observation for r in results] == ["ok", "ok"]


def test_sync_environments_and_tools_run_in_threads_concurrently():
    barrier = threading.Barrier(2, timeout=1.0)  # both calls must be inside at the same time

    class Meeting(GuessEnv):
        def step(self, text):
            barrier.wait()
            return "met", None, True

    def meet(name: str) -> str:
        """
        Waits for the other row's call.

        Args:
            name: Who arrives.
        """
        barrier.wait()
        return name

    with AgentRunner(timeout=2.0) as runner:
        results = runner.step_episodes([Episode(Meeting(), {}, 0), Episode(Meeting(), {}, 1)], ["a", "b"])
        assert [r.observation for r in results] == ["met", "met"]
        barrier.reset()
        tools = ToolSet([meet], on_error="raise")
        out = runner.run_tool_calls([tools, tools], [[ToolCall("meet", {"name": "x"})],
                                                     [ToolCall("meet", {"name": "y"})]])
        assert out == [[ToolResult("meet", "x")], [ToolResult("meet", "y")]]


def test_an_environment_that_raises_is_an_error_naming_class_method_row_and_line():
    """An environment's own exception reaches the user as an AgentError: the class, the method,
    the row, the exception and the line of the environment's code (a call that did not fit the
    signature: where the method is defined, and TRL's reset(**row) convention)."""
    class NoKwargs:
        def reset(self):
            return None

    class Crashes:
        def reset(self, row):
            return None

        def step(self, text):
            return {"a": 1}["b"]  # KeyError inside the environment's code

    with AgentRunner(timeout=1.0) as runner:
        with pytest.raises(AgentError, match=r"environment NoKwargs.reset \(row 1\) raised TypeError: .*"
                           r"unexpected keyword argument 'prompt' \(defined at .*test_agents.py:\d+\); "
                           r"expected reset\(\*\*row\) to accept the row's columns as keywords"):
            runner.reset_tool_environments([IncrementEnv(), NoKwargs()], [{"target": 1}, {"prompt": "p"}])
        episodes = [Episode(Crashes(), {"prompt": "p"}, 3)]
        runner.reset_episodes(episodes)
        with pytest.raises(AgentError, match=r"environment Crashes.step \(row 3\) raised KeyError: 'b' "
                                             r"at .*test_agents.py:\d+ in step"):
            runner.step_episodes(episodes, ["hi"])


def test_numpy_rewards_and_done_flags_are_accepted():
    """A gymnasium-style environment returns numpy scalars: np.float32 rewards and np.bool_ flags."""
    import numpy as np

    class NumpyEnv(GuessEnv):
        def step(self, text):
            return "ok", np.float32(0.5), np.bool_(True)

    episodes = [Episode(NumpyEnv(), {"secret": 1}, 0)]
    with AgentRunner(timeout=1.0) as runner:
        runner.reset_episodes(episodes)
        (result,) = runner.step_episodes(episodes, ["5"])
    assert (result.reward, result.done) == (0.5, True) and type(result.done) is bool
