"""The benchmark's summaries, tables and plots from per-seed rows (no runs)."""

from __future__ import annotations

import pytest

from qd_app.bench import SUITES, markdown, plot, summarise


def row(seconds: float, forget: float, retain: float) -> dict:
    split = {"forget-accuracy": forget, "retain-accuracy": retain}
    request = {"label": "class 9", "seconds": seconds, "before": {"forget-accuracy": 0.98, "retain-accuracy": 0.98},
               "after-unlearn": split, "after-recover": split}
    return {"seconds": seconds, "forget": forget, "retain": retain, "sample-gradients": 100, "bytes": 2e6,
            "after": {"unlearn": split, "recover": split}, "mia": 0.01, "requests": [request]}


def seeds() -> list[dict]:
    return [
        {"seed": seed, "train-seconds": 600.0, "train-accuracy": 0.98, "federaser-bytes": 0, "store-bytes": [10, 20],
         "methods": {"retrain": row(retrain, 0.0, 0.98), "quickdrop": row(quick, 0.01, 0.97)}}
        for seed, retrain, quick in ((0, 300.0, 2.0), (1, 500.0, 2.5))
    ]


def test_summary_gives_mean_and_spread_over_seeds_and_speedups_per_seed():
    summary = summarise(seeds(), ("retrain", "quickdrop"))
    assert summary["retrain"]["seconds"] == (400.0, 100.0)
    assert summary["retrain"]["quickdrop-speedup"] == (pytest.approx(175.0), pytest.approx(25.0))  # 150x and 200x
    assert summary["quickdrop"]["forget"] == (0.01, 0.0)
    assert summary["quickdrop"]["mia"] == (0.01, 0.0)


def test_markdown_table_and_plot(tmp_path):
    suite = SUITES["class-level"]
    report = {"command": "python -m qd_app.bench class-level", "machine": "test", "seeds": [0, 1],
              "settings": suite.settings,
              "variants": {"": {"seeds": seeds(), "summary": summarise(seeds(), ("retrain", "quickdrop"))}}}
    table = markdown(suite, report)
    assert "| Retrain-Or | 0.00 ± 0.00 % | 0.00 ± 0.00 % | 98.00 ± 0.00 % | 400.00 ± 100.00 | 175.0 ± 25.0x |" in table
    assert "| QuickDrop |" in table and "Command: `python -m qd_app.bench class-level`" in table
    plot(suite, report, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 1000


def test_a_sequence_of_requests_gets_a_table_row_per_request():
    suite = SUITES["sequential"]
    per_seed = seeds()
    for seed in per_seed:
        first = seed["methods"]["quickdrop"]["requests"][0]
        seed["methods"]["quickdrop"]["requests"] = [first, {**first, "label": "class 3", "after-recover": None}]
    report = {"command": "c", "machine": "m", "seeds": [0, 1], "settings": suite.settings,
              "variants": {"": {"seeds": per_seed, "summary": summarise(per_seed, ("retrain", "quickdrop"))}}}
    table = markdown(suite, report)
    assert "QuickDrop, request by request:" in table and "Retrain-Or, request by request:" not in table
    assert "| class 9 | 98.00 ± 0.00 % | 1.00 ± 0.00 % | 1.00 ± 0.00 % | 98.00 ± 0.00 % | 97.00 ± 0.00 % |" in table
    assert "| class 3 | 98.00 ± 0.00 % | 1.00 ± 0.00 % | — | 98.00 ± 0.00 % | — |" in table
