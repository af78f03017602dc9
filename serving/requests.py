"""Validation of request bodies: each mistake is a `BadRequest` naming the field and what to send."""
from dataclasses import dataclass


class BadRequest(Exception):
    """A client mistake: HTTP `status` with an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.param, self.status, self.kind = param, status, kind


COMPLETION_KEYS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "stream",
                   "stream_options", "echo", "user", "logprobs", "best_of", "presence_penalty", "frequency_penalty",
                   "logit_bias", "suffix"}


@dataclass
class Limits:
    max_prompt_tokens: int
    max_tokens: int  # per choice
    max_n: int  # choices per request: prompts x n


@dataclass
class Completion:
    prompts: list
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    n: int
    stop: list
    seed: int | None
    stream: bool
    include_usage: bool
    echo: bool


def _int(body: dict, key: str, default, lo: int, hi: int | None = None):
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, int) or isinstance(v, bool):
        raise BadRequest(f"{key} must be an integer, not {type(v).__name__}", key)
    if v < lo or (hi is not None and v > hi):
        raise BadRequest(f"{key}={v} is out of range: use {lo}..{hi}" if hi is not None else
                         f"{key}={v} must be >= {lo}", key)
    return v


def _float(body: dict, key: str, default: float) -> float:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise BadRequest(f"{key} must be a number, not {type(v).__name__}", key)
    return float(v)


def _bool(body: dict, key: str) -> bool:
    v = body.get(key, False)
    if v is not None and not isinstance(v, bool):
        raise BadRequest(f"{key} must be true or false", key)
    return bool(v)


def completion(body, limits: Limits) -> Completion:
    """The settings of a POST /v1/completions body, or BadRequest."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    unknown = sorted(set(body) - COMPLETION_KEYS)
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}; this server reads {', '.join(sorted(COMPLETION_KEYS))}",
                         unknown[0])
    for key, off in (("logprobs", None), ("suffix", None), ("presence_penalty", 0), ("frequency_penalty", 0)):
        if body.get(key, off) not in (off, None):
            raise BadRequest(f"{key} is not supported by this server; leave it out", key)
    if body.get("logit_bias"):
        raise BadRequest("logit_bias is not supported by this server; leave it out", "logit_bias")
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise BadRequest("prompt must be a string or a non-empty list of strings (token-id prompts are not "
                         "supported)", "prompt")
    if any(not p for p in prompts):
        raise BadRequest("prompt must not be empty", "prompt")
    n = _int(body, "n", 1, 1, limits.max_n)
    if len(prompts) * n > limits.max_n:
        raise BadRequest(f"{len(prompts)} prompts x n={n} is {len(prompts) * n} completions; this server makes at "
                         f"most {limits.max_n} per request", "n")
    if body.get("best_of") not in (None, 1, n):
        raise BadRequest("best_of is not supported by this server; leave it out", "best_of")
    temperature, top_p = _float(body, "temperature", 1.0), _float(body, "top_p", 1.0)
    if not 0.0 <= temperature <= 2.0:
        raise BadRequest(f"temperature={temperature} is out of range: use 0..2 (0 is greedy)", "temperature")
    if not 0.0 < top_p <= 1.0:
        raise BadRequest(f"top_p={top_p} is out of range: use a value in (0, 1]", "top_p")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("stop must be a non-empty string or a list of up to 4 of them", "stop")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise BadRequest("stream_options may hold only include_usage", "stream_options")
    seed = body.get("seed")
    if seed is not None:
        seed = _int(body, "seed", None, -(2 ** 31), 2 ** 31 - len(prompts) * n)  # choice k samples with seed + k
    return Completion(prompts, _int(body, "max_tokens", 16, 1, limits.max_tokens), temperature, top_p,
                      _int(body, "top_k", 0, 0, 2 ** 31 - 1), n, stop, seed, _bool(body, "stream"),
                      bool(options.get("include_usage")), _bool(body, "echo"))


def predict_inputs(body, max_rows: int) -> list:
    """The `inputs` list of a POST /v1/predict body, or BadRequest."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object: {\"inputs\": [...]}")
    unknown = sorted(set(body) - {"inputs", "model"})
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}; send {{\"inputs\": [...]}}", unknown[0])
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("inputs must be a non-empty list (one item per row, image or text)", "inputs")
    if len(inputs) > max_rows:
        raise BadRequest(f"{len(inputs)} inputs; this server takes at most {max_rows} per request", "inputs")
    return inputs
