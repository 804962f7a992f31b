"""Request and response bodies: the native ``/v1/generate`` and OpenAI's chat completions, whose requests carry
the user's embedding in the extension field ``user_embedding`` (and the task in ``task``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

TASKS = ("nextitem", "favgenre", "free")
RANKED_TASKS = ("nextitem", "favgenre")
EMBEDDING_DTYPE = "float32"

Task = Literal["nextitem", "favgenre", "free"]


class UserEmbedding(BaseModel):
    """Per-event outputs of the on-device encoder, before the projection: ``embeddings``, ``shape`` and
    ``dtype`` as `fed_userllm.export.device.embed` writes them, plus the encoder hash from the manifest."""

    model_config = ConfigDict(extra="forbid")
    embeddings: list[list[float]] = Field(description="[T, state_dim] (the encoder's output width), one row per "
                                                      "event, oldest first")
    shape: list[int] = Field(description="[T, state_dim]; must match embeddings and the loaded model")
    dtype: str = Field(EMBEDDING_DTYPE, description="float32, the encoder's output dtype")
    encoder_hash: str = Field(description="sha256 of the encoder weights: the manifest's source.model_sha256")
    length: int | None = Field(None, description="real events; later rows are right-padding (default: T)")


class Item(BaseModel):
    id: int = Field(description="nextitem: the dataset's item id (movieId); favgenre: the genre's vocab id")
    title: str


# ---------------------------------------------------------------------------------------------- /v1/generate


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: UserEmbedding
    task: Task = "free"
    prompt: str | None = Field(None, description="the question (required for task=free)")
    max_new_tokens: int | None = Field(None, ge=1, description="default and upper bound: the server's limit")
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 = greedy decoding")
    constrained: bool | None = Field(None, description="rank catalog titles (default: nextitem, favgenre)")
    k: int = Field(5, ge=1, description="how many ranked items to return when constrained")


class Timing(BaseModel):
    queue_ms: float = Field(description="time outside the model call: validation and waiting for a batch")
    compute_ms: float = Field(description="the batched model call this request was part of")
    total_ms: float
    batch_size: int


class GenerateResponse(BaseModel):
    text: str = Field(description="the generated text; for ranked tasks the top item's title")
    items: list[Item] | None = Field(None, description="ranked catalog items, best first (constrained only)")
    tokens: int = Field(description="new tokens generated (0 for ranked tasks)")
    timing: Timing


# ---------------------------------------------------------------------------------------------- /v1/chat/completions


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


class StreamOptions(BaseModel):
    include_usage: bool = Field(False, description="a last chunk with the usage of the whole request")


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat completion request (the subset that applies) plus the user embedding and the task."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="the served model's id (GET /v1/models); default: that model")
    messages: list[ChatMessage] = Field(default_factory=list,
                                        description="the conversation (task=free); empty for ranked tasks")
    max_completion_tokens: int | None = Field(None, ge=1, description="default and upper bound: the server's "
                                                                      "limit")
    max_tokens: int | None = Field(None, ge=1, description="the older name of max_completion_tokens")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy decoding (OpenAI's default is 1)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling (temperature > 0)")
    n: int = Field(1, ge=1, description="choices to generate")
    stream: bool = Field(False, description="server-sent events, one chunk per piece of text, then [DONE]")
    stream_options: StreamOptions | None = None
    user_embedding: UserEmbedding = Field(description="extension: the on-device encoder's output (as in "
                                                      "/v1/generate's user)")
    task: Task = Field("free", description="extension: free (chat) or a ranked task")
    constrained: bool | None = Field(None, description="extension: rank catalog titles (default: ranked tasks)")
    k: int = Field(5, ge=1, description="extension: ranked items per choice when constrained")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    items: list[Item] | None = Field(None, description="extension: ranked catalog items (constrained only)")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    finish_reason: Literal["stop", "length"] | None = None
    items: list[Item] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "fed-userllm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
