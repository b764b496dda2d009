"""A CPU-sized distillation of the quickstart's CoT member into a one-layer student.

    python -m cotlab_jax.distill --teacher=runs/quickstart/<cot member> \\
        --config=configs/distill.py[:word|on_policy] --workdir=runs/distill_word

The teacher is the 2-layer, hidden-128 quickstart model (`configs/quickstart.py`); the student
has one layer and hidden size 64. Its data and seed are always the teacher's. `word` (stage 1):
word-level KL mixed half and half with the cross-entropy. `on_policy` (stage 2): half of the
steps on the student's own sampled continuations (temperature 0.85); start it from a stage-1
student with `--config.distill.init_from=runs/distill_word`.
"""

from cotlab_jax import config as config_lib
from cotlab_jax import distill

STAGES = ("word", "on_policy")


def get_config(stage="word"):
    if stage not in STAGES:
        raise ValueError(f"configs/distill.py:{stage} is invalid: expected one of {STAGES}")
    config = config_lib.get_base_config()
    config.model.update(
        dict(
            num_hidden_layers=1,
            hidden_size=64,
            intermediate_size=256,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            dtype="float32",
        )
    )
    config.train.update(
        dict(
            n_tasks=32 * 300,
            batch_size=32,
            lr=1e-3,
            warmup_steps=50,
            lr_schedule="cosine",
            log_every_n_steps=50,
            checkpoint_every_n_steps=100,
        )
    )
    config.eval.update(dict(n_eval_tasks=512, eval_every_n_steps=100, batch_size=128))
    config.distill = distill.distill_defaults()
    if stage == "on_policy":
        config.distill.on_policy_fraction = 0.5
    return config
