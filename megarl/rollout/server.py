"""OpenAI-compatible HTTP front for an EngineGroup, for external agents (`launch/rollout_server.py`).

Endpoints:
- POST /v1/chat/completions  OpenAI chat request (messages, n, temperature, top_p, top_k,
  max_tokens | max_completion_tokens, stop, seed, logprobs), a JSON body whatever its content type
  (curl's `-d` sends form encoding). Each choice also carries the RL fields `token_ids` (generated
  ids) and the response `prompt_token_ids`, so an agent can hand exact tokens and rollout log-probs
  back to the trainer. `logprobs.content[i].logprob` follows the engines' `logprobs_mode` (see
  vllm_engine.py); only the sampled token's log-prob is available (`top_logprobs` > 0 is refused).
- POST /v1/weights  a weight update, the one mutating endpoint: it needs `Authorization: Bearer
  <token>` (401 otherwise). Either JSON {"path": file.safetensors | folder of *.safetensors} — only
  inside the server's allowed weight directories (403 otherwise, the same answer whether the path
  exists or not) — or a raw safetensors body (Content-Type application/octet-stream). The weights are
  staged first: every file read completely and every tensor checked against the served model's
  names and shapes, so a corrupt or foreign file is refused (400) before any engine is touched. Then
  they are pushed to every engine; if the push itself fails, the previous weights are pushed back
  and the weights version stays what it was (500 says whether that restore worked).
  Generation waits while a push runs (and vice versa).
- GET /health, GET /v1/models.

Request bodies above `max_body_bytes` (JSON) / `max_weights_body_bytes` (raw safetensors) get 413.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' `Request` annotations at
# runtime, and Request is imported inside create_app.
import glob
import hmac
import os
import threading
import time
import uuid
from contextlib import contextmanager

from megarl.rollout.types import RolloutRequest, SamplingOptions

TOKEN_ENV = "MEGARL_ROLLOUT_TOKEN"


class ReadWriteLock:
    """Many generate calls at once, or one weight push alone."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    @contextmanager
    def read(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._writer)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def write(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._writer and self._readers == 0)
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def sampling_from_openai(body: dict) -> SamplingOptions:
    """OpenAI request fields → SamplingOptions (absent or null fields take the defaults)."""

    def get(key, default):
        value = body.get(key)
        return default if value is None else value

    stop = get("stop", ())
    return SamplingOptions(
        n=int(get("n", 1)),
        temperature=float(get("temperature", 1.0)),
        top_p=float(get("top_p", 1.0)),
        top_k=int(get("top_k", 0)),
        max_tokens=int(get("max_completion_tokens", get("max_tokens", 256))),
        stop=(stop,) if isinstance(stop, str) else tuple(stop),
        seed=body.get("seed"),
    )


