"""POST /text-generation: Backprop's request and response shape over the same engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .bridge import JobStream, submit
from .job import Job
from .schemas import INT_LIMIT, SEED_LIMIT, RequestError, bad, from_generation_error, guard_floats, kind_of
from .state import ServerContext


async def text_generation(ctx: ServerContext, request: Request, body: dict[str, Any]) -> Response:
    """Backprop's shape: {"text": str | [str], params...} -> {"output": str | [str] | [[str]]}, with
    Backprop's (transformers') parameter names and the model's defaults."""
    req = parse_text_generation(body)
    tg = ctx.tg
    if req.return_full_text and tg.manifest.is_encoder_decoder:
        raise RequestError(400, "return_full_text=true applies to GPT-2 only: T5 returns its output text",
                           param="return_full_text", code="invalid_value")
    full_text = not tg.manifest.is_encoder_decoder if req.return_full_text is None else req.return_full_text
    try:
        plan = tg.plan(req.params)
    except (ValueError, TypeError, ArithmeticError) as exc:
        raise from_generation_error(exc, openai_names=False) from None
    ctx.check_rows(len(req.prompts), plan, "num_generations")
    ids = ctx.encode(req.prompts, plan, "text")
    request.scope.setdefault("onnxgen.log", {}).update(prompt_tokens=sum(map(len, ids)), prompts=len(ids))
    stream = JobStream(ctx, request)
    job = Job(ids, plan, stream.sink, timeout=ctx.limits.timeout,
              counts_prompt=not ctx.tg.manifest.is_encoder_decoder)
    submit(ctx, job)
    outputs = []
    for index, sequences, _ in await stream.collect(job):
        texts = [tg._generation(ids[index], out, full_text, plan).text for out in sequences]
        outputs.append(texts if plan.num_return_sequences > 1 else texts[0])
    request.scope["onnxgen.log"]["completion_tokens"] = job.generated_tokens
    return JSONResponse({"output": outputs[0] if req.single else outputs})


@dataclass(frozen=True)
class TextGenerationRequest:
    prompts: list[str]
    single: bool
    return_full_text: bool | None
    params: dict[str, Any]


def parse_text_generation(body: dict[str, Any]) -> TextGenerationRequest:
    body = dict(body)
    text = body.pop("text", None)
    if isinstance(text, str):
        prompts, single = [text], True
    elif isinstance(text, list) and text and all(isinstance(t, str) for t in text):
        prompts, single = text, False
    else:
        code = "missing_required_parameter" if text is None else "invalid_type"
        raise bad(f"text must be a string or a non-empty array of strings, got {kind_of(text)}", "text", code)
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise bad(f"text[{i}] is an empty string; give a non-empty prompt", "text", "invalid_value")
    for name, value in body.items():
        limit = SEED_LIMIT - 1 if name == "seed" else INT_LIMIT
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > limit:
            raise bad(f"{name} is out of range: {str(value)[:40]}", name, "invalid_value")
    guard_floats(body)
    full = body.pop("return_full_text", None)
    if full is not None and not isinstance(full, bool):
        raise bad(f"return_full_text must be true or false, got {kind_of(full)}", "return_full_text", "invalid_type")
    return TextGenerationRequest(prompts, single, full, body)
