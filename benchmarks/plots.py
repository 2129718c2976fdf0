"""
The suite's figures, drawn with matplotlib (Agg, no display) from the
benchmarks' JSON results: one PNG per question, each with the peers measured
in the same run.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"direct": "#9e9e9e", "nginx": "#2e7d32", "haproxy": "#1565c0", "txmesh": "#e65100",
          "bare": "#6a1b9a", "plain": "#90a4ae", "mtls": "#e65100"}


def _label_bars(ax, bars, spec: str = ",.0f") -> None:
    for bar in bars:
        height = bar.get_height()
        ax.annotate(format(height, spec), (bar.get_x() + bar.get_width() / 2, height), ha="center", va="bottom",
                    fontsize=8, xytext=(0, 2), textcoords="offset points")


def _save(fig, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _bars(ax, names: list, values: list, title: str, ylabel: str) -> None:
    """One bar per target, in its colour, with its value on top."""
    bars = ax.bar(names, values, color=[COLORS.get(n.split("-")[0], "#607d8b") for n in names])
    _label_bars(ax, bars)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, max(values) * 1.15 if values else 1)
    ax.grid(axis="y", alpha=0.3)


def _rps_by_connections(doc: dict, title: str, out: Path) -> Path:
    """Bars of req/s per target, one panel at c50 and one at c1."""
    names = [n for n in doc["summary"] if doc["summary"][n]["rps"]]
    conns = doc["params"]["connections"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, key, label in ((axes[0], "rps", f"{conns} connections"), (axes[1], "c1_rps", "1 connection")):
        _bars(ax, names, [doc["summary"][n][key] or 0 for n in names], label, "requests per second")
    fig.suptitle(f"{title} (median of {doc['params']['runs']} x {doc['params']['duration_s']} s, "
                 f"proxies pinned to one core)")
    return _save(fig, out)


def http1_latency(doc: dict, out: Path) -> Path:
    """Added p50/p90/p99 at one connection vs direct, per proxy."""
    direct = doc["summary"]["direct"]
    names = [n for n in doc["summary"] if n != "direct" and doc["summary"][n]["c1_p50_us"] is not None]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        s = doc["summary"][name]
        values = [max(0.0, s[f"c1_{p}_us"] - direct[f"c1_{p}_us"]) for p in ("p50", "p90", "p99")]
        bars = ax.bar([x + i * width for x in range(3)], values, width, label=name, color=COLORS.get(name))
        _label_bars(ax, bars)
    ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(3)], ["p50", "p90", "p99"])
    ax.set_ylabel("added latency vs direct (µs)")
    ax.set_title("HTTP/1.1, one connection (wrk -c1): latency each proxy adds")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out)


def sidecar(doc: dict, out: Path) -> Path:
    """Two panels: added latency of the two hops, and each proxy's vCPU and RSS, against the goals."""
    s, rate = doc["summary"], doc["params"]["rate"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    ax = axes[0]
    for i, path in enumerate(("plain", "mtls")):
        values = [max(0.0, (s[path][f"added_{p}_us"] or 0) / 1000) for p in ("p50", "p90", "p99")]
        bars = ax.bar([x + i * 0.4 for x in range(3)], values, 0.4, color=COLORS[path],
                      label=f"two hops, {'mutual TLS' if path == 'mtls' else 'plaintext'}")
        _label_bars(ax, bars, ".2f")
    ax.axhline(doc["targets"]["added_p90_us_max"] / 1000, color="black", ls="--", lw=1, label="goal p90 ≤ 1 ms")
    ax.axhline(2.65, color="red", ls=":", lw=1, label="Istio p90 2.65 ms")
    ax.set_xticks([0.2, 1.2, 2.2], ["p50", "p90", "p99"])
    ax.set_ylabel("added vs direct (ms)")
    ax.set_title(f"added latency at {rate:,} req/s")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)

    ax = axes[1]
    labels = ["client (plain)", "server (plain)", "client (mTLS)", "server (mTLS)"]
    values = [s["plain"]["client_cpu_s_per_1k"], s["plain"]["server_cpu_s_per_1k"],
              s["mtls"]["client_cpu_s_per_1k"], s["mtls"]["server_cpu_s_per_1k"]]
    bars = ax.bar(labels, values, color=[COLORS["plain"]] * 2 + [COLORS["mtls"]] * 2)
    _label_bars(ax, bars, ".3f")
    ax.axhline(doc["targets"]["vcpu_per_1k_max"], color="black", ls="--", lw=1, label="goal 0.10")
    ax.axhline(0.35, color="red", ls=":", lw=1, label="Istio Envoy 0.35")
    ax.set_ylabel("vCPU at 1,000 req/s (CPU s per 1,000 requests)")
    ax.set_title("CPU per sidecar")
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)

    ax = axes[2]
    values = [s["mtls"]["client_rss_mb"], s["mtls"]["server_rss_mb"]]
    bars = ax.bar(["client", "server"], values, color=COLORS["mtls"])
    _label_bars(ax, bars, ".1f")
    ax.axhline(doc["targets"]["rss_mb_max"], color="black", ls="--", lw=1, label="goal / Istio 40 MB")
    ax.set_ylabel("RSS (MB)")
    ax.set_title("memory per sidecar")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"two txmesh sidecars, mTLS + metrics + tracing, fixed {rate:,} req/s "
                 f"(median of {doc['params']['runs']} x {doc['params']['duration']} s)")
    return _save(fig, out)


def h2_grpc(h2: dict | None, grpc: dict | None, out: Path) -> Path:
    """req/s for HTTP/2 (h2load) and calls/s for gRPC (grpcio), side by side."""
    panels = [(doc, key, title) for doc, key, title in ((h2, "rps", "HTTP/2 h2c, h2load -c10 -m10"),
                                                         (grpc, "calls_per_s", "gRPC unary, grpc.aio client"))
              if doc]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, (doc, key, title) in zip(axes[0], panels, strict=True):
        names = [n for n in doc["summary"] if doc["summary"][n][key]]
        _bars(ax, names, [doc["summary"][n][key] for n in names], title, "per second")
    return _save(fig, out)


def draw_all(results: dict, directory: Path) -> list[Path]:
    """
    Draw every figure the results allow.

    @param results: C{{benchmark name: its JSON}}.
    @return: the PNGs written.
    """
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    if "http1" in results:
        written.append(_rps_by_connections(results["http1"], "HTTP/1.1 reverse proxy",
                                           directory / "bench-http1.png"))
        written.append(http1_latency(results["http1"], directory / "bench-latency.png"))
    if "l4" in results:
        written.append(_rps_by_connections(results["l4"], "L4 TCP relay (wrk over it)", directory / "bench-l4.png"))
    if "sidecar" in results:
        written.append(sidecar(results["sidecar"], directory / "bench-sidecar.png"))
    if "http2" in results or "grpc" in results:
        written.append(h2_grpc(results.get("http2"), results.get("grpc"), directory / "bench-h2-grpc.png"))
    return written
