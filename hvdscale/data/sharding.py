"""Which examples each rank reads: a deterministic per-epoch shuffle from the seed, split so
that every rank gets the same number of examples (training) or every example is read exactly
once (evaluation)."""
import numpy as np

from hvdscale.errors import ConfigError


def epoch_permutation(n, epoch, seed):
    """The same order on every rank and every run with the same (seed, epoch)."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def shard_indices(n, rank, size, epoch=0, seed=0, shuffle=True, drop_last=True):
    """Indices of rank `rank` out of `size` for one epoch.

    drop_last=True: the tail that does not divide by `size` is dropped, so all ranks hold
    equal shards (they must run the same number of steps). drop_last=False: every index is
    kept once, the first n % size ranks get one extra (for evaluation, where counts are summed).
    """
    if size < 1 or not 0 <= rank < size:
        raise ConfigError(f"shard_indices: rank {rank} is not in a world of size {size}")
    if n < 0:
        raise ConfigError(f"shard_indices: negative data set size {n}")
    order = epoch_permutation(n, epoch, seed) if shuffle else np.arange(n)
    if drop_last:
        order = order[: n - n % size]
    return order[rank::size]
