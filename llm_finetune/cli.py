"""`llm-finetune run|train|merge|verify|publish|validate|hub-server`.

Examples:
  llm-finetune validate configs/tiny-llama/sft.yaml
  llm-finetune run configs/tiny-llama/sft.yaml training.max_steps=20
  llm-finetune train configs/llama-3.1-8b/sft.yaml
  llm-finetune merge --base meta-llama/Llama-3.1-8B --adapter outputs/x/adapter --output merged
  llm-finetune verify --base meta-llama/Llama-3.1-8B --adapter outputs/x/adapter --merged merged
  llm-finetune publish --folder merged --repo-id you/model
  llm-finetune hub-server --port 8765 --storage /tmp/hub
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from llm_finetune.distributed import (
    OtherProcessFailed,
    exit_after_main,
    is_main_process,
    local_rank,
)
from llm_finetune.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, UserError


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config, e.g. configs/tiny-llama/sft.yaml")
    parser.add_argument(
        "overrides", nargs="*", metavar="key.path=value", help="e.g. training.learning_rate=1e-4"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def _load(args: argparse.Namespace):
    from llm_finetune.config import load_config

    overrides = list(args.overrides) + (["overwrite=true"] if args.overwrite else [])
    return load_config(args.config, overrides)


def cmd_validate(args: argparse.Namespace) -> int:
    config = _load(args)
    print(
        f"{args.config}: ok (run_name={config.run_name}, method={config.method}, "
        f"backend={config.backend}, output_dir={config.output_path})"
    )
    return 0


def cmd_run(args: argparse.Namespace, until: str = "publish") -> int:
    from llm_finetune.pipeline import run

    summary = run(_load(args), until=until)
    return 0 if summary["status"] in ("succeeded", "trained") else 1


def cmd_merge(args: argparse.Namespace) -> int:
    from llm_finetune.merge import merge

    report = merge(
        args.base,
        Path(args.adapter),
        Path(args.output),
        dtype=args.dtype,
        overwrite=args.overwrite,
        revision=args.revision,
        progress=print,
    )
    print(json.dumps(report.as_dict(), indent=2))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from llm_finetune.config import DEFAULT_VERIFY_PROMPT
    from llm_finetune.data import inference_prompt
    from llm_finetune.verify import verify

    raw = (
        [line for line in Path(args.prompts).read_text().splitlines() if line.strip()]
        if args.prompts
        else [DEFAULT_VERIFY_PROMPT]
    )
    tokenizer = AutoTokenizer.from_pretrained(args.merged)
    prompts = (
        raw if args.format == "raw" else [inference_prompt(args.format, p, tokenizer) for p in raw]
    )
    report = verify(args.base, Path(args.adapter), Path(args.merged), prompts, args.max_new_tokens)
    print(json.dumps(report.as_dict(), indent=2))
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from llm_finetune.hub import preflight, resolve_endpoint, resolve_token
    from llm_finetune.publish import publish

    endpoint = resolve_endpoint(args.endpoint)
    token = resolve_token()
    preflight(args.repo_id, endpoint, token, args.private)
    report = publish(
        Path(args.folder),
        args.repo_id,
        endpoint,
        token,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
        replace_readme=args.replace_readme,
    )
    print(json.dumps(report.as_dict(), indent=2))
    return 0


def cmd_hub_server(args: argparse.Namespace) -> int:
    from llm_finetune.hub_server import serve_forever

    serve_forever(args.port, Path(args.storage), None)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-finetune",
        description="LoRA fine-tuning from YAML, 16-bit merge, merge check, Hub publishing.",
        epilog="examples:" + __doc__.split("Examples:", 1)[1] + "\nConfig reference: README.md",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="the whole pipeline: train, merge, verify, publish")
    _config_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("train", help="train and save the LoRA adapter only")
    _config_args(p)
    p.set_defaults(func=lambda a: cmd_run(a, until="train"))

    p = sub.add_parser("validate", help="check a config and exit (loads no model)")
    _config_args(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("merge", help="merge a LoRA adapter into its 16-bit base")
    p.add_argument("--base", required=True, help="base model folder or Hub id (16-bit weights)")
    p.add_argument("--adapter", required=True, help="folder written by peft save_pretrained")
    p.add_argument("--output", required=True, help="new folder for the merged model")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--revision", help="Hub revision of the base")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("verify", help="compare a merged model with base+adapter")
    p.add_argument("--base", required=True)
    p.add_argument("--adapter", required=True)
    p.add_argument("--merged", required=True)
    p.add_argument("--prompts", help="text file, one prompt per line")
    p.add_argument(
        "--format",
        default="alpaca",
        choices=["alpaca", "chat", "raw"],
        help="how prompts are wrapped before they reach the model",
    )
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("publish", help="upload a model (or adapter) folder in one commit")
    p.add_argument("--folder", required=True, help="a merged model folder, or a LoRA adapter")
    p.add_argument("--repo-id", required=True)
    p.add_argument("--endpoint", help="Hub-compatible server URL (default: HF_ENDPOINT or the Hub)")
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", default="main")
    p.add_argument("--commit-message")
    p.add_argument(
        "--replace-readme", action="store_true", help="replace the repo's existing README.md"
    )
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("hub-server", help="serve a local Hub-compatible endpoint (open, for tests)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--storage", required=True, help="folder where repos are stored")
    p.set_defaults(func=cmd_hub_server)
    return parser


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    # Telemetry pings are not ours to send (HF_HUB_DISABLE_TELEMETRY=0 opts back in).
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if not is_main_process():  # one log for a multi-process run: quiet the libraries here
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # also transformers' bars
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill`, a scheduler's stop: same as Ctrl-C
    try:
        return args.func(args)
    except UserError as exc:
        if local_rank() == 0:  # one line per node, not one per process
            print(f"error: {exc}", file=sys.stderr)
        return exit_after_main(EXIT_USER_ERROR)
    except OtherProcessFailed as exc:  # the main process has printed why
        return exit_after_main(exc.exit_code)
    except KeyboardInterrupt:
        if local_rank() == 0:
            print(
                "interrupted: finished stages, the adapter (if trained) and trainer checkpoints "
                "are kept; run the same command again to resume",
                file=sys.stderr,
            )
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
