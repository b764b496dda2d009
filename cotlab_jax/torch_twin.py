"""The PyTorch twin of this lab's training: Hugging Face `LlamaForCausalLM` and
`torch.optim.AdamW` in float32, trained the way the reference (kvignesh1420/cot-icl-lab,
core/train.py) trains, on batches of this lab's sampler.

The reference's step: `AdamW(model.parameters(), lr=lr)` with torch's defaults (betas 0.9 and
0.999, eps 1e-8, weight decay 0.01 on every parameter), a constant rate, no clipping, and HF's
own loss from `labels` (-100 ignored, shifted inside the model, the mean over the batch's loss
tokens). This lab's optional warmup, decay and clipping (`config.train`) map onto torch's own:
transformers' `get_{constant,cosine,linear}_schedule_with_warmup` and
`torch.nn.utils.clip_grad_norm_`.

Used by `tests/test_torch_parity.py`, `python -m cotlab_jax.bench fidelity` and
`python -m cotlab_jax.bench model --vs_torch`; needs the `interop` extra (torch, transformers).
"""

import numpy as np
import torch
import transformers
from flax import nnx

from cotlab_jax import hf_convert
from cotlab_jax.model import LlamaConfig

SCHEDULES = {
    "constant": transformers.get_constant_schedule_with_warmup,
    "cosine": transformers.get_cosine_schedule_with_warmup,
    "linear": transformers.get_linear_schedule_with_warmup,
}


def _tensor(array) -> torch.Tensor:
    return torch.from_numpy(np.asarray(array, np.int64))


class TorchTwin:
    """An HF Llama holding this lab's parameters, with the optimizer, schedule and clipping of
    `train_cfg` (a `config.train`) over `total_steps`."""

    def __init__(
        self,
        params: nnx.State,
        model_config: LlamaConfig,
        train_cfg,
        total_steps: int,
        attn_implementation: str = "eager",
    ):
        self.model_config = model_config
        hf_config = transformers.LlamaConfig(
            **hf_convert.to_hf_config(model_config), attn_implementation=attn_implementation
        )
        self.model = transformers.LlamaForCausalLM(hf_config)
        self.model.load_state_dict(
            {
                name: torch.from_numpy(array)
                for name, array in hf_convert.to_hf_state_dict(params, model_config).items()
            }
        )
        self.model.train()
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=train_cfg.lr,
            betas=(train_cfg.b1, train_cfg.b2),
            eps=train_cfg.eps,
            weight_decay=train_cfg.weight_decay,
        )
        length = {} if train_cfg.lr_schedule == "constant" else dict(num_training_steps=total_steps)
        self.scheduler = SCHEDULES[train_cfg.lr_schedule](
            self.optimizer, num_warmup_steps=train_cfg.warmup_steps, **length
        )
        self.clip_norm = float(train_cfg.grad_clip_norm)

    def step(self, batch) -> tuple[float, float]:
        """One step on a batch of `data.sample_batch`; (loss, gradient norm before clipping).
        Positions are the batch's own (counted over real tokens): HF's default on a batch
        without padding."""
        self.optimizer.zero_grad()
        loss = self.model(
            input_ids=_tensor(batch["input_ids"]),
            attention_mask=_tensor(batch["attention_mask"]),
            position_ids=_tensor(batch["positions"]),
            labels=_tensor(batch["labels"]),
        ).loss
        loss.backward()
        if self.clip_norm:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
        else:
            norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p.grad) for p in self.model.parameters()])
            )
        self.optimizer.step()
        self.scheduler.step()
        return loss.item(), norm.item()

    @torch.no_grad()
    def greedy_decode(self, prompts, prompt_mask, new_tokens: int) -> np.ndarray:
        """Greedy decoding with HF's KV cache: `new_tokens` tokens after left-padded prompts."""
        self.model.eval()
        out = self.model.generate(
            input_ids=_tensor(prompts),
            attention_mask=_tensor(prompt_mask),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
        )
        self.model.train()
        return out[:, np.shape(prompts)[1] :].numpy()

    def params(self) -> nnx.State:
        """The current weights as this lab's parameters (to evaluate them with this lab)."""
        return hf_convert.from_hf_state_dict(
            {name: tensor.numpy() for name, tensor in self.model.state_dict().items()},
            self.model_config,
        )
