"""docs/make_docs.py, the script behind every number and picture of
docs/main_job.md: its quick mode (tiny settings) reruns every command and
rewrites every generated block of a copy of the page, recording the commit
and the machine; it refuses to put quick numbers in the real page."""
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "docs", "make_docs.py")
PAGE = os.path.join(ROOT, "docs", "main_job.md")
BLOCK = re.compile(r"<!-- make_docs: ([\w-]+) -->\n(.*?)<!-- /make_docs -->", re.S)


def _run(*args, cwd):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=1200)


def test_quick_mode_rewrites_every_block_of_a_copy(tmp_path):
    page = tmp_path / "main_job.md"
    shutil.copy(PAGE, page)
    before = dict(BLOCK.findall(page.read_text()))
    assert {"machine", "train", "seeds", "compare", "compare-story", "tasks", "char",
            "bench"} <= set(before)
    p = _run("--quick", "--doc", str(page), "--work", str(tmp_path / "work"), cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    after = dict(BLOCK.findall(page.read_text()))
    assert set(after) == set(before)
    for name in before:
        assert after[name] != before[name], f"block {name!r} not rewritten"
    assert "Quick mode" in after["machine"] and "cores" in after["machine"]
    assert re.search(r"at commit \w+", after["machine"])
    assert "$ fastrnn train --T 10" in after["train"]
    assert "$ fastrnn sample runs/char-licenses" in after["char"]
    assert "$ fastrnn backends" in after["bench"] and "loss = reference" in after["bench"]
    assert len(re.findall(r"^\| \d ", after["seeds"], re.M)) == 2
    assert after["compare-story"].count("\n| ") == 6     # the header and 5 models
    assert str(tmp_path) not in page.read_text(), "scratch paths leaked into the page"
    # the prose outside the blocks is untouched
    assert BLOCK.sub("", page.read_text()) == BLOCK.sub("", open(PAGE).read())
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "train_default.png").stat().st_size > 0
    assert (tmp_path / "compare_adding_T100.png").stat().st_size > 0


def test_quick_mode_refuses_the_real_page(tmp_path):
    p = _run("--quick", cwd=tmp_path)
    assert p.returncode == 2 and "--doc" in p.stderr
