import gzip
import json
from pathlib import Path

import numba
import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session", autouse=True)
def _pin_threads():
    """Tests run with at most 2 numba threads (CI has 2 cores)."""
    prev = numba.get_num_threads()
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    yield
    numba.set_num_threads(prev)


def load_asq_reference():
    with gzip.open(DATA / "asq_reference.json.gz", "rt") as f:
        return json.load(f)["cases"]
