"""``tidegate`` command line: dispatches to the data plane or the control plane.

The operator is imported only when its subcommand runs, so the gateway image path never
loads kopf.
"""

from __future__ import annotations

import argparse
import sys

from tidegate import __version__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["--version"], ["-V"]):
        # Answered before the subcommand machinery: image smoke tests and support scripts
        # rely on it being cheap (no kopf, no uvloop import) and always available.
        print(f"tidegate {__version__}")
        return 0
    if argv[:1] == ["operator"]:
        from tidegate.operator.main import run

        return int(run(argv[1:]))
    from tidegate.gateway import cli

    parser = argparse.ArgumentParser(prog="tidegate", description=__doc__)
    parser.add_argument("-V", "--version", action="version", version=f"tidegate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    cli.add_gateway_parser(sub)
    cli.add_check_parser(sub)
    cli.add_suggest_parser(sub)
    sub.add_parser("operator", help="run the Kubernetes operator (see tidegate operator --help)")
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # a wrong flag: the subcommand's usage, not the top level's
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    runners = {
        "gateway": cli.run_gateway_command,
        "check": cli.run_check_command,
        "suggest": cli.run_suggest_command,
    }
    return runners[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
