"""The ``onnxgen export`` subcommand: arguments and runner, called by onnxgen's command line.

Importing this module does not import torch, so ``onnxgen --help`` works in a runtime-only install; the export
itself reports the missing ``export`` extra as an error.
"""

from __future__ import annotations

import argparse
import sys

from onnxgen.export.errors import ExportError

_DEFAULT_ATOL = 1e-3  # the exporter's DEFAULT_ATOL; repeated here so --help does not import torch
_DEFAULT_THRESHOLD_MIB = 2048
_DEFAULT_MIN_AGREEMENT = 0.99  # the exporter's DEFAULT_MIN_AGREEMENT
EXIT_ERROR = 2


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        help="Hugging Face Hub id (gpt2, t5-small, google/flan-t5-base, ...) or a folder written by save_pretrained()",
    )
    parser.add_argument("output_dir", help="folder to write the ONNX graphs, tokenizer and onnxgen.json into")
    parser.add_argument("--force", action="store_true", help="replace the contents of a non-empty OUTPUT_DIR")
    parser.add_argument(
        "--atol",
        type=float,
        default=_DEFAULT_ATOL,
        help=f"largest logit difference from PyTorch accepted by verification (default {_DEFAULT_ATOL:g})",
    )
    parser.add_argument("--no-verify", action="store_true", help="skip the comparison with PyTorch")
    parser.add_argument(
        "--optimize",
        choices=("none", "fused"),
        default="none",
        help="none: optimum's portable graphs (CPU and CUDA); fused: graphs built from the weights with fused "
        "operators, last-position logits and a static key/value buffer, fastest on CPU (CPU only)",
    )
    parser.add_argument(
        "--precision",
        choices=("fp32", "fp16", "int8"),
        default="fp32",
        help="weights of the fused graph: fp32; fp16; int8 (dynamically quantized MatMuls, LM head included, "
        "fastest on CPU). fp16/int8 need --optimize fused; T5's fused graphs are fp32 or int8",
    )
    parser.add_argument(
        "--min-agreement",
        type=float,
        default=_DEFAULT_MIN_AGREEMENT,
        metavar="SHARE",
        help="fp16/int8: share of positions of a fixed text where the graph's top token must be PyTorch's "
        f"(default {_DEFAULT_MIN_AGREEMENT:g})",
    )
    parser.add_argument(
        "--external-data-threshold-mib",
        type=float,
        default=None,
        metavar="MIB",
        help="keep a graph's weights in a separate <graph>.onnx.data file above this size (default: always for "
        f"--optimize fused, which loads faster so; above {_DEFAULT_THRESHOLD_MIB} MiB for optimum's graphs)",
    )


def run_export(args: argparse.Namespace) -> int:
    """Run the export described by ``args``; print a summary (or the error) and return the exit status."""
    try:
        from onnxgen.export import export_model

        threshold = args.external_data_threshold_mib
        if threshold is not None and threshold < 0:
            raise ExportError(f"--external-data-threshold-mib must be >= 0, got {threshold}")
        manifest = export_model(
            args.source,
            args.output_dir,
            force=args.force,
            verify=not args.no_verify,
            atol=args.atol,
            external_data_threshold=None if threshold is None else int(threshold * 2**20),
            optimize=args.optimize,
            precision=args.precision,
            min_agreement=args.min_agreement,
        )
    except ModuleNotFoundError as exc:
        print(
            f"onnxgen export: error: {exc.name} is not installed; exporting needs the export extra: "
            "pip install 'onnxgen[export]'",
            file=sys.stderr,
        )
        return EXIT_ERROR
    except ExportError as exc:
        print(f"onnxgen export: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    check = manifest.verification
    if check.get("skipped"):
        verified = "not verified"
    elif "agreement" in check:
        verified = f"{manifest.dtype}, top-1 agreement with PyTorch {check['agreement']:.2%}"
    else:
        verified = f"verified, max abs diff {check['max_abs_diff']:.2g}"
    print(f"exported {args.source} ({manifest.architecture}, {verified}) to {args.output_dir}")
    return 0
