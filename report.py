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


HIGHER_IS_BETTER = ("acc", "f1", "r2")  # metric names holding these rank descending, the rest ascending


def _rows(path: str) -> list[dict]:
    """A run's metrics.jsonl; a torn line (a killed writer, or a run still being written) is skipped."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return [r for r in rows if isinstance(r, dict)]


def _number(value) -> bool:
    """Whether a logged value is a number: a row edited by hand or by another tool is skipped, as a torn line is."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _steps_wanted(run_dir: str):
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        return None
    from omegaconf import OmegaConf

    try:
        return OmegaConf.load(path).get("steps")
    except Exception:  # noqa: BLE001 - an unparsable config only leaves the status unknown ("partial")
        return None


def summarize(run_dir: str, root: str, metric: str, higher_is_better: bool) -> dict:
    rows = _rows(os.path.join(run_dir, "metrics.jsonl"))
    evals = [(r["step"], r[metric]) for r in rows if _number(r.get(metric)) and isinstance(r.get("step"), int)]
    rate_key = next((k for r in rows for k in r if k.endswith("_per_s")), "tokens_per_s")  # tokens, images...
    speeds = [r[rate_key] for r in rows if _number(r.get(rate_key)) and r[rate_key]]
    steps_wanted = _steps_wanted(run_dir)
    last_step = max((r["step"] for r in rows if isinstance(r.get("step"), int)), default=0)
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
        "wall_time_s": max((r["time_s"] for r in rows if _number(r.get("time_s"))), default=None),
        "throughput": f"{statistics.median(speeds):.0f} {rate_key[:-6]}/s" if speeds else None,
        "curve": evals,
    }


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.0f}"
    return "-" if v is None else str(v)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every entry point's mistakes, not argparse's usage block
        self.exit(2, f"error: {message}; `python report.py --help` lists the options\n")


def main(argv=None) -> int:
    parser = _Parser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", help="a sweep directory (runs/sweeps/NAME) or any folder of run directories")
    parser.add_argument("--metric", default="val_loss", help="the eval metric to rank by (default val_loss)")
    parser.add_argument("--mode", choices=("auto", "min", "max"), default="auto",
                        help="rank ascending (min) or descending (max); auto: max for accuracy, F1 and R2")
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
    higher = args.mode == "max" or (args.mode == "auto" and any(h in args.metric for h in HIGHER_IS_BETTER))
    table = [summarize(r, root, args.metric, higher) for r in runs]
    if not any(t["curve"] for t in table):
        logged = sorted({k for r in runs for row in _rows(os.path.join(r, "metrics.jsonl")) for k in row
                         if k.startswith("val_")})
        if logged:
            print(f"error: no run logged {args.metric}; pass --metric one of {', '.join(logged)}", file=sys.stderr)
            return 2
    best = f"best_{args.metric}"
    table.sort(key=lambda t: (t[best] is None, -(t[best] or 0) if higher else (t[best] or 0)))
    columns = [c for c in table[0] if c != "curve"]

    out = os.path.abspath(args.out or root)
    markdown = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    markdown += ["| " + " | ".join(_fmt(t[c]) for c in columns) + " |" for t in table]
    try:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "report.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(table)
        with open(os.path.join(out, "report.md"), "w") as f:
            f.write("\n".join(markdown) + "\n")
    except OSError as e:
        print(f"error: cannot write the report to {out} ({e.strerror}); pass --out DIR, a writable directory",
              file=sys.stderr)
        return 2
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
