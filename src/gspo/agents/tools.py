"""Tools as plain Python functions, the Qwen3-style ``<tool_call>`` format, and calling them safely.

A tool is any function with type hints and a docstring: :meth:`Tool.from_function` derives its JSON
schema (the OpenAI / Hugging Face ``tools=`` format that chat templates render) from the signature.
The model calls a tool by writing, as Qwen3's chat template teaches,

    <tool_call>{"name": "calc", "arguments": {"expr": "347*28"}}</tool_call>

:func:`parse_tool_calls` reads those spans from a model turn's text and :class:`ToolBox` runs them.
Nothing a model writes can crash a run: malformed JSON, an unknown tool, bad arguments, an exception
inside the tool and a timeout each become a short ``error: ...`` message that the model sees as the
tool's answer (:class:`ToolResult` keeps the kind for metrics). Code-executing tools run in gspo's
sandbox (:func:`python_tool`); a plain function runs in a worker thread, cut at its timeout, or, with
``isolate=True``, in a forked process that is killed at its timeout.
"""

from __future__ import annotations

import inspect
import json
import multiprocessing
import re
import threading
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.DOTALL)
DEFAULT_TIMEOUT_S = 5.0
ERROR_KINDS = ("malformed", "unknown_tool", "bad_arguments", "exception", "timeout")
_JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean", list: "array", dict: "object"}


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: a tool name and its keyword arguments (or the parse error)."""

    name: str = ""
    arguments: dict = field(default_factory=dict)
    error: str = ""  # non-empty: the call was malformed; the model is told this


@dataclass(frozen=True)
class ToolResult:
    """What the model sees for one call (``content``) and how it went (``error_kind`` "" = well-formed, ran)."""

    content: str
    error_kind: str = ""

    @property
    def ok(self) -> bool:
        return not self.error_kind


@dataclass(frozen=True)
class Tool:
    """A callable tool with its JSON schema (build one with :meth:`from_function`)."""

    function: Callable[..., Any]
    name: str
    description: str
    parameters: dict  # JSON schema of the keyword arguments
    timeout_s: float = DEFAULT_TIMEOUT_S
    isolate: bool = False  # run in a forked process, killed at the timeout (a thread cannot be killed)

    @classmethod
    def from_function(cls, function: Callable[..., Any], *, name: str | None = None,
                      timeout_s: float = DEFAULT_TIMEOUT_S, isolate: bool = False) -> "Tool":
        description, arg_docs = _parse_docstring(inspect.getdoc(function) or "")
        return cls(function, name or function.__name__, description,
                   function_schema(function, arg_docs), timeout_s, isolate)

    def schema(self) -> dict:
        """The tool as chat templates take it (``tokenizer.apply_chat_template(..., tools=[...])``)."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


def function_schema(function: Callable[..., Any], arg_docs: dict[str, str] | None = None) -> dict:
    """JSON schema of ``function``'s parameters from its type hints (required = no default)."""
    hints = typing.get_type_hints(function)
    properties, required = {}, []
    for pname, param in inspect.signature(function).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        prop = _json_type(hints.get(pname, str))
        if arg_docs and pname in arg_docs:
            prop["description"] = arg_docs[pname]
        properties[pname] = prop
        if param.default is param.empty:
            required.append(pname)
    return {"type": "object", "properties": properties, "required": required}


def _json_type(hint: Any) -> dict:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        return _json_type(options[0]) if len(options) == 1 else {"anyOf": [_json_type(a) for a in options]}
    if origin in (list, tuple, set):
        return {"type": "array", "items": _json_type(args[0])} if args else {"type": "array"}
    if origin is dict:
        return {"type": "object"}
    return {"type": _JSON_TYPES.get(hint, "string")}


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """(description, {argument: description}) from a Google-style docstring."""
    description = doc.split("\n\n", 1)[0].replace("\n", " ").strip()
    args, in_args = {}, False
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped in ("Args:", "Arguments:", "Parameters:"):
            in_args = True
        elif in_args and (match := re.match(r"(\w+)(?:\s*\(.*?\))?\s*:\s*(.+)", stripped)):
            args[match.group(1)] = match.group(2)
        elif in_args and not stripped:
            in_args = False
    return description, args


def parse_tool_calls(text: str) -> list[ToolCall]:
    """The ``<tool_call>{json}</tool_call>`` spans of a model turn, in order (an empty list: no call).

    A span that is not a JSON object with a string ``name`` and object ``arguments`` (a JSON string
    holding an object is accepted, as some models write it) becomes a call with ``error`` set; so does
    an opening tag without its closing tag.
    """
    calls = []
    for body in _CALL.findall(text):
        calls.append(_parse_one(body))
    if text.count(CALL_OPEN) > text.count(CALL_CLOSE):
        calls.append(ToolCall(error=f"malformed tool call: {CALL_OPEN} without {CALL_CLOSE}"))
    return calls


