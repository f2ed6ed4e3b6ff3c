"""Regenerate every number and picture of docs/main_job.md.

Runs the commands the page shows (`fastrnn train`, `compare`, `sample`,
`bench`, `backends`, the seed sweep and the other tasks) in a scratch
directory, then rewrites each generated block of the page: the text between
``<!-- make_docs: NAME -->`` and ``<!-- /make_docs -->``; the prose around
the blocks refers to them and holds no measured number. The pictures are
copied next to the page. The first block records the commit, the machine
(CPU model, vector width, cores), the versions and the load average.

    python docs/make_docs.py                 # everything (~10 min on 2 idle cores)
    python docs/make_docs.py --quick --doc /tmp/page.md   # tiny settings, to test the script

--quick runs every command on tiny settings (seconds, not minutes); its
numbers mean nothing, so it refuses to write docs/main_job.md itself
unless --force is given. The commands run with this checkout first on the
path, as ``python -m fastrnn``.
"""
import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "main_job.md")
BLOCK = re.compile(r"(<!-- make_docs: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /make_docs -->)",
                   re.S)
LICENSES = ("GPL-3", "Apache-2.0", "GFDL-1.3", "LGPL-2.1")
LICENSE_DIR = "/usr/share/common-licenses"

# the options of each run: full (what the page documents) and quick (tiny)
_TINY = ["--T", "10", "--steps", "20", "--hidden", "8", "--eval-every", "10",
         "--test-size", "50"]
SETTINGS = {
    "full": dict(train=[], seeds=range(8), compare=[], temporal=[],
                 temporal_orth=["--init", "orthogonal", "--forget-bias", "1"],
                 memorization=[], memorization_seeds=(0, 1), char=[],
                 sample=["--length", "300"], bench=[]),
    "quick": dict(train=_TINY, seeds=range(2), compare=_TINY, temporal=_TINY,
                  temporal_orth=["--init", "orthogonal", "--forget-bias", "1"] + _TINY,
                  memorization=["--T", "5", "--steps", "20", "--hidden", "8",
                                "--eval-every", "10", "--test-size", "50"],
                  memorization_seeds=(0,),
                  char=["--steps", "10", "--hidden", "16", "--eval-every", "10"],
                  sample=["--length", "40"],
                  bench=["--shape", "5,2,3,4", "--seconds", "0.02", "--no-torch"]),
}


# --------------------------------------------------------------------------
# running the commands
# --------------------------------------------------------------------------
class Runner:
    """Runs ``fastrnn ARGS`` in the scratch directory ``work``, from this
    checkout; remembers wall clock and load average of each run."""

    def __init__(self, work, verbose=True):
        self.work, self.verbose = work, verbose
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))

    def __call__(self, *args, env=None):
        """(output text, wall seconds, load average after); raises on failure."""
        cmd = [sys.executable, "-m", "fastrnn", *args]
        if self.verbose:
            print("$ fastrnn " + " ".join(_quote(a) for a in args), flush=True)
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=self.work, env=dict(self.env, **(env or {})),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"fastrnn {' '.join(args)} failed ({p.returncode}):\n{p.stdout}")
        # paths as the page's commands give them: relative to the scratch directory
        text = p.stdout.rstrip("\n").replace(self.work + os.sep, "")
        return text, wall, os.getloadavg()[0]

    def summary(self, out):
        with open(os.path.join(self.work, out, "summary.json")) as f:
            return json.load(f)

    def flows(self, out):
        """The gradient-flow records of a run: [(step, norms), ...]."""
        with open(os.path.join(self.work, out, "metrics.jsonl")) as f:
            recs = [json.loads(line) for line in f if '"flow"' in line]
        return [(r["step"], r["norms"]) for r in recs if r.get("type") == "flow"]


def _quote(a):
    return f'"{a}"' if (" " in a or not a) else a


def console(args, text):
    return "```console\n$ fastrnn " + " ".join(_quote(a) for a in args) + "\n" + text + "\n```\n"


def elide_steps(text, note="..."):
    """Replace each run of progress lines ("step ...") by ``note`` and the
    run's last line."""
    out, run = [], []
    for line in text.splitlines() + [None]:
        if line is not None and line.startswith("step "):
            run.append(line)
            continue
        if run:
            out += ([note] if len(run) > 1 else []) + [run[-1]]
            run = []
        if line is not None:
            out.append(line)
    return "\n".join(out)


def _num(v, digits=3):
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def _flow_ratio(norms):
    """Gradient reaching the first step over the gradient at the last."""
    return norms[0] / norms[-1] if norms[-1] else float("nan")


def _wall(wall, load):
    return f"{wall:.1f} s wall clock (load {load:.1f})"


