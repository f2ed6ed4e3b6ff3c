"""benchmarks/gpu_bench.py, what can be checked without a GPU: the report
pieces, and (under numba's CUDA simulator, .ci/cuda_sim.sh) a run end to
end on tiny shapes. Run with ``pytest benchmarks/test_gpu_bench.py``."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_bench as gb  # noqa: E402

import fastrnn as fr  # noqa: E402
from fastrnn.backends.cuda import SIM  # noqa: E402 (imports without numba-cuda)

CUDA_OK = fr.available_backends()["cuda"][0]


def test_gpu_bench_report_pieces():
    assert gb.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert gb.results_path("NVIDIA H200", "/r") == "/r/gpu_nvidia-h200.json"
    assert gb.meets_target(4, 512, 1.0) and not gb.meets_target(4, 512, 0.99)
    assert gb.meets_target(16, 128, 0.5) and not gb.meets_target(4, 1024, 0.49)
    res = [dict(cell="lstm", B=1, H=128, ratio=2.0, fastrnn_ms=1.0, torch_ms=2.0),
           dict(cell="lstm", B=64, H=1024, ratio=0.4, fastrnn_ms=5.0, torch_ms=2.0),
           dict(cell="lstm", B=1, H=1024, status="check failed")]
    table = gb.ratio_table(res)
    assert "| 1 | 2 (1 / 2) | check failed |" in table
    assert "| 64 |  | 0.4 (!) (5 / 2) |" in table
    assert "Targets met: 1/2" in table
    ok, _ = gb.check(1.0, {"w": np.ones(2)},
                     {"loss": 1.0, "w0": {"w": np.zeros(2)}, "w1": {"w": np.ones(2)}})
    assert ok
    bad, details = gb.check(1.0, {"w": np.array([1.0, 1.01])},
                            {"loss": 1.0, "w0": {"w": np.zeros(2)},
                             "w1": {"w": np.ones(2)}})
    assert not bad and details["failed"] == ["w"]
    settings = {k: 1 for k in gb.SAME_SETTINGS}
    old = {"gpu": "g", "settings": settings, "results": [
        dict(cell="lstm", B=1, H=128, T=100, ratio=1.0),
        dict(cell="rnn", B=4, H=128, T=100, ratio=2.0)]}
    new = {"gpu": "g", "settings": settings, "results": [
        dict(cell="lstm", B=1, H=128, T=100, ratio=3.0)]}
    assert [(r["cell"], r["ratio"]) for r in gb.merge(old, new)] == [("rnn", 2.0),
                                                                     ("lstm", 3.0)]
    assert gb.merge(old, dict(new, settings=dict(settings, path="step"))) == new["results"]


@pytest.mark.skipif(not (CUDA_OK and SIM), reason="needs the cuda backend under "
                    "numba's CUDA simulator (the GPU run is the real benchmark)")
def test_gpu_bench_runs_end_to_end_in_the_simulator(tmp_path, capsys):
    """Checks against the reference, timing, JSON and table on tiny shapes,
    with torch on the CPU (under the simulator the times mean nothing)."""
    pytest.importorskip("torch")
    import json

    out = tmp_path / "gpu.json"
    rc = gb.main(["--batches", "2", "--hiddens", "3", "--T", "3", "--steps", "1",
                  "--warmup", "0", "--torch-device", "cpu", "--out", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["gpu"] == "simulator" and doc["simulator"]
    assert [(r["cell"], r["B"], r["H"]) for r in doc["results"]] == [
        ("rnn", 2, 3), ("lstm", 2, 3)]
    for r in doc["results"]:
        assert r["check"]["fastrnn"]["passed"] and r["check"]["torch"]["passed"]
        assert r["ratio"] > 0 and r["path"].startswith("persistent")
    assert "speed-up over cuDNN" in capsys.readouterr().out
