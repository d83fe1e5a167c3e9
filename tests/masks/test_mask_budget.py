"""The one budget allocator (masks.budget) and the rule registry (masks.rules): allocation arithmetic, selection,
exclusion, and a new rule added in one place that mask_from_checkpoints and the CLI both pick up."""

from __future__ import annotations

import pytest
import torch

from sparse_opd_peft.masks import Budget, SparseMask, exclude_coordinates, mask_from_checkpoints, select_top
from sparse_opd_peft.masks.rules import RULES, register_rule

FFN, ATT = "model.layers.0.mlp.up_proj", "model.layers.0.self_attn.q_proj"


def test_allocate_global_ffn_share_and_per_module():
    numel = {FFN: 600, ATT: 400}
    assert Budget(0.1).allocate(numel) == [((FFN, ATT), 100)]
    assert Budget(0.1, ffn_share=0.8).allocate(numel) == [((FFN,), 80), ((ATT,), 20)]
    assert Budget(0.1, per_module=True).allocate(numel) == [((FFN,), 60), ((ATT,), 40)]
    # an override makes q_proj count as FFN: one group holds both
    assert Budget(0.1, ffn_share=1.0, type_overrides={"q_proj": "ffn"}).allocate(numel) == [((FFN, ATT), 100), ((), 0)]
    with pytest.raises(ValueError, match="non-FFN coordinates but the selected non-FFN modules have only 400"):
        Budget(1.0, ffn_share=0.5).allocate(numel)
    with pytest.raises(ValueError, match="keeps no coordinate.*at least 0.001"):
        Budget(1e-9).allocate(numel)
    with pytest.raises(ValueError, match="no module"):
        Budget(0.1).allocate({})


@pytest.mark.parametrize(
    "kwargs, match",
    [({"density": 0.0}, "density must be in"), ({"density": 1.5}, "density must be in"),
     ({"density": "0.1"}, "density must be a number"), ({"density": 0.1, "ffn_share": 1.2}, "ffn_share must be in"),
     ({"density": 0.1, "ffn_share": 0.5, "per_module": True}, "exclude each other")],
)  # fmt: skip
def test_budget_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Budget(**kwargs)


def test_select_top_exact_with_deterministic_ties():
    scores = {FFN: torch.tensor([[3.0, 1.0, 1.0], [0.0, 2.0, 1.0]]), ATT: torch.tensor([[1.0, 5.0]])}
    got = select_top(scores, [((FFN, ATT), 4)])
    # 5, 3, 2 then one of four 1.0 ties: the first in (module order, flat index) is FFN[0, 1] = flat 1
    assert got[FFN].tolist() == [0, 1, 4] and got[ATT].tolist() == [1]
    per = select_top(scores, [((FFN,), 1), ((ATT,), 1)])
    assert per[FFN].tolist() == [0] and per[ATT].tolist() == [1]
    assert select_top(scores, [((FFN,), 0)]) == {}


def test_exclude_coordinates():
    mask = SparseMask({FFN: torch.tensor([[1, 1, 0], [0, 1, 0]], dtype=torch.bool)}, {"rule": "x"})
    ex = SparseMask({FFN: torch.tensor([[0, 1, 0], [0, 0, 1]], dtype=torch.bool)})
    left = exclude_coordinates(mask, ex)
    assert left.indices(FFN).tolist() == [0, 4] and left.metadata == {"rule": "x", "excluded_coordinates": 1}
    with pytest.raises(ValueError, match="every coordinate of the mask is excluded"):
        exclude_coordinates(mask, mask)
    with pytest.raises(ValueError, match="exclude mask for module .* has shape"):
        exclude_coordinates(mask, SparseMask({FFN: torch.ones(3, 2, dtype=torch.bool)}))


def test_a_new_rule_is_one_function(tmp_path):
    """Registering a score rule makes it a mask_from_checkpoints rule with the Budget's semantics."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8)  # fmt: skip
    torch.manual_seed(0)
    a, b = Qwen3ForCausalLM(cfg), Qwen3ForCausalLM(cfg)
    name = "test_relative_change"
    try:
        register_rule(name, "score", "|ΔW| / (|W0| + 1e-3)")(lambda w0, w1: (w1 - w0).abs() / (w0.abs() + 1e-3))
        with pytest.raises(ValueError, match="registered twice"):
            register_rule(name, "score", "again")(lambda w0, w1: w0)
        mask = mask_from_checkpoints(a, b, name, density=0.1)
        w0 = {n: p.detach() for n, p in a.named_parameters()}
        w1 = {n: p.detach() for n, p in b.named_parameters()}
        scores = {n[: -len(".weight")]: (w1[n] - w0[n]).abs() / (w0[n].abs() + 1e-3)
                  for n in w0 if ".layers." in n and w0[n].dim() == 2}  # fmt: skip
        ref = select_top(scores, Budget(0.1).allocate({n: s.numel() for n, s in scores.items()}))
        assert set(mask) == set(ref) and all(torch.equal(mask.indices(n), ref[n]) for n in ref)
        assert mask.metadata["rule"] == name
        with pytest.raises(ValueError, match="needs a density"):
            mask_from_checkpoints(a, b, name)
    finally:
        RULES.pop(name, None)
    with pytest.raises(ValueError, match="kind must be"):
        register_rule("x", "other", "")
