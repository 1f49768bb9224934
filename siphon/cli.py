"""The ``siphon`` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time

from events.log import LogCorruption, LogError
from siphon.config import Config, ConfigError, dump_effective, load_config
from siphon.script.loader import ScriptError, load_script

EXIT_CONFIG = 2
EXIT_STARTUP = 3


def _setup_logging(cfg: Config | None, verbose: bool = False) -> None:
    level = "debug" if verbose else (cfg.log.level if cfg is not None else "info")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if cfg is not None and cfg.log.file:
        handlers.append(logging.FileHandler(cfg.log.file))
    logging.basicConfig(level=level.upper(), handlers=handlers, force=True)
    json_format = cfg is not None and cfg.log.format == "json"
    for handler in handlers:
        handler.setFormatter(JsonFormatter() if json_format else TextFormatter())
    # A script may log a line per registration: skip what neither format shows (the
    # caller's file and line: a stack walk per record; thread and process ids).
    logging._srcfile = None  # type: ignore[attr-defined]  # (see the logging HOWTO)
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


class TextFormatter(logging.Formatter):
    """``time level logger: message``, the time formatted once per second."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        return self.default_msec_format % (self._stamp, record.msecs)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC), level, logger, msg (and exc when there is one)."""

    converter = time.gmtime

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"siphon: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    try:
        _setup_logging(cfg, args.verbose)
    except OSError as exc:
        print(f"siphon: log.file {cfg.log.file}: cannot open: {exc.strerror or exc}",
              file=sys.stderr)
        return EXIT_CONFIG
    for warning in cfg.warnings:
        logging.getLogger("siphon.config").warning("%s", warning)
    from siphon.app import StartupError, serve

    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency
        runner = asyncio.run
    try:
        runner(serve(cfg))
    except ScriptError as exc:
        print(f"siphon: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    except LogCorruption as exc:
        print(f"siphon: the event log is damaged: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    except (LogError, StartupError) as exc:
        print(f"siphon: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    except OSError as exc:
        print(f"siphon: cannot start: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    except KeyboardInterrupt:
        return 0
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    for warning in cfg.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if cfg.script.path and not args.no_script:
        from siphon.script import namespaces

        try:
            load_script(cfg.script.path, cfg.script.include_paths)
        except ScriptError as exc:
            print(f"siphon: {exc}", file=sys.stderr)
            return EXIT_STARTUP
        namespaces.bind(None)
    if args.dump:
        print(json.dumps(dump_effective(cfg), indent=2, sort_keys=True))
    else:
        print(f"{args.config}: OK")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="siphon",
        description="Event-sourced SIP registrar and proxy, scripted in Python.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a siphon node",
                         description="Start a node: rebuild state from the log, serve SIP.")
    run.add_argument("-c", "--config", default="siphon.yaml", help="config file (siphon.yaml)")
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check-config", help="validate a config file and its script",
                           description="Validate siphon.yaml (exit 2 on a bad key or value) "
                                       "and load its script (exit 3 if it does not load).")
    check.add_argument("-c", "--config", default="siphon.yaml", help="config file")
    check.add_argument("--dump", action="store_true", help="print the effective config as JSON")
    check.add_argument("--no-script", action="store_true", help="do not load the script")
    check.set_defaults(func=cmd_check_config)

    from replay.cli import add_parser as add_replay_parser

    add_replay_parser(sub)

    from siphon.audit import add_parser as add_audit_parser

    add_audit_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
