"""gspo.distributed on one CPU process: the process group's backends and how objects travel.

The GPU halves (NCCL, CUDA tensors in gathered objects) cannot run here; these tests pin the decisions
that make them work: CPU tensors and pickled objects go over gloo on every machine, and a gathered
object's CUDA tensors land on the receiving process's own GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as torch_dist

from gspo import distributed as dist


def test_the_process_group_has_a_cpu_backend_on_every_machine():
    # NCCL alone has no CPU backend: an all_reduce of the CPU metrics raised "No backend type associated
    # with device type cpu" on GPUs
    assert dist.process_group_backend(cuda=True) == "cpu:gloo,cuda:nccl"
    assert dist.process_group_backend(cuda=False) == "gloo"


@pytest.fixture
def one_process_group():
    """A real one-process group with the CPU half of the GPU backend string."""
    store = torch_dist.HashStore()
    torch_dist.init_process_group(dist.process_group_backend(cuda=True).split(",")[0], store=store, rank=0,
                                  world_size=1)
    yield
    torch_dist.destroy_process_group()


def test_cpu_scalars_and_objects_go_over_the_cpu_backend(one_process_group):
    metrics = {"loss/policy": torch.tensor(-0.5, dtype=torch.float64), "count/tokens": 38.0}
    assert dist.gather_scalars(metrics) == [{"count/tokens": 38.0, "loss/policy": -0.5}]
    assert dist.mean_of_all([0.25, 0.75]) == 0.5 and dist.mean_of_all([]) == 0.0
    gathered = dist.all_gather_object({"rewards": torch.tensor([1.0, 0.0]), "rows": [{"prompt": "1+1="}]})
    assert len(gathered) == 1 and gathered[0]["rows"] == [{"prompt": "1+1="}]
    assert torch.equal(gathered[0]["rewards"], torch.tensor([1.0, 0.0]))
    assert torch.equal(dist.concat_over_processes(torch.arange(6.0).view(2, 3), dim=1), torch.arange(6.0).view(2, 3))


def test_gathered_objects_travel_as_bytes_and_cuda_tensors_land_on_this_process_gpu(monkeypatch):
    # pickling a batch whose tensors are on cuda:r restores them on cuda:r in every process (contexts on
    # another rank's GPU); gspo sends bytes and maps CUDA storages to this process's current GPU
    sent = []

    def fake_all_gather_object(out, obj):
        sent.append(obj)
        out[:] = [obj, obj]

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(torch_dist, "all_gather_object", fake_all_gather_object)
    gathered = dist.all_gather_object({"advantages": torch.tensor([0.5, -0.5])})
    assert isinstance(sent[0], bytes)
    assert [g["advantages"].tolist() for g in gathered] == [[0.5, -0.5], [0.5, -0.5]]

    class Storage:
        def cuda(self, device):
            return ("cuda", device)

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    storage = Storage()
    assert dist._local_storage(storage, "cuda:1") == ("cuda", 3)  # rank 1's tensor, on this process's GPU 3
    assert dist._local_storage(storage, "cpu") is storage
