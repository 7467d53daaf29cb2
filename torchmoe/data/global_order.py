"""The job's one document order, the same on every rank and at every layout.

Global position p reads document ``permutation(seed, epoch)[p % n]`` with epoch = p // n: each
epoch is a fresh shuffle drawn from (seed, epoch) alone. Row j of every global batch is a packed
stream of the documents at positions j, j + R, j + 2R, ... (R rows per global batch; loader.py),
so global batch b holds the same sequences whatever the data-parallel degree, and each rank
reads only its own rows' documents.
"""

import numpy as np


class GlobalOrder:
    """Document index at a global position; keeps the two most recent epochs' permutations
    (streams cross an epoch end at different times), 4 bytes per document each below 2**31
    documents."""

    def __init__(self, num_documents: int, seed: int) -> None:
        self.num_documents, self.seed = num_documents, seed
        self._epochs: dict[int, np.ndarray] = {}

    def __getitem__(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_documents)
        order = self._epochs.get(epoch)
        if order is None:
            dtype = np.int32 if self.num_documents < 2**31 else np.int64
            order = np.arange(self.num_documents, dtype=dtype)
            np.random.default_rng([self.seed, epoch]).shuffle(order)
            self._epochs[epoch] = order
            for old in sorted(self._epochs)[:-2]:
                del self._epochs[old]
        return int(order[offset])
