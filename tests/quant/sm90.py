"""The float8 grouped GEMMs' GPU tests: marked ``gpu`` (so ``pytest -m gpu`` runs them) and
skipped below sm90."""

from collections.abc import Callable

import pytest
import torch

_SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def needs_sm90(test: Callable) -> Callable:
    skip = pytest.mark.skipif(not _SM90, reason="float8 grouped GEMMs need a CUDA sm90+ GPU")
    return pytest.mark.gpu(skip(test))
