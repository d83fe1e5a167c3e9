"""On-policy distillation on ``accelerate``: rollouts, teacher scoring, OPD / SFT / RLVR / mix losses, the trainer.

Quick start::

    from sparse_opd_peft.opd import OPDConfig, OPDTrainer
    trainer = OPDTrainer(student, teacher, tokenizer, train_ds, OPDConfig(lr=1e-3, steps=200, batch_size=64),
                         eval_dataset=heldout_ds, reward_fn=lambda p, c, a: [float(x.startswith(y)) for x, y in zip(c, a)])
    history = trainer.train()

Multi-process: ``accelerate launch --num_processes 2 script.py`` (GPUs) runs the same script data-parallel; on CPU use
``accelerate launch --multi_gpu --num_processes 2 script.py`` (DDP over gloo; ``--cpu`` alone starts one process).
With the same global ``batch_size`` and seed it gives the single-process result up to float rounding.
"""

from .checkpoint import (
    load_training_state,
    read_training_state,
    save_trainable_state,
    save_training_state,
    trainable_state_dict,
)
from .config import BASELINES, LOSSES, TOKEN_KEEP, OPDConfig
from .losses import (
    discounted_future_sum,
    full_reverse_kl,
    grpo_advantages,
    iw_prefix_weights,
    leave_one_out_baseline,
    mix_advantages,
    policy_gradient_loss,
    reverse_kl_estimate,
    sampled_token_advantages,
    teacher_topk_logprobs,
    token_keep_weights,
    token_logprobs,
    topk_reverse_kl,
)
from .rollout import (
    Rollout,
    SeededSampler,
    build_completion_batch,
    completion_mask,
    decode_completions,
    encode_prompts,
    generate_rollouts,
    position_ids_from_mask,
    sample_seed,
    unwrap_for_generation,
)
from .tokenizers import check_tokenizer_compat, model_vocab_rows
from .trainer import OPDTrainer, RewardFn

__all__ = [
    "BASELINES",
    "LOSSES",
    "TOKEN_KEEP",
    "OPDConfig",
    "OPDTrainer",
    "RewardFn",
    "Rollout",
    "SeededSampler",
    "build_completion_batch",
    "check_tokenizer_compat",
    "completion_mask",
    "decode_completions",
    "discounted_future_sum",
    "encode_prompts",
    "full_reverse_kl",
    "generate_rollouts",
    "grpo_advantages",
    "iw_prefix_weights",
    "leave_one_out_baseline",
    "mix_advantages",
    "model_vocab_rows",
    "policy_gradient_loss",
    "position_ids_from_mask",
    "read_training_state",
    "reverse_kl_estimate",
    "sample_seed",
    "sampled_token_advantages",
    "save_trainable_state",
    "load_training_state",
    "save_training_state",
    "teacher_topk_logprobs",
    "token_keep_weights",
    "token_logprobs",
    "topk_reverse_kl",
    "trainable_state_dict",
    "unwrap_for_generation",
]
