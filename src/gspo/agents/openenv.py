"""Adapter: an OpenEnv environment (``pip install openenv-core``, Meta-PyTorch's OpenEnv) as a gspo
:class:`~gspo.agents.env.Environment`.

Why OpenEnv rather than ``verifiers``: an OpenEnv environment is a Gym-style object, ``reset()`` ->
Observation and ``step(Action)`` -> Observation (with ``done`` and ``reward``), that never calls the
model itself; the trainer keeps the sampling, so gspo's token-in / token-out episode stays exact. Its
core has light dependencies (pydantic, fastapi) that leave torch and transformers alone. The
``verifiers`` environments (0.4) drive the model through an OpenAI-compatible client inside their own
async rollout loop and pull in a large dependency tree (mcp, prime-sandboxes, renderers); adapting
them token-exactly would mean intercepting that client.

Both OpenEnv forms work: the server-side ``Environment`` class run in-process (``step`` returns an
Observation), and an ``EnvClient`` to a running server (``step`` returns a StepResult with
``observation``, ``reward`` and ``done``). The adapter maps the model's turn text to an Action
(``action``), an Observation to the text the model sees next (``observe``), and adds the
environment's rewards to the episode's. One environment instance per episode (``factory``).
"""

from __future__ import annotations

from typing import Any, Callable

from gspo.agents.env import DEFAULT_MAX_TURNS, Environment, EpisodeState, Reply
from gspo.tasks.base import Row


class OpenEnvEnvironment(Environment):
    """An OpenEnv environment (or client) behind gspo's environment interface.

    factory: () -> a fresh OpenEnv ``Environment`` or ``EnvClient`` for one episode.
    action: the model's turn text -> the environment's Action.
    observe: an Observation -> the text the model sees next (default: its ``str``).
    reset_kwargs: row -> keyword arguments of ``reset`` (default: none; e.g. a seed from the row).
    """

    def __init__(self, factory: Callable[[], Any], action: Callable[[str], Any], *,
                 observe: Callable[[Any], str] = str, reset_kwargs: Callable[[Row], dict] | None = None,
                 max_turns: int = DEFAULT_MAX_TURNS) -> None:
        self.factory, self.action, self.observe = factory, action, observe
        self.reset_kwargs = reset_kwargs or (lambda row: {})
        self.max_turns = max_turns

    def reset(self, row: Row) -> EpisodeState:
        state = EpisodeState(row)
        env = self.factory()
        first = env.reset(**self.reset_kwargs(row))
        state.data.update(env=env, reset_observation=_observation(first))  # the prompt comes from the row
        return state

    def step(self, state: EpisodeState, text: str) -> Reply:
        result = state.data["env"].step(self.action(text))
        observation = _observation(result)
        done = bool(getattr(result, "done", False) or getattr(observation, "done", False))
        reward = getattr(result, "reward", None)
        if reward is None:
            reward = getattr(observation, "reward", None)
        state.data["last_observation"] = observation
        if done:
            _close(state.data.get("env"))
        return Reply(message=None if done else self.observe(observation), done=done, reward=float(reward or 0.0))


def _observation(result: Any) -> Any:
    """The Observation of a ``step`` / ``reset`` result (a client's StepResult wraps it)."""
    return getattr(result, "observation", result)


def _close(env: Any) -> None:
    close = getattr(env, "close", None)
    if callable(close):
        close()
