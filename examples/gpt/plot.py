#!/usr/bin/env python3
"""Plots the GPT demo's metrics.csv (psft_gpt --out DIR) into a PNG.

    plot.py DIR/metrics.csv DIR/curves.png

Panels: token entropy of the training mini-batches over fine-tuning steps
(smoothed; the paper's Figure 1), entropy on held-out task responses, the
trust region's clip fraction, in-domain and out-of-domain accuracy, and the
RL stage's reward curves.
"""
import csv
import math
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def number(text):
    try:
        value = float(text)
    except ValueError:
        return math.nan
    return value


def smooth(values, window):
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    rows = defaultdict(lambda: defaultdict(list))  # (run, stage) -> column -> values
    with open(sys.argv[1], newline="") as f:
        for row in csv.DictReader(f):
            series = rows[(row["run"], row["stage"])]
            for key, value in row.items():
                if key not in ("run", "stage"):
                    series[key].append(number(value))
    runs = list(dict.fromkeys(run for run, _ in rows))  # in the CSV's order
    colours = dict(zip(runs, plt.rcParams["axes.prop_cycle"].by_key()["color"]))

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    panels = [
        (axes[0][0], "entropy", "token entropy (training batch, smoothed)", True),
        (axes[0][1], "eval_entropy", "token entropy (held-out task responses)", False),
        (axes[0][2], "clip_frac_high", "fraction of tokens with r > 1 + eps_high", True),
        (axes[1][0], "in_domain_acc", "in-domain accuracy (add)", False),
        (axes[1][1], "ood_acc", "out-of-domain accuracy (other skills)", False),
    ]
    for ax, column, title, smoothed in panels:
        for run in runs:
            series = rows.get((run, "finetune"))
            if not series:
                continue
            points = [(s, v) for s, v in zip(series["step"], series[column]) if not math.isnan(v)]
            if not points:
                continue
            steps, values = zip(*points)
            if smoothed:
                values = smooth(values, max(1, len(values) // 40))
            ax.plot(steps, values, label=run, color=colours[run], marker=None if smoothed else ".")
        ax.set_title(title)
        ax.set_xlabel("fine-tuning step")
        ax.grid(alpha=0.3)
    ax = axes[1][2]
    for run in runs:
        series = rows.get((run, "rl"))
        if not series:
            continue
        window = max(5, len(series["reward"]) // 6)
        ax.plot(series["step"], smooth(series["reward"], window), label=run, color=colours[run])
    ax.set_title("RL reward (sampled, exact match, running mean)")
    ax.set_xlabel("RL step")
    ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    axes[1][2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=110)
    print("wrote", sys.argv[2])


if __name__ == "__main__":
    main()
