"""Our cases for peft's own ``tests/test_custom_models.py`` harness, on its ``MLP`` (``lin0``: Linear(10, 20),
``lin1``: Linear(20, 2)).

They replace peft's ``TEST_CASES`` / ``MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES`` (see ``sparse_opd_harness.py``): a mask
on one Linear, on the other, on both, with ``modules_to_save``, with a subspace (alone and with a mask), with
``init_weights=False`` (applied by the harness itself, see below), at low density (int32 indices on disk) and high
density (a packed bitmask), dense through ``target_modules`` only, a mask narrowed by ``target_modules``, and the
``gather`` gradient path. Masks are bool tensors drawn from fixed seeds,
so every run sees the same coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparse_opd_peft import SparseOPDConfig

SHAPES = {"lin0": (20, 10), "lin1": (2, 20)}


def _mask(name: str, density: float, seed: int) -> torch.Tensor:
    """A bool (out, in) mask of ``name``'s weight with about ``density`` of its entries set (at least one)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(SHAPES[name], generator=g) < density
    mask.view(-1)[seed % mask.numel()] = True
    return mask


def _basis(in_features: int, rank: int, seed: int) -> torch.Tensor:
    """An orthonormal float32 (in, r) basis."""
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(in_features, rank, generator=g))[0].contiguous()


def exact(name: str, count: int, seed: int) -> torch.Tensor:
    """A bool (out, in) mask of ``name``'s weight with exactly ``count`` entries set."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(SHAPES[name], dtype=torch.bool)
    mask.view(-1)[torch.randperm(mask.numel(), generator=g)[:count]] = True
    return mask


def masks(*spec: tuple[str, float, int]) -> dict[str, torch.Tensor]:
    """``{name: bool (out, in)}`` for ``(name, density, seed)`` triples."""
    return {name: _mask(name, density, seed) for name, density, seed in spec}


@dataclass
class SparseOPDConfigAnyBase(SparseOPDConfig):
    """``SparseOPDConfig`` with ``check_fingerprint=False`` by default, for peft's tests parametrized on config
    classes (``ALL_PEFT_CONFIG_CLASSES``): some of them (``TestRequiresGrad.test_loading_model_*``) load a saved
    adapter onto a *newly initialised* ``DeepMLP``, i.e. another base model, which the base-weight fingerprint check
    refuses by design. Everything else is the real config; the ``TEST_CASES`` tests keep the check on."""

    check_fingerprint: bool = False


C = SparseOPDConfig
TEST_CASES = [
    ("Vanilla MLP 1 SparseOPD", "MLP", C, {"mask": masks(("lin0", 0.3, 1))}),
    ("Vanilla MLP 2 SparseOPD", "MLP", C, {"mask": masks(("lin1", 0.5, 2))}),
    ("Vanilla MLP 3 SparseOPD", "MLP", C, {"mask": masks(("lin0", 0.3, 3), ("lin1", 0.5, 4))}),
    ("Vanilla MLP 4 SparseOPD", "MLP", C, {"mask": masks(("lin0", 0.3, 5)), "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 5 SparseOPD subspace", "MLP", C, {"subspace": {"lin0": _basis(10, 3, 6)}}),
    (
        "Vanilla MLP 6 SparseOPD mask + subspace",
        "MLP",
        C,
        {"mask": masks(("lin0", 0.2, 7), ("lin1", 0.4, 8)), "subspace": {"lin1": _basis(20, 2, 9)}},
    ),
    # 6 of 200 coordinates (< 1/32): stored as int32 indices; 95 % / 100 %: stored as packed bitmasks. The seed is
    # one whose rows include hidden units that are active on peft's first test input (its safe-merge check looks
    # at that sample only; a mask on dead ReLU units would not change it).
    ("Vanilla MLP 7 SparseOPD low density", "MLP", C, {"mask": {"lin0": exact("lin0", 6, 15)}}),
    ("Vanilla MLP 8 SparseOPD high density", "MLP", C, {"mask": masks(("lin0", 0.95, 13), ("lin1", 1.0, 14))}),
    ("Vanilla MLP 9 SparseOPD dense target_modules", "MLP", C, {"target_modules": ["lin0"]}),
    ("Vanilla MLP 10 SparseOPD dense target_modules str", "MLP", C, {"target_modules": "lin1"}),
    (
        "Vanilla MLP 11 SparseOPD mask narrowed by target_modules",
        "MLP",
        C,
        {"mask": masks(("lin0", 0.3, 15), ("lin1", 0.5, 16)), "target_modules": ["lin1"]},
    ),
    ("Vanilla MLP 12 SparseOPD gather grad_path", "MLP", C, {"mask": masks(("lin0", 0.3, 17)), "grad_path": "gather"}),
]
# save_dtype="bfloat16" / "float16" is not a case: it rounds values on save by design (for sharing), while peft's
# save / load tests require a lossless round trip; tests/tuner/test_storage.py covers it.
# init_weights=False is not a case of its own: peft's harness sets it itself (set_init_weights_false) wherever a test
# needs an adapter that changes the output (save / load, merge, safe merge, training, ...), on every case above.

MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES = [
    (
        "SparseOPD Same",
        "sparse_opd",
        C,
        {"mask": masks(("lin0", 0.3, 20)), "init_weights": False},
        {"mask": masks(("lin0", 0.3, 21)), "init_weights": False},
    ),
    (
        "SparseOPD Different",
        "sparse_opd",
        C,
        {"mask": masks(("lin0", 0.3, 22)), "init_weights": False},
        {"mask": masks(("lin1", 0.5, 23)), "init_weights": False},
    ),
    (
        "SparseOPD Same subspace",
        "sparse_opd",
        C,
        {"mask": masks(("lin0", 0.3, 24)), "subspace": {"lin0": _basis(10, 2, 25)}, "init_weights": False},
        {"subspace": {"lin0": _basis(10, 3, 26)}, "init_weights": False},
    ),
]
