"""Models served elsewhere: any OpenAI-compatible endpoint (llama.cpp's llama-server, vLLM,
Ollama, another ``nbllm serve``), behind the same small interface as a local model.

This is how a team outgrows one machine: run vLLM or llama-server on a GPU box, name it in
``remote_models``, and the magics, chat panel, prompt cache, stats and benchmarks work on it the
same way. It speaks HTTP (answers streamed as server-sent events) through httpx, not the standard
library's urllib as before: one client per model keeps its connections open between requests (no
new TCP or TLS handshake per prompt, which adds up over ``generate_many`` and benchmarks) and is
shared safely by the threads of a batch; a connection that fails to open is retried, a request
the server received never is (a generation is not idempotent); and there are timeouts on
connecting and on each read.
"""

from __future__ import annotations

import base64
import binascii
import json
import queue
import ssl
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from nbllm.backends.base import BatchEvent, BatchItem, BatchProgress, EmbeddedTexts, LoadSettings, ModelSpec, Usage
from nbllm.core.chat_format import FormattedPrompt
from nbllm.core.config import RemoteModel as RemoteConfig
from nbllm.core.errors import GenerationError, ModelLoadError, NbllmError
from nbllm.core.params import GenerationParams
from nbllm.core.stop import StopMatcher

# Seconds to wait for a TCP connection, per try: a host that drops packets must say so in
# seconds, not after the whole (generation-sized) timeout three times over.
CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True)
class RemotePrompt(FormattedPrompt):
    """A chat for a remote model: the server applies its own template to the messages."""

    messages: tuple[dict[str, str], ...] = field(default=())


def _reason(error: BaseException) -> str:
    return str(error).rstrip(".") or type(error).__name__  # it goes into a sentence


def _endpoint_error(url: str, error: httpx.RequestError) -> ModelLoadError:
    """A request that got no answer: refused, unreachable, timed out, cut off before a reply."""
    return ModelLoadError(
        f"Cannot reach {url}: {_reason(error)}. Is the server running, and is remote_models' url right (e.g. "
        "http://host:8080/v1)?"
    )


def _status_error(url: str, response: httpx.Response) -> _StatusError:
    """An answer with an HTTP error status; reads its body (the server's explanation) and closes it."""
    try:
        body = json.loads(response.read().decode("utf-8", "replace"))
        detail = body.get("error", {}).get("message") or body.get("detail") or body
    except (ValueError, AttributeError, httpx.HTTPError):
        detail = response.reason_phrase
    finally:
        response.close()
    hint = " Check remote_models' api_key." if response.status_code in (401, 403) else ""
    return _StatusError(f"The server at {url} answered {response.status_code}: {detail}.{hint}", response.status_code)


