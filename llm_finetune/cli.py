"""`llm-finetune run|train|merge|verify|export|publish|validate|runs|hub-server|schema`.

Examples:
  llm-finetune validate configs/tiny-llama/sft.yaml
  llm-finetune run configs/tiny-llama/sft.yaml training.max_steps=20
  llm-finetune train configs/llama-3.1-8b/sft.yaml
  llm-finetune merge --base meta-llama/Llama-3.1-8B --adapter outputs/x/adapter --output merged
  llm-finetune verify --base meta-llama/Llama-3.1-8B --adapter outputs/x/adapter --merged merged
  llm-finetune export configs/tiny-llama/sft.yaml export.formats=[q4_k_m,q6_k]
  llm-finetune export --merged merged --format q4_k_m --data rows.jsonl --output out
  llm-finetune publish --folder merged --repo-id you/model
  llm-finetune hub-server --port 8765 --storage /tmp/hub
  llm-finetune runs outputs
  llm-finetune schema
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import shlex
import signal
import sys
import tempfile
import traceback
from pathlib import Path

from llm_finetune.distributed import (
    OtherProcessFailed,
    exit_after_main,
    is_main_process,
    local_rank,
    world_size,
)
from llm_finetune.errors import (
    EXIT_BUG,
    EXIT_INTERRUPTED,
    EXIT_USER_ERROR,
    UserError,
    disk_full,
    first_line,
)
from llm_finetune.progress import quiet_library_bars

PORT_ERRORS = {
    errno.EADDRINUSE: "--port {port} is in use on 127.0.0.1 (another hub-server?): stop what "
    "listens there, or choose another --port",
    errno.EACCES: "--port {port}: this user may not listen on it (ports below 1024 need root): "
    "choose a port above 1024",
}


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


def _load_checked(args: argparse.Namespace):
    """The config, with its paths checked; its output_dir is where a bug's log goes."""
    from llm_finetune.inputs import check_config_paths

    config = _load(args)
    args.output_folder = config.output_path
    check_config_paths(config)
    return config


def cmd_validate(args: argparse.Namespace) -> int:
    config = _load_checked(args)
    print(
        f"{args.config}: ok (run_name={config.run_name}, method={config.method}, "
        f"backend={config.backend}, output_dir={config.output_path})"
    )
    return 0


def cmd_run(args: argparse.Namespace, until: str = "publish") -> int:
    from llm_finetune.pipeline import run

    summary = run(_load_checked(args), until=until)
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
    from llm_finetune import inputs
    from llm_finetune.config import DEFAULT_VERIFY_PROMPT
    from llm_finetune.merge import resolve_base_folder

    # Every input is checked before a model loads: the merged model and the adapter are
    # folders, the base is a folder (when it looks like a path) or a Hub id.
    merged_config = inputs.check_model_folder(args.merged, "--merged")
    inputs.check_tokenizer(args.merged, "--merged")
    inputs.check_adapter_folder(args.adapter)
    raw = inputs.read_prompts(args.prompts) if args.prompts else [DEFAULT_VERIFY_PROMPT]
    base_config = inputs.model_config(args.base, "--base")
    inputs.check_same_model(base_config, args.base, merged_config, args.merged)
    inputs.check_weights_readable(args.merged)
    base_folder = resolve_base_folder(args.base, None)  # a Hub base: downloaded once, here
    inputs.check_adapter_fits(args.adapter, base_folder, base_config)
    merged, adapter = Path(args.merged).expanduser(), Path(args.adapter).expanduser()
    tokenizer = _merged_tokenizer(args.merged)
    if args.format == "chat" and not tokenizer.chat_template:
        raise UserError(
            f"--format chat: the tokenizer of --merged {args.merged!r} has no chat template; "
            "use --format alpaca or raw"
        )
    from llm_finetune.data import inference_prompt
    from llm_finetune.verify import verify

    prompts = (
        raw if args.format == "raw" else [inference_prompt(args.format, p, tokenizer) for p in raw]
    )
    report = verify(
        str(base_folder), adapter, merged, prompts, args.max_new_tokens, max_memory=args.max_memory
    )
    print(json.dumps(report.as_dict(), indent=2))
    return 0


