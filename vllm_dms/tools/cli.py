"""``vllm-dms`` console script. Each subcommand is one ``cmd_*`` function plus one line in
SUBCOMMANDS; serving itself goes through stock ``vllm serve ... --kv-cache-dtype dms_fp8``.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from vllm_dms.engine.config import DMSConfigError, check_serving


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print the resolved DMSConfig of a local checkpoint as JSON; non-zero if
    ``vllm serve DIR --kv-cache-dtype dms_fp8`` would refuse it (the same checks)."""
    try:
        cfg = check_serving(args.model_dir, args.hf_overrides, args.dtype)
    except DMSConfigError as e:  # the message names the missing/unsupported field
        print(f"vllm-dms inspect: {e}", file=sys.stderr)
        return 2
    print(json.dumps(cfg.summary(), indent=2, sort_keys=True))
    return 0


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="validate a DMS checkpoint and print its DMSConfig")
    p.add_argument("model_dir", help="local checkpoint directory (config.json, "
                   "optionally dms_metadata.json)")
    p.add_argument("--hf-overrides", default=None, type=json.loads,
                   help="JSON dict applied over config.json, as vllm's --hf-overrides")
    p.add_argument("--dtype", default="auto", help="the --dtype you will serve with, as vllm's")
    p.set_defaults(func=cmd_inspect)


# name -> function adding that subcommand's parser (it must set_defaults(func=...)).
def cmd_demo(args: argparse.Namespace) -> int:
    from vllm_dms.tools.demo import run_demo
    run_demo(max_tokens=args.max_tokens, window=args.window, cpu=args.cpu,
             untrained=args.untrained)
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="SmolLM2-135M with DMS fields: generate with eviction on "
                       "(vLLM + dms_fp8 on a GPU, the exact reference on CPU) and print the "
                       "per-layer compression")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--untrained", action="store_true", help="plain SmolLM2 + DMS fields instead "
                   "of the DMS-trained checkpoint shipped with the package")
    p.add_argument("--window", type=int, default=16, help="W for --untrained")
    p.add_argument("--cpu", action="store_true", help="use the CPU reference even with a GPU")
    p.set_defaults(func=cmd_demo)


def _add_passthrough(name: str, help_text: str) -> Callable[[argparse._SubParsersAction], None]:
    def add(sub: argparse._SubParsersAction) -> None:
        sub.add_parser(name, help=help_text, add_help=False)  # listed here, parsed by its module
    return add


SUBCOMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "inspect": _add_inspect,
    "demo": _add_demo,
    "eval": _add_passthrough("eval", "quality harness: KLD, token match, perplexity and "
                             "compression on held-out text (vllm_dms.tools.quality)"),
    "train": _add_passthrough("train", "DMS retrofit by logit distillation of a Llama/Qwen3 "
                              "checkpoint (vllm_dms.tools.training.train)"),
    "passkey": _add_passthrough("passkey", "passkey retrieval at 2K-7K tokens, eviction vs "
                                "no eviction (vllm_dms.tools.passkey)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-dms", description="Tools for serving DMS checkpoints with vLLM "
        "(serve with: vllm serve MODEL_DIR --kv-cache-dtype dms_fp8)")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS.values():
        add(sub)
    return parser


def _passthrough(module: str, func: str) -> Callable[[list[str]], int]:
    return lambda rest: getattr(__import__(module, fromlist=[func]), func)(rest)


# Subcommands with their own argparse (lazy: training and eval import torch models).
PASSTHROUGH = {"eval": _passthrough("vllm_dms.tools.quality", "main_eval"),
               "train": _passthrough("vllm_dms.tools.training.train", "main"),
               "passkey": _passthrough("vllm_dms.tools.passkey", "main")}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in PASSTHROUGH:
        return PASSTHROUGH[argv[0]](argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
