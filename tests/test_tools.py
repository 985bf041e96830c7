"""Tool-call parsing and shaping (pure): the Hermes/Qwen tags, bare calls of a given tool,
OpenAI's message and stream shapes."""

from __future__ import annotations

import json

from specedge.edge.tools import ToolPlan, message, parse_calls, stream_deltas

W = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
PLAN = ToolPlan((W,), "auto")


def test_tagged_calls_are_parsed_and_the_text_before_is_content():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}'
            '\n</tool_call>\n<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>')
    content, calls = parse_calls(text)
    assert content == "Let me check."
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Oslo"}, {}]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    assert len({c["id"] for c in calls}) == 2


def test_bare_json_is_a_call_only_of_a_given_tool():
    bare = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert parse_calls(bare, {"get_weather"})[1][0]["function"]["name"] == "get_weather"
    assert parse_calls(bare, {"other"}) == (bare, [])
    assert parse_calls('{"name": "get_weather", "arguments": 3}', {"get_weather"})[1] == []
    assert parse_calls("<tool_call>{broken</tool_call>") == ("<tool_call>{broken</tool_call>",
                                                             [])


def test_message_and_stream_shapes():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima"}}\n</tool_call>'
    msg, reason = message(text, "stop", PLAN)
    assert reason == "tool_calls" and msg["content"] is None
    assert message(text, "stop", ToolPlan((W,), "none")) == (
        {"role": "assistant", "content": text}, "stop")
    assert message("plain answer", "length", PLAN)[1] == "length"
    deltas, reason = stream_deltas(text, "stop", PLAN)
    assert reason == "tool_calls"
    assert deltas[0]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert json.loads(deltas[1]["tool_calls"][0]["function"]["arguments"]) == {"city": "Lima"}
