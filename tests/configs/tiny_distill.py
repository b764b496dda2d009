"""A tiny distillation for end-to-end tests: a one-layer student of a `tiny.py` teacher, half of
its steps on policy (`:word` for word-level steps only)."""

from cotlab_jax import config as config_lib
from cotlab_jax import distill


def get_config(stage="mixed"):
    config = config_lib.get_base_config()
    config.model.update(
        dict(
            num_hidden_layers=1,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            dtype="float32",
        )
    )
    config.train.update(
        dict(
            n_tasks=8 * 30, batch_size=8, lr=3e-3, log_every_n_steps=5, checkpoint_every_n_steps=10
        )
    )
    config.eval.update(
        dict(n_eval_tasks=24, eval_every_n_steps=20, batch_size=16, max_pred_tokens=12)
    )
    config.log.progress_bar = False
    config.distill = distill.distill_defaults()
    config.distill.on_policy_fraction = 0.0 if stage == "word" else 0.5
    return config
