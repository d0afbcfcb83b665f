"""Config loading, overrides and validation: every bad input gets a message naming key and fix."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gspo.config import Config, field_docs, load_config
from gspo.errors import ConfigError


def test_defaults_are_the_papers():
    config = load_config()
    assert config.algorithm == "gspo"
    assert config.clip_range == (3e-4, 4e-4)
    assert config.optim.minibatches == 4
    assert config.loss.advantage_scale == "auto" and config.advantage_scale == "group"


@pytest.mark.parametrize("algorithm, scale", [("gspo", "group"), ("grpo", "group"), ("dapo", "group"),
                                              ("dr_grpo", "none"), ("cispo", "group"), ("luspo", "group")])
def test_each_algorithm_gets_its_paper_advantage_scale(algorithm, scale):
    # Dr. GRPO drops eq. 6's std division (arXiv 2503.20783); config.json records the resolved scale
    config = load_config(None, [f"algorithm={algorithm}"])
    assert config.advantage_scale == scale and config.resolved_dict()["loss"]["advantage_scale"] == scale
    assert load_config(None, [f"algorithm={algorithm}", "loss.advantage_scale=batch"]).advantage_scale == "batch"


@pytest.mark.parametrize("algorithm, clip", [("grpo", (0.2, 0.2)), ("dapo", (0.2, 0.28)), ("gspo_token", (3e-4, 4e-4))])
def test_each_algorithm_gets_its_paper_clip_range(algorithm, clip):
    assert load_config(None, [f"algorithm={algorithm}"]).clip_range == clip


def test_dapo_turns_on_dynamic_sampling_by_default():
    assert load_config(None, ["algorithm=dapo"]).dynamic_sampling
    assert not load_config(None, ["algorithm=gspo"]).dynamic_sampling
    assert not load_config(None, ["algorithm=dapo", "loss.dynamic_sampling=false"]).dynamic_sampling


def test_overrides_are_typed():
    config = load_config(None, ["optim.lr=3e-5", "rollout.group_size=4", "log.progress=off", "loss.clip_low=0.01",
                                "reward.functions=exact_answer,format@0.5", "steps=10"])
    assert config.optim.lr == 3e-5 and isinstance(config.optim.lr, float)
    assert config.rollout.group_size == 4
    assert config.log.progress is False
    assert config.clip_range == (0.01, 4e-4)
    assert config.reward.functions == ["exact_answer", "format@0.5"]


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("algorithm: grpo\nsteps: 7\noptim:\n  lr: 0.001\n")
    config = load_config(path, ["steps=9"])
    assert (config.algorithm, config.steps, config.optim.lr) == ("grpo", 9, 0.001)


@pytest.mark.parametrize("override, fragment", [
    ("optim.lrr=1", "Did you mean 'optim.lr'"),
    ("rollout.group_sise=8", "Did you mean 'rollout.group_size'"),
    ("group_size=8", "rollout.group_size"),
    ("algoritm=grpo", "Did you mean 'algorithm'"),
])
def test_unknown_key_suggests_the_closest(override, fragment):
    with pytest.raises(ConfigError, match="unknown config key") as info:
        load_config(None, [override])
    assert fragment in str(info.value)


@pytest.mark.parametrize("override, fragment", [
    ("loss.clip_low=-0.1", "negative"),
    ("loss.clip_high=-1", "negative"),
    ("rollout.group_size=1", "at least 2"),
    ("optim.minibatches=3", "does not divide"),
    ("algorithm=ppo", "not one of"),
    ("algorithm=grp", "Did you mean 'grpo'"),
    ("optim.lr=0", "must be positive"),
    ("steps=abc", "must be an integer"),
    ("rollout.temperature=0", "greedy"),
    ("rollout.top_p=1.5", "top_p"),
    ("loss.old_logprobs=cached", "auto, recompute, rollout"),
    ("rollout.decoder=vllm", "auto, native, hf"),
    ("eval.samples=0", "eval.samples"),
    ("optim.micro_batch_size=3", "micro_batch_size"),
    ("loss.overlong_buffer=100", "overlong_buffer"),
    ("optim=3", "is a section"),
])
def test_out_of_range_values_are_named(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert fragment in str(info.value)


def test_minibatch_error_proposes_a_divisor():
    with pytest.raises(ConfigError, match=r"e\.g\. 4\)"):
        load_config(None, ["optim.minibatches=5"])


@pytest.mark.parametrize("item", ["--steps", "steps", "=3"])
def test_malformed_overrides(item):
    with pytest.raises(ConfigError):
        load_config(None, [item])


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listing)


def test_every_field_is_documented():
    rows = field_docs()
    assert len(rows) > 40
    undocumented = [key for key, _, _, doc in rows if not doc]
    assert not undocumented


def test_resolved_config_round_trips():
    config = load_config(None, ["algorithm=dapo", "rollout.top_k=5"])
    from gspo.config import from_dict

    assert from_dict(config.to_dict()) == config


KEYS = [row[0] for row in field_docs()] + ["bogus", "optim.bogus", "a.b.c"]
VALUES = st.one_of(st.text(max_size=12), st.integers(-5, 1000).map(str), st.floats(allow_nan=True).map(str),
                   st.sampled_from(["true", "none", "[1, 2]", "{a: 1}", "1e-4", "-0", "gspo", ""]))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), max_size=4))
def test_fuzzed_overrides_either_load_or_raise_config_error(pairs):
    try:
        config = load_config(None, [f"{k}={v}" for k, v in pairs])
    except ConfigError as exc:
        assert str(exc).strip()  # always a message that names the problem
        return
    from gspo.config import from_dict
    from gspo.config.validate import validate

    validate(config)  # what loads is valid ...
    assert from_dict(config.to_dict()) == config  # ... round-trips through its dict ...
    loaded, defaults = _flat(config.to_dict()), _flat(Config().to_dict())
    touched = {key for key, _ in pairs}
    for key, value in loaded.items():  # ... and keys nobody set keep their defaults
        if key not in touched:
            assert value == defaults[key], key


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out
