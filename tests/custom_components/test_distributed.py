"""custom_components.engines.distributed in one process, without and with a (one-rank, gloo) process group."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from custom_components.engines.distributed import (
    destroy_process_group,
    init_process_group,
    is_main_process,
    local_device,
    main_rank_only,
    save_rank_weights,
    wrap_ddp,
)


def test_single_process_defaults():
    assert not dist.is_initialized()
    assert is_main_process()
    assert main_rank_only(lambda a, b=0: a + b, 1, b=2) == 3
    assert local_device() == torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    assert wrap_ddp(None, "cpu") is None  # a network the variant does not use
    destroy_process_group()  # nothing to leave: no error


def test_save_rank_weights_only_when_switched_on(tmp_path):
    net = torch.nn.Linear(2, 1)
    assert save_rank_weights(net, tmp_path, enabled="false") is None and not list(tmp_path.iterdir())
    path = save_rank_weights(net, tmp_path, enabled="true")
    assert path == str(tmp_path / "generator_rank0.pt")
    state = torch.load(path, weights_only=True)
    assert torch.equal(state["weight"], net.weight)


@pytest.fixture
def process_group(tmp_path, monkeypatch):
    """A gloo process group of one rank, as ``torchrun --nproc_per_node=1`` would start."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield
    finally:
        destroy_process_group()


def test_in_a_process_group(process_group, tmp_path):
    assert dist.is_initialized()
    init_process_group("cpu")  # keeps the existing group, then synchronises the ranks
    assert is_main_process()
    net = wrap_ddp(torch.nn.Linear(2, 1), "cpu")
    assert isinstance(net, torch.nn.parallel.DistributedDataParallel)
    assert save_rank_weights(net.module, tmp_path) == str(tmp_path / "generator_rank0.pt")
    assert main_rank_only(lambda: "done") == "done"

    def fail():
        raise FileExistsError("an earlier run left 2 file(s)")

    with pytest.raises(RuntimeError, match=r"rank 0 failed: FileExistsError: an earlier run left 2 file\(s\)"):
        main_rank_only(fail)  # every rank raises, not only rank 0
    destroy_process_group()
    assert not dist.is_initialized()
