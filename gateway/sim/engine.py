"""What the simulated model says, and vLLM 0.32.0's exact wire shapes for it.

Text is deterministic: the words of the last prompt message, repeated, one
word per token (``" w1", " w2", ...``), so a test can compute the expected
answer with :func:`expected_text`. Field names and their order follow the
recorded transcripts in tests/fixtures/vllm-0.32.0-cpu.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import orjson

FINGERPRINT = "vllm-0.32.0-c2d23745"
VERSION = "0.32.0"


def prompt_words(body: dict[str, Any], chat: bool) -> tuple[list[str], int]:
    """(words the answer repeats, prompt token count)."""
    if chat:
        messages = body.get("messages") or []
        last = ""
        count = 0
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            text = _content_text(content)
            count += len(text.split()) + 4  # role and template tokens, roughly as a chat template
            if text:
                last = text
        return last.split(), count + 2
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        if prompt and isinstance(prompt[0], int):
            return [f"t{t}" for t in prompt], len(prompt)
        prompt = " ".join(p if isinstance(p, str) else " ".join(map(str, p)) for p in prompt)
    text = prompt if isinstance(prompt, str) else ""
    return text.split(), max(1, len(text.split()))


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def tokens_for(words: list[str], n: int) -> list[str]:
    if not words:
        words = ["ok"]
    return [" " + words[i % len(words)] for i in range(n)]


def expected_text(prompt_text: str, n: int) -> str:
    """The simulator's answer to a prompt whose last message is ``prompt_text``."""
    return "".join(tokens_for(prompt_text.split(), n))


def new_id(prefix: str) -> str:
    return prefix + os.urandom(8).hex()


