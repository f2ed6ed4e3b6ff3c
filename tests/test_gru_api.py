"""fr.GRU / fr.GRUCell as an API: the README's example runs, backend
resolution (a backend without the cell refuses it by name; "auto" skips
it), argument validation, shapes and dtypes of what comes back."""
import os
import re

import numpy as np
import pytest

import fastrnn as fr
from fastrnn import backends


def test_readme_gru_example_runs():
    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "README.md")
    text = open(readme, encoding="utf-8").read()
    section = text[text.index("A GRU trained the same way"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    env = {"np": np, "fr": fr}
    exec(compile(code, "README.md", "exec"), env)
    assert isinstance(env["model"].core, fr.GRU)
    assert np.isfinite(env["res"].loss) and env["res"].hx.shape == (2, 16, 64)


def test_backend_resolution_for_the_gru(monkeypatch):
    """Every backend has the GRU; a backend listed as lacking a cell refuses
    it by name and "auto" passes over it (the rule for cells that reach the
    backends one at a time)."""
    assert all(backends.supports(n, "gru") for n in backends.NAMES)
    assert backends.supports(fr.GRU(2, 3).backend, "gru")
    first = backends.resolve("auto")
    monkeypatch.setitem(backends._LACKS, first, ("gru",))
    with pytest.raises(RuntimeError, match=f"{first}.*GRU"):
        fr.GRU(2, 3, backend=first)
    with pytest.raises(RuntimeError, match="GRU"):
        fr.GRUCell(2, 3, backend=first)
    assert fr.GRU(2, 3).backend != first
    assert fr.LSTM(2, 3).backend == first


@pytest.mark.parametrize("bad,exc", [("0.1", TypeError), (True, TypeError),
                                     (-0.1, ValueError), (0.2, NotImplementedError)])
def test_dropout_is_checked(bad, exc):
    with pytest.raises(exc, match="dropout"):
        fr.GRU(2, 3, 2, dropout=bad, backend="numpy")


def test_shapes_and_state():
    g = fr.GRU(3, 4, 2, batch_first=True, bidirectional=True, dtype=np.float64,
               backend="numpy")
    out, h = g(np.zeros((5, 7, 3)))
    assert out.shape == (5, 7, 8) and h.shape == (4, 5, 4) and h.dtype == np.float64
    with pytest.raises(ValueError, match="hx"):
        g(np.zeros((5, 7, 3)), np.zeros((4, 5, 3)))
    assert sorted(g.state_dict()) == sorted(
        f"{w}_{k}_l{l}{r}" for w in ("weight", "bias") for k in ("ih", "hh")
        for l in range(2) for r in ("", "_reverse"))
    assert g.state_dict()["weight_ih_l1"].shape == (12, 8)
    c = fr.GRUCell(3, 4, bias=False, backend="numpy")
    assert c(np.zeros(3, np.float32)).shape == (4,)
    assert sorted(c.state_dict()) == ["weight_hh", "weight_ih"]
