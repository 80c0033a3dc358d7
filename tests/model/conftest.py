import pytest
import torch

from dsv4.backend.checkpoint.loader import load_model
from dsv4.backend.generate import prefill_prompt
from dsv4.backend.kv_cache.paged_cache import PagedCache

from .oracle import CONFIG_A, CONFIG_B, build_hf, save_hf


@pytest.fixture(scope="session", params=["A", "B"])
def hf_pair(request, tmp_path_factory):
    """(transformers model, its save_pretrained dir) for each oracle config."""
    config = {"A": CONFIG_A, "B": CONFIG_B}[request.param]
    model = build_hf(config, seed=0 if request.param == "A" else 7)
    return model, save_hf(model, tmp_path_factory.mktemp(f"hf_{request.param}"))


@pytest.fixture(scope="session")
def hf_a(tmp_path_factory):
    model = build_hf(CONFIG_A, seed=0)
    return model, save_hf(model, tmp_path_factory.mktemp("hf_a"))


class Runner:
    """Our model plus a cache big enough for a few sequences."""

    def __init__(self, model, max_seqs: int = 8, max_positions: int = 1024):
        self.model, self.max_seqs, self.max_positions = model, max_seqs, max_positions
        self.reset()

    def new(self, positions: int = 1024):
        self.count += 1
        return self.cache.admit(str(self.count), positions)

    def reset(self) -> None:
        self.cache = PagedCache.for_requests(self.model.cfg, self.model.dtype, "cpu", self.max_seqs, self.max_positions)
        self.storage = self.cache.storage
        self.count = 0

    def full(self, ids: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        return prefill_prompt(self.model, self.storage, self.new(), ids, chunk=chunk, all_logits=True)


_RUNNERS: dict = {}


@pytest.fixture(autouse=True)
def _fresh_cache():
    yield
    for runner in _RUNNERS.values():
        runner.reset()


@pytest.fixture(scope="session")
def runner_for():
    cache = _RUNNERS

    def make(path) -> Runner:
        if path not in cache:
            cache[path] = Runner(load_model(path, progress=False))
        return cache[path]

    return make
