"""Multi-turn, tool-using episodes in the same trainer and objectives, token-exact (docs/agents.md).

- :mod:`~gspo.agents.env`: the environment interface (:class:`Environment`, :class:`ToolEnvironment`);
- :mod:`~gspo.agents.tools`: tools from plain functions, the ``<tool_call>`` parser, safe calls;
- :mod:`~gspo.agents.format`: environment messages -> tokens, where a model turn ends;
- :mod:`~gspo.agents.episode`: episodes through any rollout engine, assembled as one sequence;
- :mod:`~gspo.agents.collect`: episodes -> ScoredBatch (the collector and evaluator the trainer uses);
- :mod:`~gspo.agents.calculator` / :mod:`~gspo.agents.warm_start`: the embedded agent task and its model;
- :mod:`~gspo.agents.openenv`: the adapter for OpenEnv environments.
"""

from gspo.agents.env import Environment, EpisodeState, Reply, ToolEnvironment
from gspo.agents.tools import Tool, ToolBox, ToolCall, ToolResult, parse_tool_calls, python_tool

__all__ = ["Environment", "EpisodeState", "Reply", "Tool", "ToolBox", "ToolCall", "ToolEnvironment", "ToolResult",
           "parse_tool_calls", "python_tool"]
