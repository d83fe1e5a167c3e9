"""Masks from a (source, tuned) checkpoint pair: :func:`mask_from_checkpoints` applies a registered rule
(:mod:`~sparse_opd_peft.masks.rules`: ``bf16_visible``, ``abs_threshold``, ``topk``, ...) module by module, and for
score rules selects the coordinates under a :class:`~sparse_opd_peft.masks.budget.Budget`, exactly, by streaming.

Weights are streamed one module at a time (see :mod:`sparse_opd_peft.diagnostics.sources`); module names are
module names without ``.weight`` (``model.layers.0.mlp.up_proj``), as in ``model.named_modules()``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from tqdm.auto import tqdm

from ..diagnostics.metrics import ABS_THRESHOLD, ETA, check_finite
from ..diagnostics.sources import module_name, open_source, paired_weights
from .budget import Budget, Group, select_top
from .mask import SparseMask
from .rules import RULES, MaskRule

_CACHE_LIMIT = 250_000_000  # score entries kept in memory between top-k passes (1 GB); above it, weights are re-read
_HI_BINS = 1 << 15  # non-negative finite float32 bit patterns >> 16 are < 0x7F80


def _flat_indices(mask: torch.Tensor) -> torch.Tensor:
    return mask.reshape(-1).nonzero().squeeze(1).cpu()


def _pair(src, tun, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    w0, w1 = src.get(name), tun.get(name)
    check_finite(w0, f"{src.location(name)}: tensor '{name}'")
    check_finite(w1, f"{tun.location(name)}: tensor '{name}'")
    return w0, w1


def _rule(rule: str, density, ffn_share, per_module: bool) -> MaskRule:
    if rule not in RULES:
        raise ValueError(f"unknown mask rule {rule!r}; use one of {', '.join(RULES)}")
    spec = RULES[rule]
    if spec.kind == "threshold" and (density is not None or ffn_share is not None or per_module):
        raise ValueError(f"density / ffn_share / per_module apply to score rules (e.g. 'topk') only, not rule={rule!r}")
    if spec.kind == "score" and density is None:
        raise ValueError(f"rule={rule!r} needs a density in (0, 1] (e.g. --density 0.05)")
    return spec


def _streaming_top(src, tun, groups: list[Group], score: Callable, progress: bool) -> dict[str, torch.Tensor]:
    """Exact top-``count`` scores per group over all its modules; ties broken by (module order, flat index).

    Three streaming passes over the modules (a histogram of the high 16 bits of the float32 bit pattern, then of
    the low 16 bits inside the threshold bin, then selection); scores stay cached between passes when they fit.
    """
    group_of = {n: g for g, (members, _) in enumerate(groups) for n in members}
    names = [n for members, _ in groups for n in members]
    budgets = {g: count for g, (_, count) in enumerate(groups)}
    total = sum(src.shape(n)[0] * src.shape(n)[1] for n in names)
    cache: dict[str, torch.Tensor] | None = {} if total <= _CACHE_LIMIT else None

    def bits(name: str) -> torch.Tensor:
        if cache is not None and name in cache:
            return cache[name]
        s = score(*_pair(src, tun, name)).float().reshape(-1).cpu() + 0.0  # + 0.0 turns -0.0 into 0.0
        if not bool((s >= 0).all()):
            raise ValueError(f"module '{name}': the mask rule gave a negative score; score rules return scores >= 0")
        b = s.view(torch.int32)
        if cache is not None:
            cache[name] = b
        return b

    def threshold(hist: torch.Tensor, budget: int) -> tuple[int, int]:
        """Bin b with count(> b) < budget <= count(>= b); returns (b, budget - count(> b))."""
        above = torch.cumsum(hist.flip(0), 0).flip(0)  # above[i] = count(>= i)
        b = int((above >= budget).nonzero().max())
        return b, budget - (int(above[b + 1]) if b + 1 < hist.numel() else 0)

    hi_hist = {g: torch.zeros(_HI_BINS, dtype=torch.int64) for g in budgets}
    for n in tqdm(names, desc="mask pass 1/3", disable=not progress):
        hi_hist[group_of[n]] += torch.bincount(bits(n) >> 16, minlength=_HI_BINS)
    hi = {g: threshold(hi_hist[g], b) for g, b in budgets.items() if b > 0}
    lo_hist = {g: torch.zeros(1 << 16, dtype=torch.int64) for g in hi}
    for n in tqdm(names, desc="mask pass 2/3", disable=not progress):
        g = group_of[n]
        if g in hi:
            b = bits(n)
            lo_hist[g] += torch.bincount(b[(b >> 16) == hi[g][0]] & 0xFFFF, minlength=1 << 16)
    cut = {}
    for g, (hb, need) in hi.items():
        lb, ties = threshold(lo_hist[g], need)
        cut[g] = [(hb << 16) | lb, ties]  # exact bit pattern of the threshold and how many ties to take
    out = {}
    for n in tqdm(names, desc="mask pass 3/3", disable=not progress):
        g = group_of[n]
        if g not in cut:
            continue
        b = bits(n)
        sel = b > cut[g][0]
        tie_idx = (b == cut[g][0]).nonzero().squeeze(1)[: cut[g][1]]
        cut[g][1] -= tie_idx.numel()
        sel[tie_idx] = True
        out[n] = sel.nonzero().squeeze(1)
    return out


def mask_from_checkpoints(
    source,
    tuned,
    rule: str = "bf16_visible",
    *,
    density: float | None = None,
    ffn_share: float | None = None,
    per_module: bool = False,
    modules: str | Iterable[str] | None = None,
    eta: float | None = None,
    abs_threshold: float | None = None,
    type_overrides: Mapping[str, str] | None = None,
    progress: bool = False,
) -> SparseMask:
    """Mask of the coordinates an update moved between two checkpoints.

    Args:
        source: W0 - model directory, ``.safetensors`` file, Hub id or ``nn.Module``. tuned: W₊, same kinds.
        rule: a registered rule (:data:`~sparse_opd_peft.masks.rules.RULES`): ``"bf16_visible"``,
            ``"abs_threshold"`` (threshold rules) or ``"topk"`` (a score rule).
        density: for score rules, the share of coordinates to select (global over the selected modules unless
            ``per_module``). ffn_share: share of that budget given to FFN modules; None = one global ranking.
        per_module: ``round(density · numel)`` coordinates in every module.
        modules: None (block Linear layers), a regex, or a list of module names.
        eta / abs_threshold: options of the ``bf16_visible`` / ``abs_threshold`` rules (None: 1e-3 / 1e-5).
        type_overrides: module-type rules (``module_type``). progress: show progress bars.

    Returns:
        :class:`SparseMask` over the modules with at least one selected coordinate; ``metadata`` records
        source, tuned, rule, density (requested and achieved), ffn_share and the rule's options.

    Raises:
        ValueError / FileNotFoundError: bad arguments, missing or mismatched checkpoints, non-finite weights, a
            budget larger than the modules, or no coordinate selected at all.
    """
    spec = _rule(rule, density, ffn_share, per_module)
    budget = Budget(density, ffn_share, per_module, type_overrides) if spec.kind == "score" else None
    options = {k: v for k, v in (("eta", eta), ("abs_threshold", abs_threshold)) if k in spec.options}
    # the values the built-in threshold rules use (each rule maps None to the same default), for the metadata; the
    # rule itself gets the options as given, so a registered rule's own None handling stays in force
    resolved = {k: {"eta": ETA, "abs_threshold": ABS_THRESHOLD}[k] if v is None else v for k, v in options.items()}
    src, tun = open_source(source), open_source(tuned)
    with src, tun:
        names = paired_weights(src, tun, modules)
        shapes = {n: tuple(src.shape(n)) for n in names}
        numel = {n: shapes[n][0] * shapes[n][1] for n in names}
        if budget is not None and not per_module:
            selected = _streaming_top(src, tun, budget.allocate(numel), spec.fn, progress)
        elif budget is not None:
            selected = {}
            for (n,), count in budget.allocate(numel):
                selected.update(select_top({n: spec.fn(*_pair(src, tun, n))}, [((n,), count)]))
        else:
            selected = {n: _flat_indices(spec.fn(*_pair(src, tun, n), **options))
                        for n in tqdm(names, desc=f"mask ({rule})", disable=not progress)}  # fmt: skip
        entries = {module_name(n): (shapes[n], selected[n]) for n in names if n in selected and selected[n].numel()}
        label_src, label_tun = src.label, tun.label
    if not entries:
        raise ValueError(
            f"no coordinate differs between {label_src} and {label_tun} under rule={rule!r}; check that you passed "
            "the tuned checkpoint, or use rule='topk' with a density"
        )
    nnz = sum(int(idx.numel()) for _, idx in entries.values())
    metadata = {
        "source": label_src, "tuned": label_tun, "rule": rule, "density": density, "ffn_share": ffn_share,
        "per_module": per_module, "achieved_density": nnz / sum(numel.values()), "n_modules_analysed": len(names),
    }  # fmt: skip
    if spec.kind == "threshold":
        metadata.update({k: resolved[k] for k in spec.options})
    return SparseMask.from_indices(entries, metadata)