@dataclass(slots=True)
class Generation:
    """One request's fixed facts, decided before the first token."""

    rid: str
    model: str
    created: int
    chat: bool
    n: int
    tokens: list[str]
    prompt_tokens: int
    finish_reason: str
    include_usage: bool
    continuous_usage: bool
    reported: tuple[int, int] | None = None  # usage to report instead of the truth (a broken backend)

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)

    def usage(self, completion: int | None = None) -> dict[str, Any]:
        c = self.completion_tokens * self.n if completion is None else completion
        if self.reported is not None:
            p, c = self.reported
            return {"prompt_tokens": p, "total_tokens": p + c, "completion_tokens": c}
        return {
            "prompt_tokens": self.prompt_tokens,
            "total_tokens": self.prompt_tokens + c,
            "completion_tokens": c,
        }

    # --- plain responses -------------------------------------------------
    def response(self) -> bytes:
        text = "".join(self.tokens)
        usage = {**self.usage(), "prompt_tokens_details": None, "completion_tokens_details": None}
        if self.chat:
            choices = [
                {
                    "index": i,
                    "message": {
                        "role": "assistant",
                        "content": text,
                        "refusal": None,
                        "annotations": None,
                        "audio": None,
                        "function_call": None,
                        "reasoning": None,
                    },
                    "logprobs": None,
                    "finish_reason": self.finish_reason,
                    "stop_reason": None,
                    "token_ids": None,
                    "routed_experts": None,
                }
                for i in range(self.n)
            ]
            return orjson.dumps(
                {
                    "id": self.rid,
                    "object": "chat.completion",
                    "created": self.created,
                    "model": self.model,
                    "choices": choices,
                    "service_tier": None,
                    "system_fingerprint": FINGERPRINT,
                    "usage": usage,
                    "prompt_logprobs": None,
                    "prompt_token_ids": None,
                    "prompt_text": None,
                    "kv_transfer_params": None,
                    "ec_transfer_params": None,
                    "metrics": None,
                }
            )
        choices = [
            {
                "index": i,
                "text": text,
                "logprobs": None,
                "finish_reason": self.finish_reason,
                "stop_reason": None,
                "token_ids": None,
                "prompt_logprobs": None,
                "prompt_token_ids": None,
                "routed_experts": None,
            }
            for i in range(self.n)
        ]
        return orjson.dumps(
            {
                "id": self.rid,
                "object": "text_completion",
                "created": self.created,
                "model": self.model,
                "choices": choices,
                "service_tier": None,
                "system_fingerprint": FINGERPRINT,
                "usage": usage,
                "kv_transfer_params": None,
                "ec_transfer_params": None,
                "metrics": None,
            }
        )

    # --- stream events ---------------------------------------------------
    def _head(self) -> dict[str, Any]:
        return {
            "id": self.rid,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
        }

    def first_event(self, index: int) -> bytes:
        """Chat only: vLLM opens a chat stream with one role chunk per choice.

        Completion streams have no such chunk; their first event is the first token.
        """
        chunk: dict[str, Any] = {
            **self._head(),
            "choices": [
                {
                    "index": index,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
        }
        if self.continuous_usage:
            chunk["usage"] = {**self.usage(0), "completion_tokens_details": None}
        chunk["prompt_token_ids"] = None
        chunk["prompt_text"] = None
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def _text_choice(self, index: int, text: str, finish: str | None) -> dict[str, Any]:
        return {
            "index": index,
            "text": text,
            "logprobs": None,
            "finish_reason": finish,
            "stop_reason": None,
            "prompt_token_ids": None,
            "token_ids": None,
        }

    def token_event(self, index: int, step: int) -> bytes:
        last = step == len(self.tokens) - 1
        finish = self.finish_reason if last else None
        token = self.tokens[step]
        choice: dict[str, Any]
        if self.chat:
            choice = {"index": index, "delta": {"content": token}, "logprobs": None, "finish_reason": finish}
            if last:
                choice["stop_reason"] = None
            choice["token_ids"] = None
        else:
            choice = self._text_choice(index, token, finish)
        chunk: dict[str, Any] = {**self._head(), "choices": [choice]}
        if self.continuous_usage:
            usage = self.usage(step + 1)
            # Chat sets completion_tokens_details (to null); completions leave it unset.
            chunk["usage"] = {**usage, "completion_tokens_details": None} if self.chat else usage
        if last and not self.include_usage:
            # vLLM stamps the fingerprint on each choice's terminal chunk, unless a
            # usage chunk follows (that one is then the true final message).
            chunk["system_fingerprint"] = FINGERPRINT
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def usage_event(self) -> bytes:
        chunk = {**self._head(), "choices": [], "usage": self.usage(), "system_fingerprint": FINGERPRINT}
        return b"data: " + orjson.dumps(chunk) + b"\n\n"


def now() -> int:
    return int(time.time())


# --- vLLM's error bodies ---------------------------------------------------
def error(message: str, type_: str, param: str | None, code: int) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


def error_input(value: Any) -> Any:
    """vLLM's size-bounded stand-in for a validation error's ``input`` value."""
    if isinstance(value, str):
        return value[:200] + "...[truncated]" if len(value) > 200 else value
    if isinstance(value, list | tuple | dict):
        return f"<{type(value).__name__} of {len(value)} items>"
    text = str(value)
    return text[:200] + "...[truncated]" if len(text) > 200 else text


def validation_error(type_: str, loc: str, msg: str, input_: Any, ctx: dict[str, Any] | None = None) -> bytes:
    """vLLM's rendering of one FastAPI request-validation error (400, not 422)."""
    detail: dict[str, Any] = {"type": type_, "loc": loc, "msg": msg, "input": error_input(input_)}
    if ctx is not None:
        detail["ctx"] = ctx
    return error(f"1 validation error:\n  {detail}", "Bad Request", loc, 400)


def vllm_validation_error(message: str, parameter: str, value: Any = None) -> bytes:
    """A ``VLLMValidationError``: message plus ``(parameter=..., value=...)``, 400."""
    extras = [f"parameter={parameter}"] + ([f"value={value}"] if value is not None else [])
    return error(f"{message} ({', '.join(extras)})", "BadRequestError", parameter, 400)


def model_card(name: str, max_model_len: int, created: int, weights: str = "") -> dict[str, Any]:
    """vLLM's model card; ``weights`` (a version tag) changes ``root`` as new weights would."""
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "vllm",
        "root": f"/models/{name}{'@' + weights if weights else ''}",
        "parent": None,
        "max_model_len": max_model_len,
        "permission": [
            {
                "id": new_id("modelperm-"),
                "object": "model_permission",
                "created": created,
                "allow_create_engine": False,
                "allow_sampling": True,
                "allow_logprobs": True,
                "allow_search_indices": False,
                "allow_view": True,
                "allow_fine_tuning": False,
                "organization": "*",
                "group": None,
                "is_blocking": False,
            }
        ],
    }
