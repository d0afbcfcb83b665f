"""The environment interface: an episode starts from a dataset row, the policy and the environment
take turns, the reward comes at the end (and optionally per turn).

Plain Python classes, like rewards. An :class:`Environment` sees text only: the decoded text of each
model turn in, a message (tool results, feedback, an observation) out. It never sees or makes token
ids: the episode runner (:mod:`gspo.agents.episode`) keeps the sampled ids as they were sampled and
tokenizes the environment's messages with a :class:`~gspo.agents.format.MessageFormat`.

The episode's reward is the task's rewards (``reward.functions``) scored on :meth:`Environment.answer`
(by default the last model turn), plus the per-turn rewards the environment returned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gspo.agents.tools import Tool, ToolBox, parse_tool_calls
from gspo.tasks.base import Row

DEFAULT_MAX_TURNS = 4


@dataclass
class Reply:
    """The environment's answer to one model turn."""

    message: str | None = None  # what the model sees next; None with done=True ends the episode
    done: bool = False
    reward: float = 0.0  # this turn's reward (added to the episode's), 0 for most environments


@dataclass
class EpisodeState:
    """One episode's state, owned by the environment between turns (``data`` is the environment's own)."""

    row: Row
    turns: list[str] = field(default_factory=list)  # decoded model turns so far
    tool_calls: int = 0
    tool_calls_ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # error kind -> count
    data: dict[str, Any] = field(default_factory=dict)


class Environment:
    """Base class: override :meth:`step` (and :meth:`reset` / :meth:`answer` when needed)."""

    max_turns: int = DEFAULT_MAX_TURNS  # model turns per episode (agent.max_turns overrides)

    def reset(self, row: Row) -> EpisodeState:
        """A fresh episode for ``row`` (the prompt itself is rendered by the task's renderer)."""
        return EpisodeState(row)

    def step(self, state: EpisodeState, text: str) -> Reply:
        """The environment's reply to the model turn ``text`` (already appended to ``state.turns``)."""
        raise NotImplementedError

    def answer(self, state: EpisodeState) -> str:
        """The text the task's rewards score: the last model turn."""
        return state.turns[-1] if state.turns else ""


class ToolEnvironment(Environment):
    """Tool use: a turn with ``<tool_call>`` spans gets their results; a turn without one is the answer."""

    def __init__(self, tools: list[Tool] | ToolBox, *, max_turns: int = DEFAULT_MAX_TURNS,
                 max_message_chars: int | None = None) -> None:
        """``max_message_chars``: clip each tool answer to this many characters (small contexts)."""
        self.toolbox = tools if isinstance(tools, ToolBox) else ToolBox(tools)
        self.max_turns = max_turns
        self.max_message_chars = max_message_chars

    def step(self, state: EpisodeState, text: str) -> Reply:
        calls = parse_tool_calls(text)
        if not calls:
            return Reply(done=True)
        results = []
        for call in calls:
            result = self.toolbox.run(call)
            state.tool_calls += 1
            state.tool_calls_ok += int(result.ok)
            if not result.ok:
                state.errors[result.error_kind] = state.errors.get(result.error_kind, 0) + 1
            results.append(result.content[: self.max_message_chars])
        return Reply(message="\n".join(results))