class WeightsRejected(ValueError):
    """A weight update refused before any engine was touched: (HTTP status, message)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def safetensors_files(path: str) -> list[str]:
    """The .safetensors file at `path`, or every *.safetensors in the folder `path`, sorted."""
    return sorted(glob.glob(os.path.join(path, "*.safetensors"))) if os.path.isdir(path) else [path]


def load_safetensors_source(path: str):
    """(name, tensor) pairs from a .safetensors file or every *.safetensors in a folder."""
    from safetensors import safe_open

    files = safetensors_files(path)
    if not files or not all(os.path.isfile(f) for f in files):
        raise FileNotFoundError(f"no safetensors weights at {path!r}")
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def model_weight_shapes(model_dir: str | None) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the served checkpoint's safetensors (headers only); {} if there are none."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in safetensors_files(model_dir) if model_dir and os.path.isdir(model_dir) else []:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


class WeightStager:
    """Turns a request into fully read, checked (name, tensor) pairs, or raises WeightsRejected."""

    def __init__(self, allowed_dirs, expected_shapes: dict[str, tuple[int, ...]]):
        self.allowed_dirs = [os.path.realpath(d) for d in allowed_dirs]
        self.expected_shapes = expected_shapes

    def _allowed(self, real: str) -> bool:
        return any(os.path.commonpath([real, d]) == d for d in self.allowed_dirs)

    def files_for(self, path) -> list[str]:
        if not isinstance(path, str) or not path:
            raise WeightsRejected(400, '"path" must be a non-empty string')
        if not self.allowed_dirs:
            raise WeightsRejected(403, "loading weights by path is disabled: the server has no allowed weight "
                                       "directories (launch/rollout_server.py --weights-dir DIR)")
        # Decided on the resolved path alone, before looking at the file system beyond it: the
        # answer outside the allowed directories never depends on whether something exists there.
        real = os.path.realpath(path)
        if not self._allowed(real):
            raise WeightsRejected(403, "path is outside the server's allowed weight directories")
        files = [os.path.realpath(f) for f in safetensors_files(real)]
        if not files or not all(os.path.isfile(f) for f in files):
            raise WeightsRejected(404, f"no safetensors weights at {path!r}")
        if not all(self._allowed(f) for f in files):  # a symlink inside pointing out
            raise WeightsRejected(403, "path is outside the server's allowed weight directories")
        return files

    def read_files(self, files: list[str]) -> list:
        from safetensors import safe_open

        named = []
        for file in files:
            try:
                with safe_open(file, framework="pt") as f:
                    named.extend((name, f.get_tensor(name)) for name in f.keys())
            except Exception as e:  # noqa: BLE001 - any read error means a bad file
                raise WeightsRejected(400, f"{os.path.basename(file)} is not a readable safetensors file: {e}") from e
        return self.check(named)

    def read_bytes(self, blob: bytes) -> list:
        from safetensors.torch import load

        try:
            named = list(load(blob).items())
        except Exception as e:  # noqa: BLE001 - any parse error is the client's
            raise WeightsRejected(400, f"body is not a safetensors file: {e}") from e
        return self.check(named)

    def check(self, named: list) -> list:
        if not named:
            raise WeightsRejected(400, "the weights hold no tensors")
        if self.expected_shapes:
            unknown = [n for n, _ in named if n not in self.expected_shapes]
            wrong = [f"{n} {tuple(t.shape)} (model: {self.expected_shapes[n]})" for n, t in named
                     if n in self.expected_shapes and tuple(t.shape) != self.expected_shapes[n]]
            if unknown or wrong:
                raise WeightsRejected(400, "the weights do not fit the served model: "
                                      + "; ".join(filter(None, [
                                          f"{len(unknown)} unknown names, e.g. {unknown[:3]}" if unknown else "",
                                          f"{len(wrong)} wrong shapes, e.g. {wrong[:3]}" if wrong else ""])))
        return named


def create_app(group, model_name: str, tokenizer, push_options=None, *, api_token: str, weight_dirs=(),
               model_dir: str | None = None, max_body_bytes: int = 16 * 2**20,
               max_weights_body_bytes: int = 4 * 2**30):
    """`api_token`: the bearer token POST /v1/weights requires. `weight_dirs`: the only directories
    {"path": ...} may read from (none: path updates refused). `model_dir`: the served checkpoint,
    whose names and shapes a pushed file must match and whose weights are the first restore point."""
    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.responses import JSONResponse

    from megarl.rollout.weight_sync import WeightPushOptions

    if not api_token:
        raise ValueError("create_app needs a non-empty api_token (the server's mutating endpoints require it)")
    app = FastAPI(title="megarl rollout server")
    lock = ReadWriteLock()
    push_options = push_options or WeightPushOptions(verify="checksum")
    stager = WeightStager(weight_dirs, model_weight_shapes(model_dir))
    # What to push back if a push fails halfway: a zero-argument callable giving the last weights
    # that were pushed successfully (the checkpoint until the first update), and their version. A
    # path update is re-read from its files (so it restores what they hold then); a raw-body update
    # keeps its body in memory until the next successful update.
    restore = {"weights": (lambda: load_safetensors_source(model_dir)) if model_dir else None, "version": 0}

    @app.exception_handler(WeightsRejected)
    async def rejected(request, exc: WeightsRejected):
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    def require_token(request: Request) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_token.encode()):
            raise HTTPException(401, "this endpoint needs 'Authorization: Bearer <token>' (the token the server "
                                     f"printed at start, or ${TOKEN_ENV})", headers={"WWW-Authenticate": "Bearer"})

    async def read_body(request: Request, limit: int) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise HTTPException(413, f"request body of {int(declared)} bytes is over the limit of {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPException(413, f"request body is over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def read_json(request: Request) -> dict:
        import json

        try:
            body = json.loads(await read_body(request, max_body_bytes))
        except ValueError as e:
            raise HTTPException(400, f"the body must be a JSON object: {e}") from e
        if not isinstance(body, dict):
            raise HTTPException(400, "the body must be a JSON object")
        return body

    @app.get("/health")
    def health():
        engines = group.health()
        return {"ok": all(h.ok for h in engines), "engines": [vars(h) for h in engines]}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "megarl"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        import asyncio

        body = await read_json(request)
        if body.get("stream"):
            raise HTTPException(400, "stream=true is not supported by the megarl rollout server")
        if int(body.get("top_logprobs") or 0) > 0:
            raise HTTPException(400, "top_logprobs > 0 is not supported; logprobs=true gives the sampled token's log-prob")
        if not body.get("messages"):
            raise HTTPException(400, "messages is required")
        try:
            sampling = sampling_from_openai(body)
            chat_request = RolloutRequest(messages=body["messages"])
        except (ValueError, TypeError) as e:
            raise HTTPException(400, str(e)) from e

        def generate():
            with lock.read():
                return group.generate([chat_request], sampling)[0]

        samples = await asyncio.get_running_loop().run_in_executor(None, generate)
        return chat_response(samples, bool(body.get("logprobs")))

    def chat_response(samples, want_logprobs: bool) -> dict:
        choices = []
        for s in samples:
            choice = {
                "index": s.sample_index,
                "message": {"role": "assistant", "content": s.text},
                "finish_reason": s.finish_reason,
                "logprobs": None,
                "token_ids": s.token_ids,
            }
            if want_logprobs:
                tokens = tokenizer.convert_ids_to_tokens(s.token_ids)
                choice["logprobs"] = {
                    "content": [
                        {"token": tok, "logprob": lp, "bytes": None, "top_logprobs": []}
                        for tok, lp in zip(tokens, s.logprobs, strict=True)
                    ]
                }
            choices.append(choice)
        prompt_len = len(samples[0].prompt_token_ids)
        completion = sum(len(s.token_ids) for s in samples)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": choices,
            "prompt_token_ids": samples[0].prompt_token_ids,
            "usage": {"prompt_tokens": prompt_len, "completion_tokens": completion, "total_tokens": prompt_len + completion},
        }

    @app.post("/v1/weights", dependencies=[Depends(require_token)])
    async def update_weights(request: Request):
        import asyncio

        loop = asyncio.get_running_loop()
        if request.headers.get("content-type", "").startswith("application/octet-stream"):
            blob = await read_body(request, max_weights_body_bytes)
            named = await loop.run_in_executor(None, stager.read_bytes, blob)
            source = lambda: iter(stager.read_bytes(blob))  # noqa: E731 - the body stays the restore point
        else:
            body = await read_json(request)
            if "path" not in body:
                raise HTTPException(400, 'send {"path": ...} or a safetensors body (application/octet-stream)')
            files = stager.files_for(body["path"])
            named = await loop.run_in_executor(None, stager.read_files, files)
            source = lambda: iter(stager.read_files(files))  # noqa: E731
        return await loop.run_in_executor(None, push, named, source)

    def push(named, source) -> dict:
        with lock.write():
            try:
                stats = group.push_weights(named, push_options)
            except Exception as e:  # noqa: BLE001 - reported to the caller after restoring
                raise HTTPException(500, f"weight push failed ({e.__class__.__name__}: {e}); {restore_previous()}") from e
            restore.update(weights=source, version=stats.weights_version)
        return {
            "weights_version": stats.weights_version,
            "tensors": stats.tensors,
            "bytes": stats.bytes,
            "seconds": stats.seconds,
            "engine_checksums": stats.engine_checksums,
        }

    def restore_previous() -> str:
        """Push the last good weights back under their version (called with the write lock held)."""
        if restore["weights"] is None:
            return "no previous weights are known to restore: the engines' weights are mixed until the next successful push"
        try:
            group.push_weights(restore["weights"](), push_options, version=restore["version"])
        except Exception as e:  # noqa: BLE001
            return (f"restoring the previous weights failed too ({e.__class__.__name__}: {e}): the engines' weights "
                    "are mixed until the next successful push")
        return f"the previous weights (version {restore['version']}) were restored"

    return app
