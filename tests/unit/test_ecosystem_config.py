"""Validation of the ecosystem keys: lora.*, log.trackers (messages name the key, the value and the fix)."""

from __future__ import annotations

import sys

import pytest

from gspo.config import load_config
from gspo.errors import ConfigError


def test_lora_defaults_are_off_and_parse_from_the_command_line():
    assert load_config(None, []).lora.rank == 0
    lora = load_config(None, ["lora.rank=8", "lora.alpha=16", "lora.target_modules=q_proj,v_proj"]).lora
    assert (lora.rank, lora.alpha, lora.target_modules) == (8, 16.0, ["q_proj", "v_proj"])


@pytest.mark.parametrize("overrides, fragment", [
    (["lora.rank=-1"], "lora.rank=-1 must be >= 0"),
    (["lora.rank=4", "lora.alpha=0"], "lora.alpha=0.0 must be positive"),
    (["lora.rank=4", "lora.dropout=1"], r"lora.dropout=1.0 must be in \[0, 1\)"),
    (["lora.rank=4", "lora.target_modules="], "lora.target_modules is empty"),
    (["lora.rank=4", "loss.beta=0.1", "loss.ref_refresh_steps=5"], "the KL reference is the base model"),
    (["lora.rnak=4"], "Did you mean 'lora.rank'"),
])
def test_bad_lora_settings(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, overrides)


def test_lora_without_peft_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ConfigError, match=r"lora.rank=4 needs PEFT: pip install 'gspo\[lora\]'"):
        load_config(None, ["lora.rank=4"])
    assert load_config(None, ["lora.rank=0"]).lora.rank == 0  # off: PEFT is not needed


def test_trackers_parse_as_a_list():
    pytest.importorskip("tensorboard", reason="tensorboard is the gspo[trackers] extra: pip install 'gspo[trackers]'")
    assert load_config(None, ["log.trackers=tensorboard"]).log.trackers == ["tensorboard"]
    assert load_config(None, []).log.trackers == [] and load_config(None, []).log.project == "gspo"
