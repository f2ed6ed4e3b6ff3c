"""fastrnn without numba (and without the C extension): `import fastrnn`
works, numba is reported unavailable with its reason, backend="auto" falls
back numba -> c -> numpy, and a training step runs. Each case runs in a
fresh interpreter in which importing numba fails, as on a platform without
llvmlite wheels."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

import fastrnn as fr

# Run in the child before anything else: a meta-path hook makes every
# import of the blocked top-level names fail like a missing package.
CHILD = textwrap.dedent("""
    import json, sys
    BLOCKED = {blocked!r}

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name in BLOCKED or name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}} "
                                          "(blocked by tests/test_fallback.py)",
                                          name=name)
            return None

    for m in [m for m in sys.modules if m in BLOCKED or m.split(".")[0] in BLOCKED]:
        del sys.modules[m]
    sys.meta_path.insert(0, Block())

    import numpy as np
    import fastrnn as fr

    avail = fr.available_backends()
    out = {{"avail": {{k: list(v) for k, v in avail.items()}}}}
    core = fr.RNN(3, 5, seed=0)                      # backend="auto"
    lstm = fr.LSTM(3, 5, seed=0)
    out["auto"] = [core.backend, lstm.backend]
    step = fr.TrainStep(fr.SequenceModel(core, 4), fr.Adam(0.01),
                        clip=fr.ClipNorm(1.0))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 2, 3))
    y = rng.integers(0, 4, (6, 2))
    losses = [step(x, y).loss for _ in range(3)]
    out["losses"] = losses
    try:
        fr.RNN(3, 5, backend="numba")
        out["numba_error"] = None
    except RuntimeError as e:
        out["numba_error"] = str(e)
    out["numba_imported"] = [m for m in sys.modules
                             if m == "numba" or m.startswith("numba.")]
    print(json.dumps(out))
""")


def _run(blocked, tmp_path):
    env = dict(os.environ)
    # the child imports the fastrnn this process imported (installed or
    # source tree), never another one from its working directory
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(fr.__file__)))]
        + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    r = subprocess.run([sys.executable, "-c", CHILD.format(blocked=blocked)],
                       capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=300)
    assert r.returncode == 0, f"child failed:\n{r.stdout}\n{r.stderr}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_import_and_train_without_numba(tmp_path):
    out = _run(["numba", "llvmlite"], tmp_path)
    ok, why = out["avail"]["numba"]
    assert ok is False
    assert "numba" in why and why.strip()
    assert out["numba_imported"] == [], "something imported numba anyway"
    assert out["numba_error"] and "not available" in out["numba_error"]
    c_ok = fr.available_backends()["c"][0]   # as built in this installation
    assert out["avail"]["c"][0] == c_ok
    expected = "c" if c_ok else "numpy"
    assert out["auto"] == [expected, expected]
    assert out["avail"]["numpy"][0] is True
    losses = out["losses"]
    assert all(l == l and abs(l) < float("inf") for l in losses)   # finite
    assert losses[-1] < losses[0]


def test_import_and_train_without_numba_and_c_extension(tmp_path):
    out = _run(["numba", "llvmlite", "fastrnn._cfused"], tmp_path)
    assert out["avail"]["numba"][0] is False
    ok, why = out["avail"]["c"]
    assert ok is False
    assert "fastrnn._cfused was not built" in why
    assert out["auto"] == ["numpy", "numpy"]
    losses = out["losses"]
    assert all(l == l and abs(l) < float("inf") for l in losses)
    assert losses[-1] < losses[0]


@pytest.mark.skipif(not fr.available_backends()["numba"][0],
                    reason="numba is not available here")
def test_auto_prefers_numba_when_it_imports():
    assert fr.RNN(3, 4).backend == "numba"
