"""Keep one engine service running: restart it when it dies, stop it on SIGINT/SIGTERM.

    python -m service.supervise --socket PATH [--log FILE] -- [service.server options]

deployments/start-workers.sh starts one of these per GPU, next to that GPU's Prefect worker.
A service that exits (a crash, an OOM kill, a SIGKILL) is started again after a short backoff
(1 s, doubling to 30 s while it keeps dying within a minute of its start); the row it was running
fails as `EngineUnavailableError` in the shard and is retried once on the new process. Each start
is logged with the new pid. On SIGINT or SIGTERM the service gets SIGTERM (uvicorn finishes the
request in flight) and SIGKILL after `--stop-timeout` seconds.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--socket", required=True)
    ap.add_argument("--stop-timeout", type=float, default=60.0)
    args = ap.parse_args(argv)

    stopping = False
    child: subprocess.Popen | None = None

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    backoff = 1.0
    command = [sys.executable, "-m", "service.server", "--socket", args.socket, *extra]
    while not stopping:
        started = time.monotonic()
        child = subprocess.Popen(command)
        print(f"engine service started, pid {child.pid}, socket {args.socket}", flush=True)
        while True:
            try:
                code = child.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if stopping:
                    try:
                        code = child.wait(timeout=args.stop_timeout)
                    except subprocess.TimeoutExpired:
                        child.kill()
                        code = child.wait()
                    break
        if stopping:
            print(f"engine service pid {child.pid} stopped ({code})", flush=True)
            break
        lived = time.monotonic() - started
        backoff = 1.0 if lived > 60 else min(backoff * 2, 30.0)
        print(f"engine service pid {child.pid} exited with {code} after {lived:.0f} s; "
              f"restarting in {backoff:.0f} s", flush=True)
        time.sleep(backoff)
    Path(args.socket).unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
