"""Where a served stream's tokens get grouped: reads the timestamps of `serve.py --trace-dir DIR` and prints, for
the streamed phase, each stage's view of the same engine steps.

    python benchmarks/serve_trace.py DIR/real [--phase stream]     # or DIR/fake

- engine:  when the engine process sent each step's message (one per step);
- hand-over: when the API process's event loop took the messages waiting (how many steps at once, and how long
  after the engine sent them);
- loop:    how late a 1 ms timer on the event loop fires (a busy loop delays every stream);
- writes:  response body chunks written (one SSE event each), per engine step;
- client:  content events received, the gap between a stream's events (the benchmark's ITL).

A stream whose tokens arrive grouped although the engine sent a message per step was grouped where the count per
step first drops.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))]


def summary(values: list[float], scale: float = 1000.0) -> str:
    if not values:
        return "-"
    return "  ".join(f"p{round(q * 100)} {pct(values, q) * scale:.2f}" for q in (0.5, 0.9, 0.99))


def analyse(trace_dir: Path, phase: str) -> dict:
    client = json.loads((trace_dir / f"{phase}_client.json").read_text())
    engine = json.loads((trace_dir / "engine_trace.json").read_text())
    api = json.loads((trace_dir / "api_trace.json").read_text())
    t0 = min(r[0] for r in client)
    t1 = max(r[2] for r in client)
    inside = lambda t: t0 <= t <= t1  # noqa: E731

    step_times = [t for t, kind in engine if kind == "step"]
    steps = [t for t in step_times if inside(t)]
    # the k-th step message sent is the k-th step the API process took: match them by count
    delays, per_handover, cum = [], [], 0
    for t, _, n, _ in api["handovers"]:
        for k in range(cum, cum + n):
            if k < len(step_times) and inside(step_times[k]):
                delays.append(t - step_times[k])
        if n and inside(t):
            per_handover.append(n)
        cum += n
    routing = [d for t, _, n, d in api["handovers"] if n and inside(t)]
    lags = [lag for t, lag in api["lags"] if inside(t)]
    writes = [t for t, _ in api["writes"] if inside(t)]
    events = [e for r in client for e in r[1]]
    gaps = [b - a for r in client for a, b in zip(r[1], r[1][1:])]
    out = {
        "window_s": t1 - t0,
        "engine_steps": len(steps),
        "engine_step_gap_ms": summary([b - a for a, b in zip(steps, steps[1:])]),
        "handovers": len(per_handover),
        "steps_per_handover": summary([float(n) for n in per_handover], 1.0),
        "handover_delay_ms": summary(delays),
        "routing_ms_per_handover": summary(routing),
        "loop_lag_ms": summary(lags),
        "loop_lag_samples": len(lags),
        "body_writes": len(writes),
        "writes_per_step": len(writes) / max(1, len(steps)),
        "client_events": len(events),
        "client_events_per_step": len(events) / max(1, len(steps)),
        "client_itl_ms": summary(gaps),
        "streams": len(client),
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace_dir", type=Path)
    ap.add_argument("--phase", default="stream")
    args = ap.parse_args()
    for key, value in analyse(args.trace_dir, args.phase).items():
        print(f"{key:26s} {value if isinstance(value, str) else round(value, 3)}")


if __name__ == "__main__":
    main()
