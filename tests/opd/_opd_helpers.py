"""Shared helpers of the OPDTrainer tests (a tiny trainer, a reward, state snapshots, the reference gradient)."""

from __future__ import annotations

import torch
from _distributed_check import exact_reward, tiny_dataset, tiny_model, tiny_tokenizer
from accelerate import Accelerator

from sparse_opd_peft.opd import OPDConfig, OPDTrainer

TIMING = ("tokens_per_s",)


def make_cfg(**kw) -> OPDConfig:
    base = dict(lr=1e-2, steps=2, batch_size=4, num_generations=2, max_new_tokens=4, seed=1, progress_bar=False)
    return OPDConfig(**{**base, **kw})


def length_reward(prompts, completions, answers):
    """A reward that differs between samples of a random model (the exact-answer reward is always 0 there)."""
    return [float(len(c)) for c in completions]


def make_trainer(student=None, teacher="default", cfg=None, **kw) -> OPDTrainer:
    student = tiny_model(0) if student is None else student
    teacher = tiny_model(1) if teacher == "default" else teacher
    kw.setdefault("reward_fn", exact_reward)
    return OPDTrainer(
        student, teacher, tiny_tokenizer(), tiny_dataset(), cfg or make_cfg(), accelerator=Accelerator(cpu=True), **kw
    )


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed_keys(before: dict, model: torch.nn.Module) -> set[str]:
    return {k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])}


def reference_gradient(trainer: OPDTrainer, student: torch.nn.Module, teacher: torch.nn.Module) -> list[torch.Tensor]:
    """The gradient of the configured loss for step 0, built from the public loss functions on rollouts generated
    here (same seeds), with ``student`` a copy of the trainer's student before the step."""
    from sparse_opd_peft.opd import decode_completions, generate_rollouts, sample_seed
    from sparse_opd_peft.opd import losses as L

    cfg, tok = trainer.config, trainer.tokenizer
    v, n = len(tok), cfg.num_generations
    items = trainer._items(0)
    prompts = [trainer._prompts[i] for _, i in items]
    seeds = [sample_seed(cfg.seed, "rollout", pos, k) for pos, _ in items for k in range(n)]
    ro = generate_rollouts(teacher if cfg.off_policy else student, tok, prompts, max_new_tokens=cfg.max_new_tokens,
                           num_generations=n, seeds=seeds, vocab_size=v)  # fmt: skip
    mask, ids, c = ro.completion_mask, ro.completion_ids, ro.completion_ids.shape[1]

    def logits(model):
        out = model(input_ids=ro.input_ids, attention_mask=ro.attention_mask, position_ids=ro.position_ids).logits
        return out[:, -(c + 1) : -1]

    s_logits = logits(student)
    with torch.no_grad():
        t_logits = logits(teacher)
    lp_s, lp_t = L.token_logprobs(s_logits, ids, v), L.token_logprobs(t_logits, ids, v)
    keep = None
    if cfg.token_keep != "all":
        scores = torch.stack([
            torch.rand(cfg.max_new_tokens, generator=torch.Generator().manual_seed(sample_seed(cfg.seed, "keep", pos, k)))[:c]
            for pos, _ in items for k in range(n)
        ])  # fmt: skip
        keep = L.token_keep_weights(lp_s.detach() - lp_t, mask, cfg.token_keep, cfg.token_keep_ratio, scores)
    if cfg.loss == "full_kl":
        loss = (L.full_reverse_kl(s_logits, t_logits, mask, v) * (mask if keep is None else keep)).sum()
    elif cfg.loss == "topk_kl":
        top_lp, top_ids = L.teacher_topk_logprobs(t_logits, cfg.topk, v)
        loss = (L.topk_reverse_kl(s_logits, top_lp, top_ids, mask, v) * (mask if keep is None else keep)).sum()
    else:
        adv = L.sampled_token_advantages(lp_s, lp_t, mask, cfg.discount, keep, cfg.sampled_token_clip,
                                         cfg.sampled_token_prefix_gamma)  # fmt: skip
        if cfg.baseline == "position":
            adv = adv - L.leave_one_out_baseline(adv, mask)
        if cfg.loss == "mix":
            texts = decode_completions(tok, ro)
            rewards = torch.tensor(length_reward(None, texts, None))
            adv = L.mix_advantages(adv, L.grpo_advantages(rewards, n, cfg.std_normalize), cfg.alpha, mask)
        loss = L.policy_gradient_loss(lp_s, adv, mask, 1.0)
    params = [p for p in student.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss / mask.sum(), params))
