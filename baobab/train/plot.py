"""Loss, learning-rate and throughput curves of one or several runs, as one PNG."""

from __future__ import annotations

from pathlib import Path

from baobab.train.metrics import read_metrics


def plot_runs(run_dirs: list[str], out: str | Path) -> Path:
    """Write a 3-panel figure (loss with validation points, lr, throughput) to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not run_dirs:
        raise ValueError("give at least one run directory to plot")
    fig, (ax_loss, ax_lr, ax_speed) = plt.subplots(1, 3, figsize=(15, 4.2))
    for run_dir in run_dirs:
        records = read_metrics(run_dir)
        label = Path(run_dir).name
        train = [r for r in records if "loss" in r]
        val = [r for r in records if "val_loss" in r]
        if not train and not val:
            raise ValueError(f"'{run_dir}' has no training metrics to plot yet")
        line = ax_loss.plot(
            [r["step"] for r in train], [r["loss"] for r in train], label=f"{label} train"
        )
        if val:
            ax_loss.plot(
                [r["step"] for r in val],
                [r["val_loss"] for r in val],
                "o--",
                color=line[0].get_color(),
                label=f"{label} val",
            )
        ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train], label=label)
        speed_key = "tok_per_s" if any("tok_per_s" in r for r in train) else "samples_per_s"
        ax_speed.plot(
            [r["step"] for r in train],
            [r.get(speed_key, 0) for r in train],
            label=f"{label} ({speed_key})",
        )
    for ax, title in ((ax_loss, "loss"), (ax_lr, "learning rate"), (ax_speed, "throughput")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
