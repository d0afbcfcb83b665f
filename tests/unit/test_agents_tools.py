"""Tools: schemas from signatures, the <tool_call> parser, and every failure as a model-visible error."""

from __future__ import annotations

import time
from typing import Literal

import pytest

from gspo.agents.calculator import calc
from gspo.agents.env import ToolEnvironment
from gspo.agents.tools import Tool, ToolBox, ToolCall, function_schema, parse_tool_calls


def lookup(city: str, units: Literal["c", "f"] = "c", days: int | None = None, tags: list[str] = ()) -> str:
    """Look up the weather.

    Args:
        city: the city's name.
        units: degrees Celsius or Fahrenheit.
    """
    return f"{city}:{units}"


def slow(seconds: float) -> str:
    """Sleep, then answer."""
    time.sleep(seconds)
    return "woke"


def boom() -> str:
    """Always fails."""
    raise ValueError("kaput")


def test_schema_from_signature_and_docstring():
    tool = Tool.from_function(lookup)
    assert tool.description == "Look up the weather."
    params = tool.parameters
    assert params["required"] == ["city"]
    assert params["properties"]["city"] == {"type": "string", "description": "the city's name."}
    assert params["properties"]["units"]["enum"] == ["c", "f"]
    assert params["properties"]["days"] == {"type": "integer"}
    assert params["properties"]["tags"] == {"type": "array", "items": {"type": "string"}}
    assert tool.schema()["function"]["name"] == "lookup"
    assert function_schema(calc)["properties"]["expr"]["type"] == "string"


def test_parse_well_formed_calls_in_order():
    text = ('ok <tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call> and '
            '<tool_call>\n{"name": "b", "arguments": "{\\"y\\": 2}"}\n</tool_call>')
    assert parse_tool_calls(text) == [ToolCall("a", {"x": 1}), ToolCall("b", {"y": 2})]
    assert parse_tool_calls("just an answer") == []


@pytest.mark.parametrize("text, fragment", [
    ('<tool_call>{"name": "calc", "arguments": {</tool_call>', "invalid json"),
    ("<tool_call>[1, 2]</tool_call>", "expected"),
    ('<tool_call>{"arguments": {}}</tool_call>', "expected"),
    ('<tool_call>{"name": "calc", "arguments": 3}</tool_call>', "arguments must be an object"),
    ('<tool_call>{"name": "calc", "arguments": {}}', "without"),
])
def test_malformed_calls_become_errors(text, fragment):
    calls = parse_tool_calls(text)
    assert calls and calls[-1].error and fragment in calls[-1].error
    result = ToolBox([calc]).run(calls[-1])
    assert result.error_kind == "malformed" and result.content.startswith("error:")


@pytest.mark.parametrize("call, kind, fragment", [
    (ToolCall("nope", {}), "unknown_tool", "unknown tool 'nope'"),
    (ToolCall("calc", {"wrong": "1"}), "bad_arguments", "bad arguments"),
    (ToolCall("calc", {}), "bad_arguments", "bad arguments"),
    (ToolCall("calc", {"expr": "2**99999"}), "exception", "ValueError"),
    (ToolCall("boom", {}), "exception", "kaput"),
])
def test_failures_become_model_visible_errors(call, kind, fragment):
    result = ToolBox([calc, boom]).run(call)
    assert result.error_kind == kind and fragment in result.content and result.content.startswith("error:")


@pytest.mark.parametrize("isolate", [False, True])
def test_hanging_tool_is_cut_at_its_timeout(isolate):
    box = ToolBox([Tool.from_function(slow, timeout_s=0.3, isolate=isolate)])
    t0 = time.perf_counter()
    result = box.run(ToolCall("slow", {"seconds": 30}))
    assert time.perf_counter() - t0 < 3.0
    assert result.error_kind == "timeout" and "timed out after 0.3s" in result.content
    assert box.run(ToolCall("slow", {"seconds": 0})).content == "woke"  # the box still works


def test_isolated_tool_returns_values_and_errors():
    box = ToolBox([Tool.from_function(calc, isolate=True), Tool.from_function(boom, isolate=True)])
    assert box.run(ToolCall("calc", {"expr": "347*28"})).content == "9716"
    assert "kaput" in box.run(ToolCall("boom", {})).content


def test_box_wide_timeout_overrides_each_tool():
    box = ToolBox([Tool.from_function(slow, timeout_s=60)], timeout_s=0.2)
    assert box.run(ToolCall("slow", {"seconds": 5})).error_kind == "timeout"


def test_tool_environment_answers_every_call_and_counts():
    env = ToolEnvironment([calc])
    state = env.reset({"prompt": "2*3="})
    reply = env.step(state, '<tool_call>{"name":"calc","arguments":{"expr":"2*3"}}</tool_call>'
                            '<tool_call>{"name":"nope","arguments":{}}</tool_call>')
    assert reply.message == "6\nerror: unknown tool 'nope'; tools: calc" and not reply.done
    assert (state.tool_calls, state.tool_calls_ok, state.errors) == (2, 1, {"unknown_tool": 1})
    assert env.step(state, "6").done


def test_sandboxed_python_tool():
    from gspo.agents.tools import python_tool

    box = ToolBox([python_tool(timeout_s=5)])
    assert box.run(ToolCall("python", {"code": "print(6 * 7)"})).content.strip() == "42"
    failed = box.run(ToolCall("python", {"code": "raise SystemExit(3)"}))
    assert failed.error_kind == "exception" and failed.content.startswith("error:")