def _parse_one(body: str) -> ToolCall:
    try:
        value = json.loads(body)
    except json.JSONDecodeError as e:
        return ToolCall(error=f"malformed tool call: invalid json ({e.msg})")
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return ToolCall(error='malformed tool call: expected {"name": ..., "arguments": {...}}')
    arguments = value.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    if not isinstance(arguments, dict):
        return ToolCall(name=value["name"], error="malformed tool call: arguments must be an object")
    return ToolCall(value["name"], arguments)


class ToolBox:
    """Tools by name; :meth:`run` turns one :class:`ToolCall` into a :class:`ToolResult`, never raising."""

    def __init__(self, tools: list[Tool | Callable[..., Any]], *, timeout_s: float | None = None) -> None:
        built = [t if isinstance(t, Tool) else Tool.from_function(t) for t in tools]
        if timeout_s is not None:  # agent.tool_timeout_s: one limit for every tool
            built = [Tool(t.function, t.name, t.description, t.parameters, timeout_s, t.isolate) for t in built]
        self.tools = {t.name: t for t in built}

    def schemas(self) -> list[dict]:
        return [t.schema() for t in self.tools.values()]

    def run(self, call: ToolCall) -> ToolResult:
        if call.error:
            return ToolResult(f"error: {call.error}", "malformed")
        tool = self.tools.get(call.name)
        if tool is None:
            return ToolResult(f"error: unknown tool {call.name!r}; tools: {', '.join(self.tools)}", "unknown_tool")
        try:
            inspect.signature(tool.function).bind(**call.arguments)
        except TypeError as e:
            return ToolResult(f"error: bad arguments for {call.name}: {e}", "bad_arguments")
        runner = _run_in_process if tool.isolate else _run_in_thread
        return runner(tool, call.arguments)


def _run_in_thread(tool: Tool, arguments: dict) -> ToolResult:
    """The call in a daemon thread; at the timeout the episode moves on (the thread is abandoned:
    Python cannot kill a thread, so a tool that may really hang should use ``isolate=True``)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = tool.function(**arguments)
        except BaseException as e:  # noqa: BLE001 - any failure is the model's to see
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True, name=f"gspo-tool-{tool.name}")
    thread.start()
    thread.join(tool.timeout_s)
    if thread.is_alive():
        return ToolResult(f"error: {tool.name} timed out after {tool.timeout_s:g}s", "timeout")
    if "error" in box:
        return ToolResult(f"error: {type(box['error']).__name__}: {box['error']}", "exception")
    return ToolResult(_to_text(box.get("value")))


def _child(conn, function, arguments) -> None:
    try:
        conn.send(("value", function(**arguments)))
    except BaseException as e:  # noqa: BLE001
        conn.send(("error", f"{type(e).__name__}: {e}"))


def _run_in_process(tool: Tool, arguments: dict) -> ToolResult:
    """The call in a forked child process, SIGKILLed at the timeout."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(send, tool.function, arguments), daemon=True)
    process.start()
    send.close()
    try:
        if not receive.poll(tool.timeout_s):
            return ToolResult(f"error: {tool.name} timed out after {tool.timeout_s:g}s", "timeout")
        kind, value = receive.recv()
    except EOFError:
        return ToolResult(f"error: {tool.name} died without an answer", "exception")
    finally:
        if process.is_alive():
            process.kill()
        process.join()
        receive.close()
    if kind == "error":
        return ToolResult(f"error: {value}", "exception")
    return ToolResult(_to_text(value))


def _to_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return str(value)


def python_tool(*, timeout_s: float = DEFAULT_TIMEOUT_S, memory_mb: int = 256) -> Tool:
    """A ``python(code)`` tool that runs the code in :func:`gspo.sandbox.run_sandboxed` (no network,
    resource limits, killed at ``timeout_s``) and answers with its stdout, or its error."""
    from gspo.sandbox import run_sandboxed

    def python(code: str) -> str:
        """Run Python code and return what it prints.

        Args:
            code: a complete Python program; print the result.
        """
        result = run_sandboxed(code, timeout_s=timeout_s, memory_mb=memory_mb)
        if result.timed_out:
            raise TimeoutError(f"the program ran longer than {timeout_s:g}s")
        if not result.ok:
            raise RuntimeError(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else
                               f"exit status {result.returncode}")
        return result.stdout

    # the sandbox enforces the time limit itself; the thread's limit only backs it up
    return Tool.from_function(python, timeout_s=timeout_s + 5.0)
