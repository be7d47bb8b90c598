"""What `turbo-batch` prints: `--help` for every option, the last line of a run, the progress bar
in a terminal (a pseudo-terminal here), and a pytest session that ends without a logging error.

The runs are the real CLI in a subprocess on the tiny preset, with its own Prefect API server.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
SUMMARY = re.compile(r"turbo-batch: (\d+) rows: (\d+) succeeded, (\d+) skipped, (\d+) failed, (\d+) invalid; "
                     r"\d+\.\d (GPU-s|engine-s); wall \d+\.\d s")
BAR = re.compile(r"rows [━╺╸ ]+ \d+/\d+ \d+:\d\d:\d\d( [a-z]+ \d+)*\s*")
PREFECT_BANNERS = ("Starting temporary server", "Stopping temporary server", "telemetry")


def cli_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "COLUMNS": "80", **extra}


def manifest(tmp_path: Path, bad_steps: bool = False) -> Path:
    """Two tiny t2v rows; with bad_steps a third row asks for 9 steps (invalid)."""
    path = tmp_path / "m.csv"
    rows = [["r0", "t2v", "a cat", "tiny-t2v", "5", "0", ""], ["r1", "t2v", "a dog", "tiny-t2v", "5", "1", ""]]
    if bad_steps:
        rows.append(["r2", "t2v", "a fox", "tiny-t2v", "5", "2", "9"])
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "mode", "prompt", "model", "num_frames", "seed", "num_steps"])
        w.writerows(rows)
    return path


# -- --help ---------------------------------------------------------------------------------------
def help_entries(text: str) -> list[tuple[str, bool]]:
    """(invocation, has a description) for each entry of argparse's help output.

    Entries sit at indent 2 (sub-commands 4); a description follows on the same line after two or
    more spaces, or on the next lines at the help column. A group's own description is the part
    of its section before the first blank line."""
    sections: list[list[str]] = []
    current: list[str] | None = None
    for line in text.splitlines():
        if re.fullmatch(r"[a-z][a-z ]*:", line):      # a section title: "options:", "run parameters:"
            current = []
            sections.append(current)
        elif line.strip() and not line.startswith(" "):
            current = None                                # prose: usage, description
        elif current is not None:
            current.append(line)
    entries = []
    for body in sections:
        if "" in body and any(line.strip() for line in body[body.index(""):]):
            body = body[body.index("") + 1:]
        body = [line for line in body if line.strip()]
        for i, line in enumerate(body):
            indent = len(line) - len(line.lstrip())
            if indent > 6:
                continue                 # a description line
            entry = line.strip()
            inline = re.search(r"\S {2,}\S", entry) is not None
            below = i + 1 < len(body) and len(body[i + 1]) - len(body[i + 1].lstrip()) > 6
            entries.append((re.split(r" {2,}", entry)[0], inline or below))
    return entries


@pytest.mark.parametrize("command, expected", [
    ("", {"COMMAND", "validate", "run", "report", "expand", "-h, --help"}),
    ("validate", {"manifest", "--strict", "--model MODEL", "--seed SEED", "--quant-linear QUANT_LINEAR"}),
    ("run", {"--max-rows-per-shard N", "--out OUT", "--sla-topk SLA_TOPK", "--fps FPS", "--no-progress"}),
    ("report", {"location"}),
    ("expand", {"template", "-o OUTPUT, --output OUTPUT"}),
])
def test_every_option_and_command_has_help(command, expected):
    out = subprocess.run([sys.executable, "-m", "flows.cli", *command.split(), "--help"], cwd=REPO, text=True,
                         capture_output=True, env=cli_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    entries = help_entries(out.stdout)
    assert expected <= {name for name, _ in entries}, entries
    assert [name for name, described in entries if not described] == []
    if command in ("validate", "run"):      # each run parameter says what it sets
        text = " ".join(out.stdout.split())
        assert "sampling steps" in text and "random seed" in text and "frame rate" in text


def test_help_entries_sees_a_missing_description():
    text = "usage: x\n\noptions:\n  -h, --help  show help\n  --a A\n  --b B       the b\n  --long-option-name LONG\n" \
           "                        wrapped help\n"
    assert help_entries(text) == [("-h, --help", True), ("--a A", False), ("--b B", True),
                                  ("--long-option-name LONG", True)]


# -- the last line of a run -----------------------------------------------------------------------
def test_non_tty_run_ends_with_one_summary_line_and_cpu_time_is_engine_s(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(manifest(tmp_path, bad_steps=True)),
                          "--out", str(out)], cwd=REPO, text=True, capture_output=True, env=cli_env(),
                         timeout=600)
    assert run.returncode == 1, run.stderr[-3000:]          # one row is invalid
    last = run.stdout.splitlines()[-1]
    m = SUMMARY.fullmatch(last)
    assert m, run.stdout
    assert m.groups() == ("3", "2", "0", "0", "1", "engine-s")   # the tiny preset runs on the CPU
    assert "GPU-s" not in run.stdout

    report = subprocess.run([sys.executable, "-m", "flows.cli", "report", str(out)], cwd=REPO, text=True,
                            capture_output=True, env=cli_env(), timeout=120)
    assert report.returncode == 0, report.stderr
    assert "| engine-s total | engine-s per video |" in report.stdout and "GPU-s" not in report.stdout


# -- the progress bar in a terminal ---------------------------------------------------------------
def run_in_pty(argv: list[str], env: dict[str, str], timeout: float = 600) -> tuple[int, str]:
    """Run argv with stdin, stdout and stderr on one pseudo-terminal (120 columns); all it wrote."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError as e:      # EIO: every writer closed the terminal
                if e.errno != errno.EIO:
                    raise
                break
            if not data:
                break
            chunks.append(data)
        else:
            proc.kill()
        return proc.wait(timeout=30), b"".join(chunks).decode(errors="replace")
    finally:
        os.close(master)


