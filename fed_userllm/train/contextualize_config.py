"""The settings of a contextualization run (its config.json), importable without torch so the CLI can show
them quickly. The closed sets name what `fed_userllm.tasks.TASKS`, `fed_userllm.models.userllm` (with the
integrations of `fed_userllm.models.integrations`) and `fed_userllm.models.textprompt` implement."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fed_userllm.settings import INTEGRATION_NAMES, check_choices, from_dict, setting

TASK_NAMES = ("nextitem", "favgenre", "reviewg")
METHODS = ("userllm", "textprompt")
STRATEGIES = ("full", "lora", "enc", "proj")
USER_TOKENS = ("events", "next_item")
OBJECTIVES = ("lm", "catalog")

if TYPE_CHECKING:
    from fed_userllm.models.textprompt import TextPromptConfig
    from fed_userllm.models.userllm import UserLLMConfig


@dataclass
class ContextualizeConfig:
    """Everything a contextualization run depends on (saved as the run's config.json)."""

    method: str = setting("userllm", "userllm: the LLM reads the encoder's user tokens; textprompt: the TextPrompt "
                                     "baseline (the history as text, the LLM fine-tuned, no encoder)", METHODS)
    encoder: str | None = setting(None, "pretraining run directory (config.json + best/); not used by "
                                        "--method textprompt")
    dataset: str | None = setting(None, "dataset (default: the encoder run's; ml-latest-small without an encoder)")
    llm: str | None = setting(None, "HF id, local folder or .gguf file (default: the embedded "
                                    "SmolLM2-135M-Instruct)")
    task: str = setting("nextitem", "nextitem, favgenre or reviewg (review folders)", TASK_NAMES)
    integration: str = setting("xattn", "how user tokens enter the LLM: xattn (cross-attention) or softprompt "
                                        "(before the prompt); the TextPrompt baseline has none (--method "
                                        "textprompt)", INTEGRATION_NAMES)
    strategy: str = setting("enc", "what trains: full (everything), lora (LoRA on the LLM + encoder + "
                                   "projection), enc (encoder + projection, LLM frozen), proj (projection only)",
                            STRATEGIES)
    perceiver: bool = setting(True, "compress the event states into --num-latents tokens")
    num_latents: int = setting(16, "Perceiver latents (user tokens the LLM reads)")
    xattn_layers: list[int] | None = setting(None, "decoder layers followed by cross-attention, negative from "
                                                   "the end (default: every 4th)")
    user_tokens: str = setting("events", "events: one token per event; next_item: the encoder's next-item "
                                         "vector (needs --no-perceiver)", USER_TOKENS)
    objective: str = setting("lm", "lm: token cross-entropy; catalog: -log P(answer | catalog) from cached text "
                                   "states (nextitem or favgenre, xattn only)", OBJECTIVES)
    encoder_prior: bool = setting(False, "score titles as the encoder's next-item distribution changed by the "
                                         "LLM's user-specific logits (equals the encoder at zero gates; needs "
                                         "--objective catalog; ranks exactly, does not generate)")
    history_len: int = setting(50, "events per example (the encoder's input)")
    text_history_len: int = setting(0, "most recent events also written into the prompt (0: User-LLM only)")
    review_field: str = setting("text", "ReviewG target: the review text or (Amazon) its summary",
                                ("text", "summary"))
    noun: str | None = setting(None, "how prompts call an item (default: movie, item or place by dataset)")
    steps: int = setting(300, "training steps")
    batch_size: int = setting(8, "examples per step")
    micro_batch_size: int = setting(0, "> 0: accumulate gradients over micro-batches of this size (less memory)")
    lr: float = setting(1e-3, "peak AdamW learning rate (linear warm-up, cosine decay)")
    encoder_lr: float | None = setting(None, "encoder learning rate (default: --lr); lower keeps a pretrained "
                                             "encoder while new layers learn fast")
    weight_decay: float = setting(1e-3, "AdamW weight decay")
    warmup_frac: float = setting(0.05, "fraction of the steps spent warming up")
    max_grad_norm: float = setting(1.0, "gradient clipping norm (0: off; the catalog objective trains better "
                                        "without it)")
    max_target_tokens: int = setting(64, "target tokens kept per example")
    eval_users: int = setting(100, "size of the fixed random subset of users evaluated (0: skip evaluation)")
    eval_batch_size: int = setting(8, "prompts per beam search (the KV cache grows with prompt length x beams)")
    eval_every: int = setting(0, "validate every N steps (0: only at the end)")
    checkpoint_every: int = setting(50, "write the resumable checkpoint every N steps")
    seed: int = setting(0, "random seed")
    device: str = setting("auto", "auto (CUDA when present), cpu, cuda or cuda:N")

    def __post_init__(self) -> None:
        if self.integration == "text":  # the spelling of runs written before TextPrompt was its own method
            raise ValueError("integration='text': the TextPrompt baseline is method='textprompt' (it has no "
                             "integration)")
        check_choices(self)
        if self.objective == "catalog" and (self.task in ("nextitem", "favgenre"), self.integration,
                                            self.text_history_len, self.method) != (True, "xattn", 0, "userllm"):
            raise ValueError("objective='catalog' scores NextItem titles or FavGenre names from cached text states: "
                             "it needs task='nextitem' or 'favgenre', integration='xattn', text_history_len=0 of "
                             f"method='userllm' (got {self.task!r}, {self.integration!r}, {self.text_history_len}, "
                             f"{self.method!r})")
        if self.encoder_prior and (self.objective, self.task) != ("catalog", "nextitem"):
            raise ValueError("encoder_prior=True scores titles by exact ranking over the catalog: it needs "
                             f"objective='catalog' and task='nextitem' (got {self.objective!r}, {self.task!r})")
        for name in ("num_latents", "history_len", "steps", "batch_size", "max_target_tokens",
                     "eval_batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected >= 1")
        for name in ("text_history_len", "micro_batch_size", "eval_users", "eval_every", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: expected >= 0")
        if self.encoder_lr is not None and self.encoder_lr < 0:
            raise ValueError(f"encoder_lr={self.encoder_lr}: expected >= 0 (or None for lr)")
        if self.lr <= 0 or not 0 <= self.warmup_frac < 1:
            raise ValueError(f"lr={self.lr}, warmup_frac={self.warmup_frac}: expected lr > 0, "
                             "0 <= warmup_frac < 1")
        if self.text_history_len > self.history_len:
            raise ValueError(f"text_history_len={self.text_history_len} exceeds history_len="
                             f"{self.history_len}: the text history is the most recent part of the history")
        if self.method == "textprompt":
            if self.text_history_len != self.history_len:
                raise ValueError("method='textprompt' reads only the text history: expected text_history_len "
                                 f"== history_len, got {self.text_history_len} and {self.history_len}")
            self.textprompt_config()  # its own checks, before anything is loaded
        elif self.encoder is None:
            raise ValueError("method='userllm' needs encoder= (a pretraining run directory)")
        else:
            self.userllm_config()  # its own checks, before anything is loaded

    def userllm_config(self) -> UserLLMConfig:
        """The UserLLM settings of this run (imported here: reading the settings needs no torch)."""
        from fed_userllm.models.userllm import UserLLMConfig

        return UserLLMConfig(llm=self.llm, integration=self.integration, perceiver=self.perceiver,
                             num_latents=self.num_latents, xattn_layers=self.xattn_layers,
                             user_tokens=self.user_tokens, encoder_prior=self.encoder_prior,
                             strategy=self.strategy)

    def textprompt_config(self) -> TextPromptConfig:
        """The TextPrompt settings of this run (imported here: reading the settings needs no torch)."""
        from fed_userllm.models.textprompt import TextPromptConfig

        return TextPromptConfig(llm=self.llm, strategy=self.strategy, history_len=self.text_history_len)

    @classmethod
    def from_dict(cls, values: dict) -> ContextualizeConfig:
        return from_dict(cls, values, "contextualize")
