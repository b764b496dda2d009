"""A tiny compression pipeline for end-to-end tests: a teacher of `tiny.py`'s task distilled
into a one-layer student by word-level steps, half its MLP neurons pruned, re-distilled,
quantized to int8 weights."""

from cotlab_jax import compress, distill
from cotlab_jax import config as config_lib


def get_config(arg=None):
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
        dict(n_tasks=8 * 20, batch_size=8, lr=3e-3, log_every_n_steps=5, checkpoint_every_n_steps=5)
    )
    config.eval.update(
        dict(
            n_eval_tasks=24,
            eval_every_n_steps=10,
            batch_size=16,
            max_pred_tokens=12,
        )
    )
    config.log.progress_bar = False
    config.log.tensorboard = False
    config.distill = distill.distill_defaults()
    config.compress = compress.compress_defaults()
    config.compress.update(
        dict(
            calibration_tasks=16,
            redistill_tasks=8 * 15,
            decode_tasks=8,
            decode_repeats=1,
        )
    )
    if arg == "sweep":
        config.sweep.axes = (("compress.mlp_keep", (0.5, 0.25)),)
        config.compress.quantize = ""
        config.compress.redistill_on_policy_fraction = 0.5
    return config