def _merged_tokenizer(merged: str):
    """The merged folder's tokenizer; one that does not load is the folder's fault."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(Path(merged).expanduser())
    except Exception as exc:  # a damaged or foreign tokenizer file: the loader's reason
        raise UserError(
            f"--merged {merged!r}: its tokenizer does not load ({type(exc).__name__}: "
            f"{first_line(exc)[:200]}); copy the base model's tokenizer files into it"
        ) from None


def cmd_export(args: argparse.Namespace) -> int:
    """Exports of a finished run (CONFIG) or of any merged folder (--merged), each checked."""
    from llm_finetune.exports.formats import table
    from llm_finetune.exports.stage import export_all

    if (args.config is None) == (args.merged is None):
        raise UserError("export: pass either a CONFIG of a finished run or --merged DIR")
    if args.config is not None:
        config = _load_checked(args)
        merged, out, base = config.output_path / "merged", config.output_path, None
        if not (merged / "config.json").is_file():
            raise UserError(
                f"{merged} holds no merged model: run `llm-finetune run {args.config}` first"
            )
        from llm_finetune.base_model import resolve_base

        base = resolve_base(config.model)
    else:
        config, merged, out = _standalone_export_config(args), Path(args.merged), Path(args.output)
        base = None
    args.output_folder = out
    from llm_finetune.exports.stage import toolchain_problems

    if problems := toolchain_problems(config):
        raise UserError(problems[0])
    rows = export_all(config, base, merged, out, _merged_tokenizer(merged))
    for line in table(rows):
        print("  ".join(line))
    return 0 if all(r["passed"] for r in rows) else 1


def _standalone_export_config(args: argparse.Namespace):
    """A config for `export --merged DIR`: the formats, and the rows the check runs on."""
    from llm_finetune import inputs
    from llm_finetune.config import Config
    from llm_finetune.exports.formats import FP32, LORA

    inputs.check_model_folder(args.merged, "--merged")
    inputs.check_tokenizer(args.merged, "--merged")
    if needs_adapter := [f for f in args.formats if f in (LORA, FP32)]:
        raise UserError(
            f"export --merged: {', '.join(needs_adapter)} are made from the base and the "
            "adapter, not a merged folder: list them in the config's export.formats and run "
            "`llm-finetune export CONFIG`"
        )
    from pydantic import ValidationError

    from llm_finetune.config import format_validation_error

    if not args.formats or not args.data or not args.output:
        raise UserError("export --merged DIR needs --format (repeatable), --data and --output")
    try:
        return Config.model_validate(
            {
                "run_name": Path(args.merged).resolve().name,
                "output_dir": args.output,
                "model": {"name": str(Path(args.merged).resolve())},
                "data": {"datasets": [{"path": args.data}], "format": args.data_format},
                "export": {"formats": args.formats, "gguf_pre_tokenizer": args.gguf_pre_tokenizer},
            }
        )
    except ValidationError as exc:
        raise UserError(format_validation_error(exc).replace("config error", "export")) from None


def cmd_publish(args: argparse.Namespace) -> int:
    from llm_finetune.hub import preflight, require_token, resolve_endpoint, resolve_token
    from llm_finetune.inputs import check_publish_folder
    from llm_finetune.publish import local_files, publish

    # What is local first, the token and the manifest check included: no request before.
    check_publish_folder(args.folder)
    token = require_token(resolve_token())
    folder = Path(args.folder).expanduser()
    files = local_files(folder)
    endpoint = resolve_endpoint(args.endpoint)
    preflight(args.repo_id, endpoint, token, args.private)
    report = publish(
        folder,
        args.repo_id,
        endpoint,
        token,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
        replace_readme=args.replace_readme,
        files=files,
    )
    print(json.dumps(report.as_dict(), indent=2))
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from llm_finetune.runs import find_summaries, run_row, runs_table

    folder = Path(args.folder).expanduser()
    summaries = find_summaries(folder)
    if not summaries:
        print(f"no runs under {args.folder}: no run-summary.json in it or its subfolders")
        return 0
    print(runs_table([run_row(path, folder) for path in summaries]))
    return 0


def cmd_hub_server(args: argparse.Namespace) -> int:
    from llm_finetune.fsutil import check_output_folder
    from llm_finetune.hub_server import serve_forever

    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: a port is a number from 0 (any free port) to 65535")
    check_output_folder(args.storage, "--storage")
    try:
        serve_forever(args.port, Path(args.storage).expanduser(), None)
    except OSError as exc:  # binding the port: a file error names its file
        if exc.filename is not None or exc.errno not in PORT_ERRORS:
            raise
        raise UserError(PORT_ERRORS[exc.errno].format(port=args.port)) from None
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    """configs/schema.json, the JSON schema editors check and complete the configs with."""
    from llm_finetune.schema import schema_text, write_schema

    if args.output == "-":
        sys.stdout.write(schema_text())
        return 0
    write_schema(Path(args.output).expanduser())
    print(f"wrote {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-finetune",
        description="LoRA fine-tuning from YAML, 16-bit merge, merge check, Hub publishing.",
        epilog="examples:"
        + __doc__.split("Examples:", 1)[1]
        + "\nConfig reference: docs/configuration.md",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # Where a bug's log file goes: set by the commands that have an output folder.
    parser.set_defaults(output_folder=None)
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
    p.add_argument(
        "--max-memory",
        type=_memory_size,
        help='cap on what the check holds, e.g. "24GB" (verify.max_memory); below what the '
        "whole model needs it runs one layer at a time",
    )
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "export", help="write GGUF / 4-bit / fp32 exports, each checked against the merge"
    )
    p.add_argument("config", nargs="?", help="the config of a finished run: its export.formats")
    p.add_argument("overrides", nargs="*", metavar="key.path=value")
    p.set_defaults(overwrite=False)
    p.add_argument("--merged", help="instead of a config: any merged model folder")
    p.add_argument("--format", dest="formats", action="append", help="with --merged; repeatable")
    p.add_argument("--data", help="with --merged: held-out rows to check on (file, Hub, builtin:)")
    p.add_argument("--data-format", default="alpaca", choices=["alpaca", "chat"])
    p.add_argument("--output", help="with --merged: the folder that gets exports/")
    p.add_argument("--gguf-pre-tokenizer", help="llama.cpp's name for a local BPE pre-tokenizer")
    p.set_defaults(func=cmd_export)

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

    p = sub.add_parser("runs", help="a table of the runs under a folder, from their summaries")
    p.add_argument("folder", nargs="?", default="outputs", help="default: outputs")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("hub-server", help="serve a local Hub-compatible endpoint (open, for tests)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--storage", required=True, help="folder where repos are stored")
    p.set_defaults(func=cmd_hub_server)

    p = sub.add_parser("schema", help="write configs/schema.json, the configs' JSON schema")
    p.add_argument(
        "--output",
        default="configs/schema.json",
        metavar="PATH",
        help="default: configs/schema.json (the configs' first line points there); - for stdout",
    )
    p.set_defaults(func=cmd_schema)
    return parser


def _memory_size(text: str) -> str:
    """argparse's check of --max-memory: a size accelerate understands, kept as written."""
    from llm_finetune.config import memory_size

    try:
        memory_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def report_bug(exc: Exception, argv: list[str], folder: Path | None) -> str:
    """Write the traceback of an unexpected exception (a bug of ours, not the user's input) to
    a log file, and return the one line that says so and where the file is.

    The file goes into the run's output folder when it exists (`folder`; never a model or
    adapter folder, whose every file would be published), else into a temporary folder. Tokens
    are scrubbed from both the file and the line.
    """
    from llm_finetune import __version__
    from llm_finetune.hub import scrub_tokens

    text = scrub_tokens(
        f"llm-finetune {__version__}, python {sys.version.split()[0]}\n"
        f"command: llm-finetune {shlex.join(argv)}\n\n" + "".join(traceback.format_exception(exc))
    )
    rank = f"rank{os.environ.get('RANK', '0')}-" if world_size() > 1 else ""
    reason = scrub_tokens(f"{type(exc).__name__}: {first_line(exc)[:300]}")
    for where in ([folder] if folder is not None and folder.is_dir() else []) + [None]:
        try:
            fd, log = tempfile.mkstemp(prefix=f"llm-finetune-bug-{rank}", suffix=".log", dir=where)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError:
            continue
        return (
            f"error: unexpected failure, a bug in llm-finetune ({reason}); the full traceback "
            f"is in {log}: please report it with that file"
        )
    return (  # no folder could take the log: the traceback itself, after the line
        f"error: unexpected failure, a bug in llm-finetune ({reason}); no log file could be "
        f"written, so here is its traceback:\n{text}"
    )


