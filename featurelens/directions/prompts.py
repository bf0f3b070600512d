"""Chat formatting of instructions, and the post-instruction token positions.

The post-instruction tokens are everything the chat template puts after the user's text (for SmolLM2:
``<|im_end|>``, a newline, ``<|im_start|>assistant`` and a newline). Prompts are left-padded so those
tokens sit at the same negative offsets in every row. Models without a chat template get a plain
``User: ...\\nAssistant:`` frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from featurelens.errors import FeatureLensError
from featurelens.models.loading import LoadedModel

FALLBACK_TEMPLATE = "User: {instruction}\nAssistant:"


def format_instruction(tokenizer: Any, instruction: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                                 add_generation_prompt=True))
    return FALLBACK_TEMPLATE.format(instruction=instruction)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def n_post_instruction_tokens(tokenizer: Any, probe: str = "Tell me about the weather") -> int:
    """Number of template tokens after the user's text."""
    full = format_instruction(tokenizer, probe)
    i = full.rfind(probe)
    if i < 0:
        raise FeatureLensError("the chat template does not contain the instruction text verbatim")
    n = len(_encode(tokenizer, full)) - len(_encode(tokenizer, full[: i + len(probe)]))
    if n <= 0:
        raise FeatureLensError("the chat template leaves no tokens after the instruction")
    return n


@dataclass(frozen=True)
class PromptBatch:
    """Left-padded chat-formatted prompts."""

    input_ids: Tensor
    """``[batch, seq]`` token ids, left-padded."""
    attention_mask: Tensor
    """``[batch, seq]`` 1 for real tokens."""
    position_ids: Tensor
    """``[batch, seq]`` positions counted from each row's first real token."""


def left_pad(rows: list[list[int]], pad: int, device: torch.device | str = "cpu") -> PromptBatch:
    """Token rows left-padded with ``pad``, each with positions counted from its own first token."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), int(pad), dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, T - len(r) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    return PromptBatch(ids.to(device), mask.to(device), pos.to(device))


def encode_prompts(tokenizer: Any, instructions: list[str], device: torch.device | str = "cpu") -> PromptBatch:
    rows = [_encode(tokenizer, format_instruction(tokenizer, x)) for x in instructions]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return left_pad(rows, int(pad), device)


def next_token_logits(lm: LoadedModel, instructions: list[str]) -> Tensor:
    """``[n, vocab]`` float32 logits at the last prompt position (the first generated token), in one
    forward pass on the model's device; gradients flow (the refinement needs them)."""
    pb = encode_prompts(lm.tokenizer, instructions, lm.device)
    out = lm.model(input_ids=pb.input_ids, attention_mask=pb.attention_mask, position_ids=pb.position_ids,
                   use_cache=False, logits_to_keep=1).logits
    return out[:, -1].float()


@torch.no_grad()
def last_logits(lm: LoadedModel, instructions: list[str], batch_size: int = 16) -> Tensor:
    """``[n, vocab]`` float32 logits at the last prompt position, batched, on the CPU."""
    return torch.cat([next_token_logits(lm, instructions[b : b + batch_size]).cpu()
                      for b in range(0, len(instructions), batch_size)])
