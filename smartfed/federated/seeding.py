"""Every random stream of a run is derived from (seed, stream, round, client, ...), never from a
shared generator's position, so any round can be replayed alone: that is what makes ``--resume``
exact. Stream ids keep streams apart even for equal (seed, round, client) tuples."""

import numpy as np

STREAM_SAMPLING = 1
STREAM_CLIENT = 2
STREAM_BASE_MODEL = 11
STREAM_POOL = 12
STREAM_LAYOUT = 13
STREAM_ROUTER_INIT = 21
STREAM_TRAIN_DATA = 31
STREAM_EVAL_DATA = 32
STREAM_PARTITION = 33
STREAM_VALIDATION = 34
STREAM_ROOT_SET = 35
STREAM_ATTACK = 41
STREAM_ROOT_UPDATE = 42


def derived_seed(seed, *parts) -> int:
    """A 63-bit seed from (seed, stream, ...) by numpy's SeedSequence hashing."""
    words = np.random.SeedSequence([int(seed), *(int(p) for p in parts)]).generate_state(2, dtype=np.uint32)
    return int((int(words[0]) << 31) ^ int(words[1])) & ((1 << 63) - 1)
