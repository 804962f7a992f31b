"""User-LLM: a causal LM contextualized with user-encoder embeddings (User-LLM, Ning, Liu et al., 2024, §3).

The user encoder's output is projected to user tokens, which enter the LLM by one of the integrations of
`fed_userllm.models.integrations` (``xattn``: gated cross-attention; ``softprompt``: a prefix of the input).

User tokens: ``events`` projects every event's embedding (the paper; optionally Perceiver-compressed);
``next_item`` projects only the encoder's *next-item vectors*, what its item head scores every item against
after the last event (one for the AR encoder, k for the dual encoder). A frozen LLM's query barely separates
50 event tokens, and the prediction the encoder was trained for is one of them, mixed with the other 49.

``encoder_prior`` (NextItem, exact ranking): titles are scored by the encoder's next-item distribution, read
in the LLM's own title space, changed by what the user tokens change in the LLM's logits (the LLM's logits
with the user minus without, at each branching node of the title trie). At zero gates the model is exactly
the encoder, so training can only add what the LLM reads from the user (`fed_userllm.tasks.catalog`).

Training strategies (what is trainable): ``full`` LLM + encoder + projection, ``lora`` LoRA adapters + encoder +
projection, ``enc`` encoder + projection (LLM frozen; the default), ``proj`` projection only. The integration's
layers (cross-attention blocks, task prompt) count as projection.
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
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .integrations import INTEGRATIONS
from .llm import ADAPTER_DIR, add_lora, check_llm_signature, llm_signature, load_adapter, load_llm
from .projection import Projection

USER_TOKENS = ("events", "next_item")
STRATEGIES = ("full", "lora", "enc", "proj")
CONFIG_NAME = "userllm_config.json"
WEIGHTS_NAME = "userllm_trained.safetensors"
ENCODER_DIR = "encoder"


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
    encoder_prior: bool = False  # titles scored as the encoder's distribution + the LLM's user-specific change
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
            raise ValueError(f"integration={self.integration!r}: expected one of {tuple(INTEGRATIONS)}")
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


class UserLLM(nn.Module):
    """HF causal LM + user encoder + projection + integration. Takes ownership of ``llm`` (freezes it, may
    inject LoRA; the cross-attention integration hooks its layers).

    ``encoder`` is any module with ``encode(batch) -> [B, T, d]`` and ``state_dim`` (d); the user batch
    follows the project's batch contract (``batch["mask"]`` marks real events). Without ``llm`` the base
    LLM is loaded from ``config.llm`` onto ``device``; the new modules follow the LLM's device.
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
        self.encoder = encoder
        if config.user_tokens == "next_item" and getattr(encoder, "next_item_dim", None) is None:
            raise ValueError(f"user_tokens='next_item': {type(encoder).__name__} has no next_item_vectors "
                             "(the AR and dual encoders do)")
        if config.encoder_prior and not hasattr(encoder, "score_items"):
            raise ValueError(f"encoder_prior=True: {type(encoder).__name__} has no score_items (next-item scores)")
        d_user = encoder.next_item_dim if config.user_tokens == "next_item" else encoder.state_dim
        integration = INTEGRATIONS[config.integration]
        self.projection = Projection(
            d_user, integration.token_dim(config, llm.config.hidden_size), config.perceiver, config.num_latents,
            config.perceiver_depth, config.n_xattn_heads,
        )
        self.integration = integration(config, llm)
        if config.strategy == "lora":
            llm = add_lora(llm, config)  # freezes the base weights, LoRA weights trainable
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
        """The LLM with the integration switched off (user-independent text states)."""
        with self.integration.without_user():
            yield self.llm

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
        return self.integration(self.llm, tokens, user_mask, input_ids, attention_mask, labels)

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
        if self.config.encoder_prior:
            raise ValueError("this User-LLM scores titles with the encoder's prior (encoder_prior=True): it ranks "
                             "them exactly (fed_userllm.tasks.catalog.CatalogScorer.rank), it does not generate")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        tokens, user_mask = self.encode_user(batch_user)
        return self.integration.generate(self.llm, tokens, user_mask, input_ids, attention_mask, **generate_kwargs)

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
            "llm_signature": llm_signature(self.llm),
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
        every encoder was saved need it when theirs was frozen (strategy ``proj``). Folders written before the
        integrations were objects name their tensors ``xattn.*`` / ``task_prompt``: they load too.
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
        check_llm_signature(llm, meta["llm_signature"])
        model = cls(config, encoder, llm)
        state = INTEGRATIONS[config.integration].upgrade_names(load_file(str(directory / WEIGHTS_NAME)))
        adapter = directory / ADAPTER_DIR
        if adapter.is_dir():
            load_adapter(model.llm, adapter)
        saved_apart = ("encoder.", "llm.") if adapter.is_dir() else ("encoder.",)
        expected = {n for n in model.trainable_parameter_names() if not n.startswith(saved_apart)}
        if set(state) != expected:
            raise ValueError(
                f"{directory / WEIGHTS_NAME}: saved parameters differ from the trainable ones; "
                f"missing {sorted(expected - set(state))[:5]}, unexpected {sorted(set(state) - expected)[:5]}"
            )
        model.load_state_dict(state, strict=False)
        return model
