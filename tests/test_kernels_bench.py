"""`ripple bench kernels` writes the figures it promises (on a tiny model: checks shape, not speed)."""
import json

from ripple.android_host.cli import main


def test_bench_kernels_writes_rows_headline_ratios_and_a_plot(random_llama_dir, tmp_path, capsys):
    out = tmp_path / "k.json"
    assert main(["bench", "kernels", "--model", str(random_llama_dir), "--fractions", "0.2", "1.0",
                 "--repeat", "3", "--db", str(tmp_path / "none.json"), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert (tmp_path / "k.png").stat().st_size > 0
    variants = {r["variant"] for r in res["rows"]}
    assert variants == {"tvm-sparse-fp16-default", "tvm-sparse-int8-default", "torch-fp16",
                        "torch-f32", "tvm-dense-fp16"}      # no tuned rows: the database is empty
    tvm_rows = [r for r in res["rows"] if r["variant"].startswith("tvm")]
    assert all(r["max_rel_err"] < 1e-4 for r in tvm_rows)
    assert all(r["roofline_ratio"] == r["us"] / r["roofline_us"] for r in res["rows"])
    at20 = min(r["us"] for r in tvm_rows if r["fraction"] == 0.2 and "sparse" in r["variant"])
    assert res["ratio_20pct_vs_dense"] == at20 / res["dense_us"]
    assert res["dram_read_GBps"] > 0 and "roofline_ratio_20pct" in res
    assert "20% active" in capsys.readouterr().out
