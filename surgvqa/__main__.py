"""Command line: ``python -m surgvqa <command> ...``; each command lives in the module it belongs to."""
from __future__ import annotations

import importlib
import sys

# command -> "module:function"; the function takes the remaining argv and returns an exit code.
COMMANDS = {
    "workbook": "surgvqa.workbook:main",
    "compare": "surgvqa.compare:main",
    "synthesize": "surgvqa.audio:main",
    "score": "surgvqa.evaluate:main",
    "merge": "surgvqa.inference:merge_main",
    "pretrain": "surgvqa.pretrain:main",
    "heard-bank": "surgvqa.pretrain_data:heard_bank_main",
    "make-checkpoint": "surgvqa.dryrun:main",
    "dry-run": "surgvqa.dryrun:dry_run_main",
    "phantom-frames": "surgvqa.frames:phantom_frames_main",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: python -m surgvqa {" + ",".join(sorted(COMMANDS)) + "} [args...]")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module, function = COMMANDS[argv[0]].split(":")
    return int(getattr(importlib.import_module(module), function)(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