class _StatusError(GenerationError):
    """The server answered with an HTTP error ``status`` (RemoteModel.generate reads it)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _client(url: str, config: RemoteConfig) -> httpx.Client:
    """The connections to one server, shared by every request to it (httpx clients are thread-safe)."""
    headers = {"Accept": "text/event-stream, application/json"}
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key}"
    # What urllib did unasked, kept: the system's certificate authorities (httpx's default is
    # certifi's bundle, which lacks a company's own CA) and the *_proxy / no_proxy variables
    # (httpx reads them only when it builds its own transport).
    parts = urllib.parse.urlsplit(url)
    proxy = None if urllib.request.proxy_bypass(parts.netloc) else urllib.request.getproxies().get(parts.scheme)
    if proxy and "://" not in proxy:
        proxy = f"http://{proxy}"
    transport = httpx.HTTPTransport(
        verify=ssl.create_default_context(),
        proxy=proxy or None,
        # No cap on connections: ``run_batch`` has up to performance.parallel requests in flight.
        # Idle ones are dropped after 4 s, before the 5 s after which uvicorn (vLLM, nbllm serve)
        # and llama-server close theirs: a request should not go out on a connection being closed.
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None, keepalive_expiry=4.0),
        retries=2,  # connection attempts only (refused, timed out): never a request that was sent
    )
    return httpx.Client(
        base_url=url,
        headers=headers,
        # Each read and write may take the configured time (a long prompt on a slow server), but a
        # host that does not answer at all fails fast: connecting is retried, and each try waits.
        timeout=httpx.Timeout(config.timeout, connect=min(config.timeout, CONNECT_TIMEOUT)),
        transport=transport,
        follow_redirects=True,
        default_encoding="utf-8",  # server-sent events are UTF-8 whatever the headers say
    )


class RemoteModel:
    """One model on an OpenAI-compatible server. Thread-safe: the server does the queueing."""

    def __init__(self, name: str, config: RemoteConfig, settings: LoadSettings) -> None:
        self.name = name
        self.config = config
        self.settings = settings
        self.url = config.url.rstrip("/")
        self.model = config.model or name
        self.path = Path(f"remote/{name}")  # no file: a stable stand-in for displays
        self._client = _client(self.url, config)
        self._schema_in_json_object = False  # see generate: the form this server takes schemas in

    @property
    def context_size(self) -> int:
        return self.config.context_size

    # ---------------------------------------------------------------- requests

    def _request(self, endpoint: str, payload: dict[str, Any] | None = None) -> httpx.Response:
        """Send a request (a POST of ``payload``, else a GET) and return the answer once its
        headers are in, its body still to read: the caller reads it and closes it.

        ``client.send(..., stream=True)`` is what ``client.stream()`` does inside its ``with``;
        called plainly, the response outlives this call (a generator reads it later)."""
        if payload is None:
            request = self._client.build_request("GET", endpoint)
        else:
            # Encoded as before (httpx's own json= differs: no NaN, no ASCII escapes).
            content = json.dumps(payload).encode()
            request = self._client.build_request(
                "POST", endpoint, content=content, headers={"Content-Type": "application/json"}
            )
        try:
            response = self._client.send(request, stream=True)
        except httpx.RequestError as error:
            raise _endpoint_error(self.url, error) from error
        if not response.is_success:
            raise _status_error(self.url, response)
        return response

    def check(self) -> list[str]:
        """The models the server lists (``GET /models``): proves it answers, at load time."""
        response = self._request("/models")
        try:
            listing = json.loads(response.read().decode("utf-8"))
        finally:
            response.close()
        return [str(entry.get("id")) for entry in listing.get("data", [])]

    def embed(
        self, texts: Sequence[str], *, truncate: bool, on_progress: Callable[[int], None], cancel: threading.Event
    ) -> EmbeddedTexts:
        """OpenAI's ``POST /embeddings``, in slices of EMBED_SLICE texts (a server limits a
        request's inputs). The server decides about texts too long for its model."""
        rows: list[list[float]] = []
        tokens = 0
        for part in _slices(texts):
            if cancel.is_set():
                raise GenerationError(f"The embedding was stopped after {len(rows)} of {len(texts)} texts.")
            try:
                response = self._request("/embeddings", {"model": self.model, "input": part})
            except _StatusError as error:
                if error.status in (404, 405, 501):
                    raise GenerationError(
                        f"The server at {self.url} has no embeddings endpoint ({error.status}): {self.name} cannot "
                        "embed there. Use a local embedding model (nbllm.embed without model=) or a server with one."
                    ) from error
                raise
            try:
                body = json.loads(response.read().decode("utf-8"))
            except (ValueError, httpx.HTTPError) as error:
                raise GenerationError(f"The server at {self.url} sent no readable embeddings ({error}).") from error
            finally:
                response.close()
            rows += _embedding_rows(body, len(part), self.url)
            usage = body.get("usage") if isinstance(body, dict) else None
            counted = usage.get("prompt_tokens") if isinstance(usage, dict) else None
            tokens += counted if isinstance(counted, int) and counted >= 0 else 0
            on_progress(len(part))
        if len({len(row) for row in rows}) != 1:
            raise GenerationError(f"The server at {self.url} sent embeddings of different lengths.")
        return EmbeddedTexts(np.asarray(rows, dtype=np.float32), tokens)

    def format_chat(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
    ) -> FormattedPrompt:
        # The server formats the chat, and is given the tools as OpenAI's tools (_payload).
        return RemotePrompt(text="", messages=tuple(dict(m) for m in messages), trim_whitespace=True)

    def count_tokens(self, prompt: FormattedPrompt) -> int:
        # No tokenizer here: an estimate (about four characters per token) for checks only.
        text = prompt.text or " ".join(m["content"] for m in getattr(prompt, "messages", ()))
        return max(1, len(text) // 4)

    def _payload(self, prompt: FormattedPrompt, params: GenerationParams, seed: int) -> tuple[str, dict[str, Any]]:
        payload: dict[str, Any] = {
            "model": self.model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "presence_penalty": params.presence_penalty,
            "frequency_penalty": params.frequency_penalty,
            "seed": seed,
        }
        stops = [*params.stop, *prompt.stop]
        if stops:
            payload["stop"] = stops[:4]  # OpenAI allows four; the rest are applied here
        if self.config.llama_extras:
            payload.update(top_k=params.top_k, min_p=params.min_p, repeat_penalty=params.repeat_penalty)
            if params.ignore_eos:
                payload["ignore_eos"] = True
        if params.tools is not None:  # the server formats and constrains the calls itself
            payload["tools"] = [tool.as_openai() for tool in params.tools.tools]
            choice = params.tools.choice
            payload["tool_choice"] = (
                choice if choice in ("auto", "none", "required") else {"type": "function", "function": {"name": choice}}
            )
        elif params.constraint is not None:
            payload["response_format"] = self._response_format(params)
        if isinstance(prompt, RemotePrompt):
            payload["messages"] = [_wire_message(message) for message in prompt.messages]
            return "/chat/completions", payload
        payload["prompt"] = prompt.text
        return "/completions", payload

    def _response_format(self, params: GenerationParams) -> dict[str, Any]:
        constraint = params.constraint
        assert constraint is not None
        if self._schema_in_json_object and constraint.kind != "json":
            return {"type": "json_object", "schema": dict(constraint.schema)}
        return constraint.response_format()

    def generate(
        self, prompt: FormattedPrompt, params: GenerationParams, seed: int, usage: Usage, cancel: threading.Event
    ) -> Iterator[str]:
        endpoint, payload = self._payload(prompt, params, seed)
        try:
            response = self._request(endpoint, payload)  # errors here, at the call: like a local prompt check
        except _StatusError as error:
            # OpenAI's "json_schema" is what llama-server, vLLM and Ollama take; llama-cpp-python's
            # server knows only {"type": "json_object", "schema": ...} and refuses it (a 500 that
            # names response_format, in 0.3; others answer 400 or 422). Asked once
            # in that form, and the form that worked is kept for this model.
            rejected = error.status in (400, 422) or "response_format" in str(error)
            if not (rejected and params.constraint is not None and params.constraint.kind != "json"):
                raise
            if self._schema_in_json_object:
                raise
            self._schema_in_json_object = True
            endpoint, payload = self._payload(prompt, params, seed)
            response = self._request(endpoint, payload)
        return self._stream(response, params, prompt, usage, cancel)

    def _stream(
        self,
        response: httpx.Response,
        params: GenerationParams,
        prompt: FormattedPrompt,
        usage: Usage,
        cancel: threading.Event,
    ) -> Iterator[str]:
        matcher = StopMatcher([*params.stop, *prompt.stop])
        finish, chunks, at_stop = "stop", 0, False
        calls: dict[int, dict[str, str]] = {}  # streamed tool calls, by index: name and arguments text
        try:
            for data in _events(response):
                if cancel.is_set():
                    finish = "cancelled"
                    break
                if data.get("usage"):
                    usage.prompt_tokens = int(data["usage"].get("prompt_tokens") or 0)
                    usage.completion_tokens = int(data["usage"].get("completion_tokens") or chunks)
                for choice in data.get("choices", [])[:1]:
                    for part in (choice.get("delta") or {}).get("tool_calls") or []:
                        slot = calls.setdefault(int(part.get("index") or 0), {"name": "", "arguments": ""})
                        function = part.get("function") or {}
                        slot["name"] += function.get("name") or ""
                        slot["arguments"] += function.get("arguments") or ""
                    text = (choice.get("delta") or {}).get("content") or choice.get("text") or ""
                    if text:
                        if chunks == 0:
                            usage.first_token_at = time.perf_counter()
                            text = text.lstrip() if prompt.trim_whitespace else text
                        chunks += 1
                        # Without a usage report, chunks stand in for tokens (a server may split
                        # a token's bytes over two chunks: never count past max_tokens).
                        usage.completion_tokens = max(usage.completion_tokens, min(chunks, params.max_tokens))
                        shown, at_stop = matcher.feed(text)
                        if shown:
                            yield shown
                        if at_stop:
                            break
                    if choice.get("finish_reason"):
                        finish = "length" if choice["finish_reason"] == "length" else "stop"
                if at_stop:
                    break
            if calls and finish != "cancelled":
                # As nbllm writes calls (core/tools.py): the pipeline parses and validates them.
                yield json.dumps([_call(calls[index]) for index in sorted(calls)])
            if not at_stop and finish != "cancelled":
                tail = matcher.flush()
                tail = tail.rstrip() if prompt.trim_whitespace else tail
                if tail:
                    yield tail
        except (GeneratorExit, KeyboardInterrupt):
            finish = "cancelled"
            raise
        except (httpx.HTTPError, OSError, ValueError) as error:
            finish = "error"
            raise GenerationError(f"The stream from {self.url} broke off: {_reason(error)}.") from error
        finally:
            # Read to its end, the connection goes back to the pool; cut short (a stop sequence,
            # cancel, the consumer gone, an error), it is closed: the server sees the client go.
            response.close()
            usage.finish_reason = finish

    # ---------------------------------------------------------------- batches and benchmarks

    def run_batch(
        self,
        feed: queue.SimpleQueue[BatchItem | None],
        stop: threading.Event,
        progress: BatchProgress,
        idle: Callable[[], bool],
        *,
        parallel: int,
        seq_context: int,
    ) -> None:
        """``generate_many`` on a remote model: ``parallel`` requests in flight at once (the
        server batches them); the same events as the local loop."""

        def one(item: BatchItem) -> None:
            prompt = item.prompt if isinstance(item.prompt, FormattedPrompt) else self.format_chat(item.prompt)
            try:
                for piece in self.generate(prompt, item.params, item.seed, item.usage, item.cancel):
                    progress.tokens += 1
                    item.sink(BatchEvent(item, "piece", piece))
            except Exception as error:  # every item gets its end, or its caller waits forever
                failure = (
                    error
                    if isinstance(error, NbllmError)
                    else GenerationError(
                        f"The answer from {self.url} could not be read: {type(error).__name__}: {error}."
                    )
                )
                item.usage.finish_reason = "error"
                item.sink(BatchEvent(item, "error", error=failure))
                return
            progress.finished += 1
            item.sink(BatchEvent(item, "done"))

        with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix=f"nbllm-remote-{self.name}") as pool:
            running: list[Future[None]] = []
            while not stop.is_set():
                running = [job for job in running if not job.done()]
                try:
                    item = feed.get(timeout=0.05)
                except queue.Empty:
                    if not running and idle():
                        return
                    continue
                if item is not None:
                    running.append(pool.submit(one, item))

    def timed_decode(self, kind: str, n_tokens: int, seed: int = 0) -> float:
        """llama-bench's pp/tg as far as an API allows: pp = a prompt of about ``n_tokens`` with
        one token answered; tg = ``n_tokens`` generated (EOS ignored where the server allows),
        timed from the first token."""
        words = " ".join(["token"] * n_tokens)
        params = GenerationParams(
            temperature=0.0, max_tokens=1 if kind == "pp" else n_tokens, top_p=1.0, top_k=0, min_p=0.0,
            repeat_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, seed=seed, ignore_eos=kind == "tg",
        )  # fmt: skip
        usage = Usage()
        start = time.perf_counter()
        for _ in self.generate(
            FormattedPrompt(words if kind == "pp" else "Count:"), params, seed, usage, threading.Event()
        ):
            pass
        end = time.perf_counter()
        if kind == "tg" and usage.first_token_at is not None and usage.completion_tokens > 1:
            return (end - usage.first_token_at) * n_tokens / (usage.completion_tokens - 1)
        return end - start

    def set_threads(self, threads: int) -> None:
        pass  # the server's own business

    def clear_prefix_cache(self) -> None:
        pass

    def prefix_cache_stats(self) -> dict[str, int]:
        return {"snapshots": 0, "bytes": 0, "tokens": 0, "saved": 0, "restored": 0, "evicted": 0}

    def close(self) -> None:
        self._client.close()  # its kept-alive connections


