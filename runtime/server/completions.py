"""POST /v1/completions: validate, hand the prompts to the engine, answer as OpenAI does (JSON or SSE)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..search import SequenceOutput
from ..tokenizer import INCOMPLETE_CHARACTER, common_prefix_length
from .bridge import JobStream, submit
from .job import Job, TokenUpdate
from .schemas import CompletionRequest, RequestError, from_generation_error, parse_completion
from .state import ServerContext

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
_CONTEXT_TOKENS = 4  # tokens decoded before a token to get its own text right (leading spaces, merges)


async def create_completion(ctx: ServerContext, request: Request, body: dict[str, Any]) -> Response:
    req = parse_completion(body, ctx.tg.manifest.vocab_size, ctx.model_name)
    try:
        plan = ctx.tg.plan(req.params)
    except (ValueError, TypeError, ArithmeticError) as exc:
        raise from_generation_error(exc, openai_names=True) from None
    if req.max_tokens > ctx.max_new_tokens:
        raise RequestError(400, f"max_tokens must be <= {ctx.max_new_tokens} on this server, got {req.max_tokens}",
                           param="max_tokens", code="invalid_value")
    ctx.check_rows(len(req.prompts), plan, "n" if len(req.prompts) == 1 else "prompt")
    ids = ctx.encode(req.prompts, plan, "prompt")
    log = request.scope.setdefault("onnxgen.log", {})
    log.update(prompt_tokens=sum(map(len, ids)), prompts=len(ids), n=req.n, stream=req.stream)
    stream = JobStream(ctx, request)
    job = Job(ids, plan, stream.sink, stream=req.stream, top_logprobs=req.logprobs, timeout=ctx.limits.timeout,
              counts_prompt=not ctx.tg.manifest.is_encoder_decoder)
    submit(ctx, job)
    answer = _Answer(ctx, req, ids)
    if req.stream:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return JobStreamingResponse(ctx.engine, job, _sse(ctx, stream, job, answer, log),
                                    media_type="text/event-stream", headers=headers)
    results = await stream.collect(job)
    choices = [choice for prompt, outputs, alternatives in results
               for sequence, (output, alts) in enumerate(zip(outputs, alternatives))
               for choice in answer.choice(prompt, sequence, output, alts)]
    log.update(completion_tokens=answer.completion_tokens)
    return JSONResponse({**answer.envelope(), "choices": choices, "usage": answer.usage()})


class JobStreamingResponse(StreamingResponse):
    """A streamed answer that stops its job however the response ends. The body's own clean-up runs only once
    the body has started, and a client gone before the first byte was sent never starts it: the job would then
    generate to its last token for nobody. (Cancelling a finished job does nothing.)"""

    def __init__(self, engine, job: Job, content, **kwargs):
        super().__init__(content, **kwargs)
        self.engine, self.job = engine, job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.engine.cancel(self.job)


class _Answer:
    """Builds OpenAI completion objects for one request."""

    def __init__(self, ctx: ServerContext, req: CompletionRequest, ids: list[list[int]]):
        self.ctx, self.req, self.ids = ctx, req, ids
        self.id = "cmpl-" + uuid.uuid4().hex
        self.created = int(time.time())
        self.completion_tokens = 0
        self.texts = TokenTexts(ctx.tg.tokenizer)
        self.copies = req.n if req.repeat_greedy else 1

    def envelope(self) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.ctx.model_name,
                "system_fingerprint": None}

    def usage(self) -> dict[str, int]:
        prompt = sum(map(len, self.ids))
        return {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens,
                "total_tokens": prompt + self.completion_tokens}

    def indices(self, prompt: int, sequence: int) -> list[int]:
        """Choice indices of one generated sequence (several when a greedy answer is repeated n times)."""
        first = prompt * self.req.n + sequence
        return list(range(first, first + self.copies))

    def prompt_text(self, prompt: int) -> str:
        item = self.req.prompts[prompt]
        return item if isinstance(item, str) else self.ctx.tg.tokenizer.decode(item)

    def final_text(self, output: SequenceOutput) -> str:
        return output.text if output.text is not None else self.ctx.tg.tokenizer.decode(output.token_ids)

    def choice(self, prompt: int, sequence: int, output: SequenceOutput, alternatives) -> list[dict[str, Any]]:
        text = self.final_text(output)
        logprobs = None
        if self.req.logprobs is not None:
            logprobs = self.logprobs(output.token_ids, output.logprobs, alternatives, 0, len(text))
        if self.req.echo:
            text = self.prompt_text(prompt) + text
        self.completion_tokens += len(output.token_ids) * self.copies
        reason = finish_reason(output)
        return [{"text": text, "index": i, "logprobs": logprobs, "finish_reason": reason}
                for i in self.indices(prompt, sequence)]

    def logprobs(self, token_ids: list[int], token_logprobs: list[float], alternatives, offset: int,
                 text_length: int | None, context: list[int] | None = None) -> dict[str, Any]:
        """OpenAI's logprobs object for `token_ids`, whose text starts at `offset`; tokens past `text_length`
        (where a stop string cut the text) are left out. `context`: the tokens before these ones."""
        history = list(context or [])
        alternatives = alternatives or [None] * len(token_ids)
        tokens, values, tops, offsets = [], [], [], []
        for token, value, alts in zip(token_ids, token_logprobs, alternatives):
            if text_length is not None and offset >= text_length and tokens:
                break
            string = self.texts.one(token, history)
            top = dict(self.texts.alternatives(alts, history))
            top.setdefault(string, value)  # OpenAI: the chosen token is always listed
            tokens.append(string)
            values.append(value)
            tops.append(top)
            offsets.append(offset)
            offset += len(string)
            history.append(token)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def finish_reason(output: SequenceOutput) -> str:
    return FINISH_REASONS.get(output.finish_reason, "stop")


class TokenTexts:
    """Each token's own text: decoded after a few tokens of context, as OpenAI's token strings read."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def one(self, token: int, before: list[int], joined: bool = True) -> str:
        """What `token` adds to the text after `before`. A character split across tokens belongs to the token
        that completes it (those before it add "", so the chosen tokens' strings join to the text; an
        alternative, `joined=False`, shows its vocabulary entry instead); a special token, which decodes to
        nothing, shows its name."""
        context = list(before[-_CONTEXT_TOKENS:])
        decode = self.tokenizer.decode
        text = decode(context + [token]).rstrip(INCOMPLETE_CHARACTER)
        head = decode(context).rstrip(INCOMPLETE_CHARACTER) if context else ""
        piece = text[len(head):] if text.startswith(head) else text[common_prefix_length(head, text):]
        if piece or (joined and decode([token])):
            return piece
        return self.tokenizer.backend.id_to_token(int(token)) or ""

    def alternatives(self, pair: dict[int, float] | None, before: list[int]) -> list[tuple[str, float]]:
        if not pair:
            return []
        return [(self.one(token, before, joined=False), lp) for token, lp in pair.items()]


