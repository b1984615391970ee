"""Where a served stream's tokens get grouped: reads the timestamps of `serve.py --trace-dir DIR` and prints, for
the streamed phase, each stage's view of the same engine steps.

    python benchmarks/serve_trace.py DIR/real [--phase stream]     # or DIR/fake

- engine:  when the engine process sent each step's message (one per step);
- hand-over: when the API process's event loop took the messages waiting (how many steps at once, and how long
  after the engine sent them);
- loop:    how late a 1 ms timer on the event loop fires (a busy loop delays every stream);
- writes:  response body chunks written (one SSE event each), per engine step;
- client:  content events received, the gap between a stream's events (the benchmark's ITL);
- first token path: each request's TTFT split into admission (HTTP, parsing, checks), the hop to the engine
  process, the engine (waiting for the step in progress, then its prefill), and the way back to the client.

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

    step_times = [t for t, kind, *_ in engine["sent"] if kind == "step"]
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
    out.update(first_token_path(client, engine, api, inside))
    return out


def first_token_path(client: list, engine: dict, api: dict, inside) -> dict:
    """Where each request's time to first token went: client sent -> API posted it to the engine -> the engine
    process took it -> the engine sent the step with its first output -> the client read its first event."""
    posted = {rid: t for t, rid in api["posts"]}
    taken = {rid: t for t, rid in engine["adds"]} or posted  # (the fake engine does not record when it took one)
    first = {rid: t for t, rid in engine["firsts"]}
    ids = sorted((t, rid) for rid, t in posted.items() if inside(t) and rid in first)
    starts = sorted((r[0], r[1][0]) for r in client if r[1])
    if len(ids) != len(starts):  # requests are matched in arrival order: only when each client request has one
        return {"first_token_path": f"not matched ({len(ids)} posted, {len(starts)} streams)"}
    stages = {"admission_ms": [], "to_engine_ms": [], "engine_ms": [], "to_client_ms": []}
    for (t_post, rid), (t_start, t_first) in zip(ids, starts):
        stages["admission_ms"].append(t_post - t_start)
        stages["to_engine_ms"].append(taken[rid] - t_post)
        stages["engine_ms"].append(first[rid] - taken[rid])
        stages["to_client_ms"].append(t_first - first[rid])
    return {f"ttft_{k}": summary(v) for k, v in stages.items()}


def ramp(steps: list[tuple[float, int]], t0: float, adds: list[float] | None = None) -> dict:
    """How the engine's work was spread over a phase that started at `t0`: when it took the requests (`adds`; the
    offline engine has them all at once), how many steps it ran before and after the last one, their mean time and
    tokens, and when the last step ended. Side by side with the offline run it tells a slow admission (a long
    ramp of small steps) from slower steps."""
    adds = sorted(a - t0 for a in adds) if adds else [0.0]
    last_add = adds[-1]
    steps = [(t - t0, n) for t, n in steps]
    before = [n for t, n in steps if t <= last_add]
    after = [t for t, _ in steps if t > last_add]
    gaps = [b - a for a, b in zip(after, after[1:])]
    return {
        "adds_ms": f"first {adds[0] * 1e3:.1f}  p50 {pct(adds, 0.5) * 1e3:.1f}  last {last_add * 1e3:.1f}",
        "steps_until_last_add": len(before),
        "tokens_per_step_until_last_add": sum(before) / max(1, len(before)),
        "steps_after_last_add": len(after),
        "step_ms_after_last_add": sum(gaps) / max(1, len(gaps)) * 1e3,
        "last_step_ms": steps[-1][0] * 1e3 if steps else float("nan"),
    }


def phase_ramp(trace_dir: Path, phase: str) -> dict:
    """ramp() of one served phase, from its client and engine traces; with the real engine's own step times."""
    client = json.loads((trace_dir / f"{phase}_client.json").read_text())
    if not client:  # no request of the phase succeeded: nothing to place on the engine's timeline
        return {}
    engine = json.loads((trace_dir / "engine_trace.json").read_text())
    t0, t1 = min(r[0] for r in client), max(r[2] for r in client)
    steps = [(t, n) for t, kind, n in engine["sent"] if kind == "step" and n and t0 <= t <= t1]
    adds = [t for t, _ in engine["adds"] if t0 <= t <= t1]
    out = ramp(steps, t0, adds)
    last_add = max(adds, default=t0)
    timed = [(busy, send) for t, busy, send in engine.get("steps", []) if last_add < t <= t1]
    if timed:  # the real engine: its own time per step, and sending the step's message
        out["engine_step_ms_after_last_add"] = sum(b for b, _ in timed) / len(timed) * 1e3
        out["send_ms_after_last_add"] = sum(s for _, s in timed) / len(timed) * 1e3
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
