"""Device and distributed helpers that work unchanged in one process.

With no process group every helper degrades to its single-process meaning: rank 0 of 1, a gather
returns its input, the batch shuffle is a permutation of the local batch. Launch: ``torchrun``
(env://) or ``launch(fn, n)`` which spawns n local processes (what ``--num-gpus`` does).
Why not detectron2's ``comm`` / ``launch``: pretraining runs without detectron2 installed, the
backend follows DEVICE (gloo for a CPU run on a GPU machine), and MoCo needs tensor gathers
without gradient and the shuffle-BN permutation, which ``comm`` does not offer.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from ..utils.elastic import DEFAULT_TIMEOUT_S, prepare_collectives, restart_count


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def barrier() -> None:
    if is_dist():
        dist.barrier()


@torch.no_grad()
def concat_all_gather(x: Tensor) -> Tensor:
    """Concatenate x (BxC..., same shape on every rank) over ranks in rank order; no gradient."""
    if not is_dist() or get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def all_reduce_mean(x: Tensor) -> Tensor:
    """Mean of x over ranks (a new tensor; x itself is untouched)."""
    if not is_dist() or get_world_size() == 1:
        return x
    y = x.detach().clone()
    dist.all_reduce(y)
    return y / get_world_size()


@torch.no_grad()
def batch_shuffle(x: Tensor) -> tuple[Tensor, Tensor]:
    """Shuffle-BN, step 1: a random permutation of the GLOBAL batch; returns this rank's slice.

    Several ranks: the key images of all ranks are gathered, permuted with a permutation drawn
    on rank 0 and broadcast, and each rank gets B of them, so a key is normalised with BN
    statistics of other images than its query (MoCo's defence against BN "cheating").
    One process: the permutation only reorders the local batch, which alone changes nothing for
    BN; it is combined with MODEL.SHUFFLE_BN_SPLITS > 1 (the batch is cut into BN groups after the
    shuffle) to get the same effect. The permutation comes from the global CPU RNG (checkpointed).
    Returns (local shuffled batch, index that undoes it).
    """
    b = x.shape[0]
    x_all = concat_all_gather(x)  # (world*B)x...
    perm = torch.randperm(x_all.shape[0]).to(x.device)
    if is_dist() and get_world_size() > 1:
        dist.broadcast(perm, src=0)
    restore = torch.argsort(perm)
    r = get_rank()
    return x_all[perm[r * b : (r + 1) * b]], restore


@torch.no_grad()
def batch_unshuffle(y: Tensor, restore: Tensor) -> Tensor:
    """Shuffle-BN, step 2: gather the outputs, undo the permutation, keep this rank's rows."""
    b = y.shape[0]
    y_all = concat_all_gather(y)
    r = get_rank()
    return y_all[restore[r * b : (r + 1) * b]]


def pick_device(name: str = "", local_rank: int = 0) -> torch.device:
    """The device of a run: ``name`` ("" = cuda when available, else cpu); cuda -> this process's
    GPU (``local_rank``)."""
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)


def init_distributed(
    device_type: str, timeout_s: float = DEFAULT_TIMEOUT_S
) -> tuple[int, int, int]:
    """Join the env:// process group when launched by torchrun/launch. Returns (rank, world, local).

    Backend: nccl for CUDA, gloo for CPU. Without RANK/WORLD_SIZE in the environment: one process.
    torchrun with one process joins a group of one too (``TORCHELASTIC_RUN_ID`` is set), so a
    1-GPU torchrun run goes through the same NCCL set-up and barriers as an 8-GPU one.
    ``timeout_s`` (``DIST.TIMEOUT_S``): how long a collective may wait for a peer before it fails
    and, NCCL's asynchronous error handling set (``mcl_det.utils.elastic``), ends the process.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    if (world <= 1 and not under_torchrun) or is_dist():
        return get_rank(), get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local)
    prepare_collectives()
    timeout = timedelta(seconds=timeout_s)
    if under_torchrun:
        rank = int(os.environ["RANK"])
        store = attempt_store(rank, world, timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    else:
        dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
    if dist.get_rank() == 0:
        n = dist.get_world_size()
        print(f"joined the {backend} process group: {n} process(es)", flush=True)
    return dist.get_rank(), dist.get_world_size(), local


def attempt_store(rank: int, world: int, timeout: timedelta) -> dist.Store:
    """The key-value store the process group of this torchrun attempt meets in, with keys of its
    own (``mcl_det/attempt_<TORCHELASTIC_RESTART_COUNT>/``).

    Why not plain ``env://``: with a c10d rendezvous the agent serves one store at MASTER_PORT for
    every restart of the group, and the gloo addresses the killed attempt's processes published
    there are still in it; a restarted rank that reads a dead peer's address before the peer's
    new incarnation overwrites it fails to connect, and the restart is lost (seen with torch
    2.14, ``connectFullMesh ... Connection refused``). Without the agent's store, rank 0 serves it.
    """
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=not agent and rank == 0,
        timeout=timeout,
    )
    return dist.PrefixStore(f"mcl_det/attempt_{restart_count()}", store)


def cleanup_distributed() -> None:
    if is_dist():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(local_rank: int, fn: Callable[..., Any], world: int, port: int, args: tuple) -> None:
    os.environ.update(
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    fn(*args)


def launch(fn: Callable[..., Any], num_procs: int, args: tuple = ()) -> None:
    """Run fn(*args) in num_procs local processes (one machine); fn calls init_distributed.

    For several machines use torchrun, which sets the same environment variables.
    """
    if num_procs <= 1:
        fn(*args)
        return
    mp.start_processes(
        _worker, args=(fn, num_procs, _free_port(), args), nprocs=num_procs, start_method="spawn"
    )
