"""Turn pytest-benchmark JSON (--benchmark-json) into markdown tables.

    python benchmarks/report.py benchmarks/results/cpu.json [--out table.md]
                                                            [--plot plot.png]

One table per cell type: a row per (B, H), the median time of one training
step in ms for each implementation found (numba, numba-mkl, c, cuda, numpy,
torch, ...), and the speed-ups of numba (and of numba-mkl, the numba
backend with MKL, when the run has it) over torch and over numpy (time of
the other / time of numba: > 1 means fastrnn is faster), and of numba-mkl
over numba. The machine (CPU, cores), the date of the run and the package
versions are printed above the tables.

With --out, the markdown also goes to that file and, when matplotlib is
importable, a plot goes beside it (same name, .png) unless --plot names
another file; without matplotlib no plot is made and nothing is said.
"""
import argparse
import json
import os
import re
import sys
from collections import defaultdict

# Column order: fastrnn's fast backends, its reference, then PyTorch;
# anything else found goes after them, alphabetically.
ORDER = ("numba", "numba-mkl", "c", "cuda", "numpy", "torch")
REFERENCE = "numba"            # the backend the speed-ups are of
REFERENCES = ("numba", "numba-mkl")   # ... each one found in the run
VERSUS = ("torch", "numpy")    # ... over these
NAME_RE = re.compile(r"\[(?P<cell>[a-z]+)-B(?P<B>\d+)-H(?P<H>\d+)-(?P<backend>[\w-]+)\]")


def load(path):
    with open(path) as f:
        data = json.load(f)
    if "benchmarks" not in data:
        sys.exit(f"{path}: not a pytest-benchmark JSON file (no 'benchmarks')")
    return data


def describe(bench):
    """(cell, B, H, backend) of one benchmark entry, or None if not ours."""
    info = bench.get("extra_info") or {}
    params = bench.get("params") or {}
    try:
        return (str(info.get("cell", params.get("cell"))),
                int(info.get("B", params.get("B"))),
                int(info.get("H", params.get("H"))),
                str(info.get("backend", params.get("backend"))))
    except (TypeError, ValueError):
        m = NAME_RE.search(bench.get("name", ""))
        if not m:
            return None
        return m["cell"], int(m["B"]), int(m["H"]), m["backend"]


def collect(data):
    """{cell: {(B, H): {backend: median seconds}}} and one extra_info."""
    table = defaultdict(lambda: defaultdict(dict))
    sample_info = {}
    for bench in data["benchmarks"]:
        key = describe(bench)
        if key is None:
            continue
        cell, B, H, backend = key
        table[cell][(B, H)][backend] = bench["stats"]["median"]
        sample_info = sample_info or (bench.get("extra_info") or {})
    return table, sample_info


def backends_of(rows):
    found = {b for times in rows.values() for b in times}
    return ([b for b in ORDER if b in found]
            + sorted(found - set(ORDER)))


def _cell_order(cell):
    return (cell != "rnn", cell)


def fmt_ms(seconds):
    if seconds is None:
        return "–"
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    return f"{ms:.2f}"


def fmt_ratio(num, den):
    if num is None or den is None or den <= 0:
        return "–"
    return f"{num / den:.2f}×"


def header(data, info, path):
    mi = data.get("machine_info", {})
    cpu = mi.get("cpu", {}) or {}
    brand = cpu.get("brand_raw") or mi.get("processor") or "unknown CPU"
    cores = cpu.get("count", "?")
    hz = cpu.get("hz_advertised_friendly") or cpu.get("hz_actual_friendly")
    lines = [
        "# fastrnn training-step benchmarks",
        "",
        f"- source: `{os.path.basename(path)}`, run at {data.get('datetime', '?')}"
        f" (pytest-benchmark {data.get('version', '?')})",
        f"- machine: {brand}" + (f" @ {hz}" if hz else "")
        + f", {cores} cores, {mi.get('system', '?')} {mi.get('machine', '')},"
          f" Python {mi.get('python_version', '?')}",
    ]
    loads = [b["extra_info"]["loadavg_1min"] for b in data["benchmarks"]
             if isinstance((b.get("extra_info") or {}).get("loadavg_1min"),
                           (int, float))]
    if loads:
        lines.append(f"- 1-min load average before each benchmark: "
                     f"{min(loads):.2f} to {max(loads):.2f} (this run itself "
                     f"adds about 1-2; more means other work shared the CPU)")
    versions = info.get("versions")
    if isinstance(versions, dict) and versions:
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    commit = data.get("commit_info") or {}
    if commit.get("id") and commit["id"] != "unknown":
        dirty = " (dirty)" if commit.get("dirty") else ""
        lines.append(f"- commit: {commit['id'][:12]}{dirty}")
    if info:
        setting = ", ".join(f"{k}={info[k]}" for k in
                            ("T", "I", "O", "dtype", "nonlinearity", "loss",
                             "readout", "optimizer") if k in info)
        lines.append(f"- setting: one training step (forward, loss, BPTT, "
                     f"update); {setting}")
    lines += ["- times: median of one step in ms; speed-up \"A vs B\" = time of B "
              "/ time of A (> 1: A faster)", ""]
    mkl = {(b.get("extra_info") or {}).get("gemm") for b in data["benchmarks"]
           if (b.get("extra_info") or {}).get("backend") == "numba-mkl"}
    if mkl - {None}:
        layers = {(b.get("extra_info") or {}).get("numba_threading_layer")
                  for b in data["benchmarks"]} - {None}
        lines[-1:-1] = [
            "- numba-mkl: the numba backend with Intel MKL (the `mkl` extra) for "
            "the per-step products where it measured faster (`mkl_paths` in each "
            "result's extra_info); numba: the same backend without MKL, as "
            "installed by default" + (f"; numba threading layer: "
                                      f"{', '.join(sorted(layers))}" if layers else "")]
    return lines


