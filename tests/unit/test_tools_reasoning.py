"""Tool calls and reasoning traces: read into one message shape, rendered by the template, masked right."""

import json
import re

import pytest

from sftkit.data.render import IGNORE, Renderer, build_examples
from sftkit.data.sources import DataError, Normaliser

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
CALL = {"role": "assistant", "content": "", "tool_calls": [
    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
TOOL_CHAT = {"tools": TOOLS, "messages": [
    {"role": "user", "content": "Weather in Paris?"}, CALL, {"role": "tool", "content": '{"temp": 12}'},
    {"role": "assistant", "content": "It is 12 degrees in Paris."}]}


def row(obj, line=1, **kw):
    return Normaliser("data.jsonl", **kw)(obj, line)


def trained_text(tokenizer, ex):
    return tokenizer.decode([t for t in ex.labels if t != IGNORE])


def test_tool_calls_are_read_in_one_shape_whatever_shape_they_come_in():
    flat = {"messages": [{"role": "user", "content": "Weather in Paris?"},
                         {"role": "assistant", "content": None,
                          "tool_calls": [{"name": "get_weather", "arguments": '{"city": "Paris"}'}]},
                         {"role": "tool", "content": "12"}], "tools": json.dumps(TOOLS)}
    r = row(flat)
    assert r.messages[1] == CALL and r.tools == TOOLS
    share = {"conversations": [{"from": "human", "value": "Weather in Paris?"},
                               {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
                               {"from": "observation", "value": "12"}, {"from": "gpt", "value": "12 degrees."}],
             "tools": json.dumps(TOOLS)}
    r = row(share)
    assert [m["role"] for m in r.messages] == ["user", "assistant", "tool", "assistant"]
    assert r.messages[1]["tool_calls"] == CALL["tool_calls"] and r.tools == TOOLS


@pytest.mark.parametrize("messages, message", [
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "",
                                         "tool_calls": [{"name": "f", "arguments": "{oops"}]}],
     r"data.jsonl:1: messages\[1\].tool_calls\[0\].function.arguments: not JSON"),
    ([{"role": "user", "content": "q"}, {"role": "tool", "content": "12"}],
     r"messages\[1\].role: a tool turn must follow an assistant turn with tool_calls"),
    ([{"role": "user", "content": "q"}, CALL, {"role": "user", "content": "and?"}],
     r"messages\[2\].role: an assistant turn with tool_calls must be followed by the tools' results"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [{"arguments": {}}]}],
     r"messages\[1\].tool_calls\[0\].function.name"),
    ([{"role": "user", "content": "q", "reasoning_content": "x"}, {"role": "assistant", "content": "a"}],
     r"messages\[0\].reasoning_content: only assistant messages carry it"),
])
def test_bad_tool_rows_name_the_file_line_and_field(messages, message):
    with pytest.raises(DataError, match=message):
        row({"messages": messages})


def test_a_template_that_cannot_render_tools_stops_naming_one_that_can(tokenizer):
    with pytest.raises(DataError, match=r"data.jsonl:4: the chat template .* cannot render the tools' definitions or "
                                        r"tool calls .*data.template to qwen3"):
        build_examples([row(TOOL_CHAT, line=4)], Renderer(tokenizer))


def test_calls_are_trained_as_rendered_and_tool_results_never(tokenizer):
    renderer = Renderer(tokenizer, template="qwen3")
    ex = renderer.render(row(TOOL_CHAT))
    text = tokenizer.decode(ex.input_ids)
    assert '"name": "get_weather"' in text.split("<|im_end|>")[0]  # the definitions, in the system turn
    trained = trained_text(tokenizer, ex)
    assert trained == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
                       "It is 12 degrees in Paris.<|im_end|>")
    assert "tool_response" in text and "temp" not in trained
    prompt = renderer.prompt_ids(TOOL_CHAT["messages"][:1], tools=TOOLS)  # generation sees the tools too
    assert ex.input_ids[: len(prompt)] == prompt


@pytest.mark.parametrize("template", ["auto", "qwen3"])
@pytest.mark.parametrize("given", ["field", "inline"])
def test_reasoning_is_trained_masked_or_dropped(tokenizer, template, given):
    reply = ({"role": "assistant", "content": "42.", "reasoning_content": "Six times seven."} if given == "field"
             else {"role": "assistant", "content": "<think>\nSix times seven.\n</think>\n\n42."})
    data = {"messages": [{"role": "user", "content": "What is 6 x 7?"}, reply]}
    out = {}
    for mode in ("train", "mask", "drop"):
        ex = Renderer(tokenizer, template=template, reasoning=mode).render(row(data))
        out[mode] = (tokenizer.decode(ex.input_ids), trained_text(tokenizer, ex))
    end = "<|im_end|>"
    assert "<think>\nSix times seven.\n</think>\n\n42." in out["train"][0]
    assert out["train"][1] == f"<think>\nSix times seven.\n</think>\n\n42.{end}"
    assert out["mask"][0] == out["train"][0] and out["mask"][1] == f"42.{end}"  # in the text, not trained
    assert "Six" not in out["drop"][0] and out["drop"][1] == f"42.{end}"


