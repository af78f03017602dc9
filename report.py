"""Compare runs: `python report.py DIR [--metric val_loss]` for a sweep directory or any folder of runs.

Prints a table of every run under DIR (its directory names the overrides in a sweep), sorted by
the metric; writes report.csv, report.md and val_curves.png into DIR (or --out).
"""
import argparse
import csv
import json
import os
import statistics
import sys


def find_runs(root: str) -> list[str]:
    """Directories under root (root included) holding a run: metrics, a checkpoint or a FAILED mark."""
    runs = []
    for d, subdirs, files in os.walk(root):
        if "metrics.jsonl" in files or "FAILED" in files or "config.yaml" in files:
            runs.append(d)
            subdirs[:] = []  # a run's own folders (checkpoints, tb) hold no further runs
    return sorted(runs)


def _rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize(run_dir: str, root: str, metric: str, higher_is_better: bool) -> dict:
    rows = _rows(os.path.join(run_dir, "metrics.jsonl"))
    evals = [(r["step"], r[metric]) for r in rows if r.get(metric) is not None]
    rate_key = next((k for r in rows for k in r if k.endswith("_per_s")), "tokens_per_s")  # tokens, images...
    speeds = [r[rate_key] for r in rows if r.get(rate_key)]
    steps_wanted = None
    if os.path.exists(os.path.join(run_dir, "config.yaml")):
        from omegaconf import OmegaConf

        steps_wanted = OmegaConf.load(os.path.join(run_dir, "config.yaml")).get("steps")
    last_step = max((r["step"] for r in rows), default=0)
    if os.path.exists(os.path.join(run_dir, "FAILED")):
        status = "failed"
    else:
        status = "done" if steps_wanted is not None and last_step >= steps_wanted else "partial"
    pick = max if higher_is_better else min
    return {
        "run": os.path.relpath(run_dir, root),
        "status": status,
        f"final_{metric}": evals[-1][1] if evals else None,
        f"best_{metric}": pick(v for _, v in evals) if evals else None,
        "steps": last_step,
        "wall_time_s": max((r.get("time_s", 0.0) for r in rows), default=None),
        "throughput": f"{statistics.median(speeds):.0f} {rate_key[:-6]}/s" if speeds else None,
        "curve": evals,
    }


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.0f}"
    return "-" if v is None else str(v)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", help="a sweep directory (runs/sweeps/NAME) or any folder of run directories")
    parser.add_argument("--metric", default="val_loss", help="the eval metric to rank by (default val_loss)")
    parser.add_argument("--out", default=None, help="where to write report.csv/.md and val_curves.png (default DIR)")
    args = parser.parse_args(argv)
    root = os.path.abspath(args.dir)
    if not os.path.isdir(root):
        print(f"error: {root} does not exist; pass a sweep or runs directory", file=sys.stderr)
        return 2
    runs = find_runs(root)
    if not runs:
        print(f"error: no runs under {root} (no metrics.jsonl or FAILED files); train first", file=sys.stderr)
        return 2
    higher = "acc" in args.metric
    table = [summarize(r, root, args.metric, higher) for r in runs]
    best = f"best_{args.metric}"
    table.sort(key=lambda t: (t[best] is None, -(t[best] or 0) if higher else (t[best] or 0)))
    columns = [c for c in table[0] if c != "curve"]

    out = os.path.abspath(args.out or root)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "report.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(table)
    markdown = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    markdown += ["| " + " | ".join(_fmt(t[c]) for c in columns) + " |" for t in table]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(markdown) + "\n")
    print("\n".join(markdown))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for t in table:
        if t["curve"]:
            steps, values = zip(*t["curve"])
            ax.plot(steps, values, marker="o", markersize=3, label=t["run"])
    ax.set(xlabel="step", ylabel=args.metric, title=f"{args.metric}: {os.path.basename(root)}")
    ax.grid(alpha=0.3)
    if any(t["curve"] for t in table):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "val_curves.png"), dpi=100)
    print(f"wrote report.csv, report.md, val_curves.png to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
