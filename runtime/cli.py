"""The `onnxgen` command: export, generate, info, serve. Bad input is one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

EXIT_USAGE = 2

# Every generation parameter, as the CLI spells it, with the type argparse converts to.
_PARAMS: dict[str, Any] = {
    "max_new_tokens": int, "max_length": int, "min_new_tokens": int, "min_length": int,
    "temperature": float, "top_k": int, "top_p": float, "repetition_penalty": float,
    "length_penalty": float, "num_beams": int, "num_generations": int, "no_repeat_ngram_size": int,
    "seed": int,
}


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _early_stopping(text: str) -> bool | str:
    return "never" if text.lower() == "never" else _bool(text)


def _add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation parameters (transformers' meaning; unset = model default)")
    for name, kind in _PARAMS.items():
        group.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None)
    group.add_argument("--do-sample", dest="do_sample", type=_bool, default=None, metavar="{true,false}")
    group.add_argument("--early-stopping", dest="early_stopping", type=_early_stopping, default=None,
                       metavar="{true,false,never}")
    group.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    group.add_argument("--return-full-text", dest="return_full_text", type=_bool, default=None,
                       metavar="{true,false}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onnxgen", description="Export GPT-2/T5 to ONNX and generate text.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    commands = parser.add_subparsers(dest="command", required=True)

    from onnxgen.export.cli import add_export_arguments  # argument definitions only: no torch

    export = commands.add_parser("export", help="export a Hugging Face checkpoint (needs onnxgen[export])")
    add_export_arguments(export)

    generate = commands.add_parser("generate", help="generate text from an exported model directory")
    generate.add_argument("model_dir")
    generate.add_argument("prompt", nargs="+", help="one or more prompts")
    generate.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    generate.add_argument("--stream", action="store_true", help="print tokens as they come (one prompt)")
    generate.add_argument("--json", action="store_true", help="print details as JSON")
    generate.add_argument("--truncation", action="store_true", help="crop prompts that do not fit the context")
    _add_generation_arguments(generate)

    info = commands.add_parser("info", help="describe an exported model directory")
    info.add_argument("model_dir")

    serve = commands.add_parser("serve", help="serve a model over HTTP (OpenAI-compatible; needs onnxgen[serve])")
    serve.add_argument("model_dir")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    serve.add_argument("--model-name", default=None, help="the `model` clients send (default: the directory's name)")
    limits = serve.add_argument_group("limits (past them: 400, 413, 429 or 504 with an OpenAI error object)")
    limits.add_argument("--max-prompt-tokens", type=int, default=None, help="default: the model's context")
    limits.add_argument("--max-tokens-limit", type=int, default=None,
                        help="largest max_tokens a request may ask for (default: the model's context)")
    limits.add_argument("--max-queue", type=int, default=64, help="requests waiting for the batch; more get 429")
    limits.add_argument("--max-batch-rows", type=int, default=32,
                        help="sequences generated together (continuous batching); 1 = one at a time")
    limits.add_argument("--timeout", type=float, default=300.0, help="seconds per request; 0 = none")
    limits.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def _run_export(args: argparse.Namespace) -> int:
    from onnxgen.export.cli import run_export

    return run_export(args)


def _run_generate(args: argparse.Namespace) -> int:
    from onnxgen import TextGeneration

    params = {name: getattr(args, name) for name in [*_PARAMS, "do_sample", "early_stopping", "stop"]}
    tg = TextGeneration(args.model_dir, device=args.device)
    if args.stream:
        if len(args.prompt) != 1:
            raise ValueError(f"--stream takes one prompt, got {len(args.prompt)}")
        for piece in tg.stream(args.prompt[0], truncation=args.truncation, **params):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    outputs = tg(args.prompt, return_full_text=args.return_full_text, return_details=args.json,
                 truncation=args.truncation, **params)
    for output in outputs:
        for item in output if isinstance(output, list) else [output]:
            if args.json:
                print(json.dumps(item.__dict__, ensure_ascii=False))
            else:
                print(item)
    return 0


def _run_info(args: argparse.Namespace) -> int:
    from onnxgen.manifest import load_manifest

    print(json.dumps(load_manifest(args.model_dir).to_dict(), indent=2))
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    from onnxgen.server import ServerLimits, serve

    limits = ServerLimits(
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens=args.max_tokens_limit,
        max_queue=args.max_queue,
        max_batch_rows=args.max_batch_rows,
        timeout=args.timeout or None,
    )
    serve(args.model_dir, host=args.host, port=args.port, device=args.device, limits=limits,
          model_name=args.model_name, log_level=args.log_level)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose or args.command == "export" else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    runner = {"export": _run_export, "generate": _run_generate, "info": _run_info, "serve": _run_serve}
    try:
        return runner[args.command](args)
    except (ValueError, TypeError, FileExistsError, FileNotFoundError, ImportError, RuntimeError) as exc:
        print(f"onnxgen {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
