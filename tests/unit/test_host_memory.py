"""The host heap settings (gspo.host_memory): the decision, its effect on glibc, and that training applies it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from gspo import host_memory
from gspo.host_memory import HEAP_SETTINGS, M_MMAP_MAX, M_TRIM_THRESHOLD, heap_setting


def test_heap_only_on_glibc_unless_the_user_or_another_allocator_decides():
    assert heap_setting({}, glibc=True) == HEAP_SETTINGS == {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: -1}
    assert heap_setting({}, glibc=True, reuse=False) == host_memory.LEAN_SETTINGS == {-3: 4 * 2**20}
    assert heap_setting({}, glibc=False) is None  # macOS, musl: their allocators are left alone
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"):
        assert heap_setting({name: "4194304"}, glibc=True) is None  # the user's own setting
    assert heap_setting({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=4194304"}, glibc=True) is None
    assert heap_setting({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=512"}, glibc=True) == HEAP_SETTINGS
    for preload in ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "libtcmalloc_minimal.so.4"):
        assert heap_setting({"LD_PRELOAD": preload}, glibc=True) is None


# A training step allocates the same large shapes over and over. Configured, once the heap has grown to a
# step's needs the next steps take their memory from it: no page faults. With the earlier 4 MiB mmap threshold
# every 24 MiB tensor here was a fresh mapping, 18,435 faults per step (glibc's default: 12,288 here).
SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    from gspo import host_memory
    assert host_memory.configure_heap() == host_memory.HEAP_SETTINGS
    x, w = torch.randn(2048, 1024), torch.randn(1024, 3072)
    def step():
        h = x @ w  # (2048, 3072) float32: 24 MiB, and two more below
        return float((torch.nn.functional.silu(h) * h).sum())
    faults = []
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(sum(faults[-3:]))
""")


@pytest.mark.skipif(host_memory._LIBC is None, reason="glibc only")
def test_repeated_steps_reuse_the_heap_without_page_faults_once_configured():
    env = {"PATH": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": ":".join(sys.path)}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, check=True,
                         timeout=120)
    # the last three steps together: fewer faults than one step took with the 4 MiB threshold (18,435; 55,305
    # for three); measured 0, or 6,144 (one tensor's pages) depending on where the heap's holes fall
    assert int(out.stdout.split()[-1]) < 18_000


def test_training_configures_the_heap_before_the_model_loads(monkeypatch, tmp_path):
    from gspo.config.load import load_config
    from gspo.trainer import build as build_module
    from gspo.trainer.trainer import Trainer

    calls = []
    monkeypatch.setattr(build_module.host_memory, "configure_heap", lambda reuse=True: calls.append(("heap", reuse)))
    real_load = build_module._load_policy
    monkeypatch.setattr(build_module, "_load_policy", lambda *a, **k: (calls.append("load"), real_load(*a, **k))[1])
    config = load_config(None, ["steps=1", "log.tensorboard=false", "device=cpu", "rollout.prompts_per_step=2",
                                "rollout.group_size=2", "rollout.max_new_tokens=4"])
    Trainer.from_config(config, run_dir=None).close()
    assert calls[:2] == [("heap", True), "load"]  # the default run fits with the heap kept


