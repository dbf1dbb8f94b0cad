"""The `onnxgen` command: export, generate, info, serve. Bad input is one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import itertools
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
    _add_ray_serve_arguments(serve)
    _add_batch_command(commands)
    return parser


def _add_ray_serve_arguments(serve: argparse.ArgumentParser) -> None:
    group = serve.add_argument_group("Ray Serve (needs onnxgen[ray]): replicas behind Ray's HTTP proxy")
    group.add_argument("--ray", action="store_true", help="serve with Ray Serve instead of one uvicorn process")
    group.add_argument("--ray-address", default=None, help="a running cluster (auto, ray://HEAD:10001); implies --ray")
    group.add_argument("--replicas", type=int, default=1, help="model copies, each with its own batching engine")
    group.add_argument("--num-cpus", type=float, default=1.0,
                       help="CPUs reserved per replica, also its onnxruntime threads (default 1)")
    group.add_argument("--num-gpus", type=float, default=0.0, help="GPUs reserved per replica (with --device cuda)")


def _add_batch_command(commands) -> None:
    batch = commands.add_parser("batch", help="generate for every row of a JSONL/Parquet file, resumably")
    batch.add_argument("model_dir")
    batch.add_argument("input", help="*.jsonl (one JSON object a line) or *.parquet (a file or a folder)")
    batch.add_argument("output", help="a folder of part-NNNNN shards; rerun the same command to resume")
    batch.add_argument("--column", default="text", help="the prompts' column (default: text)")
    batch.add_argument("--output-column", default="generated", help="the new column (default: generated)")
    batch.add_argument("--seed-column", default=None, help="a column of per-row integer seeds (overrides --seed)")
    batch.add_argument("--shard-size", type=int, default=1000, help="rows per output file (default 1000)")
    batch.add_argument("--batch-size", type=int, default=16, help="prompts generated together (default 16)")
    batch.add_argument("--output-format", choices=["jsonl", "parquet"], default=None, help="default: the input's")
    batch.add_argument("--overwrite", action="store_true", help="discard an earlier run's output and start again")
    batch.add_argument("--no-progress", action="store_true", help="no progress bar")
    batch.add_argument("--truncation", action="store_true", help="crop prompts that do not fit the context")
    batch.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    batch.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (per Ray actor)")
    ray = batch.add_argument_group("Ray Data (needs onnxgen[ray])")
    ray.add_argument("--ray", action="store_true", help="generate on Ray actors instead of in this process")
    ray.add_argument("--ray-address", default=None, help="a running cluster (auto, ray://HEAD:10001); implies --ray")
    ray.add_argument("--num-actors", type=int, default=1, help="actors, each loading the model once (default 1)")
    ray.add_argument("--num-cpus", type=float, default=1.0,
                     help="CPUs reserved per actor, also its onnxruntime threads unless --threads (default 1)")
    ray.add_argument("--num-gpus", type=float, default=0.0, help="GPUs reserved per actor (with --device cuda)")
    _add_generation_arguments(batch)


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
        if args.json:
            raise ValueError("--stream prints text as it comes and --json prints details at the end: pass one of them")
        pieces = tg.stream(args.prompt[0], truncation=args.truncation, **params)
        first = next(pieces, "")  # bad parameters fail here, before anything is printed
        if tg._full_text(args.return_full_text):  # as without --stream: GPT-2 repeats the prompt by default
            sys.stdout.write(tg.tokenizer.decode(tg.tokenizer.encode(args.prompt[0])))
        for piece in itertools.chain([first], pieces):
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
    """Print the manifest; a directory this onnxgen cannot load (an older format, a missing file) is still described,
    with the reason under "problem" and on stderr, and exit code 2. "loadable" checks the format and that the files
    are there; the graphs' inputs and outputs are checked when a model loads them."""
    from onnxgen.manifest import ManifestError, check_directory, read_manifest

    manifest = read_manifest(args.model_dir)
    try:
        check_directory(manifest, args.model_dir)
        problem = None
    except ManifestError as exc:
        problem = str(exc)
    print(json.dumps({**manifest.to_dict(), "loadable": problem is None, **({"problem": problem} if problem else {})},
                     indent=2))
    if problem:
        print(f"onnxgen info: error: {problem}", file=sys.stderr)
        return 2
    return 0


def _run_batch(args: argparse.Namespace) -> int:
    import importlib.util

    from onnxgen.batch import BatchOptions, RayOptions, run_batch

    names = [*_PARAMS, "do_sample", "early_stopping", "stop", "return_full_text"]
    params = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    options = BatchOptions(column=args.column, output_column=args.output_column, seed_column=args.seed_column,
                           shard_size=args.shard_size, batch_size=args.batch_size, output_format=args.output_format,
                           truncation=args.truncation, params=params)
    ray_options = None
    if args.ray or args.ray_address:
        ray_options = RayOptions(address=args.ray_address, num_actors=args.num_actors, num_cpus=args.num_cpus,
                                 num_gpus=args.num_gpus)
    if not args.no_progress and importlib.util.find_spec("tqdm") is None:
        logging.getLogger("onnxgen.batch").setLevel(logging.INFO)  # no bar: a log line per shard instead
    try:
        summary = run_batch(args.model_dir, args.input, args.output, options, ray_options=ray_options,
                            device=args.device, intra_op_threads=args.threads, overwrite=args.overwrite,
                            progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"onnxgen batch: interrupted; finished shards are kept in {args.output}: rerun the same command "
              "to resume", file=sys.stderr)
        return 130
    print(f"{summary.rows} rows in {summary.shards} shards under {args.output}: {summary.written_shards} written "
          f"now, {summary.skipped_shards} by an earlier run ({summary.seconds:.1f} s)")
    return 0


def _server_limits(args: argparse.Namespace):
    from onnxgen.server import ServerLimits

    return ServerLimits(
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens=args.max_tokens_limit,
        max_queue=args.max_queue,
        max_batch_rows=args.max_batch_rows,
        timeout=args.timeout or None,
    )


def _run_serve_ray(args: argparse.Namespace) -> int:
    from onnxgen.ray.serve import serve_ray

    limits = _server_limits(args)
    logging.getLogger("onnxgen.ray").setLevel(args.log_level.upper())  # where it serves, and when it stops
    serve_ray(args.model_dir, replicas=args.replicas, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
              host=args.host, port=args.port, address=args.ray_address, device=args.device, limits=limits,
              model_name=args.model_name)
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    if args.ray or args.ray_address:
        return _run_serve_ray(args)
    from onnxgen.server import serve

    serve(args.model_dir, host=args.host, port=args.port, device=args.device, limits=_server_limits(args),
          model_name=args.model_name, log_level=args.log_level)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose or args.command == "export" else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    runner = {"export": _run_export, "generate": _run_generate, "info": _run_info, "serve": _run_serve,
              "batch": _run_batch}
    try:
        return runner[args.command](args)
    except (ValueError, TypeError, FileExistsError, FileNotFoundError, ImportError, RuntimeError) as exc:
        print(f"onnxgen {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
