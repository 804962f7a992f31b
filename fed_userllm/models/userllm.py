"""User-LLM: a causal LM contextualized with user-encoder embeddings (User-LLM, Ning, Liu et al., 2024, §3).

Two integrations:
- ``xattn``: Flamingo-style gated cross-attention blocks run after every k-th decoder layer; text states attend to
  the projected user tokens (kept at a small ``xattn_dim``). Gates start at 0, so an untrained model is exactly the
  base LLM. Blocks are attached with forward hooks, so the LLM's modules and weight names stay untouched and HF
  ``generate`` (KV cache, beam search) works unchanged: the hook reads the user tokens stored for the duration of
  the call and repeats them to match beam-expanded batches.
- ``softprompt``: projected user tokens plus a learned task prompt are prepended to the token embeddings.

User tokens: ``events`` projects every event's embedding (the paper; optionally Perceiver-compressed);
``next_item`` projects only the encoder's *next-item vectors*, what its item head scores every item against
after the last event (one for the AR encoder, k for the dual encoder). A frozen LLM's query barely separates
50 event tokens, and the prediction the encoder was trained for is one of them, mixed with the other 49.

Training strategies (what is trainable): ``full`` LLM + encoder + projection, ``lora`` LoRA adapters + encoder +
projection, ``enc`` encoder + projection (LLM frozen; the default), ``proj`` projection only. Cross-attention
blocks and the task prompt count as projection.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model, load_peft_weights, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .llm import load_llm
from .projection import CrossAttention, Projection, feed_forward

INTEGRATIONS = ("xattn", "softprompt")
USER_TOKENS = ("events", "next_item")
STRATEGIES = ("full", "lora", "enc", "proj")
CONFIG_NAME = "userllm_config.json"
WEIGHTS_NAME = "userllm_trained.safetensors"
ENCODER_DIR = "encoder"
ADAPTER_DIR = "adapter"  # strategy lora: the PEFT adapter (adapter_config.json + adapter_model.safetensors)


@dataclass
class UserLLMConfig:
    llm: str | None = None  # HF id, local dir, .gguf path; None / "smollm2" = embedded SmolLM2-135M-Instruct
    integration: str = "xattn"
    xattn_every: int = 4  # a cross-attention block after every k-th decoder layer
    xattn_layers: list[int] | None = None  # or after exactly these decoder layers (negative: from the end)
    xattn_dim: int = 64
    n_xattn_heads: int = 4
    xattn_ffn: bool = True  # gated feed-forward after each cross-attention
    user_tokens: str = "events"  # events: one per event | next_item: the encoder's next-item vector(s)
    perceiver: bool = True
    num_latents: int = 16
    perceiver_depth: int = 1
    num_task_prompt_tokens: int = 8  # softprompt only
    strategy: str = "enc"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = None  # None = PEFT's default for the architecture

    def __post_init__(self) -> None:
        if self.integration not in INTEGRATIONS:
            raise ValueError(f"integration={self.integration!r}: expected one of {INTEGRATIONS}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r}: expected one of {STRATEGIES}")
        if self.user_tokens not in USER_TOKENS:
            raise ValueError(f"user_tokens={self.user_tokens!r}: expected one of {USER_TOKENS}")
        if self.user_tokens == "next_item" and self.perceiver:
            raise ValueError("user_tokens='next_item' gives one token per user embedding; the Perceiver compresses "
                             "event sequences: set perceiver=False")
        for name in ("xattn_every", "xattn_dim", "n_xattn_heads", "num_latents", "perceiver_depth", "lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected a positive integer")
        if self.xattn_layers is not None and not self.xattn_layers:
            raise ValueError("xattn_layers=[]: expected decoder layer indices (or None for every xattn_every-th)")
        if self.xattn_dim % self.n_xattn_heads:
            raise ValueError(f"xattn_dim={self.xattn_dim} must be divisible by n_xattn_heads={self.n_xattn_heads}")
        if self.num_task_prompt_tokens < 0:
            raise ValueError(f"num_task_prompt_tokens={self.num_task_prompt_tokens}: expected >= 0")


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
        self.user: tuple[torch.Tensor, torch.Tensor] | None = None  # set by UserLLM for one forward/generate
        self.bypass = False  # set by UserLLM.base_llm: the decoder layer's output passes unchanged

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


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip padding, the same rule HF generate uses, so training and decoding agree."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def _llm_signature(llm: PreTrainedModel) -> dict:
    c = llm.config
    return {k: getattr(c, k) for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")}


class UserLLM(nn.Module):
    """HF causal LM + user encoder + projection. Takes ownership of ``llm`` (freezes it, may inject LoRA).

    ``encoder`` is any module with ``encode(batch) -> [B, T, d]`` and ``state_dim`` (d); the user batch
    follows the project's batch contract (``batch["mask"]`` marks real events). Without ``llm`` the base
    LLM is loaded from ``config.llm`` onto ``device``; the new modules follow the LLM's device.
    Cross-attention reads the user tokens only during ``forward``/``generate``, so activation checkpointing
    of the LLM (which recomputes layers during backward) is not supported with ``xattn``.
    """

    def __init__(
        self,
        config: UserLLMConfig,
        encoder: nn.Module,
        llm: PreTrainedModel | None = None,
        device: str | torch.device = "auto",
    ):
        super().__init__()
        self.config = config
        llm = llm if llm is not None else load_llm(config.llm, device=device)[0]
        hidden = llm.config.hidden_size
        self.encoder = encoder
        d_out = config.xattn_dim if config.integration == "xattn" else hidden
        if config.user_tokens == "next_item" and getattr(encoder, "next_item_dim", None) is None:
            raise ValueError(f"user_tokens='next_item': {type(encoder).__name__} has no next_item_vectors "
                             "(the AR and dual encoders do)")
        d_user = encoder.next_item_dim if config.user_tokens == "next_item" else encoder.state_dim
        self.projection = Projection(
            d_user, d_out, config.perceiver, config.num_latents, config.perceiver_depth,
            config.n_xattn_heads,
        )
        if config.integration == "xattn":
            layers = decoder_layers(llm)
            at = xattn_positions(config, len(layers))
            self.xattn_at = at  # decoder layer index of each block
            self.xattn = nn.ModuleList(
                GatedCrossAttention(hidden, config.xattn_dim, config.n_xattn_heads, config.xattn_ffn) for _ in at
            )
            for i, block in zip(at, self.xattn, strict=True):
                layers[i].register_forward_hook(block.hook)
        else:
            std = getattr(llm.config, "initializer_range", 0.02)
            self.task_prompt = nn.Parameter(torch.randn(config.num_task_prompt_tokens, hidden) * std)
        if config.strategy == "lora":
            lora = LoraConfig(
                r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                target_modules=config.lora_target_modules, task_type="CAUSAL_LM",
            )
            llm = get_peft_model(llm, lora)  # freezes the base weights, LoRA weights trainable
        else:
            llm.requires_grad_(config.strategy == "full")
        self.llm = llm
        self.encoder.requires_grad_(config.strategy != "proj")
        self.to(next(llm.parameters()).device)

    def trainable_parameter_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def encode_user(self, batch_user: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """User batch -> (user tokens [B, N, d_out], mask [B, N] True at real tokens)."""
        states = self.encoder.encode(batch_user)
        mask = batch_user["mask"]
        if self.config.user_tokens == "next_item":
            return self.next_item_tokens(self.encoder.next_item_vectors(states, mask))
        if mask.shape != states.shape[:2]:  # encoders emitting k summary tokens (dual encoder): all real
            mask = torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)
        return self.projection(states, mask)

    def next_item_tokens(self, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """User tokens (and their all-real mask) from next-item vectors [B, k, next_item_dim], layer-normed:
        item-head outputs have no fixed scale. Public item features go in here too (catalog alignment)."""
        vectors = F.layer_norm(vectors, vectors.shape[-1:])
        return self.projection(vectors, torch.ones(vectors.shape[:2], dtype=torch.bool, device=vectors.device))

    @contextmanager
    def base_llm(self) -> Iterator[PreTrainedModel]:
        """The LLM with its cross-attention blocks switched off (user-independent text states)."""
        for block in self.xattn:
            block.bypass = True
        try:
            yield self.llm
        finally:
            for block in self.xattn:
                block.bypass = False

    @contextmanager
    def _attending(self, tokens: torch.Tensor, mask: torch.Tensor) -> Iterator[None]:
        """Make the user tokens visible to every cross-attention hook for one LLM call."""
        for block in self.xattn:
            block.user = (tokens, mask)
        try:
            yield
        finally:
            for block in self.xattn:
                block.user = None

    def _soft_prompt(
        self, tokens: torch.Tensor, user_mask: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[user tokens | task prompt | text] embeddings and the matching attention mask."""
        text = self.llm.get_input_embeddings()(input_ids)
        b = input_ids.shape[0]
        prefix = torch.cat([tokens, self.task_prompt.expand(b, -1, -1)], dim=1).to(text.dtype)
        task_mask = user_mask.new_ones(b, self.task_prompt.shape[0])
        mask = torch.cat([user_mask, task_mask, attention_mask.bool()], dim=1).to(attention_mask.dtype)
        return torch.cat([prefix, text], dim=1), mask

    def forward(
        self,
        batch_user: dict[str, torch.Tensor],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> CausalLMOutputWithPast:
        """Logits over the text positions (soft prompt: prefix positions included) and the LM loss if labels."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        tokens, user_mask = self.encode_user(batch_user)
        if self.config.integration == "xattn":
            with self._attending(tokens, user_mask):
                return self.llm(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        embeds, mask = self._soft_prompt(tokens, user_mask, input_ids, attention_mask)
        if labels is not None:
            labels = torch.cat([labels.new_full((labels.shape[0], embeds.shape[1] - labels.shape[1]), -100), labels], 1)
        return self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=_positions(mask), labels=labels)

    @torch.no_grad()
    def generate(
        self,
        batch_user: dict[str, torch.Tensor],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """HF generate contextualized by the user; returns only the new tokens [B * num_return_sequences, L].

        Prompts must be left-padded. A ``prefix_allowed_tokens_fn`` sees only the generated tokens, whatever the
        integration.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        tokens, user_mask = self.encode_user(batch_user)
        if self.config.integration == "xattn":
            n_prompt = input_ids.shape[1]
            allowed = generate_kwargs.get("prefix_allowed_tokens_fn")
            if allowed is not None:
                generate_kwargs["prefix_allowed_tokens_fn"] = lambda i, ids: allowed(i, ids[n_prompt:])
            with self._attending(tokens, user_mask):
                out = self.llm.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
            return out[:, n_prompt:]
        embeds, mask = self._soft_prompt(tokens, user_mask, input_ids, attention_mask)
        return self.llm.generate(
            inputs_embeds=embeds, attention_mask=mask, position_ids=_positions(mask), **generate_kwargs
        )

    @property
    def _saved_apart(self) -> tuple[str, ...]:
        """Trained parameters saved in their own folder: the encoder, and the LoRA adapter."""
        return ("encoder.", "llm.") if self.config.strategy == "lora" else ("encoder.",)

    def save_pretrained(self, directory: str | Path) -> None:
        """The model folder: the config, the base-LLM reference, the trained tensors of the new layers, the
        encoder (trained or not: the folder is self-contained) and, with LoRA, the PEFT adapter."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        trained = {
            n: p.detach().cpu().contiguous()
            for n, p in self.named_parameters()
            if p.requires_grad and not n.startswith(self._saved_apart)
        }
        save_file(trained, str(directory / WEIGHTS_NAME))
        self.encoder.save_pretrained(directory / ENCODER_DIR)
        if self.config.strategy == "lora":
            self.llm.save_pretrained(directory / ADAPTER_DIR)  # a PeftModel saves only its adapter
        meta = {
            "config": asdict(self.config),
            "llm_signature": _llm_signature(self.llm),
            "encoder_class": f"{type(self.encoder).__module__}:{type(self.encoder).__qualname__}",
            "encoder_saved": True,
        }
        (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2))

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        llm: PreTrainedModel | None = None,
        encoder: nn.Module | None = None,
        device: str | torch.device = "auto",
    ) -> UserLLM:
        """Rebuild from ``save_pretrained``; the base LLM is loaded from ``config.llm`` unless ``llm`` is given.

        ``encoder`` replaces the saved one (serving passes the states a phone computed); folders written before
        every encoder was saved need it when theirs was frozen (strategy ``proj``).
        """
        directory = Path(directory)
        meta = json.loads((directory / CONFIG_NAME).read_text())
        config = UserLLMConfig(**meta["config"])
        if encoder is None:
            if not meta["encoder_saved"]:
                raise ValueError(f"{directory}: the encoder was frozen and not saved; pass encoder=")
            module, name = meta["encoder_class"].split(":")
            encoder = getattr(importlib.import_module(module), name).from_pretrained(directory / ENCODER_DIR)
        llm = llm if llm is not None else load_llm(config.llm, device=device)[0]
        if _llm_signature(llm) != meta["llm_signature"]:
            raise ValueError(f"base LLM {_llm_signature(llm)} does not match the saved {meta['llm_signature']}")
        model = cls(config, encoder, llm)
        state = load_file(str(directory / WEIGHTS_NAME))
        adapter = directory / ADAPTER_DIR
        if adapter.is_dir():
            set_peft_model_state_dict(model.llm, load_peft_weights(str(adapter)))
        saved_apart = ("encoder.", "llm.") if adapter.is_dir() else ("encoder.",)
        expected = {n for n in model.trainable_parameter_names() if not n.startswith(saved_apart)}
        if set(state) != expected:
            raise ValueError(
                f"{directory / WEIGHTS_NAME}: saved parameters differ from the trainable ones; "
                f"missing {sorted(expected - set(state))[:5]}, unexpected {sorted(set(state) - expected)[:5]}"
            )
        model.load_state_dict(state, strict=False)
        return model