def test_the_plan_leaves_room_for_the_heap_only_where_gspo_keeps_it(monkeypatch):
    import torch

    from gspo import memory_plan
    from gspo.config.load import load_config
    from gspo.trainer import sizing

    real_plan, seen = memory_plan.plan, []
    monkeypatch.setattr(memory_plan, "plan", lambda *a, **k: seen.append(k["heap_reuse"]) or real_plan(*a, **k))
    config = load_config(None, ["device=cpu", "rollout.max_new_tokens=4"])
    for env, expected in (({}, host_memory._LIBC is not None), ({"MALLOC_MMAP_THRESHOLD_": "4194304"}, False),
                          ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, False)):
        for name in ("MALLOC_MMAP_THRESHOLD_", "LD_PRELOAD"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        sizing.precision_and_memory(config, torch.device("cpu"), None)
        assert seen[-1] is expected, env  # the user's allocator settings: no budget shrunk for a heap not kept


def test_heap_kept_only_where_the_plan_leaves_room_for_its_holes():
    from gspo.memory import GB, Estimate
    from gspo.memory_plan import MemoryPlan, heap_reuse_fits

    def plan(available_gb: float, device: str = "cpu") -> MemoryPlan:  # 8 GB persistent + a 10 GB transient
        estimate = Estimate({"weights": 8 * GB, "activations": 10 * GB})
        return MemoryPlan(False, 0, estimate, int(available_gb * GB), device)

    assert heap_reuse_fits(plan(31))  # (18 + 0.9 * 10) GB = 27 <= 0.9 * 31
    assert not heap_reuse_fits(plan(25))  # 27 > 22.5: the estimate alone fits, its holes would not
    assert not heap_reuse_fits(plan(31), processes=2)  # two processes share the RAM
    assert heap_reuse_fits(plan(1, device="cuda"))  # the host heap holds little beside a GPU
    assert not heap_reuse_fits(None)  # no estimate: the lean heap


def test_a_run_without_room_keeps_the_lean_heap_and_says_so(monkeypatch):
    from gspo.config.load import load_config
    from gspo.trainer import build as build_module
    from gspo.trainer.trainer import Trainer

    calls = []
    monkeypatch.setattr(build_module.memory_plan, "heap_reuse_fits", lambda memory, processes=1: False)
    monkeypatch.setattr(build_module.host_memory, "configure_heap",
                        lambda reuse=True: calls.append(reuse) or host_memory.LEAN_SETTINGS)
    config = load_config(None, ["steps=1", "log.tensorboard=false", "device=cpu", "rollout.prompts_per_step=2",
                                "rollout.group_size=2", "rollout.max_new_tokens=4"])
    trainer = Trainer.from_config(config, run_dir=None)
    try:
        assert calls == [False]
        assert "host heap lean: no room for its reuse" in trainer.parts.memory.describe()
    finally:
        trainer.close()


def test_no_trim_between_phases_where_the_heap_is_kept(monkeypatch):
    # each trim handed every free page back, and the next phase faulted them in again (1.5 million faults per
    # 0.6B step on an AMX Xeon); the lean setting, whose large blocks are mmapped anyway, still trims
    calls = []

    class Libc:
        def mallopt(self, param, value):
            return 1

        def malloc_trim(self, pad):
            calls.append(pad)
            return 1

    monkeypatch.setattr(host_memory, "_LIBC", Libc())
    monkeypatch.setattr(host_memory, "_KEPT", False)
    for name in (*host_memory.USER_SETTINGS, "LD_PRELOAD", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    assert host_memory.configure_heap(reuse=False) == host_memory.LEAN_SETTINGS
    host_memory.release_freed_memory()
    assert calls == [0]
    assert host_memory.configure_heap(reuse=True) == HEAP_SETTINGS
    host_memory.release_freed_memory()
    assert calls == [0]


# 2.2 GiB freed at the top of the heap, as the 0.6B shape's gradients are between minibatches: with the trim
# threshold at glibc's largest int (2 GiB, the earlier setting) free() gave it back to the OS (and the next
# minibatch faulted it in again); at -1 it stays
TOP_SCRIPT = textwrap.dedent("""
    import ctypes
    from gspo import host_memory
    assert host_memory.configure_heap() == host_memory.HEAP_SETTINGS
    libc, size = host_memory._LIBC, 2_200 * 2**20
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * 4096
    before = rss()
    block = libc.malloc(size)  # from the heap's top (no mmapped blocks)
    ctypes.memset(block, 1, size)
    libc.free(block)
    print((rss() - before) / 2**30)
""")


@pytest.mark.skipif(host_memory._LIBC is None, reason="glibc only")
def test_a_large_block_freed_at_the_heap_top_stays_for_reuse():
    env = {"PATH": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": ":".join(sys.path)}
    out = subprocess.run([sys.executable, "-c", TOP_SCRIPT], capture_output=True, text=True, env=env, check=True,
                         timeout=120)
    assert float(out.stdout.split()[-1]) > 2.0  # GiB still resident after the free
