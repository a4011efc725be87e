"""`switchyard` console script: one entry point, each subcommand owned by the module that implements it."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module with `main(argv) -> int`, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "gateway": ("gateway.server", "run the gateway (same as python -m gateway)"),
    "sim": ("worker.sim.cli", "run vLLM-compatible simulated servers (same as python -m worker.sim)"),
    "worker": ("worker.launcher", "run a real vLLM server for one model (same as python -m worker)"),
    "models": ("worker.models", "prepare the bundled demo models (switchyard models prepare)"),
    "up": ("worker.stack", "start workers and the gateway on this machine"),
    "batch": ("gateway.clients.batch", "send an OpenAI Batch-format JSONL file through the gateway"),
    "status": ("gateway.clients.status", "show the gateway's view of its fleet (GET /admin/fleet)"),
}


def _usage() -> str:
    lines = ["usage: switchyard COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<9} {text}" for name, (_, text) in SUBCOMMANDS.items()]
    lines += ["", "Run `switchyard COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"switchyard: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    code: int = module.main(rest)
    return code


if __name__ == "__main__":
    sys.exit(main())
