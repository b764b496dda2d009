"""The compression pipeline (distill, prune, re-distill, quantize) on a CPU, from the
quickstart's CoT member:

    python -m cotlab_jax.main --config=configs/quickstart.py --workdir=runs/quickstart
    python -m cotlab_jax.compress --config=configs/compress.py \\
        --teacher=runs/quickstart/<the cot member> --workdir=runs/compress

The teacher is the quickstart's 2-layer, hidden-128 CoT model. Stage 1 trains a student of the
same shape from scratch by word-level distillation (400 steps at batch 32: the teacher's
cross-entropy and KL, half and half); OSSCAR then removes half of every layer's MLP neurons
(512 -> 256, calibrated on 128 tasks); 300 steps of re-distillation, a quarter of them on the
student's own samples, recover what pruning lost; int8 weights (`w8`) end it. The student
always takes the teacher's data and seed, so every stage is evaluated on the same 512 frozen
tasks as the teacher.

Variants (`:name`):
- `shallow`: a one-layer student (the depth question: can a shallow student learn CoT from a
  deeper teacher?).
- sweeps, one pipeline per member, a table of all their stages: `sweep_depth` (student depth
  1, 2), `sweep_keep` (kept MLP fraction 0.75, 0.5, 0.25), `sweep_temperature` (distillation
  temperature 1, 2, 4), `sweep_on_policy` (the re-distillation's on-policy fraction 0, 0.5, 1).
"""

from cotlab_jax import compress, distill
from cotlab_jax import config as config_lib

SWEEPS = {
    "sweep_depth": (("model.num_hidden_layers", (1, 2)),),
    "sweep_keep": (("compress.mlp_keep", (0.75, 0.5, 0.25)),),
    "sweep_temperature": (("distill.temperature", (1.0, 2.0, 4.0)),),
    "sweep_on_policy": (("compress.redistill_on_policy_fraction", (0.0, 0.5, 1.0)),),
}
VARIANTS = ("cpu", "shallow", *SWEEPS)


def get_config(variant="cpu"):
    if variant not in VARIANTS:
        raise ValueError(f"configs/compress.py:{variant} is invalid: expected one of {VARIANTS}")
    config = config_lib.get_base_config()
    config.model.update(
        dict(
            num_hidden_layers=1 if variant == "shallow" else 2,
            hidden_size=128,
            intermediate_size=512,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            dtype="float32",
        )
    )
    config.train.update(
        dict(
            n_tasks=32 * 400,
            batch_size=32,
            lr=1e-3,
            warmup_steps=50,
            lr_schedule="cosine",
            log_every_n_steps=50,
            checkpoint_every_n_steps=100,
        )
    )
    config.eval.update(
        dict(n_eval_tasks=512, eval_every_n_steps=100, batch_size=128, example_counts="all")
    )
    config.log.progress_bar = False
    config.distill = distill.distill_defaults()
    config.compress = compress.compress_defaults()
    config.compress.update(
        dict(
            mlp_keep=0.5,
            calibration_tasks=128,
            redistill_tasks=32 * 300,
            redistill_on_policy_fraction=0.25,
            quantize="w8",
            decode_tasks=128,
            decode_repeats=5,
        )
    )
    if variant in SWEEPS:
        config.sweep.name = f"compress_{variant.removeprefix('sweep_')}"
        config.sweep.axes = SWEEPS[variant]
    return config
