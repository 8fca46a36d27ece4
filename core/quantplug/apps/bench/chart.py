"""The PNG chart written beside the bench's JSON: wrapped/bare per backend and shape, one panel per token
count."""

from __future__ import annotations

from pathlib import Path

from quantplug.apps.bench.report import TARGETS


def chart(rows: list[dict], path: Path) -> Path | None:
    """A PNG a person can read: wrapped/bare per backend and shape, one panel per token count."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    layer = [
        r for r in rows if isinstance(r["tokens"], int) and "adapters" not in r and r.get("wrapped_over_bare")
    ]
    if not layer:
        return None
    tokens_list = sorted({r["tokens"] for r in layer})
    series = [
        ("quantplug fast", lambda r: r.get("kernels") == "fast", "wrapped_over_bare"),
        ("quantplug fast, CUDA graph", lambda r: r.get("kernels") == "fast",
         "graph_wrapped_over_bare"),
        ("quantplug reference", lambda r: r.get("kernels") == "reference",
         "wrapped_over_bare"),
        ("PEFT", lambda r: r["library"] == "peft", "wrapped_over_bare"),
        ("PEFT, CUDA graph", lambda r: r["library"] == "peft", "graph_wrapped_over_bare"),
    ]  # fmt: skip
    fig, axes = plt.subplots(len(tokens_list), 1, figsize=(11, 3.6 * len(tokens_list)), squeeze=False)
    for ax, tokens in zip(axes[:, 0], tokens_list):
        groups = []
        for r in layer:
            label = f"{r['backend']}\n{r['shape']}"
            if r["tokens"] == tokens and label not in groups:
                groups.append(label)
        width = 0.8 / len(series)
        for i, (name, pick, key) in enumerate(series):
            values = []
            for label in groups:
                match = [
                    r
                    for r in layer
                    if r["tokens"] == tokens and f"{r['backend']}\n{r['shape']}" == label and pick(r)
                ]
                values.append(match[0].get(key) or 0.0 if match else 0.0)
            xs = [g + (i - len(series) / 2 + 0.5) * width for g in range(len(groups))]
            bars = ax.bar(xs, values, width, label=name)
            for bar, value in zip(bars, values):
                if value:
                    ax.annotate(f"{value:.2f}", (bar.get_x() + bar.get_width() / 2, value), ha="center",
                                va="bottom", fontsize=6, rotation=90)  # fmt: skip
        ax.axhline(1.0, color="black", linewidth=0.8)
        if tokens == 1:
            ax.axhline(
                TARGETS["decode_ratio"], color="red", linestyle="--", linewidth=0.8, label="target 1.10"
            )
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, fontsize=8)
        ax.set_ylabel("time / bare layer")
        ax.set_title(
            f"{tokens} token{'s' if tokens > 1 else ''}: adapter layer time over the bare quantized layer"
        )
        ax.legend(fontsize=7, ncol=3, loc="upper left")
    env = rows[0].get("env", {})
    fig.suptitle(
        f"quantplug bench on {env.get('gpu', '?')} ({env.get('date', '')}): lower is better", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
