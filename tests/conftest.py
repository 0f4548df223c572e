import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(int(os.environ.get("DQTOOL_TEST_THREADS", "2")))


@pytest.fixture(scope="session", autouse=True)
def _hash_cache(tmp_path_factory):
    """Tests never write the user's ~/.cache/dqtool: the sha256 cache lives in the session's temp folder."""
    os.environ["DQTOOL_HASH_CACHE"] = str(tmp_path_factory.mktemp("hash-cache") / "sha256-cache.json")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Factory: a saved tiny model folder per (arch, enc, dec), built once per session."""
    from tiny import save_tiny

    cache = {}

    def make(arch: str, enc: int = 4, dec: int = 4):
        key = (arch, enc, dec)
        if key not in cache:
            path = tmp_path_factory.mktemp(f"{arch}-{enc}-{dec}")
            save_tiny(path, arch, enc, dec)
            cache[key] = path
        return cache[key]

    return make
