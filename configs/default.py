"""The reference's defaults, its `Args()` (core/args.py) and `default_task_card`: the task V=1024,
d=10, N=M=4 inputs and parents, a chain of C=2, K=40 examples, leaky-ReLU processors, `standard`
prompts (no CoT, no special tokens); a depth-4, hidden-2048 Llama (245M parameters); AdamW at lr
5e-5, batch 64, 3.2M tasks (50k steps), eval and checkpoint every 500 steps. A GPU/TPU job.

The reference's batch is per DDP rank: `--config.train.reference_world_size=W` reproduces a run
it made on W GPUs (global batch 64 x W, 50k / W steps). It computes in float32 at full precision,
as the reference; `--config.model.dtype=bfloat16` is this lab's faster option on accelerators.
docs/tasks.md lists where this lab differs.

`python -m cotlab_jax.main --config=configs/default.py`
"""

from cotlab_jax import config as config_lib


def get_config(arg=None):
    del arg
    return config_lib.get_base_config()
