"""The benchmark tool itself (dpo_fast.bench): reading results, the table, the peer ratios,
--compare, the results folder, and the CPU peak-memory measurement. Synthetic JSON only:
no benchmark is run here."""
import copy
import json

import pytest
import torch

from dpo_fast import bench


def _bench(name, bench_name, provider, median, *, tokens=1024, hidden=256, vocab=8000, flops=True, peak=None,
           series=("tokens",)):
    info = {"bench": bench_name, "provider": provider, "shape": "llama3-8b/16", "tokens": tokens, "hidden": hidden,
            "vocab": vocab, "dtype": "float32", "series": list(series), "peak_bytes": peak,
            "ceiling_tflops": 0.2, "ceiling": {"shape": [tokens, hidden, vocab], "dtype": "float32",
                                                "median_s": 0.01, "tflops": 0.2}}
    if flops:
        info["flops"] = 8 * tokens * hidden * vocab
    return {"name": name, "fullname": f"benchmarks/test_x.py::{name}", "group": bench_name,
            "extra_info": info, "stats": {"median": median, "rounds": 5}}


def _data():
    fb = "linear_logprobs.fwd_bwd"
    return {"benchmarks": [
        _bench("t[llama-N1024-dpo_fast-torch]", fb, "dpo_fast-torch", 0.050, peak=10 << 20),
        _bench("t[llama-N1024-oracle]", fb, "oracle", 0.100, peak=100 << 20),
        _bench("t[llama-N1024-trl-chunked]", fb, "trl-chunked", 0.080, peak=20 << 20),
        _bench("t[llama-N2048-dpo_fast-torch]", fb, "dpo_fast-torch", 0.100, tokens=2048, peak=12 << 20),
        _bench("t[llama-N2048-oracle]", fb, "oracle", 0.150, tokens=2048, peak=200 << 20),
        _bench("e[pairs-dpo_fast]", "epilogue.dpo_loss", "dpo_fast", 1e-4, hidden=None, vocab=None, flops=False),
    ]}


def test_load_rows_computes_throughput_and_ceiling_share():
    rows = {r["name"]: r for r in bench.load_rows(_data())}
    r = rows["benchmarks/test_x.py::t[llama-N1024-oracle]"]
    assert r["tflops"] == pytest.approx(8 * 1024 * 256 * 8000 / 0.1 / 1e12)
    assert r["pct_ceiling"] == pytest.approx(100 * r["tflops"] / 0.2)
    e = rows["benchmarks/test_x.py::e[pairs-dpo_fast]"]
    assert e["tflops"] is None and e["pct_ceiling"] is None


def test_peer_ratio_is_against_the_fastest_non_dpo_fast_provider_of_the_same_shape():
    rows = {r["name"].split("::")[1]: r for r in bench.add_peer_ratios(bench.load_rows(_data()))}
    assert rows["t[llama-N1024-dpo_fast-torch]"]["vs_best_peer"] == pytest.approx(0.050 / 0.080)
    assert rows["t[llama-N1024-oracle]"]["vs_best_peer"] == pytest.approx(0.100 / 0.080)
    assert rows["t[llama-N2048-dpo_fast-torch]"]["vs_best_peer"] == pytest.approx(0.100 / 0.150)
    assert rows["e[pairs-dpo_fast]"]["vs_best_peer"] is None  # no peer measured


def test_markdown_table_lists_every_row_fastest_first_and_the_skips():
    skips = [{"nodeid": "x", "provider": "cce", "reason": "needs a CUDA device"},
             {"nodeid": "y", "provider": "cce", "reason": "needs a CUDA device"}]
    md = bench.markdown_table(bench.load_rows(_data()), skips)
    assert "### linear_logprobs: forward + backward" in md
    assert "### loss epilogue: dpo_loss" in md
    lines = [ln for ln in md.splitlines() if ln.startswith("| llama3-8b/16 | 1024 | 256 × 8000")]
    assert [ln.split("|")[5].strip() for ln in lines] == ["**dpo_fast-torch**", "trl-chunked", "oracle"]
    assert "50.00 ms" in lines[0] and "0.62×" in lines[0] and "| 10 MiB |" in lines[0]
    assert md.count("| cce | needs a CUDA device |") == 1  # deduplicated


