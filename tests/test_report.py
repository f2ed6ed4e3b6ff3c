"""benchmarks/report.py on a small synthetic pytest-benchmark JSON: the
tables and the share of the GEMM peak (the numbers are made up here; the
real ones come from `pytest benchmarks/`)."""
import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _report():
    spec = importlib.util.spec_from_file_location(
        "report", os.path.join(ROOT, "benchmarks", "report.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _bench(name, median, **info):
    return {"name": name, "stats": {"median": median}, "extra_info": info,
            "params": {}}


def test_tables_and_gemm_peak_share(tmp_path, capsys):
    report = _report()
    flops = report.step_flops("lstm", 64, 512)
    # 2*T*B*G*H*(2I + 3H) + 6*T*B*H*O with T=100, I=32, O=10
    assert flops == 2 * 100 * 64 * 4 * 512 * (64 + 1536) + 6 * 100 * 64 * 512 * 10
    data = {"machine_info": {}, "commit_info": {}, "datetime": "now", "benchmarks": [
        _bench("test_sgemm_peak", 2 * 2048 ** 3 / 200e9, kind="gemm_peak", n=2048,
               flops=2 * 2048 ** 3),
        _bench("x", flops / 100e9, cell="lstm", backend="numba", B=64, H=512),
        _bench("y", flops / 50e9, cell="lstm", backend="torch", B=64, H=512),
    ]}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    assert report.main([str(path), "--out", str(tmp_path / "r.md"), "--plot",
                        str(tmp_path / "r.png")]) == 0
    text = capsys.readouterr().out
    assert "fp32 GEMM peak of this run (numpy sgemm n=2048): 200 GFLOP/s" in text
    assert "lstm B=64 H=512 numba: 100 GFLOP/s, 50% of the sgemm peak" in text
    assert "| 64 | 512 |" in text and "2.00×" in text   # numba vs torch