def test_prefect_console_output_does_not_break_the_progress_bar(tmp_path):
    # Prefect at INFO, as with a profile that sets it: flow and task runs log to the console
    # while the bar is live.
    env = cli_env(PREFECT_LOGGING_LEVEL="INFO", COLUMNS="120", TERM="xterm-256color")
    code, output = run_in_pty([sys.executable, "-m", "flows.cli", "run", str(manifest(tmp_path)),
                               "--out", str(tmp_path / "out")], env)
    assert code == 0, output[-3000:]
    segments = [s for s in re.split(r"[\r\n]+", ANSI.sub("", output)) if s.strip()]

    bars = [s for s in segments if "━" in s]
    assert bars, output[-3000:]
    broken = [s for s in bars if not BAR.fullmatch(s)]
    assert broken == [], broken[:5]                 # nothing written into a bar line
    assert any("2/2" in s and "succeeded 2" in s for s in bars)     # the bar's final line
    prefect_lines = [s for s in segments if " prefect." in s or "| prefect" in s]
    assert prefect_lines and all("━" not in s for s in prefect_lines)   # it did log, on lines of its own
    for banner in PREFECT_BANNERS:
        assert not [s for s in segments if banner in s]
    assert SUMMARY.fullmatch(segments[-1]), segments[-5:]


# -- the test suite itself ------------------------------------------------------------------------
def test_pytest_session_with_a_flow_ends_without_logging_error(tmp_path):
    """A session that ran a flow on Prefect's ephemeral API server (which logs "Stopping temporary
    server" at interpreter exit) prints no "--- Logging error ---" (tests/conftest.py)."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")   # its own ephemeral server and database
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/tasks/test_metrics.py::test_publish_artifacts_puts_the_contact_sheet_on_the_flow_run"],
                         cwd=REPO, env=env, text=True, capture_output=True, timeout=600)
    combined = out.stdout + out.stderr
    assert "Logging error" not in combined, combined[-3000:]
    assert "Traceback" not in combined, combined[-3000:]
    assert out.returncode == 0 and "1 passed" in out.stdout, combined[-3000:]
