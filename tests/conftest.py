import gzip
import json
from pathlib import Path

import pytest

import ipq_index

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session", autouse=True)
def _pin_threads():
    """Tests run with at most 2 threads (CI has 2 cores)."""
    prev = ipq_index.get_num_threads()
    ipq_index.set_num_threads(2)
    yield
    ipq_index.set_num_threads(prev)


def load_asq_reference():
    with gzip.open(DATA / "asq_reference.json.gz", "rt") as f:
        return json.load(f)["cases"]
