"""How user tokens enter the LLM: the two integrations of User-LLM (Ning, Liu et al., 2024, §3), one class each.

- ``xattn`` (`CrossAttentionIntegration`): Flamingo-style gated cross-attention blocks run after every k-th
  decoder layer; text states attend to the projected user tokens (kept at a small ``xattn_dim``). Gates start
  at 0, so an untrained model is exactly the base LLM. Blocks are attached with forward hooks, so the LLM's
  modules and weight names stay untouched and HF ``generate`` (KV cache, beam search) works unchanged: the hook
  reads the user tokens stored for the duration of the call and repeats them to match beam-expanded batches.
- ``softprompt`` (`SoftPromptIntegration`): projected user tokens plus a learned task prompt are prepended to
  the token embeddings.

Both have one interface (`Integration`): their trainable layers are the module itself, `token_dim` is the width
of the user tokens they read, `forward` / `generate` make the LLM call with the user tokens, and `legacy_names`
says where folders written before integrations were objects kept their tensors. `UserLLM` builds the one its
config names from `INTEGRATIONS` and delegates to it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from fed_userllm.settings import INTEGRATION_NAMES

from .projection import CrossAttention, feed_forward

if TYPE_CHECKING:
    from .userllm import UserLLMConfig


class Integration(nn.Module, ABC):
    """How one kind of user tokens enters the LLM; the module's parameters are what it trains and saves."""

    legacy_names: ClassVar[tuple[str, str]]  # (old prefix, new prefix) of its tensors in folders written before

    @staticmethod
    @abstractmethod
    def token_dim(config: UserLLMConfig, hidden: int) -> int:
        """Width of the user tokens it reads (what the projection outputs) for an LLM of width ``hidden``."""

    @abstractmethod
    def forward(self, llm: PreTrainedModel, tokens: torch.Tensor, user_mask: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor, labels: torch.Tensor | None) -> CausalLMOutputWithPast:
        """The LLM's output for the text given the user tokens [B, N, d] and their mask [B, N]."""

    @abstractmethod
    def generate(self, llm: PreTrainedModel, tokens: torch.Tensor, user_mask: torch.Tensor, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, **generate_kwargs) -> torch.Tensor:
        """HF generate given the user tokens; only the new tokens. A ``prefix_allowed_tokens_fn`` sees only them."""

    @contextmanager
    def without_user(self) -> Iterator[None]:
        """The LLM's own, user-independent behaviour for the duration (nothing to switch off by default)."""
        yield

    @classmethod
    def upgrade_names(cls, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` with the names of folders written before integrations were objects made current."""
        old, new = cls.legacy_names
        return {new + k[len(old):] if k.startswith(old) else k: v for k, v in state.items()}


class GatedCrossAttention(nn.Module):
    """LN -> cross-attention(text, user tokens) -> tanh(gate) residual, then an optional gated FFN.

    Runs as a forward hook on a decoder layer, in float32 whatever the LLM dtype, and returns the hidden
    states unchanged (bit for bit) while the gates are 0. Updates are scaled by the residual stream's RMS at
    each position: late layers of an LLM carry states of large RMS (docs/design-notes.md), where an update of
    unit size would barely move the logits however the gate is trained.
    """

    def __init__(self, hidden: int, user_dim: int, n_heads: int, ffn: bool):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.attn = CrossAttention(hidden, user_dim, user_dim, n_heads, out_dim=hidden)
        self.gate_attn = nn.Parameter(torch.zeros(()))
        self.ff = feed_forward(hidden) if ffn else None
        self.gate_ff = nn.Parameter(torch.zeros(())) if ffn else None
        self.user: tuple[torch.Tensor, torch.Tensor] | None = None  # set for one forward/generate
        self.bypass = False  # set by CrossAttentionIntegration.without_user: the layer's output passes unchanged

    def forward(self, h: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        rows, users = h.shape[0], tokens.shape[0]
        if rows % users:
            raise ValueError(f"hidden batch {rows} is not a multiple of the user batch {users}")
        if rows != users:  # generate() expands each example to num_beams / num_return_sequences rows
            tokens, mask = tokens.repeat_interleave(rows // users, 0), mask.repeat_interleave(rows // users, 0)
        x = h.to(self.gate_attn.dtype)
        scale = x.pow(2).mean(-1, keepdim=True).sqrt()  # updates in units of the residual stream's RMS
        x = x + torch.tanh(self.gate_attn) * scale * self.attn(self.norm(x), tokens, mask)
        if self.ff is not None:
            x = x + torch.tanh(self.gate_ff) * scale * self.ff(x)
        return x.to(h.dtype)

    def hook(self, module: nn.Module, args: tuple, output: torch.Tensor | tuple) -> torch.Tensor | tuple | None:
        if self.bypass:
            return None
        if self.user is None:
            raise RuntimeError("cross-attention layers need user embeddings: call UserLLM.forward / generate")
        if isinstance(output, tuple):
            return (self(output[0], *self.user), *output[1:])
        return self(output, *self.user)


def decoder_layers(llm: nn.Module) -> nn.ModuleList:
    """The decoder layer stack of a HF causal LM (Llama ``model.layers``, GPT-2 ``transformer.h``, ...)."""
    n = llm.config.num_hidden_layers
    for module in llm.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"could not find the {n} decoder layers of {type(llm).__name__}")


def xattn_positions(config: UserLLMConfig, n_layers: int) -> list[int]:
    """Decoder layer indices followed by a cross-attention block (sorted, distinct)."""
    if config.xattn_layers is None:
        at = [i for i in range(n_layers) if (i + 1) % config.xattn_every == 0]
        if not at:
            raise ValueError(f"xattn_every={config.xattn_every} exceeds the {n_layers} decoder layers")
        return at
    bad = [i for i in config.xattn_layers if not -n_layers <= i < n_layers]
    if bad:
        raise ValueError(f"xattn_layers={config.xattn_layers}: {bad} outside the {n_layers} decoder layers")
    return sorted({i % n_layers for i in config.xattn_layers})


class CrossAttentionIntegration(Integration):
    """Gated cross-attention blocks hooked after decoder layers ``at``; they read the user tokens of the call.

    The tokens are visible to the hooks only during `forward` / `generate`, so activation checkpointing of the
    LLM (which recomputes layers during backward) is not supported.
    """

    legacy_names = ("xattn.", "integration.blocks.")

    def __init__(self, config: UserLLMConfig, llm: PreTrainedModel):
        super().__init__()
        layers = decoder_layers(llm)
        self.at = xattn_positions(config, len(layers))  # decoder layer index of each block
        hidden = llm.config.hidden_size
        self.blocks = nn.ModuleList(
            GatedCrossAttention(hidden, config.xattn_dim, config.n_xattn_heads, config.xattn_ffn) for _ in self.at
        )
        for i, block in zip(self.at, self.blocks, strict=True):
            layers[i].register_forward_hook(block.hook)

    @staticmethod
    def token_dim(config: UserLLMConfig, hidden: int) -> int:
        return config.xattn_dim

    @contextmanager
    def _attending(self, tokens: torch.Tensor, mask: torch.Tensor) -> Iterator[None]:
        """Make the user tokens visible to every cross-attention hook for one LLM call."""
        for block in self.blocks:
            block.user = (tokens, mask)
        try:
            yield
        finally:
            for block in self.blocks:
                block.user = None

    @contextmanager
    def without_user(self) -> Iterator[None]:
        """The blocks switched off: the decoder layers' outputs pass unchanged."""
        for block in self.blocks:
            block.bypass = True
        try:
            yield
        finally:
            for block in self.blocks:
                block.bypass = False

    def forward(self, llm, tokens, user_mask, input_ids, attention_mask, labels):
        with self._attending(tokens, user_mask):
            return llm(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def generate(self, llm, tokens, user_mask, input_ids, attention_mask, **generate_kwargs):
        n_prompt = input_ids.shape[1]
        allowed = generate_kwargs.get("prefix_allowed_tokens_fn")
        if allowed is not None:
            generate_kwargs["prefix_allowed_tokens_fn"] = lambda i, ids: allowed(i, ids[n_prompt:])
        with self._attending(tokens, user_mask):
            out = llm.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
        return out[:, n_prompt:]


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip padding, the same rule HF generate uses, so training and decoding agree."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


class SoftPromptIntegration(Integration):
    """[user tokens | learned task prompt | text] as the LLM's input embeddings."""

    legacy_names = ("task_prompt", "integration.task_prompt")

    def __init__(self, config: UserLLMConfig, llm: PreTrainedModel):
        super().__init__()
        std = getattr(llm.config, "initializer_range", 0.02)
        self.task_prompt = nn.Parameter(torch.randn(config.num_task_prompt_tokens, llm.config.hidden_size) * std)

    @staticmethod
    def token_dim(config: UserLLMConfig, hidden: int) -> int:
        return hidden

    def _inputs(self, llm: PreTrainedModel, tokens: torch.Tensor, user_mask: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[user tokens | task prompt | text] embeddings and the matching attention mask."""
        text = llm.get_input_embeddings()(input_ids)
        b = input_ids.shape[0]
        prefix = torch.cat([tokens, self.task_prompt.expand(b, -1, -1)], dim=1).to(text.dtype)
        task_mask = user_mask.new_ones(b, self.task_prompt.shape[0])
        mask = torch.cat([user_mask, task_mask, attention_mask.bool()], dim=1).to(attention_mask.dtype)
        return torch.cat([prefix, text], dim=1), mask

    def forward(self, llm, tokens, user_mask, input_ids, attention_mask, labels):
        """Logits over the prefix positions too; the prefix carries no loss."""
        embeds, mask = self._inputs(llm, tokens, user_mask, input_ids, attention_mask)
        if labels is not None:
            labels = torch.cat([labels.new_full((labels.shape[0], embeds.shape[1] - labels.shape[1]), -100), labels], 1)
        return llm(inputs_embeds=embeds, attention_mask=mask, position_ids=_positions(mask), labels=labels)

    def generate(self, llm, tokens, user_mask, input_ids, attention_mask, **generate_kwargs):
        embeds, mask = self._inputs(llm, tokens, user_mask, input_ids, attention_mask)
        return llm.generate(inputs_embeds=embeds, attention_mask=mask, position_ids=_positions(mask),
                            **generate_kwargs)


INTEGRATIONS: dict[str, type[Integration]] = dict(zip(INTEGRATION_NAMES, (CrossAttentionIntegration,
                                                                         SoftPromptIntegration), strict=True))
