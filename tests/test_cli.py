"""The command line: parsing and defaults, end-to-end runs with tiny sizes
(train, resume, sample, compare, bench, backends, plot), progress output."""
import io
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

import fastrnn as fr
from fastrnn import cli, tasks as fr_tasks

TINY = ["--T", "8", "--hidden", "6", "--batch", "4", "--eval-every", "5",
        "--test-size", "50", "--progress", "log"]
TEXT = ("It was the best of times, it was the worst of times, it was the age of "
        "wisdom, it was the age of foolishness.\n") * 12


def _cfg(*argv):
    args = cli.make_parser().parse_args(["train", *argv])
    return cli.resolve_config(args)


def _run(argv, capsys):
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def _exit_code(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    return e.value.code, capsys.readouterr().err


@pytest.fixture
def no_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(TEXT)
    return str(p)


# -- parsing and defaults --------------------------------------------------------

def test_train_defaults_are_the_main_job():
    cfg = _cfg()
    assert (cfg["task"], cfg["T"], cfg["cell"], cfg["hidden"], cfg["layers"]) == \
        ("adding", 100, "lstm", 32, 1)
    assert cfg["clip_norm"] == 1.0 and cfg["clip_value"] is None
    assert (cfg["optimizer"], cfg["lr"], cfg["batch"], cfg["seed"]) == ("adam", 0.01, 32, 0)
    assert cfg["stop_when_solved"] and cfg["dtype"] == "float32" and cfg["backend"] == "auto"


def test_train_options_parse():
    cfg = _cfg("--task", "order", "--cell", "rnn", "--nonlinearity", "relu", "--init",
               "identity", "--hidden", "7", "--layers", "2", "--bidirectional", "--T", "30",
               "--batch", "5", "--steps", "9", "--optimizer", "sgd", "--lr", "0.1",
               "--momentum", "0.9", "--clip-value", "0.5", "--state-clip", "2",
               "--backend", "numpy", "--dtype", "float64", "--seed", "3", "--no-stop",
               "--eval-every", "4", "--checkpoint-every", "2")
    assert cfg["task"] == "temporal-order"
    assert (cfg["cell"], cfg["nonlinearity"], cfg["init"], cfg["hidden"], cfg["layers"],
            cfg["bidirectional"], cfg["T"], cfg["batch"], cfg["steps"]) == \
        ("rnn", "relu", "identity", 7, 2, True, 30, 5, 9)
    assert (cfg["optimizer"], cfg["lr"], cfg["momentum"]) == ("sgd", 0.1, 0.9)
    assert cfg["clip_norm"] is None and cfg["clip_value"] == 0.5 and cfg["state_clip"] == 2
    assert (cfg["backend"], cfg["dtype"], cfg["seed"]) == ("numpy", "float64", 3)
    assert not cfg["stop_when_solved"]
    assert (cfg["eval_every"], cfg["checkpoint_every"]) == (4, 2)


def test_per_task_defaults(text_file):
    assert _cfg("--task", "memorization")["T"] == 50
    cfg = _cfg("--task", "char", "--text", text_file)
    assert cfg["T"] == 64 and cfg["hidden"] == 128 and not cfg["stop_when_solved"]
    assert os.path.isabs(cfg["text"])
    assert _cfg("--task", "char", "--text", text_file, "--hidden", "5")["hidden"] == 5
    assert _cfg("--no-clip")["clip_norm"] is None


def test_forget_bias_option_and_presets():
    cfg = _cfg("--task", "temporal-order")
    assert cfg["forget_bias"] == 3.0 and cfg["cell"] == "lstm"
    assert _cfg("--task", "temporal-order", "--cell", "rnn")["forget_bias"] is None
    assert _cfg()["forget_bias"] is None
    cfg = _cfg("--forget-bias", "2.5", "--layers", "2", "--bidirectional", "--hidden", "3")
    from fastrnn import tasks
    model, _ = cli.build(cfg, tasks.make_task("adding", 5))
    for k, v in model.state_dict().items():
        if k.startswith("bias_ih"):
            assert np.all(v[3:6] == 2.5) and not np.all(v[:3] == 2.5), k
        if k.startswith("bias_hh"):
            assert np.all(v[3:6] == 0), k


@pytest.mark.parametrize("argv,message", [
    (["--clip-norm", "1", "--clip-value", "1"], "not both"),
    (["--no-clip", "--clip-norm", "2"], "--no-clip"),
    (["--init", "identity"], "identity"),
    (["--nonlinearity", "relu"], "--cell rnn"),
    (["--task", "char"], "--text"),
    (["--task", "parity"], "task"),
    (["--hidden", "0"], "--hidden"),
    (["--cell", "rnn", "--forget-bias", "1"], "--forget-bias"),
    (["--lr", "-1"], "--lr"),
    (["--task", "char", "--text", "/nonexistent/file.txt"], "no such file"),
])
def test_bad_options_exit_2_with_a_message(capsys, argv, message):
    code, err = _exit_code(["train", *argv], capsys)
    assert code == 2 and message in err and "fastrnn train: error" in err


def test_bad_choice_is_an_argparse_error(capsys):
    code, err = _exit_code(["train", "--cell", "transformer"], capsys)
    assert code == 2 and "--cell" in err


def test_help_lists_the_subcommands():
    r = subprocess.run([sys.executable, "-m", "fastrnn", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0
    for cmd in ("train", "compare", "sample", "bench", "backends"):
        assert cmd in r.stdout
    h = cli.make_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for opt in ("--task", "--cell", "--nonlinearity", "--init", "--hidden", "--layers",
                "--bidirectional", "--T", "--batch", "--steps", "--optimizer", "--lr",
                "--clip-norm", "--clip-value", "--state-clip", "--backend", "--dtype",
                "--seed", "--out", "--resume", "--text"):
        assert opt in h, opt


# -- train ------------------------------------------------------------------------

def test_help_has_no_rst_markup_and_lists_tune():
    text = cli.make_parser().format_help()
    assert "``" not in text and "fastrnn tune" in text


def test_slow_first_calls_are_announced_and_timed_apart(tmp_path, capsys, monkeypatch,
                                                        no_matplotlib):
    """First calls slower than COMPILE_NOTICE_S (here: a timer that fires at
    once) say that the kernels compile; the summary gives that time apart
    from training time."""
    class FiresAtOnce:
        def __init__(self, delay, fn, args):
            self.fn, self.args, self.daemon = fn, args, False

        def start(self):
            self.fn(*self.args)

        def cancel(self):
            pass

    monkeypatch.setattr(cli.train.threading, "Timer", FiresAtOnce)
    out = tmp_path / "run"
    code, text, _ = _run(["train", *TINY, "--steps", "3", "--out", str(out)], capsys)
    assert code == 0
    assert "compiling kernels (one time, about a minute)" in text
    assert "of compiling or loading the kernels" in text
    s = json.load(open(out / "summary.json"))
    assert s["startup_seconds"] >= 0 and s["seconds"] >= 0


def test_train_end_to_end(tmp_path, capsys, no_matplotlib):
    out = tmp_path / "run"
    code, text, _ = _run(["train", *TINY, "--steps", "12", "--out", str(out)], capsys)
    assert code == 0
    assert "fastrnn train: adding T=8" in text
    assert "step      5/12" in text and "test MSE" in text and "steps/s" in text
    assert "matplotlib is not installed: skipping the picture" in text
    assert "done: 12 steps" in text and "gradient norm: largest" in text
    assert {"metrics.jsonl", "checkpoint.npz", "summary.json"} <= set(os.listdir(out))
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert recs[0]["type"] == "config" and recs[0]["hidden"] == 6
    steps = [r for r in recs if r["type"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert all({"loss", "grad_norm", "clipped", "skipped"} <= set(r) for r in steps)
    assert [r["step"] for r in recs if r["type"] == "eval"] == [5, 10, 12]
    flows = [r for r in recs if r["type"] == "flow"]
    assert [f["step"] for f in flows] == [0, 12] and len(flows[0]["norms"]) == 8
    s = json.load(open(out / "summary.json"))
    assert s["steps"] == 12 and s["solved"] is False and s["metric_name"] == "test MSE"
    ck = fr.load(out / "checkpoint.npz")
    assert ck.step == 12 and ck.train_step.steps == 12
    assert ck.model.core.hidden_size == 6


def test_train_gru_and_resume(tmp_path, capsys, no_matplotlib):
    """--cell gru trains a fr.GRU (on a backend that has the cell), saves it,
    and a resumed run equals the uninterrupted one bitwise."""
    extra = ["--cell", "gru", "--no-stop", "--dtype", "float64"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert cli.main(["train", *TINY, *extra, "--steps", "8", "--out", a]) == 0
    text = capsys.readouterr().out
    assert "GRU H=6" in text
    ck = fr.load(os.path.join(a, "checkpoint.npz"))
    assert isinstance(ck.model.core, fr.GRU)
    assert cli.main(["train", *TINY, *extra, "--steps", "4", "--out", b]) == 0
    assert cli.main(["train", "--resume", b, "--steps", "8", "--progress", "log"]) == 0
    _assert_same_run(a, b)
    code, err = _exit_code(["train", "--cell", "gru", "--init", "identity"], capsys)
    assert code == 2 and "identity" in err


def test_train_require_solved_exit_status(tmp_path, capsys):
    code, _, _ = _run(["train", *TINY, "--steps", "3", "--require-solved",
                       "--out", str(tmp_path / "r")], capsys)
    assert code == 1


def test_train_picture_with_matplotlib(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    code, text, _ = _run(["train", *TINY, "--steps", "6", "--out", str(out)], capsys)
    assert code == 0 and (out / "training.png").stat().st_size > 1000
    cmp = tmp_path / "cmp"
    code, text, _ = _run(["compare", "--only", "rnn,lstm", "--T", "5", "--hidden", "3",
                          "--steps", "4", "--eval-every", "2", "--test-size", "10",
                          "--progress", "none", "--out", str(cmp)], capsys)
    assert code == 0 and (cmp / "compare.png").stat().st_size > 1000


def test_plot_without_matplotlib_says_so(tmp_path, capsys, no_matplotlib):
    out = tmp_path / "run"
    _run(["train", *TINY, "--steps", "3", "--out", str(out)], capsys)
    code, text, _ = _run(["plot", str(out)], capsys)
    assert code == 0 and "skipping the picture" in text
    m = cli.read_metrics(str(out))
    assert m["steps"]["step"].tolist() == [1, 2, 3] and len(m["flows"]) == 2


def _final(out):
    ck = fr.load(os.path.join(out, "checkpoint.npz"))
    return ck.model.state_dict(), ck.train_step.opt_state, ck.train_step.steps


def _step_records(out):
    return [line for line in open(os.path.join(out, "metrics.jsonl"))
            if '"type": "step"' in line]


def _assert_same_run(a, b):
    pa, oa, sa = _final(a)
    pb, ob, sb = _final(b)
    assert sa == sb
    for k in pa:
        assert pa[k].dtype == pb[k].dtype
        assert np.array_equal(pa[k], pb[k]), k         # bitwise
    assert np.array_equal(oa, ob)
    assert _step_records(a) == _step_records(b)


@pytest.mark.parametrize("task", ["adding", "temporal-order", "memorization", "char"])
def test_resume_equals_uninterrupted_run(tmp_path, capsys, no_matplotlib, task, text_file):
    extra = ["--task", task, "--no-stop", "--dtype", "float64"]
    if task == "char":
        extra += ["--text", text_file]      # state carried across windows
    if task == "memorization":
        extra += ["--T", "3"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert cli.main(["train", *TINY, *extra, "--steps", "20", "--out", a]) == 0
    assert cli.main(["train", *TINY, *extra, "--steps", "10", "--out", b]) == 0
    assert cli.main(["train", "--resume", b, "--steps", "20", "--progress", "log"]) == 0
    text = capsys.readouterr().out
    assert "resuming" in text and "from step 10" in text
    _assert_same_run(a, b)


def test_interrupt_saves_and_resume_continues_exactly(tmp_path, capsys, no_matplotlib,
                                                      monkeypatch):
    args = [*TINY, "--no-stop", "--steps", "16", "--checkpoint-every", "100"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert cli.main(["train", *args, "--out", a]) == 0
    real = fr.TrainStep.__call__
    calls = []

    def ctrl_c_at_7(self, *aa, **kw):
        calls.append(1)
        if len(calls) == 7:
            os.kill(os.getpid(), signal.SIGINT)     # Ctrl-C in the middle of step 7
        return real(self, *aa, **kw)
    monkeypatch.setattr(fr.TrainStep, "__call__", ctrl_c_at_7)
    with pytest.raises(SystemExit) as e:
        cli.main(["train", *args, "--out", b])
    assert e.value.code == 130
    assert "interrupted at step 7" in capsys.readouterr().out
    assert fr.load(os.path.join(b, "checkpoint.npz")).step == 7
    monkeypatch.setattr(fr.TrainStep, "__call__", real)
    assert cli.main(["train", "--resume", b, "--progress", "log"]) == 0
    _assert_same_run(a, b)


def test_resume_keeps_the_configuration(tmp_path, capsys, no_matplotlib):
    out = str(tmp_path / "r")
    cli.main(["train", *TINY, "--steps", "2", "--out", out])
    code, err = _exit_code(["train", "--resume", out, "--hidden", "9"], capsys)
    assert code == 2 and "--hidden" in err and "keeps its configuration" in err
    code, err = _exit_code(["train", "--resume", str(tmp_path / "nothing")], capsys)
    assert code == 2 and "no checkpoint" in err


def test_resume_rejects_a_changed_text(tmp_path, capsys, no_matplotlib, text_file):
    out = str(tmp_path / "r")
    cli.main(["train", *TINY, "--task", "char", "--text", text_file, "--steps", "2",
              "--out", out])
    with open(text_file, "a") as f:
        f.write("more")
    code, err = _exit_code(["train", "--resume", out, "--steps", "4"], capsys)
    assert code == 2 and "changed" in err


# -- sample ------------------------------------------------------------------------

def test_sample_from_a_char_model(tmp_path, capsys, no_matplotlib, text_file):
    out = str(tmp_path / "char")
    assert cli.main(["train", *TINY, "--task", "char", "--text", text_file, "--steps", "6",
                     "--hidden", "16", "--out", out]) == 0
    capsys.readouterr()
    code, text, _ = _run(["sample", out, "--length", "40", "--prime", "It was",
                          "--seed", "1"], capsys)
    assert code == 0 and text.startswith("It was") and len(text) == len("It was") + 40 + 1
    assert set(text[:-1]) <= set(TEXT)
    assert _run(["sample", out, "--length", "40", "--prime", "It was", "--seed", "1"],
                capsys)[1] == text
    cold = _run(["sample", os.path.join(out, "checkpoint.npz"), "--length", "25",
                 "--temperature", "0"], capsys)[1]
    assert cold == _run(["sample", out, "--length", "25", "--temperature", "0",
                         "--seed", "5"], capsys)[1]
    code, err = _exit_code(["sample", out, "--prime", "XYZ"], capsys)
    assert code == 2 and "vocabulary" in err


def test_sample_text_is_greedy_decoding_with_state_carry():
    model = fr.SequenceModel(fr.LSTM(4, 5, seed=0, dtype=np.float64), 4)
    got = cli.sample_text(model, "abcd", 6, temperature=0, prime="ab")
    z, h = model(np.array([[0], [1]]))          # "ab" as token ids
    nxt = int(np.argmax(z[-1, 0]))
    expect = "ab" + "abcd"[nxt]
    for _ in range(5):
        z, h = model(np.array([[nxt]]), hx=h)
        nxt = int(np.argmax(z[0, 0]))
        expect += "abcd"[nxt]
    assert got == expect


def test_sample_rejects_other_checkpoints(tmp_path, capsys, no_matplotlib):
    out = str(tmp_path / "r")
    cli.main(["train", *TINY, "--steps", "2", "--out", out])
    code, err = _exit_code(["sample", out], capsys)
    assert code == 2 and "not a character-model checkpoint" in err


# -- compare, bench, backends ---------------------------------------------------------

def test_compare_end_to_end(tmp_path, capsys, no_matplotlib):
    out = tmp_path / "cmp"
    code, text, _ = _run(["compare", "--T", "6", "--hidden", "4", "--batch", "4",
                          "--steps", "6", "--eval-every", "3", "--test-size", "20",
                          "--progress", "none", "--out", str(out)], capsys)
    assert code == 0
    table = text[text.index("| model"):]
    for label, _ in cli.VARIANTS.values():
        assert label in table
    assert "largest grad norm" in table and "clipped" in table and "skipped" in table
    doc = json.load(open(out / "compare.json"))
    assert [r["name"] for r in doc["runs"]] == list(cli.VARIANTS)
    by = {r["name"]: r for r in doc["runs"]}
    assert by["rnn"]["clip_norm"] is None and by["rnn"]["clipped"] == 0
    assert by["irnn"]["clip_norm"] == 1.0
    cfgs = {n: json.loads(open(out / n / "metrics.jsonl").readline()) for n in by}
    assert cfgs["irnn"]["nonlinearity"] == "relu" and cfgs["irnn"]["init"] == "identity"
    assert cfgs["rnn-orth-clip"]["init"] == "orthogonal"
    assert cfgs["lstm"]["cell"] == "lstm" and cfgs["gru"]["cell"] == "gru"
    assert all(c["seed"] == 0 and c["steps"] == 6 for c in cfgs.values())
    assert (out / "compare.md").read_text().startswith("| model")
    code, text, _ = _run(["plot", str(out)], capsys)
    assert code == 0 and "skipping the picture" in text


def test_compare_only(tmp_path, capsys, no_matplotlib):
    code, text, _ = _run(["compare", "--only", "lstm", "--T", "5", "--hidden", "3",
                          "--steps", "2", "--eval-every", "2", "--test-size", "10",
                          "--progress", "none", "--out", str(tmp_path / "c")], capsys)
    assert code == 0 and "LSTM" in text and "IRNN" not in text.split("| model")[1]
    code, err = _exit_code(["compare", "--only", "mamba"], capsys)
    assert code == 2 and "mamba" in err


def test_bench_quick(capsys, tmp_path):
    js = tmp_path / "b.json"
    code, text, _ = _run(["bench", "--shape", "4,2,3,5", "--seconds", "0.01",
                          "--json", str(js)], capsys)
    assert code == 0
    assert "numpy" in text and "numba" in text and "ms/step" in text
    rows = json.load(open(js))
    assert {r["cell"] for r in rows} == {"rnn", "lstm"}
    assert all(r["loss_matches_reference"] for r in rows)
    impls = {r["impl"] for r in rows}
    try:
        import torch  # noqa: F401
        assert "torch" in impls
    except ImportError:
        assert "torch" not in impls


def test_backends_command(capsys):
    code, text, _ = _run(["backends"], capsys)
    assert code == 0
    for name in ("numpy", "numba", "c", "cuda", "auto"):
        assert name in text


# -- progress output -------------------------------------------------------------------

class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_log_lines_when_not_a_terminal():
    p = cli.make_progress("auto", 10, 0, "x", io.StringIO())
    assert type(p) is cli._LogLines


def test_builtin_bar_on_a_terminal(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "rich", None)
    s = _Tty()
    p = cli.make_progress("auto", 10, 0, "task", s)
    assert isinstance(p, cli._TextBar)
    p.update(5, "loss 1.0")
    p.write("a log line")
    p.update(10, "loss 0.5")
    p.close()
    out = s.getvalue()
    assert "\r" in out and "5/10" in out and "10/10 loss 0.5" in out and "a log line\n" in out


def test_tqdm_bar_when_available():
    pytest.importorskip("tqdm")
    s = _Tty()
    p = cli.make_progress("bar", 10, 0, "task", s)
    assert isinstance(p, cli._TqdmBar)
    p.update(3, "loss 1")
    p.write("line")
    p.close()
    assert "line" in s.getvalue()


# -- hardening: bad values, skipped steps, damaged files, filesystem errors ---------

def _one_line_error(err, command="train"):
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith(f"fastrnn {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("argv,message", [
    (["--test-size", "0"], "--test-size"),
    (["--test-size", "-5"], "--test-size"),
    (["--forget-bias", "nan"], "--forget-bias"),
    (["--forget-bias", "inf"], "--forget-bias"),
    (["--lr", "1e39"], "--lr"),                       # not finite in float32
    (["--lr", "nan"], "--lr"),
    (["--clip-norm", "1e39"], "--clip-norm"),
    (["--momentum", "nan"], "--momentum"),
    (["--momentum", "-1"], "--momentum"),
    (["--state-clip", "inf"], "--state-clip"),
])
def test_bad_values_exit_2_with_a_message(tmp_path, capsys, argv, message):
    out = tmp_path / "r"
    code, err = _exit_code(["train", *TINY, "--steps", "2", *argv, "--out", str(out)], capsys)
    assert code == 2 and message in _one_line_error(err)
    assert not out.exists()


def test_bad_values_in_compare_exit_2(tmp_path, capsys):
    code, err = _exit_code(["compare", "--test-size", "0", "--out", str(tmp_path / "c")],
                           capsys)
    assert code == 2 and "--test-size" in _one_line_error(err, "compare")
    assert not (tmp_path / "c").exists()


def test_lr_large_but_finite_in_float64_is_accepted():
    assert _cfg("--lr", "1e39", "--dtype", "float64")["lr"] == 1e39


def _nan_batches(monkeypatch, every=1):
    """Make every `every`-th training batch of the adding task non-finite."""
    real = fr_tasks.Task.train_batch

    def batch(self, rng, B, step):
        x, y, reset = real(self, rng, B, step)
        if step % every == 0:
            x = x.copy()
            x[0, 0, 0] = np.nan
        return x, y, reset
    monkeypatch.setattr(fr_tasks.Task, "train_batch", batch)


def test_a_run_whose_steps_are_all_skipped_stops_with_an_error(tmp_path, capsys,
                                                                monkeypatch, no_matplotlib):
    _nan_batches(monkeypatch)
    out = tmp_path / "r"
    code, err = _exit_code(["train", *TINY, "--steps", "12", "--out", str(out)], capsys)
    line = _one_line_error(err)
    assert code == 1 and "skipped" in line and "12" in line
    steps = [json.loads(ln) for ln in open(out / "metrics.jsonl")
             if '"step"' in ln and '"type": "step"' in ln]
    assert len(steps) == 12 and all(r["skipped"] for r in steps)


def test_a_long_run_of_skipped_steps_stops_early(tmp_path, capsys, monkeypatch,
                                                 no_matplotlib):
    _nan_batches(monkeypatch)
    out = tmp_path / "r"
    code, err = _exit_code(["train", *TINY, "--steps", "100000", "--eval-every", "50000",
                            "--out", str(out)], capsys)
    assert code == 1 and "skipped" in _one_line_error(err)
    n = sum('"type": "step"' in ln for ln in open(out / "metrics.jsonl"))
    assert n == cli.STOP_AFTER_SKIPPED


def test_many_skipped_steps_warn(tmp_path, capsys, monkeypatch, no_matplotlib):
    _nan_batches(monkeypatch, every=3)
    code, text, err = _run(["train", *TINY, "--steps", "12", "--out", str(tmp_path / "r")],
                           capsys)
    assert code == 0
    assert "warning:" in err and "skipped" in err
    assert "skipped (non-finite) 4" in text


def test_resume_drops_an_incomplete_last_metrics_line(tmp_path, capsys, no_matplotlib):
    extra = [*TINY, "--no-stop", "--dtype", "float64"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert cli.main(["train", *extra, "--steps", "20", "--out", a]) == 0
    assert cli.main(["train", *extra, "--steps", "10", "--out", b]) == 0
    with open(os.path.join(b, "metrics.jsonl"), "a") as f:
        f.write('{"type": "step", "step": 11, "loss": 0.2')       # a crash mid-write
    assert cli.main(["train", "--resume", b, "--steps", "20", "--progress", "log"]) == 0
    _assert_same_run(a, b)
    for line in open(os.path.join(b, "metrics.jsonl")):
        json.loads(line)
    assert cli.read_metrics(b)["steps"]["step"].tolist() == list(range(1, 21))


def test_plot_reads_metrics_with_an_incomplete_last_line(tmp_path, capsys, no_matplotlib):
    out = str(tmp_path / "r")
    cli.main(["train", *TINY, "--steps", "3", "--out", out])
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"type": "st')
    assert cli.read_metrics(out)["steps"]["step"].tolist() == [1, 2, 3]


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path, capsys, no_matplotlib):
    a, b, c = str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c")
    cli.main(["train", *TINY, "--steps", "3", "--out", a])
    cli.main(["train", *TINY, "--steps", "3", "--task", "memorization", "--T", "3",
              "--out", b])
    cli.main(["train", *TINY, "--steps", "3", "--hidden", "5", "--out", c])
    capsys.readouterr()
    shutil.copy(os.path.join(b, "checkpoint.npz"), os.path.join(a, "checkpoint.npz"))
    code, err = _exit_code(["train", "--resume", a, "--steps", "6"], capsys)
    line = _one_line_error(err)
    assert code == 2 and "task" in line and "memorization" in line and "adding" in line
    shutil.copy(os.path.join(c, "checkpoint.npz"), os.path.join(a, "checkpoint.npz"))
    code, err = _exit_code(["train", "--resume", a, "--steps", "6"], capsys)
    line = _one_line_error(err)
    assert code == 2 and "hidden" in line


def test_resume_refuses_a_model_that_does_not_match_its_configuration(
        tmp_path, capsys, no_matplotlib):
    a = str(tmp_path / "a")
    cli.main(["train", *TINY, "--steps", "3", "--out", a])
    ck = fr.load(a)
    ex = dict(ck.extra, config=dict(ck.extra["config"], hidden=7))
    fr.save(os.path.join(a, "checkpoint.npz"), ck.model, ck.step, train_step=ck.train_step,
            extra=ex)
    code, err = _exit_code(["train", "--resume", a, "--steps", "6"], capsys)
    assert code == 2 and "hidden" in _one_line_error(err)


@pytest.fixture
def not_checkpoints(tmp_path):
    model = fr.SequenceModel(fr.LSTM(3, 4, seed=0), 3)
    fr.save(tmp_path / "good.npz", model)
    data = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "text.txt").write_text("just some text\n" * 10)
    np.savez(tmp_path / "foreign.npz", a=np.zeros(3))
    (tmp_path / "cut.npz").write_bytes(data[:len(data) // 3])
    return [str(tmp_path / n) for n in ("text.txt", "foreign.npz", "cut.npz")]


def test_resume_and_sample_on_a_file_that_is_not_a_checkpoint(not_checkpoints, capsys):
    for path in not_checkpoints:
        code, err = _exit_code(["train", "--resume", path], capsys)
        line = _one_line_error(err)
        assert code == 2 and path in line and "not a fastrnn checkpoint" in line
        assert "pickled" not in line
        code, err = _exit_code(["sample", path], capsys)
        line = _one_line_error(err, "sample")
        assert code == 2 and path in line and "not a fastrnn checkpoint" in line


def test_out_naming_a_file_is_a_one_line_error(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    code, err = _exit_code(["train", *TINY, "--steps", "2", "--out", str(f / "run")], capsys)
    assert code == 1 and str(f) in _one_line_error(err)
    code, err = _exit_code(["train", *TINY, "--steps", "2", "--out", str(f)], capsys)
    assert code == 1 and str(f) in _one_line_error(err)
    assert f.read_text() == "x"


def test_unwritable_directory_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    import errno
    real = os.makedirs

    def denied(path, *a, **k):
        if str(path).startswith(str(tmp_path / "ro")):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *a, **k)
    monkeypatch.setattr(os, "makedirs", denied)
    code, err = _exit_code(["train", *TINY, "--steps", "2", "--out",
                            str(tmp_path / "ro" / "run")], capsys)
    line = _one_line_error(err)
    assert code == 1 and "Permission denied" in line and "ro" in line


def test_disk_full_before_the_first_step_leaves_no_run_directory(tmp_path, capsys,
                                                                 monkeypatch):
    import errno
    real = cli.train.gradient_flow_record

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(cli.train, "gradient_flow_record", full)
    out = tmp_path / "runs" / "r"
    code, err = _exit_code(["train", *TINY, "--steps", "2", "--out", str(out)], capsys)
    assert code == 1 and "No space left on device" in _one_line_error(err)
    assert not (tmp_path / "runs").exists()
    monkeypatch.setattr(cli.train, "gradient_flow_record", real)


def test_disk_full_at_a_checkpoint_is_a_one_line_error(tmp_path, capsys, monkeypatch,
                                                       no_matplotlib):
    import errno
    from fastrnn import checkpoint

    def full(f, arrays):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoint, "_write_arrays", full)
    out = tmp_path / "r"
    code, err = _exit_code(["train", *TINY, "--steps", "6", "--out", str(out)], capsys)
    assert code == 1 and "No space left on device" in _one_line_error(err)
    assert [n for n in os.listdir(out) if n.endswith(".tmp")] == []


def test_unavailable_backend_leaves_no_run_directory(tmp_path, capsys, monkeypatch):
    if fr.available_backends()["cuda"][0]:
        pytest.skip("CUDA is available here")
    monkeypatch.chdir(tmp_path)
    code, err = _exit_code(["train", *TINY, "--backend", "cuda"], capsys)
    assert code == 2 and "cuda" in _one_line_error(err)
    assert os.listdir(tmp_path) == []
    code, err = _exit_code(["compare", "--backend", "cuda", "--T", "5", "--steps", "2",
                            "--progress", "none"], capsys)
    assert code == 2 and "cuda" in _one_line_error(err, "compare")
    assert os.listdir(tmp_path) == []
