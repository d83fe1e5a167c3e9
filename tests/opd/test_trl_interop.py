"""Our adapter as the student inside TRL's ``DistillationTrainer`` (skipped when ``trl`` is not installed).

TRL's trainer is fully on-policy (the student samples every completion) and ``beta=1.0`` selects the exact
full-vocabulary reverse KL, i.e. our ``loss="full_kl"``. Its loss runs the student *backbone* and projects the
hidden states through ``lm_head.weight`` itself (in chunks), bypassing ``PeftModel.forward``: adapters inside the
transformer blocks train, an adapter on ``lm_head`` would not (TRL refuses it up front).
"""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import Qwen3ForCausalLM

from sparse_opd_peft import SparseOPDConfig
from sparse_opd_peft.lab.toy import ModelSpec, build_model, build_tokenizer

trl = pytest.importorskip("trl")
DistillationConfig = getattr(trl, "DistillationConfig", None)
DistillationTrainer = getattr(trl, "DistillationTrainer", None)
if DistillationTrainer is None:  # pragma: no cover - older TRL (GKDTrainer only)
    pytest.skip("this trl has no DistillationTrainer", allow_module_level=True)

torch.set_num_threads(1)
TOKENIZER = build_tokenizer()
PROMPTS = ["123+456=", "001+002=", "999+999=", "500+250=", "042+017=", "300+700="]


def _model(seed: int, hidden: int = 32) -> Qwen3ForCausalLM:
    """A 2-layer toy Qwen3 (head_dim 16, untied) over the toy tokenizer; the spec's schedule is unused."""
    spec = ModelSpec(hidden, 2, 2, 1, 16, 2 * hidden, steps=0, lr=1e-3)
    return build_model(spec, TOKENIZER, seed)


def _mask(model: torch.nn.Module, with_lm_head: bool = False, density: float = 0.2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    if with_lm_head:
        names.append("lm_head")
    modules = dict(model.named_modules())
    return {n: torch.rand(modules[n].weight.shape, generator=g) < density for n in names}


def _args(tmp_path, steps: int = 3) -> DistillationConfig:
    return DistillationConfig(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], bf16=False, max_steps=steps,
        per_device_train_batch_size=3, max_completion_length=6, learning_rate=1e-2, logging_steps=1,
        save_strategy="no", beta=1.0, temperature=1.0, disable_tqdm=True, seed=0,
    )  # fmt: skip


def test_sparse_adapter_trains_inside_trl_distillation(tmp_path):
    student, teacher = _model(0), _model(1, hidden=48)
    reference = {n: p.detach().clone() for n, p in student.named_parameters()}
    mask = _mask(student)
    peft_model = get_peft_model(student, SparseOPDConfig(mask=mask))
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    trainer = DistillationTrainer(
        peft_model, teacher, args=_args(tmp_path), train_dataset=Dataset.from_dict({"prompt": PROMPTS * 2}),
        processing_class=TOKENIZER,
    )  # fmt: skip
    assert trainer.args.gradient_checkpointing  # TRL's default: our autograd function is recomputed in backward
    trainer.train()

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    after = dict(trainer.accelerator.unwrap_model(trainer.model).named_parameters())
    changed = {n for n, p in after.items() if not torch.equal(p.detach(), before[n])}
    assert changed, "no parameter moved"
    assert all("sparse_opd_values" in n for n in changed), sorted(changed)
    assert sum("sparse_opd_values" in n for n in changed) == len(mask)  # every block adapter got a gradient

    merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
    moved_inside = 0
    for name, param in merged.named_parameters():
        module = name.removesuffix(".weight")
        if module in mask:
            m = mask[module]
            assert torch.equal(param.detach()[~m], reference[name][~m]), f"{name}: a masked-out coordinate moved"
            moved_inside += int((param.detach()[m] != reference[name][m]).sum())
        else:
            assert torch.equal(param.detach(), reference[name]), f"{name} is not adapted but changed"
    assert moved_inside > 0


def test_trl_refuses_an_adapter_on_lm_head(tmp_path):
    """The documented caveat, as TRL 1.16 enforces it: an adapter on lm_head would be silently ignored by the
    chunked loss, so the trainer raises instead."""
    student, teacher = _model(0), _model(1)
    peft_model = get_peft_model(student, SparseOPDConfig(mask=_mask(student, with_lm_head=True)))
    with pytest.raises(ValueError, match="lm_head"):
        DistillationTrainer(
            peft_model, teacher, args=_args(tmp_path), train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
            processing_class=TOKENIZER,
        )  # fmt: skip


def test_chunked_loss_gives_no_gradient_to_an_lm_head_adapter():
    """Why TRL refuses it: its loss reads ``lm_head.weight`` (the frozen base weight) directly, so an lm_head
    adapter gets no gradient there, while our trainer's loss (through ``PeftModel.forward``) does train it."""
    chunked = getattr(pytest.importorskip("trl.trainer.distillation_trainer"), "_chunked_divergence_loss", None)
    if chunked is None:
        pytest.skip("this trl has no _chunked_divergence_loss")
    student, teacher = _model(0), _model(1)
    peft_model = get_peft_model(student, SparseOPDConfig(mask=_mask(student, with_lm_head=True)))
    ids = torch.tensor([TOKENIZER(p)["input_ids"] for p in PROMPTS])
    keep = torch.ones(ids.shape[0], ids.shape[1] - 1)

    def head_grad(loss: torch.Tensor) -> tuple[bool, bool]:
        peft_model.zero_grad(set_to_none=True)
        loss.backward()
        grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
        head = [g for n, g in grads.items() if "lm_head" in n]
        body = [g for n, g in grads.items() if "lm_head" not in n]
        return any(g is not None and g.abs().sum() > 0 for g in head), all(g is not None for g in body)

    backbone = peft_model.base_model.model.model
    h_s = backbone(input_ids=ids).last_hidden_state[:, :-1]
    with torch.no_grad():
        h_t = teacher.model(input_ids=ids).last_hidden_state[:, :-1]
    loss, _, _ = chunked(h_s, h_t, peft_model.get_output_embeddings().weight, teacher.lm_head.weight, keep, 1.0)
    head_trained, body_trained = head_grad(loss)
    assert body_trained and not head_trained

    log_s = torch.log_softmax(peft_model(input_ids=ids).logits[:, :-1], -1)
    with torch.no_grad():
        log_t = torch.log_softmax(teacher(input_ids=ids).logits[:, :-1], -1)
    reverse_kl = (log_s.exp() * (log_s - log_t)).sum(-1).mean()
    head_trained, body_trained = head_grad(reverse_kl)
    assert body_trained and head_trained