def cell_table(cell, rows):
    backends = backends_of(rows)
    versus = [v for v in VERSUS if v in backends and v not in REFERENCES]
    refs = [r for r in REFERENCES if r in backends]
    pairs = [(v, r) for v in versus for r in refs]   # (other, reference)
    if "numba" in refs and "numba-mkl" in refs:
        pairs.append(("numba", "numba-mkl"))
    cols = ["B", "H"] + [f"{b} (ms)" for b in backends]
    cols += [f"{r} vs {v}" for v, r in pairs]
    lines = [f"## {cell}", "",
             "| " + " | ".join(cols) + " |",
             "|" + "|".join("---:" for _ in cols) + "|"]
    for (B, H) in sorted(rows):
        times = rows[(B, H)]
        cells = [str(B), str(H)] + [fmt_ms(times.get(b)) for b in backends]
        cells += [fmt_ratio(times.get(v), times.get(r)) for v, r in pairs]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def plot(table, path):
    """One panel per (cell, B): median ms against H, a line per backend."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    panels = [(cell, B) for cell in sorted(table, key=_cell_order)
              for B in sorted({b for (b, _) in table[cell]})]
    if not panels:
        return False
    ncol = min(3, len(panels))
    nrow = (len(panels) + ncol - 1) // ncol
    colors = {b: f"C{i}" for i, b in enumerate(
        sorted({b for rows in table.values() for t in rows.values() for b in t},
               key=lambda b: (ORDER.index(b) if b in ORDER else len(ORDER), b)))}
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.4 * nrow),
                             squeeze=False)
    for ax, (cell, B) in zip(axes.flat, panels):
        rows = {k: v for k, v in table[cell].items() if k[0] == B}
        for backend in backends_of(rows):
            pts = sorted((H, t[backend] * 1e3) for (_, H), t in rows.items()
                         if backend in t)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    label=backend, color=colors[backend])
        ax.set_xscale("log", base=2)
        hs = sorted({H for (_, H) in rows})
        ax.set_xticks(hs, [str(h) for h in hs])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_yscale("log")
        ax.set_title(f"{cell}, B={B}")
        ax.set_xlabel("hidden size H")
        ax.set_ylabel("ms / training step")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


GATES = {"rnn": 1, "gru": 3, "lstm": 4}


def step_flops(cell, B, H, T=100, I=32, O=10):
    """Multiply-add FLOPs (2 per multiply-add) of one training step of one
    layer: forward input projection and recurrence (2*T*B*G*H*(I + H)),
    backward dW_ih, dgates.W_hh and dW_hh (2*T*B*G*H*(I + 2H)), read-out
    forward, dW_out and dh (6*T*B*H*O). No input gradient (it is not needed)."""
    G = GATES.get(cell, 1)
    return 2 * T * B * G * H * (2 * I + 3 * H) + 6 * T * B * H * O


def peak_lines(data, table):
    """The sgemm peak of the run (benchmarks/test_bench_peak.py) and each
    cell's largest point of the fastest fastrnn backend as a share of it."""
    peak = [b for b in data["benchmarks"]
            if (b.get("extra_info") or {}).get("kind") == "gemm_peak"]
    if not peak:
        return []
    info = peak[0]["extra_info"]
    gf = info["flops"] / peak[0]["stats"]["median"] / 1e9
    lines = [f"fp32 GEMM peak of this run (numpy sgemm n={info['n']}): {gf:.0f} GFLOP/s", ""]
    for cell in sorted(table, key=_cell_order):
        B, H = max(table[cell])
        times = table[cell][(B, H)]
        for backend in REFERENCES:
            if backend in times:
                g = step_flops(cell, B, H) / times[backend] / 1e9
                lines.append(f"- {cell} B={B} H={H} {backend}: {g:.0f} GFLOP/s, "
                             f"{g / gf:.0%} of the sgemm peak")
    return lines + [""]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="pytest-benchmark JSON (--benchmark-json)")
    ap.add_argument("--out", help="also write the markdown to this file")
    ap.add_argument("--plot", help="PNG plot path (default with --out: "
                                   "beside it, same name, .png)")
    args = ap.parse_args(argv)

    data = load(args.results)
    table, info = collect(data)
    lines = header(data, info, args.results)
    if not table:
        lines.append("(no fastrnn training-step benchmarks in this file)")
    for cell in sorted(table, key=_cell_order):
        lines += cell_table(cell, table[cell])
    lines += peak_lines(data, table)
    text = "\n".join(lines).rstrip() + "\n"
    print(text, end="")

    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    plot_path = args.plot or (os.path.splitext(args.out)[0] + ".png"
                              if args.out else None)
    if plot_path and table:
        plot(table, plot_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