def main(argv: list[str] | None = None) -> int:
    # Telemetry pings are not ours to send (HF_HUB_DISABLE_TELEMETRY=0 opts back in).
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # bitsandbytes on an AVX-512 CPU warns on import that an optional kernel package (fetched
    # from the Hub) is missing; its own CPU code runs instead: not the user's concern.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    if not is_main_process():  # one log for a multi-process run: quiet the libraries here
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # also transformers' bars
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    quiet_library_bars()  # none in a log file or CI; on a terminal, the libraries' own
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill`, a scheduler's stop: same as Ctrl-C
    try:
        return args.func(args)
    except UserError as exc:
        if local_rank() == 0:  # one line per node, not one per process
            print(f"error: {exc}", file=sys.stderr)
        return exit_after_main(exc.exit_code)
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
    except Exception as exc:
        if full := disk_full(exc):  # not a bug: the user can free space
            if local_rank() == 0:
                where = f" while writing {full.filename!r}" if full.filename else ""
                print(
                    f"error: the disk is full{where} ({full.strerror}): free space, or write "
                    "elsewhere (--output, output_dir, HF_HOME), and run the command again",
                    file=sys.stderr,
                )
            return exit_after_main(EXIT_USER_ERROR)
        # A bug of ours: one line, the traceback in a log file.
        line = report_bug(exc, sys.argv[1:] if argv is None else argv, args.output_folder)
        if local_rank() == 0:  # every process wrote its own log, beside this one
            print(line, file=sys.stderr)
        return exit_after_main(EXIT_BUG)


if __name__ == "__main__":
    sys.exit(main())