def test_a_template_that_drops_earlier_reasoning_gets_one_example_per_turn_each_as_generated(tokenizer):
    renderer = Renderer(tokenizer, template="qwen3")
    msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4.", "reasoning_content": "Add."},
            {"role": "user", "content": "Times 3?"}, {"role": "assistant", "content": "12.", "reasoning_content": "4*3."}]
    exs, stats = build_examples([row({"messages": msgs}, line=9)], renderer)
    assert len(exs) == 2 and stats.expanded == 1 and stats.per_turn == 2 and stats.kept == 1
    assert "1 rows with reasoning made into 2 examples, one per trained turn" in stats.summary("train")
    for k, (ex, turn) in enumerate(zip(exs, (1, 3))):
        # The text of each example is what the template writes when that turn is the one generated...
        assert ex.input_ids == renderer._encode(renderer._text(msgs[: turn + 1]))
        prompt = renderer.prompt_ids(msgs[:turn])
        assert ex.input_ids[: len(prompt)] == prompt and all(t == IGNORE for t in ex.labels[: len(prompt)])
        # ...and it trains that turn alone, its reasoning with it.
        want = ["<think>\nAdd.\n</think>\n\n4.<|im_end|>", "<think>\n4*3.\n</think>\n\n12.<|im_end|>"][k]
        assert trained_text(tokenizer, ex) == want
    plain = [{"role": m["role"], "content": m["content"]} for m in msgs]  # no reasoning: one rendering serves both
    exs, stats = build_examples([row({"messages": plain})], renderer)
    assert len(exs) == 1 and stats.expanded == 0 and trained_text(tokenizer, exs[0]) == "4.<|im_end|>12.<|im_end|>"


def test_a_bad_reasoning_mode_is_refused(tokenizer):
    with pytest.raises(DataError, match="data.reasoning: 'hide' is not one of train, mask, drop"):
        Renderer(tokenizer, reasoning="hide")


def test_tool_calls_are_parsed_from_a_reply_and_scored_by_name_and_arguments():
    from sftkit.evaluate import reference_reply
    from sftkit.metrics import parse_tool_calls, tool_call

    reply = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
             '<tool_call>{"name": "get_time", "arguments": "{\\"city\\": \\"Oslo\\"}"}</tool_call><tool_call>oops</tool_call>')
    calls, bad = parse_tool_calls(reply)
    assert calls == [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {"city": "Oslo"}}]
    assert bad == ["oops"]
    ref = reference_reply(CALL)  # a reference turn's calls, as text the metric parses
    assert parse_tool_calls(ref)[0] == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    assert tool_call('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', ref) == 1.0
    assert tool_call('<tool_call>{"name": "get_weather", "arguments": {"city": "Lima"}}</tool_call>', ref) == 0.0
    assert tool_call('<tool_call>{"name": "get_time", "arguments": {"city": "Paris"}}</tool_call>', ref) == 0.0
    assert tool_call("It is sunny.", ref) == 0.0 and tool_call("It is sunny.", "Sunny.") == 1.0
    assert tool_call(reply, ref) == 0.0  # an extra call, and a block that is not one


def test_generate_gives_the_model_the_tools_and_parses_its_calls(tokenizer, tmp_path, monkeypatch):
    from sftkit.generate import generate_file, read_prompts

    from ..conftest import make_tiny_llama, write_jsonl

    own = [{"type": "function", "function": {"name": "get_time"}}]
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Weather in Paris?"},
                                              {"prompt": "Time in Oslo?", "tools": json.dumps(own)}])
    renderer = Renderer(tokenizer, template="qwen3")
    given = []
    real = renderer.prompt_ids
    monkeypatch.setattr(renderer, "prompt_ids", lambda m, tools=None: given.append(tools) or real(m, tools))
    generate_file(make_tiny_llama(tokenizer).eval(), renderer, read_prompts(str(inp)), str(tmp_path / "out.jsonl"),
                  4, 2, tools=TOOLS)
    assert given == [TOOLS, own]  # --tools for a row without its own; a row's `tools` column wins
    out = [json.loads(x) for x in open(tmp_path / "out.jsonl")]
    assert all(isinstance(r["tool_calls"], list) for r in out)  # the calls parsed from each reply
    assert "get_weather" in tokenizer.decode(real([{"role": "user", "content": "q"}], TOOLS))


def test_a_bad_tools_file_or_column_stops_before_the_model_loads(tmp_path):
    from sftkit.config import ConfigError
    from sftkit.generate import read_prompts, read_tools

    bad = tmp_path / "tools.json"
    bad.write_text('{"name": ')
    with pytest.raises(ConfigError, match="--tools: .*tools.json:1: not JSON"):
        read_tools(str(bad))
    bad.write_text('[{"description": "no name"}]')
    with pytest.raises(ConfigError, match=r"--tools: .*tools\[0\]: a function definition needs a name"):
        read_tools(str(bad))
    rows = tmp_path / "in.jsonl"
    rows.write_text('{"prompt": "q", "tools": "[oops"}\n')
    with pytest.raises(DataError, match=r"in.jsonl:1: tools: not JSON"):
        read_prompts(str(rows))


def test_data_inspect_marks_the_call_trained_and_the_tool_result_not(tokenizer):
    """`sftkit data inspect` (and the dashboard's Data page, from the same labels) shows a tool row
    as trained: the call and the final answer are marked, the tool's result is plain."""
    from sftkit.data.quality import highlight

    shown = highlight(Renderer(tokenizer, template="qwen3").render(row(TOOL_CHAT)), tokenizer, color=False)
    marked = re.findall(r"\[\[(.*?)\]\]", shown, flags=re.S)
    assert any('"name": "get_weather"' in m for m in marked) and any("12 degrees" in m for m in marked)
    assert "tool_response" in shown and not any("tool_response" in m or "temp" in m for m in marked)
