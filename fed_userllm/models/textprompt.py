"""TextPrompt: the baseline User-LLM is measured against (Ning, Liu et al., 2024, §4): no encoder, no user
tokens; the prompt lists the user's last ``history_len`` events as text and the LLM is fine-tuned on it, fully
or with LoRA. Its prompts are tens of times longer than User-LLM's, which is what the comparison is about.

The model folder: ``textprompt_config.json`` (the config and the base LLM's signature) and the trained weights,
``adapter/`` (LoRA, PEFT's format) or ``llm.safetensors`` (every LLM weight, strategy ``full``); the base LLM is
loaded from ``config.llm`` and the weights applied to it, as `fed_userllm.models.userllm.UserLLM` does.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .llm import ADAPTER_DIR, add_lora, check_llm_signature, llm_signature, load_adapter, load_llm

STRATEGIES = ("full", "lora")
CONFIG_NAME = "textprompt_config.json"
WEIGHTS_NAME = "llm.safetensors"  # strategy full: the fine-tuned LLM


@dataclass
class TextPromptConfig:
    llm: str | None = None  # HF id, local dir, .gguf path; None / "smollm2" = embedded SmolLM2-135M-Instruct
    strategy: str = "lora"  # full: every LLM weight trains | lora: LoRA adapters only
    history_len: int = 50  # events listed in the prompt, most recent last
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = None  # None = PEFT's default for the architecture

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r}: the TextPrompt baseline has no encoder or projection; "
                             f"expected one of {STRATEGIES}")
        for name in ("history_len", "lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected a positive integer")


class TextPromptLLM(nn.Module):
    """A causal LM fine-tuned (fully or with LoRA) on prompts that write the history out as text.

    Calls pass straight to the LLM (HF keyword arguments), so everything that scores a plain causal LM scores
    it. Takes ownership of ``llm``; without it the base LLM is loaded from ``config.llm`` onto ``device``.
    """

    def __init__(self, config: TextPromptConfig, llm: PreTrainedModel | None = None,
                 device: str | torch.device = "auto"):
        super().__init__()
        self.config = config
        llm = llm if llm is not None else load_llm(config.llm, device=device)[0]
        self.llm = add_lora(llm, config) if config.strategy == "lora" else llm.requires_grad_(True)

    def forward(self, **llm_kwargs) -> CausalLMOutputWithPast:
        return self.llm(**llm_kwargs)

    @torch.no_grad()
    def generate(self, **generate_kwargs) -> torch.Tensor:
        """HF generate: the prompt followed by the new tokens."""
        return self.llm.generate(**generate_kwargs)

    def save_pretrained(self, directory: str | Path) -> None:
        """The model folder: the config, the base LLM's signature and the trained weights."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.config.strategy == "lora":
            self.llm.save_pretrained(directory / ADAPTER_DIR)  # a PeftModel saves only its adapter
        else:
            save_model(self.llm, str(directory / WEIGHTS_NAME))  # tied weights once
        meta = {"config": asdict(self.config), "llm_signature": llm_signature(self.llm)}
        (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | Path, llm: PreTrainedModel | None = None,
                        device: str | torch.device = "auto") -> TextPromptLLM:
        """Rebuild from ``save_pretrained``; the base LLM is loaded from ``config.llm`` unless ``llm`` is given."""
        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{directory}: not a TextPrompt model folder (no {CONFIG_NAME}; TextPrompt runs "
                                    "written before it had its own folder saved a bare LLM or adapter: retrain)")
        meta = json.loads((directory / CONFIG_NAME).read_text())
        config = TextPromptConfig(**meta["config"])
        llm = llm if llm is not None else load_llm(config.llm, device=device)[0]
        check_llm_signature(llm, meta["llm_signature"])
        model = cls(config, llm)
        if config.strategy == "lora":
            load_adapter(model.llm, directory / ADAPTER_DIR)
        else:
            load_model(model.llm, str(directory / WEIGHTS_NAME), device=str(next(llm.parameters()).device))
        return model
