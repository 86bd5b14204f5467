"""pipeline/distributed/comm.py: the one rule for the device a process group communicates on.

No NCCL here (CPU build of torch), so the NCCL case is tested on what makes NCCL different: a
group whose backend is registered for CUDA only, as NCCL is in torch's capability table. Such a
group refuses CPU tensors exactly as NCCL does, and the rule must send its collectives to CUDA.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from pipeline.distributed.comm import backend_device_type, backend_devices, group_device


def test_nccl_entry_of_torchs_capability_table_is_cuda_only():
    # What the rule is built on: if torch ever gave NCCL a CPU path, this would say so.
    assert dist.Backend.backend_capability["nccl"] == ["cuda"]
    assert "cpu" in dist.Backend.backend_capability["gloo"]


@pytest.mark.parametrize(
    "backend, device",
    [
        ("nccl", "cuda"),
        ("gloo", "cpu"),
        ("cpu:gloo,cuda:nccl", "cuda"),  # torch's default when init_process_group gets no backend
        ("cpu:gloo", "cpu"),
        ("mpi", "cpu"),
        ("xccl", "xpu"),
    ],
)
def test_backend_device_type(backend, device):
    assert backend_device_type(backend) == device


def test_backend_devices_and_unknown_backend():
    assert backend_devices("cpu:gloo,cuda:nccl") == {"cpu": "gloo", "cuda": "nccl"}
    assert backend_devices("NCCL") == {"cuda": "nccl"}
    with pytest.raises(ValueError, match="'nosuch' is not registered"):
        backend_device_type("nosuch")


def _gloo_backend(store, rank, size, timeout):
    return dist.ProcessGroupGloo(store, rank, size, timeout)


@pytest.fixture
def world_of_one(tmp_path):
    """A one-process default group (gloo), destroyed afterwards so later tests see no process group."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_gloo_group_communicates_on_the_cpu_and_round_trips(world_of_one):
    group = dist.new_group([0])
    assert group_device(group) == torch.device("cpu") == group_device()
    send = torch.tensor([[3, 0], [1, 4]], device=group_device(group))
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    assert recv.tolist() == [[3, 0], [1, 4]]


def test_cuda_only_group_is_sent_to_cuda_never_the_cpu(world_of_one):
    # A backend registered for CUDA only, like NCCL (it runs gloo underneath, which is never reached
    # with CPU tensors: the group has no CPU backend at all).
    if "cuda_only_test" not in dist.Backend.backend_list:
        dist.Backend.register_backend("cuda_only_test", _gloo_backend, devices=["cuda"])
    group = dist.new_group([0], backend="cuda_only_test")
    assert group._device_types == [torch.device("cuda")]
    assert backend_device_type(dist.get_backend(group)) == "cuda"
    # What the old EP dispatch did (counts moved to the CPU before the exchange) fails on such a group:
    counts = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
        dist.all_to_all_single(torch.empty_like(counts), counts, group=group)
    if torch.cuda.is_available():
        assert group_device(group) == torch.device("cuda", torch.cuda.current_device())
    else:
        with pytest.raises(RuntimeError, match="communicates on cuda, but this process has no cuda device"):
            group_device(group)
