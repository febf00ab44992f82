"""An OpenAI-compatible chat endpoint for a model folder, on this machine: `GET /v1/models`, `POST /v1/chat/completions`
(whole answers, or streamed as server-sent events), served with transformers.

Prompts are rendered with the folder's own tokenizer, chat template and template switches (what training used and the
parity check compared), and generation stops on every end token of the template, as `predict` and evaluation stop.
One model answers one request at a time (a lock); the HTTP server takes requests on threads, so a client waiting for
its turn is served after the one in progress, and a bad request gets a 4xx in OpenAI's error shape while the server
keeps serving. No ZenML here.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator, Optional

ROLES = ("system", "user", "assistant", "tool")


class BadRequest(ValueError):
    """What is wrong with a request, with the parameter it names: answered 400."""

    def __init__(self, message: str, param: Optional[str] = None, status: int = 400, code: Optional[str] = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


@dataclass
class ChatRequest:
    messages: list[dict]
    max_tokens: int
    stream: bool
    temperature: float
    stop: list[str]
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the token counts


def parse_request(body: bytes, served: str, default_max_tokens: int) -> ChatRequest:
    """The request, or BadRequest naming the parameter (every check a client can get wrong)."""
    try:
        doc = json.loads(body or b"null")
    except json.JSONDecodeError as exc:
        raise BadRequest(f"the body is not JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(doc, dict):
        raise BadRequest("the body must be a JSON object with 'messages'")
    if doc.get("model") not in (None, served):
        raise BadRequest(f"the model {doc['model']!r} does not exist here; this server serves {served!r} (GET "
                         "/v1/models)", "model", 404, "model_not_found")
    messages = doc.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {role, content}", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {', '.join(ROLES)}", f"messages[{i}].role")
        if not isinstance(m.get("content"), str):
            raise BadRequest(f"messages[{i}].content must be a string", f"messages[{i}].content")
    max_tokens = doc.get("max_completion_tokens", doc.get("max_tokens", default_max_tokens))
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise BadRequest("'max_tokens' must be a positive integer", "max_tokens")
    temperature = doc.get("temperature", 0.0)
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature <= 2:
        raise BadRequest("'temperature' must be a number from 0 to 2 (0: greedy)", "temperature")
    stop = doc.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("'stop' must be a string or a list of strings", "stop")
    if doc.get("n", 1) != 1:
        raise BadRequest("'n' other than 1 is not served here", "n")
    options = doc.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object", "stream_options")
    return ChatRequest([{"role": m["role"], "content": m["content"]} for m in messages], max_tokens,
                       bool(doc.get("stream", False)), float(temperature), stop, bool(options.get("include_usage")))


class ChatModel:
    """A model and its tokenizer answering chat requests, one at a time."""

    def __init__(self, model: Any, tokenizer: Any, name: str):
        from lorapipe.data.end_tokens import end_token_ids

        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.end_ids = end_token_ids(tokenizer)
        self.lock = threading.Lock()

    def tokens(self, request: ChatRequest) -> tuple[int, Iterator[str], dict]:
        """(prompt tokens, the answer's text pieces as generated, a dict filled at the end: completion_tokens and
        finish_reason "stop" or "length"). Holds the model's lock until the pieces are consumed."""
        import torch
        from transformers import TextIteratorStreamer

        from lorapipe.data.render import render

        text = render(self.tokenizer, request.messages, None, add_generation_prompt=True)
        device = next(self.model.parameters()).device
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        sampling = {"do_sample": True, "temperature": request.temperature} if request.temperature > 0 else \
            {"do_sample": False}
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                with torch.no_grad():
                    out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                              max_new_tokens=request.max_tokens, eos_token_id=self.end_ids,
                                              pad_token_id=self.tokenizer.pad_token_id, streamer=streamer,
                                              **sampling)
                new = out[0, ids.shape[1]:].tolist()
                result.update(completion_tokens=len(new),
                              finish_reason="stop" if any(t in self.end_ids for t in new) else "length")
            except Exception as exc:  # noqa: BLE001 - said to the client as a server error, the server stays up
                result["error"] = f"{type(exc).__name__}: {exc}"
                streamer.end()

        def pieces() -> Iterator[str]:
            with self.lock:
                worker = threading.Thread(target=run, daemon=True)
                worker.start()
                emitted = ""
                try:
                    for piece in streamer:
                        cut = _stop_cut(emitted + piece, request.stop)
                        if cut is not None:  # a client stop string: the answer ends before it
                            yield (emitted + piece)[len(emitted):cut]
                            result["finish_reason"] = "stop"
                            return
                        emitted += piece
                        if piece:
                            yield piece
                finally:  # also when the client went away mid-stream: the model is free only once generation ends
                    worker.join()
            if "error" in result:
                raise RuntimeError(result["error"])

        return int(ids.shape[1]), pieces(), result


