"""Multi-turn episodes, token-in / token-out, through any :class:`~gspo.rollout.base.RolloutEngine`.

Each turn is one ``engine.generate`` call on the current contexts (the prompt's ids followed by every
token of the episode so far), for the episodes still running. The episode is then one token sequence
in the trainer's layout ``[left-padded prompt | completion segment]``, where the completion segment
is model turn 1, environment message 1, model turn 2, ... (right-padded):

- the model's tokens are the sampled ids, exactly (a turn may be cut after the tool-call marker, see
  :mod:`gspo.agents.format`), never re-tokenized text; environment tokens are the tokenized messages;
- ``completion_mask`` is True on the model's tokens only (loss, sequence ratio, length normalisation),
  ``completion_attention`` on every real token (the model attended to the environment's messages);
- ``logprobs`` are the sampler's on the model's tokens and 0 on the environment's.

Reproducible and split-invariant: row ``i``'s turn ``k`` is sampled with the seed
:func:`turn_seed` (``row_seeds[i]``, ``k``), so an episode does not depend on which other episodes
share the batch or the process (engines that honour ``row_seeds``, ``EngineInfo.reproducible``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from gspo.agents.env import Environment, EpisodeState
from gspo.agents.format import MessageFormat
from gspo.rollout.base import Rollout, RolloutEngine, SamplingParams
from gspo.tasks.base import Row


@dataclass
class Episode:
    """One finished episode: its completion segment as parallel per-token lists."""

    state: EpisodeState
    prompt: list[int]
    ids: list[int] = field(default_factory=list)  # the completion segment
    model: list[bool] = field(default_factory=list)  # True: sampled by the model (carries loss)
    logprobs: list[float] = field(default_factory=list)  # sampler's on model tokens, 0.0 on env tokens
    turn: list[int] = field(default_factory=list)  # per token: the model turn it belongs to or follows
    turn_rewards: list[float] = field(default_factory=list)  # per model turn
    routes: list[list[torch.Tensor]] | None = None  # R3: per MoE layer, (n, k) chunks over positions 0.. in order
    truncated: bool = False  # a turn hit its token budget without ending, or the context was full
    done: bool = False

    @property
    def num_turns(self) -> int:
        return len(self.state.turns)


def turn_seed(row_seed: int, turn: int) -> int:
    """The sampling seed of one episode's turn (a fixed mixing into 63 bits)."""
    return (row_seed * 0xD6E8FEB86659FD93 + (turn + 1) * 0x9E3779B97F4A7C15) % (1 << 63)


@dataclass
class EpisodeRunner:
    """Runs batches of episodes of one environment with one engine.

    ``context``: the most tokens a whole episode (prompt included) may hold, usually the model's
    ``max_position_embeddings``; a turn's budget is ``params.max_new_tokens`` and what is left of it.
    """

    engine: RolloutEngine
    environment: Environment
    format: MessageFormat
    decode: object  # token ids -> text (the task renderer's decode)
    pad_token_id: int
    context: int
    max_turns: int = 0  # 0 = the environment's own
    record_routing: bool = False  # MoE R3: keep the engine's experts of every position (see _record_routes)

    @property
    def turn_limit(self) -> int:
        """Model turns per episode: ``max_turns``, else the environment's own limit."""
        return self.max_turns or self.environment.max_turns

    def max_model_tokens(self, max_new_tokens: int) -> int:
        """The most model tokens an episode can hold: each turn samples at most ``max_new_tokens``, and the
        whole episode fits the context."""
        return min(self.turn_limit * max_new_tokens, self.context)

    def run(self, prompts: list[list[int]], rows: list[Row], params: SamplingParams, row_seeds: list[int],
            *, seed: int = 0, record_routing: bool | None = None) -> tuple[list[Episode], dict[str, float]]:
        """One episode per prompt (``rows[i]`` is prompt i's row); returns them and the sampler's timings.

        ``record_routing``: override :attr:`record_routing` (evaluation does not need the routes)."""
        record = self.record_routing if record_routing is None else record_routing
        episodes = [Episode(self.environment.reset(row), list(p)) for p, row in zip(prompts, rows)]
        max_turns = self.turn_limit
        timings: dict[str, float] = {}
        for k in range(max_turns):
            index = [i for i, e in enumerate(episodes) if not e.done]
            if not index:
                break
            active = [episodes[i] for i in index]
            rooms = [self.context - len(e.prompt) - len(e.ids) for e in active]
            budget = max(1, min(params.max_new_tokens, max(rooms)))
            rollout = self.engine.generate([e.prompt + e.ids for e in active], replace(params, max_new_tokens=budget),
                                           torch.Generator().manual_seed(seed + k),
                                           row_seeds=[turn_seed(row_seeds[i], k) for i in index],
                                           record_routing=record)
            for name, value in rollout.timings.items():
                timings[name] = timings.get(name, 0.0) + value
            t0 = time.perf_counter()
            for j, (episode, room) in enumerate(zip(active, rooms)):
                self._advance(episode, rollout, j, room, last=k == max_turns - 1)
            timings["time/env_s"] = timings.get("time/env_s", 0.0) + time.perf_counter() - t0
        return episodes, timings

    def _advance(self, episode: Episode, rollout: Rollout, j: int, room: int, *, last: bool) -> None:
        """Append row ``j`` of ``rollout`` as the episode's next model turn, then the environment's reply."""
        mask = rollout.completion_mask[j]
        ids = rollout.completion_ids[j][mask].tolist()
        logprobs = rollout.logprobs[j][mask].tolist()
        sampled, context = len(ids), len(episode.prompt) + len(episode.ids)
        ended_with_eos = not bool(rollout.truncated[j])
        cut = self.format.turn_end(ids)
        # went on after the tool-call marker (not just its EOS): keep the turn up to the marker
        if cut is not None and cut < len(ids) - int(ended_with_eos):
            ids, logprobs, ended_with_eos = ids[:cut], logprobs[:cut], False
        full = len(ids) >= room  # the context is full (the shared budget may have been another episode's room)
        ids, logprobs = ids[:room], logprobs[:room]
        if full or (cut is None and not ended_with_eos):  # the turn used its budget without ending
            episode.truncated = True
        if rollout.routing is not None:
            _record_routes(episode, rollout, j, context, sampled, len(ids))
        turn = len(episode.state.turns)
        self._append(episode, ids, True, logprobs, turn)
        episode.state.turns.append(self.decode(ids))
        reply = self.environment.step(episode.state, episode.state.turns[-1])
        episode.turn_rewards.append(float(reply.reward))
        # a truncated turn still goes to the environment, which decides (a ToolEnvironment sees no call: done)
        if reply.done or reply.message is None or last or full:
            episode.done = True
            return
        env_ids = self.format.message_ids(reply.message, ended_with_eos=ended_with_eos)
        if len(episode.prompt) + len(episode.ids) + len(env_ids) >= self.context:  # no room for an answer
            episode.done = episode.truncated = True
            return
        self._append(episode, env_ids, False, [0.0] * len(env_ids), turn)

    @staticmethod
    def _append(episode: Episode, ids: list[int], model: bool, logprobs: list[float], turn: int) -> None:
        episode.ids += ids
        episode.model += [model] * len(ids)
        episode.logprobs += logprobs
        episode.turn += [turn] * len(ids)