def test_compare_flags_time_and_memory_regressions_only_above_threshold():
    old = _data()
    new = copy.deepcopy(old)
    new["benchmarks"][0]["stats"]["median"] = 0.060   # +20%: regression
    new["benchmarks"][1]["stats"]["median"] = 0.105   # +5%: within 10%
    new["benchmarks"][2]["extra_info"]["peak_bytes"] = 40 << 20  # memory doubled
    new["benchmarks"][3]["stats"]["median"] = 0.050   # faster: fine
    lines, regs = bench.compare(old, new, threshold=0.10)
    found = {(r["name"].split("::")[1], r["metric"]) for r in regs}
    assert found == {("t[llama-N1024-dpo_fast-torch]", "time"), ("t[llama-N1024-trl-chunked]", "memory")}
    assert "2 regression(s)" in lines[-1]
    _, none = bench.compare(old, old)
    assert none == []


def test_compare_cli_exit_code(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_data()))
    slower = _data()
    for x in slower["benchmarks"]:
        x["stats"]["median"] *= 2
    b.write_text(json.dumps(slower))
    assert bench.main(["--compare", str(a), str(a)]) == 0
    assert bench.main(["--compare", str(a), str(b)]) == 1
    assert "REGRESSION (time)" in capsys.readouterr().out


def test_cli_registers_bench_subcommand():
    from dpo_fast.cli import build_parser

    args = build_parser().parse_args(["bench", "--compare", "a.json", "b.json", "--threshold", "0.2"])
    assert args.compare == ["a.json", "b.json"] and args.threshold == 0.2


def test_write_report_makes_table_snippet_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    data = _data()
    for b in data["benchmarks"][:3]:
        b["extra_info"]["series"] = ["tokens", "vocab"]
    (tmp_path / "results.json").write_text(json.dumps(data))
    (tmp_path / "environment.json").write_text(json.dumps({"device": "test cpu", "device_type": "cpu",
                                                           "torch": "x", "date": "2026-11-25T00:00:00"}))
    bench.write_report(tmp_path)
    table = (tmp_path / "table.md").read_text()
    assert "CPU figures" in table and "do not edit by hand" in table and "test cpu" in table
    snippet = (tmp_path / "README-snippet.md").read_text()
    assert "These are CPU figures" in snippet and "GPU figures are still to be measured" in snippet
    assert (tmp_path / "time_vs_tokens.png").stat().st_size > 1000
    assert (tmp_path / "memory_vs_vocab.png").stat().st_size > 1000
    env = json.loads((tmp_path / "environment.json").read_text())
    assert env["matmul_ceilings"]


def test_cpu_peak_memory_counts_what_a_call_allocates():
    from dpo_fast.memory import rss_peak_supported

    if not rss_peak_supported():
        pytest.skip("no /proc/self/clear_refs: peak RSS cannot be reset here")

    def three_buffers():
        a = torch.ones(4 << 20)  # 16 MiB each
        b = torch.ones(4 << 20)
        return a + b

    for _ in range(3):  # freed blocks now sit in the heap; the trim must not let them hide
        three_buffers()
    peak, method = bench.peak_memory(three_buffers, "cpu")
    assert "VmHWM" in method
    assert 44 << 20 <= peak <= 60 << 20


def test_packing_table_reports_tokens_speedup_and_losses():
    def row(provider, median, trunk, real, loss):
        b = _bench(f"p[{provider}]", "packing_step", provider, median, flops=False, peak=5 << 20)
        b["extra_info"].update(trunk_tokens_per_pair=trunk, real_tokens_per_pair=real, first_step_loss=loss, pairs=8)
        return b

    data = {"benchmarks": [row("trl-padded", 2.0, 1200.0, 800.0, 0.7012345), row("dpo_fast-padded", 1.0, 1200.0, 800.0,
                                                                             0.7012345),
                           row("dpo_fast-packed", 0.5, 600.0, 590.0, 0.7012346)]}
    md = bench.markdown_table(bench.load_rows(data))
    assert "### DPO step with shared prompts and packing" in md
    lines = [ln for ln in md.splitlines() if ln.startswith("| ") and "padded" in ln or "packed" in ln]
    packed = next(ln for ln in lines if "dpo_fast-packed" in ln)
    assert "| 600 |" in packed and "2.00×" in packed and "-50%" in packed and "16.00" in packed
    assert "0.7012346" in packed
    assert "0.50×" in next(ln for ln in lines if "trl-padded" in ln)
    assert "packing" in bench.SUITES and bench.SUITES["packing"] == "test_packing_step.py"