# --------------------------------------------------------------------------
# the machine
# --------------------------------------------------------------------------
def machine():
    """CPU model, vector width, cores, versions, commit."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key.strip() == "model name" and model in ("", platform.machine()):
                    model = val.strip()
                if key.strip() == "flags" and not flags:
                    flags = set(val.split())
    except OSError:
        pass
    vector = ("AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags
              else "AVX" if "avx" in flags else "SSE/NEON or unknown")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        commit += " (with uncommitted changes)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown (not a git checkout)"
    versions = [f"Python {platform.python_version()}"]
    for mod in ("numpy", "numba", "torch"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            pass
    return dict(cpu=model, vector=vector, cores=os.cpu_count(), commit=commit,
                versions=", ".join(versions), system=platform.system())


# --------------------------------------------------------------------------
# the blocks
# --------------------------------------------------------------------------
def make_blocks(run, cfg, mode, text_file):
    """name -> new text of each generated block (and the pictures' sources)."""
    b, pictures = {}, {}
    load0 = os.getloadavg()[0]

    # fastrnn train, default
    args = ["train", *cfg["train"], "--out", "runs/train-default"]
    out, wall, load = run(*args)
    flows = run.flows("runs/train-default")
    f0, f1 = flows[0][1], flows[-1][1]
    b["train"] = console(args, out) + (
        f"\n{_wall(wall, load)} in all. At initialisation the gradient reaching "
        f"the first step was {_num(_flow_ratio(f0), 2)} of the gradient at the "
        f"last; after training, {_num(_flow_ratio(f1), 2)}.\n")
    pictures["train_default.png"] = "runs/train-default/training.png"

    # the seed sweep
    rows = ["| seed | solved at step | test MSE | training time | wall clock |",
            "|-----:|---------------:|---------:|--------------:|-----------:|"]
    loads = []
    for seed in cfg["seeds"]:
        d = f"runs/seed-{seed}"
        _, wall, load = run("train", *cfg["train"], "--seed", str(seed), "--out", d)
        s = run.summary(d)
        loads.append(load)
        rows.append(f"| {seed} | {s['solved_at'] if s['solved'] else 'not solved'} | "
                    f"{s['test_metric']:.4f} | {s['seconds']:.1f} s | {wall:.1f} s |")
    b["seeds"] = ("\n".join(rows) + f"\n\n`fastrnn train {' '.join(cfg['train'])}"
                  f"{' ' if cfg['train'] else ''}--seed S`, one run after the other; "
                  f"load average {min(loads):.1f}-{max(loads):.1f}.\n")

    # the first run: compile with an empty numba cache (full mode only: minutes)
    if mode == "full":
        cache = tempfile.mkdtemp(prefix="numba-cache-")
        try:
            _, wall, load = run("train", "--out", "runs/cold", env={"NUMBA_CACHE_DIR": cache})
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        b["cold"] = (f"With an empty Numba cache (`NUMBA_CACHE_DIR` pointed at a new "
                     f"directory) the default run took {_wall(wall, load)}, compilation "
                     f"included.\n")
    else:
        b["cold"] = "(the first run with an empty Numba cache is measured in full mode only)\n"

    # fastrnn compare
    args = ["compare", *cfg["compare"], "--out", "runs/compare"]
    out, wall, load = run(*args)
    b["compare"] = console(args, elide_steps(
        out, "... (a log line every evaluation per model, left out here)")) + (
        f"\n{_wall(wall, load)} in all; the runs are deterministic given the seed, "
        f"only the seconds change with the load.\n")
    pictures["compare_adding_T100.png"] = "runs/compare/compare.png"
    with open(os.path.join(run.work, "runs/compare/compare.json")) as f:
        cmp_runs = json.load(f)["runs"]
    rows = ["| model | solved | largest grad norm | steps clipped "
            "| gradient at t=1 / t=T, start | at the end |",
            "|---|---|---:|---:|---:|---:|"]
    for r in cmp_runs:
        flows = run.flows(os.path.join("runs/compare", r["name"]))
        clipped = (f"{100 * r['clipped'] / r['steps']:.0f}%" if r["clip_norm"] else "- (off)")
        rows.append(f"| {r['label']} | {'step ' + str(r['solved_at']) if r['solved'] else 'no'} | "
                    f"{_num(r['max_grad_norm'])} | {clipped} | "
                    f"{_num(_flow_ratio(flows[0][1]), 2)} | {_num(_flow_ratio(flows[-1][1]), 2)} |")
    b["compare-story"] = "\n".join(rows) + "\n"
    story = {r["name"]: r["solved"] for r in cmp_runs}

    # the other tasks
    rows = ["| command | solved at step | error / metric | training time |",
            "|---|---:|---:|---:|"]
    runs = [(["--task", "temporal-order", *cfg["temporal"]], "temporal"),
            (["--task", "temporal-order", *cfg["temporal_orth"]], "temporal-orth")]
    runs += [(["--task", "memorization", *cfg["memorization"], "--seed", str(s)],
              f"memorization-{s}") for s in cfg["memorization_seeds"]]
    for opts, name in runs:
        d = f"runs/{name}"
        run("train", *opts, "--out", d)
        s = run.summary(d)
        solved = s["solved_at"] if s["solved"] else f"not solved ({s['steps']})"
        rows.append(f"| `fastrnn train {' '.join(opts)}` | {solved} | "
                    f"{s['test_metric']:.4f} | {s['seconds']:.1f} s |")
    b["tasks"] = "\n".join(rows) + "\n"

    # char-level language model, and sampling from it
    shutil.copy(text_file, os.path.join(run.work, "corpus.txt"))
    args = ["train", "--task", "char", "--text", "corpus.txt", *cfg["char"],
            "--out", "runs/char-licenses"]
    out, _, _ = run(*args)
    sargs = ["sample", "runs/char-licenses", "--prime", "This License", *cfg["sample"],
             "--seed", "0"]
    sout, _, _ = run(*sargs)
    b["char"] = console(args, elide_steps(out)).rstrip("\n").rstrip("`").rstrip("\n") + (
        "\n$ fastrnn " + " ".join(_quote(a) for a in sargs) + "\n" + sout + "\n```\n")

    # fastrnn bench, fastrnn backends
    args = ["bench", *cfg["bench"]]
    out, wall, load = run(*args)
    bout, _, _ = run("backends")
    b["bench"] = (console(args, out).rstrip("\n").rstrip("`").rstrip("\n")
                  + "\n$ fastrnn backends\n" + bout + "\n```\n\n" + _wall(wall, load)
                  + " for the bench.\n")

    m = machine()
    b["machine"] = (
        f"Generated by `python docs/make_docs.py{' --quick' if mode == 'quick' else ''}` on "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC at commit "
        f"{m['commit']}: {m['cpu']}, {m['vector']}, {m['cores']} cores, {m['system']}; "
        f"{m['versions']}. Load average {load0:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end (the machine may be shared: timings "
        f"move with the load, the steps and losses do not).\n")
    if mode == "quick":
        b["machine"] += ("\n**Quick mode: tiny settings, the numbers below are a test "
                         "of the script, not results.**\n")
    return b, pictures, story


def check_story(story):
    """The page's prose says which models of `compare` solve the task."""
    # the IRNN ends near the threshold with the default budget, either side
    # of it from one version of the kernels to the next: the prose says so
    expected = {"rnn": False, "lstm": True, "gru": True}
    return [f"compare: {name} {'solved' if story[name] else 'did not solve'} the task; "
            f"the prose of docs/main_job.md says otherwise: update it"
            for name, want in expected.items() if name in story and story[name] != want]


def rewrite(doc_text, blocks):
    """The page with each generated block replaced; every block of the page
    must be generated and every generated block must be on the page."""
    seen = set()

    def sub(m):
        name = m.group("name")
        if name not in blocks:
            raise KeyError(f"the page has a block {name!r} that make_docs.py does not make")
        seen.add(name)
        # blank lines around the text: a table or a code block next to the
        # marks would not render as one
        return m.group(1) + "\n" + blocks[name].strip("\n") + "\n\n" + m.group(4)

    text = BLOCK.sub(sub, doc_text)
    missing = set(blocks) - seen
    if missing:
        raise KeyError(f"blocks missing from the page: {', '.join(sorted(missing))}")
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny settings, to test the script")
    p.add_argument("--doc", default=DOC, help="the page to rewrite (default: %(default)s); "
                   "the pictures go next to it")
    p.add_argument("--work", help="scratch directory for the runs (default: a temporary one, "
                   "removed at the end)")
    p.add_argument("--text", help="text for the char model (default: the GPL-3, Apache-2.0, "
                   f"GFDL-1.3 and LGPL-2.1 texts of {LICENSE_DIR}; --quick: README.md)")
    p.add_argument("--force", action="store_true",
                   help="with --quick, allow rewriting docs/main_job.md itself")
    a = p.parse_args(argv)
    mode = "quick" if a.quick else "full"
    doc = os.path.abspath(a.doc)
    if mode == "quick" and doc == DOC and not a.force:
        p.error("--quick would put meaningless numbers in docs/main_job.md: "
                "give --doc (or --force)")
    with open(doc) as f:
        page = f.read()
    work = os.path.abspath(a.work or tempfile.mkdtemp(prefix="make_docs-"))
    os.makedirs(work, exist_ok=True)
    try:
        text = os.path.join(work, "licenses.txt")
        if a.text:
            text = a.text
        elif mode == "quick":
            text = os.path.join(ROOT, "README.md")
        else:
            with open(text, "w") as out:
                for name in LICENSES:
                    with open(os.path.join(LICENSE_DIR, name)) as f:
                        out.write(f.read())
        blocks, pictures, story = make_blocks(Runner(work), SETTINGS[mode], mode, text)
        new = rewrite(page, blocks)
        for name, src in pictures.items():
            src = os.path.join(work, src)
            if os.path.exists(src):      # drawn only with matplotlib installed
                shutil.copy(src, os.path.join(os.path.dirname(doc), name))
            else:
                print(f"no picture {src} (matplotlib missing?): kept the old {name}")
        with open(doc, "w") as f:
            f.write(new)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {doc} ({len(blocks)} blocks) and {', '.join(pictures)}")
    problems = check_story(story) if mode == "full" else []
    for line in problems:
        print("WARNING:", line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
