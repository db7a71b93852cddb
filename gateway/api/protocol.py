"""Wire schema: what the gateway must understand of an OpenAI request.

Only the fields the gateway checks or uses are declared; everything else
(vLLM's ``top_k``, ``min_p``, ``guided_json``, ``structured_outputs``,
``chat_template_kwargs``, ``priority``, ...) is allowed and forwarded
untouched, because the proxy forwards the client's own JSON object rather
than a re-serialised model.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, field_validator, model_validator
from pydantic_core import PydanticCustomError

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ContentPart(_Open):
    type: StrictStr


class ChatMessage(_Open):
    role: Role
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.content is None and self.role not in ("assistant", "function"):
            raise ValueError(f"a message with role '{self.role}' needs `content`")
        return self


class StreamOptions(_Open):
    include_usage: StrictBool | None = None
    continuous_usage_stats: StrictBool | None = None


PositiveInt = Annotated[int, Field(ge=1, strict=True)]
Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]


class _Sampling(_Open):
    model: StrictStr = Field(min_length=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: PositiveInt | None = None
    stop: StrictStr | list[StrictStr] | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _Sampling:
        # Same rule and wording as vLLM, answered without a round trip.
        if self.stream_options is not None and not self.stream:
            raise PydanticCustomError(
                "stream_options_without_stream",
                "Stream options can only be defined when `stream=True`.",
                {"param": "stream_options"},
            )
        return self


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: PositiveInt | None = None


class CompletionRequest(_Sampling):
    prompt: StrictStr | list[StrictStr] | list[int] | list[list[int]]
    best_of: PositiveInt | None = None  # sequences generated per prompt (OpenAI: >= n)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_not_empty(cls, value: Any) -> Any:
        if value in ("", []):
            raise ValueError("must not be empty")
        return value


class EmbeddingRequest(_Open):
    model: StrictStr = Field(min_length=1)
    input: StrictStr | list[StrictStr] | list[int] | list[list[int]]