def _stop_cut(text: str, stops: list[str]) -> Optional[int]:
    found = [text.find(s) for s in stops if s in text]
    return min(found) if found else None


def make_handler(chat: ChatModel, default_max_tokens: int) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "lorapipe"
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
            """One line per request on stderr, lorapipe's own (not the stdlib's access log format)."""
            import sys

            sys.stderr.write(f"serve: {self.command} {self.path} -> {args[1] if len(args) > 1 else ''}\n")

        def _json(self, status: int, doc: dict) -> None:
            body = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> None:
            kind = "invalid_request_error" if status < 500 else "server_error"
            self._json(status, {"error": {"message": message, "type": kind, "param": param, "code": code}})

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": chat.name, "object": "model", "created": 0,
                                                             "owned_by": "lorapipe"}]})
            elif self.path.rstrip("/") == "/health":
                self._json(200, {"status": "ok"})
            else:
                self._error(404, f"no route {self.path}: GET /v1/models, POST /v1/chat/completions")

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._error(404, f"no route {self.path}: POST /v1/chat/completions")
            try:
                request = parse_request(body, chat.name, default_max_tokens)
            except BadRequest as exc:
                return self._error(exc.status, str(exc), exc.param, exc.code)
            completion_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
            try:
                prompt_tokens, pieces, result = chat.tokens(request)
                if request.stream:
                    return self._stream(completion_id, created, pieces, result, prompt_tokens, request.include_usage)
                text = "".join(pieces)
            except RuntimeError as exc:
                return self._error(500, f"generation failed: {exc}")
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": result.get("completion_tokens", 0),
                     "total_tokens": prompt_tokens + result.get("completion_tokens", 0)}
            self._json(200, {"id": completion_id, "object": "chat.completion", "created": created,
                             "model": chat.name, "usage": usage,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": text.strip()},
                                          "finish_reason": result.get("finish_reason", "stop")}]})

        def _stream(self, completion_id: str, created: int, pieces: Iterator[str], result: dict,
                    prompt_tokens: int, include_usage: bool) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True

            def event(delta: dict, finish: Optional[str] = None) -> None:
                doc = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                       "model": chat.name, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
                self.wfile.write(f"data: {json.dumps(doc)}\n\n".encode())
                self.wfile.flush()

            try:
                event({"role": "assistant", "content": ""})
                for piece in pieces:
                    event({"content": piece})
            except RuntimeError as exc:
                self.wfile.write(f"data: {json.dumps({'error': {'message': str(exc)}})}\n\n".encode())
            except (BrokenPipeError, ConnectionResetError):  # the client went away: nothing more to send it
                pieces.close()  # type: ignore[attr-defined] - a generator: its lock is released after generation
                return
            event({}, result.get("finish_reason", "stop"))
            if include_usage:  # as OpenAI's API: one more chunk, no choices, the counts
                completion = result.get("completion_tokens", 0)
                doc = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": chat.name,
                       "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                                                "total_tokens": prompt_tokens + completion}}
                self.wfile.write(f"data: {json.dumps(doc)}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()

    return Handler


def make_server(chat: ChatModel, host: str = "127.0.0.1", port: int = 8000,
                default_max_tokens: int = 256) -> ThreadingHTTPServer:
    """The HTTP server (not started: `serve_forever`); port 0 takes a free one (`server.server_address`)."""
    server = ThreadingHTTPServer((host, port), make_handler(chat, default_max_tokens))
    server.daemon_threads = True
    return server
