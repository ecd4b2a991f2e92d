"""A client-go exec credential plugin for the tests, behaving as ``aws eks get-token`` does.

Usage: ``python exec_credential_plugin.py STATE_DIR``. Each run hands out the next token of
``STATE_DIR/tokens`` (one per line; the last one repeats), valid for ``$TOKEN_LIFETIME``
seconds according to the ``expirationTimestamp`` it prints, and appends a line to
``STATE_DIR/runs`` so the test can count the runs. ``KUBERNETES_EXEC_INFO`` (set by the
client) is saved to ``STATE_DIR/exec-info.json``. Exit 1 with a message when
``STATE_DIR/fail`` exists (a broken plugin).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path


def main() -> int:
    state = Path(sys.argv[1])
    if (state / "fail").exists():
        print("the identity provider is unreachable", file=sys.stderr)
        return 1
    tokens = (state / "tokens").read_text().split()
    runs = state / "runs"
    count = len(runs.read_text().splitlines()) if runs.exists() else 0
    token = tokens[min(count, len(tokens) - 1)]
    with runs.open("a") as out:
        out.write(f"{count + 1}\n")
    (state / "exec-info.json").write_text(os.environ.get("KUBERNETES_EXEC_INFO", ""))
    lifetime = float(os.environ.get("TOKEN_LIFETIME", "900"))
    expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=lifetime)
    credential = {
        "apiVersion": "client.authentication.k8s.io/v1beta1",
        "kind": "ExecCredential",
        "status": {
            "token": token,
            "expirationTimestamp": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
    }
    print(json.dumps(credential))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
