"""The README's two set-up commands, extracted verbatim, and a bounded run of the server command.

    python3 .ci/readme.py print server|test   # the command as the README writes it
    python3 .ci/readme.py serve                # run the server command, wait for /health, one request, stop

Each command is the only line of the ```bash block right after a `<!-- ci: server command ... -->` or
`<!-- ci: test command ... -->` marker; anything else (no marker, two markers, a longer block) is an error, so the
README cannot drift away from what CI runs. Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
HOST, PORT = "127.0.0.1", 8000  # what the README's server command binds
START_TIMEOUT_S = 1800  # the install happens inside the command, before the server starts
REQUEST = {"model": "shakespeare-target", "prompt": "ROMEO:", "max_tokens": 16, "temperature": 0}


def readme_command(kind: str, text: str | None = None) -> str:
    """The one-line command of the ```bash block that follows the README's `<!-- ci: <kind> command` marker."""
    text = README.read_text(encoding="utf-8") if text is None else text
    found = re.findall(rf"<!-- ci: {kind} command[^\n]*-->\n```bash\n(.*?)```", text, flags=re.S)
    if len(re.findall(rf"<!-- ci: {kind} command", text)) != 1 or len(found) != 1:
        raise SystemExit(f"README.md: expected exactly one '<!-- ci: {kind} command' marker before a ```bash block")
    lines = found[0].strip().splitlines()
    if len(lines) != 1:
        raise SystemExit(f"README.md: the {kind} command block must hold exactly one line, not {len(lines)}")
    return lines[0]


def get(path: str, body: dict | None = None, timeout: float = 60) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{HOST}:{PORT}{path}", data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.status, resp.read()


def port_is_free() -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, PORT))
        except OSError:
            return False
    return True


def wait_for_health(proc: subprocess.Popen) -> None:
    """Poll /health until the command's server answers; fail at once if the command exits (install error)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server command exited with status {proc.returncode} before /health answered")
        try:
            if get("/health", timeout=5)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit(f"no answer on /health within {START_TIMEOUT_S} s")


def check_one_request() -> str:
    status, raw = get("/v1/completions", REQUEST)
    body = json.loads(raw)
    text = body["choices"][0]["text"]
    if status != 200 or body["usage"]["completion_tokens"] != REQUEST["max_tokens"] or not text.strip():
        raise SystemExit(f"unexpected completion: {status} {raw[:500]!r}")
    return text


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the command's whole process group (bash, pip, uvicorn), SIGKILL if it lingers."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def serve() -> None:
    command = readme_command("server")
    if not port_is_free():
        raise SystemExit(f"port {PORT} is taken: the README's server command cannot bind it here")
    print(f"$ {command}", flush=True)
    start = time.monotonic()
    proc = subprocess.Popen(["bash", "-c", command], stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_health(proc)
        ready = time.monotonic()
        text = check_one_request()
        done = time.monotonic()
    finally:
        stop(proc)
    print(f"server command: installed and answering /health after {ready - start:.0f} s", flush=True)
    print(f"one completion ({REQUEST['max_tokens']} tokens) in {done - ready:.2f} s: {text!r}", flush=True)


def main(argv: list[str]) -> None:
    if argv[:1] == ["print"] and len(argv) == 2 and argv[1] in ("server", "test"):
        print(readme_command(argv[1]))
    elif argv == ["serve"]:
        serve()
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
