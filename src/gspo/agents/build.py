"""The agent side of the assembly point: :func:`gspo.trainer.build.build` calls these for a task whose
``environment`` is set, in place of the single-turn ``Collector`` and ``Evaluator``."""

from __future__ import annotations

from gspo import distributed as dist
from gspo.agents.collect import ADVANTAGES, EpisodeCollector, EpisodeEvaluator
from gspo.agents.env import ToolEnvironment
from gspo.agents.episode import EpisodeRunner
from gspo.agents.format import MessageFormat
from gspo.agents.tools import ToolBox
from gspo.errors import ConfigError

# Without a max_position_embeddings in the model config, episodes stop at this many tokens.
DEFAULT_CONTEXT = 4096


def episode_runner(config, task, engine, render, tokenizer, model) -> EpisodeRunner:
    """The runner for ``task.environment`` with ``config.agent``'s limits."""
    a = config.agent
    if a.max_turns < 0:
        raise ConfigError(f"agent.max_turns={a.max_turns} must be >= 0 (0 = the environment's own limit)")
    if a.tool_timeout_s < 0:
        raise ConfigError(f"agent.tool_timeout_s={a.tool_timeout_s} must be >= 0 (0 = each tool's own)")
    env = task.environment
    if a.tool_timeout_s and isinstance(env, ToolEnvironment):
        env.toolbox = ToolBox(list(env.toolbox.tools.values()), timeout_s=a.tool_timeout_s)
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None) or DEFAULT_CONTEXT
    return EpisodeRunner(engine, env, MessageFormat.for_tokenizer(tokenizer), render.decode,
                         tokenizer.pad_token_id, context, max_turns=a.max_turns,
                         record_routing=config.moe.routing_replay == "r3")  # R3: the engine's experts, stitched


def agent_collector(config, runner: EpisodeRunner, render, rewards, params) -> EpisodeCollector:
    """The :class:`EpisodeCollector` for a training run, after checking what agents do not support yet."""
    from gspo.algorithms.catalogue import SPECS

    a = config.agent
    if a.advantages not in ADVANTAGES:
        raise ConfigError(f"agent.advantages={a.advantages!r} is not one of {', '.join(ADVANTAGES)}")
    if a.advantages == "turn" and not SPECS[config.algorithm].token_advantages:
        takes = ", ".join(name for name, spec in SPECS.items() if spec.token_advantages)
        raise ConfigError(f"agent.advantages=turn needs an objective that takes (B, T) advantages ({takes}); "
                          f"algorithm={config.algorithm} takes one per response: set agent.advantages=episode")
    if config.loss.overlong_buffer:
        raise ConfigError("loss.overlong_buffer (DAPO's overlong shaping) is per response; with agent tasks "
                          "set loss.overlong_buffer=0")
    return EpisodeCollector(runner, render, rewards, params, config.rollout.group_size, config.advantage_scale,
                            config.reward.none_policy, advantages=a.advantages,
                            sum_over_processes=dist.all_reduce_sum)


def agent_evaluator(config, runner: EpisodeRunner, render, rewards) -> EpisodeEvaluator:
    return EpisodeEvaluator(runner, render, rewards, config.rollout.max_new_tokens,
                            none_policy=config.reward.none_policy)