def _call(call: dict[str, str]) -> dict[str, Any]:
    try:
        arguments = json.loads(call["arguments"] or "{}")
    except ValueError:
        arguments = call["arguments"]  # not JSON: the pipeline reports it, with the exchange
    return {"name": call["name"], "arguments": arguments}


EMBED_SLICE = 256  # texts per embeddings request, and at most EMBED_SLICE_BYTES of them
EMBED_SLICE_BYTES = 512 * 1024  # servers limit a request's body (nbllm serve: 1 MiB)


def _slices(texts: Sequence[str]) -> Iterator[list[str]]:
    part: list[str] = []
    size = 0
    for text in texts:
        length = len(text.encode("utf-8"))
        if part and (len(part) == EMBED_SLICE or size + length > EMBED_SLICE_BYTES):
            yield part
            part, size = [], 0
        part.append(text)
        size += length
    if part:
        yield part


def _embedding_rows(body: Any, count: int, url: str) -> list[list[float]]:
    """The vectors of an OpenAI embeddings answer, in input order, checked: one per input, all of
    one length, numbers only."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list) or len(data) != count:
        raise GenerationError(f"The server at {url} answered with {len(data) if isinstance(data, list) else 'no'} "
                              f"embeddings for {count} texts.")  # fmt: skip
    rows: list[list[float]] = [[] for _ in range(count)]
    for position, entry in enumerate(data):
        index = entry.get("index", position) if isinstance(entry, dict) else None
        vector = entry.get("embedding") if isinstance(entry, dict) else None
        if not isinstance(index, int) or not 0 <= index < count or rows[index]:
            raise GenerationError(f"The server at {url} sent an embedding with a wrong index ({index!r}).")
        try:
            if isinstance(vector, str):  # base64, if the server ignored encoding_format
                vector = np.frombuffer(base64.b64decode(vector, validate=True), dtype="<f4").tolist()
            if not isinstance(vector, list) or not vector:
                raise ValueError("not a list")
            row = [float(x) for x in vector if isinstance(x, (int, float)) and not isinstance(x, bool)]
        except (ValueError, OverflowError, binascii.Error) as error:
            raise GenerationError(f"The server at {url} sent an embedding that is not numbers ({error}).") from None
        if len(row) != len(vector):
            raise GenerationError(f"The server at {url} sent an embedding that is not a list of numbers.")
        rows[index] = row
    return rows


def _wire_message(message: Mapping[str, Any]) -> dict[str, Any]:
    """A message as OpenAI's API takes it: a tool call's arguments as JSON text (nbllm keeps
    them as objects, as chat templates take them)."""
    calls = message.get("tool_calls")
    if not calls:
        return dict(message)
    wired = [
        {**call, "function": {**call["function"], "arguments": json.dumps(call["function"]["arguments"])}}
        if not isinstance(call["function"].get("arguments"), str) else call
        for call in calls
    ]  # fmt: skip
    return {**message, "tool_calls": wired}


def _events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """Server-sent events of a streamed completion (or one JSON body, if the server ignored
    ``stream``), as dicts; ``[DONE]`` ends them."""
    content_type = response.headers.get("Content-Type", "")
    if "text/event-stream" not in content_type:
        yield _as_stream_chunk(json.loads(response.read().decode("utf-8")))
        return
    lines = response.iter_lines()
    for raw in lines:
        line = raw.strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            _drain(lines)
            return
        event = json.loads(data)
        if isinstance(event, dict) and "error" in event:
            raise GenerationError(f"The server reported: {event['error'].get('message', event['error'])}.")
        yield event


# Lines read after ``[DONE]`` before giving up on the connection: a server ends the body there
# (a blank line at most); one that keeps sending must not hold the answer, and the model, open.
_DRAIN_LINES = 4


def _drain(lines: Iterator[str]) -> None:
    """Read what is left of a body after ``[DONE]`` (its end, at once): a connection read to
    the end of its answer is kept for the next request, one left mid-answer is closed by the
    caller. The answer is complete, so an error here is no error: llama-cpp-python's server, for
    one, ends a stream it interrupts for a newer request with ``[DONE]`` and then cuts the body off."""
    try:
        for count, _ in enumerate(lines, start=1):
            if count >= _DRAIN_LINES:
                return
    except httpx.HTTPError:
        pass


def _as_stream_chunk(body: dict[str, Any]) -> dict[str, Any]:
    choices = []
    for choice in body.get("choices", [])[:1]:
        message = choice.get("message") or {}
        choices.append(
            {
                "delta": {"content": message.get("content") or choice.get("text") or ""},
                "finish_reason": choice.get("finish_reason"),
            }
        )
    return {"choices": choices, "usage": body.get("usage")}


class RemoteBackend:
    name = "remote"

    def load(self, spec: ModelSpec, settings: LoadSettings) -> RemoteModel:
        assert spec.remote is not None, "backend_for() sends only remote models here"
        name = spec.name
        model = RemoteModel(name, spec.remote, settings)
        try:
            try:
                listed = model.check()
            except (httpx.HTTPError, ValueError) as error:  # a reply cut short or timed out, or not JSON
                raise ModelLoadError(f"The server at {model.url} did not answer /models properly: {error}.") from error
            if listed and model.model not in listed:
                from nbllm.core.errors import ModelNotFoundError, did_you_mean

                raise ModelNotFoundError(
                    f"The server at {model.url} has no model {model.model!r}.{did_you_mean(model.model, listed)} "
                    f"It serves: {', '.join(listed)}. Set remote_models.{name}.model."
                )
        except BaseException:
            model.close()  # a model that failed to load is nobody's to close later
            raise
        return model

    def build_info(self) -> dict[str, Any]:
        return {"backend": "remote", "gpu_offload": False, "system_info": ""}