class _Choice:
    """Streaming state of one generated sequence."""

    def __init__(self, answer: _Answer, prompt: int, sequence: int, stops):
        self.indices = answer.indices(prompt, sequence)
        self.decoder = answer.ctx.tg.tokenizer.incremental_decoder(stops)
        self.tokens: list[int] = []
        self.pending: list[TokenUpdate] = []
        self.offset = 0


async def _sse(ctx: ServerContext, stream: JobStream, job: Job, answer: _Answer, log: dict) -> AsyncIterator[bytes]:
    req, choices = answer.req, {}
    stops = job.plan.stop

    def state(prompt: int, sequence: int) -> _Choice:
        if (prompt, sequence) not in choices:
            choices[prompt, sequence] = _Choice(answer, prompt, sequence, stops)
        return choices[prompt, sequence]

    def chunk(choice: _Choice, text: str, reason: str | None, context_start: int) -> bytes:
        logprobs = None
        if req.logprobs is not None:
            updates, choice.pending = choice.pending, []
            logprobs = answer.logprobs([u.token_id for u in updates], [u.logprob for u in updates],
                                       [u.alternatives for u in updates], choice.offset, None,
                                       context=choice.tokens[:context_start])
        choice.offset += len(text)
        parts = [{"text": text, "index": i, "logprobs": logprobs, "finish_reason": reason} for i in choice.indices]
        return _event({**answer.envelope(), "choices": parts, **({"usage": None} if req.include_usage else {})})

    finished = False
    try:
        if req.echo:
            for prompt in range(len(req.prompts)):
                for sequence in range(1 if req.repeat_greedy else req.n):
                    yield chunk(state(prompt, sequence), answer.prompt_text(prompt), None, 0)
                    state(prompt, sequence).offset = 0  # offsets count the completion only
        async for message in stream.messages(job):
            if message[0] == "tokens":
                for update in message[1]:
                    choice = state(update.prompt, update.sequence)
                    start = len(choice.tokens) - len(choice.pending)  # where the pending tokens begin
                    choice.tokens.append(update.token_id)
                    choice.pending.append(update)
                    if update.finish_reason is None:
                        piece = choice.decoder.piece(choice.tokens)
                        if piece:
                            yield chunk(choice, piece, None, start)
            elif message[0] == "prompt_done":
                _, prompt, outputs, _ = message
                for sequence, output in enumerate(outputs):
                    choice = state(prompt, sequence)
                    start = len(choice.tokens) - len(choice.pending)
                    answer.completion_tokens += len(output.token_ids) * answer.copies
                    rest = choice.decoder.finish(answer.final_text(output))
                    yield chunk(choice, rest, finish_reason(output), start)
        if req.include_usage:
            yield _event({**answer.envelope(), "choices": [], "usage": answer.usage()})
        finished = True
        yield b"data: [DONE]\n\n"
    except RequestError as exc:  # the engine gave up (timeout): say so in the stream, as OpenAI does
        log.update(status=exc.status, error=exc.message)
        finished = True
        yield _event(exc.body())
        yield b"data: [DONE]\n\n"
    finally:
        log.update(completion_tokens=answer.completion_tokens)
        if not finished:  # the client went away (or the server is forcing a shutdown): stop the rows
            ctx.engine.cancel(job)
            log.setdefault("error", "client disconnected")


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"

