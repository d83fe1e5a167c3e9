"""Shared fixtures: a tiny Qwen3 built from a config and masks over its block Linears, and the tiny toy world (built
once per session)."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

import sparse_opd_peft  # noqa: F401  (registers the PEFT method)

torch.set_num_threads(1)  # tiny models: one thread is fastest and steadiest on 2 shared cores


def tiny_config(**overrides) -> Qwen3Config:
    """A 2-layer Qwen3 with hidden 32: about 22k parameters, builds in milliseconds."""
    kwargs = dict(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return Qwen3Config(**kwargs)


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(tiny_config(**overrides)).to(dtype)
    model.eval()
    return model


def block_linears(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]


def random_mask(model, density: float = 0.1, seed: int = 1, names=None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    return {n: torch.rand(modules[n].weight.shape, generator=g) < density for n in (names or block_linears(model))}


@pytest.fixture
def model():
    return make_model()


@pytest.fixture
def mask(model):
    return random_mask(model)


@pytest.fixture
def ids():
    return torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="session")
def tiny_toy_cache(tmp_path_factory):
    """A toy-world cache root in which ``build_world(root, ToyRecipe.tiny())`` has been built, once per session.

    ``build_world`` caches by recipe, so every test that builds the tiny world on this root (``StudyConfig(tiny=True,
    cache_dir=...)``, ``--tiny --cache-dir``) loads it instead of training it again. Its teacher is nearly untrained
    (held-out accuracy of a few %): tests on it check mechanics, not results.
    """
    from sparse_opd_peft.lab.toy import ToyRecipe, build_world

    root = tmp_path_factory.mktemp("toy_cache")
    build_world(root, ToyRecipe.tiny(), progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_toy_world(tiny_toy_cache):
    """The tiny toy world of :func:`tiny_toy_cache` (loaded from the cache)."""
    from sparse_opd_peft.lab.toy import ToyRecipe, build_world

    return build_world(tiny_toy_cache, ToyRecipe.tiny(), progress=False)
