"""The OpenEnv adapter on OpenEnv's own offline environment: the echo environment that ``openenv init``
generates, run in-process (skipped where ``openenv-core`` is not installed: it is an optional extra)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("openenv.core.env_server.interfaces")

from gspo.agents.calculator import build_calc_tokenizer  # noqa: E402
from gspo.agents.episode import EpisodeRunner, assemble  # noqa: E402
from gspo.agents.format import MessageFormat  # noqa: E402
from gspo.agents.openenv import OpenEnvEnvironment  # noqa: E402
from gspo.rollout.base import EngineInfo, Rollout, SamplingParams  # noqa: E402

TOK = build_calc_tokenizer()


def enc(text: str) -> list[int]:
    return list(TOK(text, add_special_tokens=False)["input_ids"])


class Echoing:
    """Writes "hi" + EOS on every turn."""

    info = EngineInfo("scripted")

    def generate(self, prompts, params, generator=None, *, row_seeds=None, record_routing=False) -> Rollout:
        turn = torch.tensor(enc("hi") + [TOK.eos_token_id])
        b = len(prompts)
        return Rollout(torch.zeros((b, 1), dtype=torch.long), torch.ones((b, 1), dtype=torch.bool),
                       turn.repeat(b, 1), torch.ones((b, 3), dtype=torch.bool), torch.full((b, 3), -0.5),
                       torch.zeros(b, dtype=torch.bool))

    def sync_weights(self, model) -> None: ...

    def close(self) -> None: ...


@pytest.fixture(scope="module")
def echo_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("openenv")
    subprocess.run([sys.executable, "-m", "openenv.cli", "init", "echo_env"], cwd=root, check=True,
                   capture_output=True)
    sys.path.insert(0, str(root))
    try:
        from echo_env.models import EchoAction
        from echo_env.server.echo_env_environment import EchoEnvironment
    finally:
        sys.path.remove(str(root))
    return EchoEnvironment, EchoAction


def test_openenv_echo_environment_through_the_episode_runner(echo_env):
    environment, action = echo_env
    env = OpenEnvEnvironment(environment, lambda text: action(message=text),
                             observe=lambda obs: f"echo {obs.echoed_message}", max_turns=3)
    runner = EpisodeRunner(Echoing(), env, MessageFormat(TOK), lambda ids: TOK.decode(ids, skip_special_tokens=True),
                           TOK.pad_token_id, 96)
    rows = [{"prompt": "1*1="}, {"prompt": "2*2="}]
    episodes, _ = runner.run([enc(r["prompt"]) for r in rows], rows, SamplingParams(8), [1, 2])
    turn, reply = enc("hi") + [TOK.eos_token_id], enc("<tool_response>echo hi</tool_response>")
    for e in episodes:
        assert e.num_turns == 3 and e.ids == turn + reply + turn + reply + turn
        assert e.turn_rewards == pytest.approx([0.2, 0.2, 0.2])  # the echo environment's reward: 0.1 per character
        assert e.state.data["reset_observation"].echoed_message.endswith("ready!")
    rollout = assemble(episodes, TOK.pad_token_id)
    assert rollout.lengths.tolist() == [9, 9]  # the model's tokens only
    assert (rollout.logprobs[rollout.completion_mask] == -0.5).all()
