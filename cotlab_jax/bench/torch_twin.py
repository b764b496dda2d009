"""The same Llama, weights and train step in PyTorch (`transformers.LlamaForCausalLM`, sdpa
attention, `torch.optim.AdamW`), for `python -m cotlab_jax.bench model --vs_torch`.

Imported only when a side-by-side run is asked for, so the JAX benchmark runs without torch.
"""

import numpy as np
import torch
import transformers

from cotlab_jax import hf_convert, model


class TorchTwin:
    """One float32 training step (forward, backward, AdamW) and greedy KV-cache decoding of the
    HF model holding `state`'s weights, on the CPU with torch's default thread count."""

    def __init__(self, config: model.LlamaConfig, state, lr, b1, b2, eps, weight_decay):
        hf_config = transformers.LlamaConfig(
            **hf_convert.to_hf_config(config), attn_implementation="sdpa"
        )
        self.hf = transformers.LlamaForCausalLM(hf_config)
        weights = hf_convert.to_hf_state_dict(state, config)
        self.hf.load_state_dict({name: torch.from_numpy(w) for name, w in weights.items()})
        self.hf.train()
        self.optimizer = torch.optim.AdamW(
            self.hf.parameters(), lr=lr, betas=(b1, b2), eps=eps, weight_decay=weight_decay
        )

    def train_step(self, ids: np.ndarray, mask: np.ndarray) -> float:
        """One step on left-padded ids [B, L]; returns the loss: the mean next-token
        cross-entropy over real target tokens, as the JAX step computes it."""
        ids_t = torch.from_numpy(np.asarray(ids, np.int64))
        mask_t = torch.from_numpy(np.asarray(mask, np.int64))
        positions = torch.clamp(torch.cumsum(mask_t, -1) - 1, min=0)
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.hf(input_ids=ids_t, attention_mask=mask_t, position_ids=positions).logits
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids_t[:, 1:].reshape(-1), reduction="none"
        )
        weights = mask_t[:, 1:].reshape(-1).float()
        loss = (losses * weights).sum() / weights.sum()
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    @torch.no_grad()
    def greedy_decode(self, prompts: np.ndarray, prompt_mask: np.ndarray, new_tokens: int):
        self.hf.eval()
        out = self.hf.generate(
            input_ids=torch.from_numpy(np.asarray(prompts, np.int64)),
            attention_mask=torch.from_numpy(np.asarray(prompt_mask, np.int64)),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
        )
        self.hf.train()
        return out[:, prompts.shape[1] :].numpy()
