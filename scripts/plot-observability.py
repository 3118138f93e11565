#!/usr/bin/env python3
"""Plots calls/s, failed calls/s and p99 of the example consumer over a
provider SIGKILL and restart, from Prometheus range queries saved by
scripts/prometheus-check.sh --plot.

    plot-observability.py DIR START KILLED RESTARTED OUT.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def series(path, start):
    with open(path) as f:
        r = json.load(f)
    res = r["data"]["result"]
    if not res:
        return [], []
    xs, ys = [], []
    for t, v in res[0]["values"]:
        try:
            y = float(v)
        except ValueError:
            continue
        if y != y:  # NaN: no samples in that window
            continue
        xs.append(float(t) - start)
        ys.append(y)
    return xs, ys


def main():
    d, start, killed, restarted, out = sys.argv[1:6]
    start, killed, restarted = float(start), float(killed), float(restarted)
    qx, qy = series(f"{d}/qps.json", start)
    ex, ey = series(f"{d}/errors.json", start)
    px, py = series(f"{d}/p99.json", start)
    ix, iy = series(f"{d}/instances.json", start)

    fig, (a1, a2, a3) = plt.subplots(3, 1, figsize=(9, 7.5), sharex=True)
    a1.plot(qx, [y / 1000 for y in qy], color="tab:blue", label="ok calls/s")
    if ex and max(ey) > 0:
        a1.plot(ex, [y / 1000 for y in ey], color="tab:red", label="failed calls/s")
    else:
        a1.plot([], [], " ", label="failed calls: none")
    a1.set_ylim(bottom=0)
    a1.set_ylabel("thousand calls/s")
    a1.legend(loc="lower left")
    a2.plot(px, [y * 1000 for y in py], color="tab:orange")
    a2.set_ylim(bottom=0)
    a2.set_ylabel("p99 (ms)")
    a3.step(ix, iy, where="post", color="tab:green")
    a3.set_ylabel("instances listed")
    a3.set_ylim(0, max(iy + [2]) + 0.5)
    a3.set_xlabel("seconds since Prometheus started scraping")
    for a in (a1, a2, a3):
        a.axvline(killed - start, color="tab:red", linestyle="--", linewidth=1)
        a.axvline(restarted - start, color="tab:green", linestyle="--", linewidth=1)
        a.grid(alpha=0.3)
    a1.set_title(
        "example-consumer (4 in flight, get_user) over two providers:\n"
        "red line: one provider SIGKILLed; green line: started again "
        "(from Prometheus, 1 s scrapes, rate over 2 s)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
