"""Several processes (torchrun, ``accelerate launch``) and the training order, for ``dqtool qat``.

* :func:`world_size` / :func:`rank` / :func:`is_main` read the launcher's environment
  (``WORLD_SIZE``, ``RANK``), so they answer before any process group exists.
* :class:`EpochShuffle` is the training sampler: epoch ``e`` reads
  ``torch.randperm(n, generator seeded seed + e)``. Every process computes the same order;
  accelerate gives process ``p`` the batches ``p, p + W, p + 2W, ...`` of it, so the rows
  read in the first ``S`` optimizer steps are the first ``S x global batch`` of epoch 0
  whatever the number of processes (:func:`rows_read`), which is what lets ``--targets
  teacher`` generate the teacher's outputs for only those rows.
"""

from __future__ import annotations

import os

import torch


def world_size() -> int:
    """Processes in this run (``WORLD_SIZE`` set by torchrun / accelerate launch; 1 alone).

    Example:
        >>> world_size() >= 1
        True
    """
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def rank() -> int:
    """This process's global rank (0 alone)."""
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """True on the process that writes outputs and prints (global rank 0)."""
    return rank() == 0


class EpochShuffle(torch.utils.data.Sampler):
    """Indices ``0..n-1`` in the order ``torch.randperm(n)`` draws with a generator seeded
    ``seed + epoch``; the Trainer calls :meth:`set_epoch` at the start of every epoch
    (also when resuming), so an interrupted run reads the same order as an uninterrupted one.

    Example:
        >>> s = EpochShuffle(5, seed=3)
        >>> sorted(s) == list(range(5)) and list(s) == s.order(0) and s.order(1) != s.order(0)
        True
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self, epoch: int) -> list[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self):
        return iter(self.order(self.epoch))

    def __len__(self) -> int:
        return self.n


def rows_read(n: int, seed: int, max_steps: int, global_batch: int) -> list[int]:
    """The training rows (indices) ``max_steps`` optimizer steps of ``global_batch`` rows
    read with :class:`EpochShuffle`: the first ``max_steps x global_batch`` of epoch 0, or
    every row when training goes past one epoch. Sorted.

    Example:
        >>> len(rows_read(100, 0, 3, 8)), len(rows_read(100, 0, 13, 8))
        (24, 100)
    """
    need = max_steps * global_batch
    if need >= n:
        return list(range(n))
    return sorted(EpochShuffle(n, seed).order(0)[:need])
