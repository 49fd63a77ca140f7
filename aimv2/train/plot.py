"""PNG plots of a run's metrics.jsonl (matplotlib, Agg backend: no display needed).

    plots/losses.png      total, pixel and text loss against the step
    plots/throughput.png  images/s (left axis) and MFU % (right axis; data-wait % when the device peak
                          is unknown, e.g. on a CPU) against the step
"""
from __future__ import annotations

from pathlib import Path

from .metrics import read_metrics


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write the plots of run directory `run_dir`; returns their paths."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    if not rows:
        raise ValueError(f"plot: {str(run_dir / 'metrics.jsonl')!r} is missing or has no rows")
    out = run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    steps = [r["step"] for r in rows]

    def series(key):
        return [r.get(key) if r.get(key) is not None else float("nan") for r in rows]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, style in (("loss", "-"), ("pixel_loss", "--"), ("text_loss", ":")):
        ax.plot(steps, series(key), style, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{run_dir.name}: training losses")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    losses = out / "losses.png"
    fig.savefig(losses, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(steps, series("images_per_s"), color="tab:blue", label="images/s")
    ax.set_xlabel("step")
    ax.set_ylabel("images / s", color="tab:blue")
    ax.grid(alpha=0.3)
    has_mfu = any(r.get("mfu") is not None for r in rows)
    ax2 = ax.twinx()
    if has_mfu:
        ax2.plot(steps, [100 * v for v in series("mfu")], color="tab:red", label="MFU %")
        ax2.set_ylabel("MFU %", color="tab:red")
    else:                                    # no device peak (CPU): TFLOP/s would just rescale images/s
        ax2.plot(steps, series("data_wait_pct"), color="tab:red", label="data wait %")
        ax2.set_ylabel("time waiting for data %", color="tab:red")
    ax.set_title(f"{run_dir.name}: throughput")
    fig.tight_layout()
    thr = out / "throughput.png"
    fig.savefig(thr, dpi=110)
    plt.close(fig)
    return [losses, thr]
