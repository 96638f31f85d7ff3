"""results/sampler_overhead/README.md, generated from the benchmark's JSON (nothing typed in).

    python benchmarks/overhead_table.py results/sampler_overhead/cpu-xeon.json > results/sampler_overhead/README.md

Columns: the whole-run ratio (fastest of the interleaved rounds, and the median of the per-round ratios) and the
decomposed ratio 1 + (the sampler's own work, timed with a replaying denoiser) / (the bare calls), which is what
the 1.05 target is read from (``test_sampler_overhead.py`` says why).
"""
from __future__ import annotations

import json
import sys

TARGET = 1.05


def _rows(path: str) -> list[dict]:
    return [b for b in json.load(open(path))["benchmarks"] if b["name"].startswith("test_sampler_overhead[")]


def table(path: str, rows: list[dict] | None = None) -> str:
    """The Markdown table of the benchmark JSON at ``path`` (or of its already-loaded ``rows``)."""
    rows = _rows(path) if rows is None else rows
    lines = ["| sampler | options | NFE | own work (ms) | bare calls (s) | overhead: own work | within 1.05 "
             "| whole run, fastest round | whole run, median round | calls in the loop / alone |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for b in rows:
        p, e = b["params"], b["extra_info"]
        own = e.get("overhead_ratio_own_work")
        lines.append(
            f"| {p['name']} | {p['opts'] or ''} | {e['nfe']} | "
            + (f"{e['own_work_s'] * 1e3:.2f} | {e['bare_calls_s']:.3f} | {own:.4f} | {'yes' if own <= TARGET else 'no'}"
               if own is not None else "— | — | — | —")
            + f" | {e['overhead_ratio']:.3f} | {e['overhead_ratio_median']:.3f} | "
            + (f"{e['calls_in_loop_over_bare']:.3f} |" if "calls_in_loop_over_bare" in e else "— |"))
    return "\n".join(lines)


def readme(path: str) -> str:
    benches = _rows(path)  # the JSON read once
    rows = [b["extra_info"] for b in benches]
    whole = [e["overhead_ratio"] for e in rows]
    own = [e["overhead_ratio_own_work"] for e in rows if e.get("overhead_ratio_own_work") is not None]
    lo = min(zip(whole, (b["params"]["name"] for b in benches)))
    return f"""# Sampler overhead on the CPU (digits U-Net, batch {rows[0]['batch']})

`pytest -n 0 benchmarks/test_sampler_overhead.py -s --benchmark-columns=median,rounds --benchmark-json={path}`
(nothing else running), then `python benchmarks/overhead_table.py {path} > results/sampler_overhead/README.md`.

Overhead = sampler wall time / wall time of the same denoiser calls, measured two ways:

- **own work** (the column the {TARGET} target is read from): 1 + (the sampler's own work) / (the bare calls).  The
  sampler runs with a denoiser that replays the outputs recorded from one real run, so it follows the same
  trajectory and does everything but the network (its arithmetic, noise draws from the per-sample streams, grid
  handling, error control); fastest of 35 runs.  The bare calls are the recorded inputs fed to the real denoiser,
  fastest of the interleaved rounds.  The own work takes milliseconds, so machine noise hardly moves it.
  Range over the {len(own)} configurations: {min(own):.4f} to {max(own):.4f}; {sum(o <= TARGET for o in own)} of
  {len(own)} within {TARGET}.
- **whole run**: the sampler with the real denoiser over the bare calls, rounds alternating (fastest round and
  median round).  It reads from {lo[0]:.3f} ({lo[1]}; below 1, which no real overhead can be) to {max(whole):.3f}: on
  this VM the network's speed drifts between rounds by more than the {TARGET} target, so this direct ratio is kept
  beside the decomposed one but cannot decide the target.  Caveat: the decomposition assumes the network's calls
  cost inside the sampling loop what they cost alone.  The whole-run ratios average {sum(whole) / len(whole):.3f}
  against {sum(own) / len(own):.3f} for own work; whether that gap is drift or the calls running slower inside
  a loop (inputs in freshly allocated memory, caches) is what the last column measures (the calls timed one by
  one inside the sampling loop over the same calls alone, fastest rounds, the order of the two alternating by
  round; JSONs written before that column existed show "—").

One denoiser call took {rows[0]['denoiser_call_s'] * 1e3:.1f} ms (median of 30).

{table(path, benches)}
"""


if __name__ == "__main__":
    print(readme(sys.argv[1] if len(sys.argv) > 1 else "results/sampler_overhead/cpu-xeon.json"), end="")