def _record_routes(episode: Episode, rollout: Rollout, j: int, context: int, sampled: int, kept: int) -> None:
    """Keep the experts the engine used at the positions this call fed to the model for the first time.

    Each position's route is taken from the first call that ran the model on it: the prompt and the
    previous environment message from this call's prefill, this turn's tokens from its decode steps
    (all but the last sampled one, which is fed by the next call's prefill, or never: the single-turn
    convention, where the filler of :meth:`RoutingRecord.pad_to` stands in for it). Those are exactly
    the forwards that produced the sampler's log-probabilities. In the call's record the context sits
    right-aligned before column P (left padding) and the completion follows it.
    """
    done = sum(chunk.shape[0] for chunk in episode.routes[0]) if episode.routes else 0
    end = context + (kept if kept < sampled else kept - 1)  # positions fed so far, exclusive
    start_col = rollout.prompt_ids.shape[1] - context  # column of the episode's position 0
    chunks = [layer[j, start_col + done : start_col + end] for layer in rollout.routing.indices]  # (n, k) each
    if episode.routes is None:
        episode.routes = [[] for _ in chunks]
    for store, chunk in zip(episode.routes, chunks):
        store.append(chunk)


def _assemble_routing(episodes: list[Episode], width_p: int, width_t: int):
    """The episodes' stitched routes as one RoutingRecord over ``[prompt | completion]`` columns."""
    from gspo.moe.routing import RoutingRecord

    layers = []
    for layer in range(len(episodes[0].routes)):
        k = episodes[0].routes[layer][0].shape[-1]
        out = torch.arange(k).expand(len(episodes), width_p + width_t, k).clone()  # (B, P + T, k) filler
        for i, e in enumerate(episodes):
            routes = torch.cat(e.routes[layer])  # (n, k) positions 0..n-1 of the episode
            start = width_p - len(e.prompt)
            out[i, start : start + len(routes)] = routes
        layers.append(out)
    return RoutingRecord(layers)


def assemble(episodes: list[Episode], pad_token_id: int) -> Rollout:
    """The episodes as one :class:`Rollout` in the ``[left-padded prompt | completion segment]`` layout."""
    width_p = max(len(e.prompt) for e in episodes)
    width_t = max(1, max(len(e.ids) for e in episodes))
    b = len(episodes)
    prompt_ids = torch.full((b, width_p), pad_token_id, dtype=torch.long)  # (B, P)
    prompt_mask = torch.zeros((b, width_p), dtype=torch.bool)  # (B, P)
    completion_ids = torch.full((b, width_t), pad_token_id, dtype=torch.long)  # (B, T)
    completion_mask = torch.zeros((b, width_t), dtype=torch.bool)  # (B, T) model tokens
    attention = torch.zeros((b, width_t), dtype=torch.bool)  # (B, T) model + environment tokens
    logprobs = torch.zeros((b, width_t), dtype=torch.float32)  # (B, T)
    for i, e in enumerate(episodes):
        p, t = len(e.prompt), len(e.ids)
        prompt_ids[i, width_p - p:] = torch.tensor(e.prompt, dtype=torch.long)
        prompt_mask[i, width_p - p:] = True
        if t:
            completion_ids[i, :t] = torch.tensor(e.ids, dtype=torch.long)
            completion_mask[i, :t] = torch.tensor(e.model, dtype=torch.bool)
            attention[i, :t] = True
            logprobs[i, :t] = torch.tensor(e.logprobs, dtype=torch.float32)
    truncated = torch.tensor([e.truncated for e in episodes], dtype=torch.bool)  # (B,)
    routing = _assemble_routing(episodes, width_p, width_t) if episodes[0].routes is not None else None
    return Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask, logprobs, truncated, routing=routing,
                   completion_attention=attention)


def turn_index(episodes: list[Episode], width: int) -> torch.Tensor:
    """(B, T) long: the model turn each completion token belongs to (-1 on padding)."""
    out = torch.full((len(episodes), width), -1, dtype=torch.long)
    for i, e in enumerate(episodes):
        if e.turn:
            out[i, : len(e.turn)] = torch.tensor(e.turn, dtype=torch.long)
    return out
