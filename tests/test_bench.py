"""The benchmark's summaries, tables and plots from per-seed rows (no runs)."""

from __future__ import annotations

import argparse
import tomllib
from dataclasses import replace

import pytest

from qd_app.bench import __main__ as bench_main
from qd_app.bench.plots import plot
from qd_app.bench.report import client_misses, markdown, summarise
from qd_app.bench.runner import method_row, target_requests
from qd_app.bench.suites import SUITES
from qd_app.deploy.processes import PROJECT, staged_app


def row(seconds: float, forget: float, retain: float) -> dict:
    split = {"forget-accuracy": forget, "retain-accuracy": retain}
    request = {"label": "class 9", "seconds": seconds, "before": {"forget-accuracy": 0.98, "retain-accuracy": 0.98},
               "after-unlearn": split, "after-recover": split}
    return {"seconds": seconds, "forget": forget, "retain": retain, "sample-gradients": 100, "bytes": 2e6,
            "compute-seconds": seconds / 2,
            "after": {"unlearn": split, "recover": split}, "mia": 0.01, "requests": [request]}


def seeds() -> list[dict]:
    return [
        {"seed": seed, "train-seconds": 600.0, "train-accuracy": 0.98, "federaser-bytes": 0, "store-bytes": [10, 20],
         "train-compute-seconds": 1000.0, "train-distill-seconds": distill,
         "methods": {"retrain": row(retrain, 0.0, 0.98), "quickdrop": row(quick, 0.01, 0.97)}}
        for seed, retrain, quick, distill in ((0, 300.0, 2.0, 400.0), (1, 500.0, 2.5, 600.0))
    ]


def report_of(suite, variants: dict) -> dict:
    """A report of two seeds with these variants' results."""
    return {"command": "c", "machine": "m", "seeds": [0, 1], "settings": suite.settings, "variants": variants}


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
    assert "| MIA on forget set | ToW | KL vs Retrain-Or |" in table
    plot(suite, report, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 1000


def test_a_sequence_of_requests_gets_a_table_row_per_request_and_a_plot_of_every_class(tmp_path):
    suite = SUITES["sequential"]
    per_seed = seeds()
    rounds = [{"round": r, "stage": stage, "accuracy": 0.9, "class-accuracy": [0.9] * 10}
              for r, stage in enumerate(["train", "train", "unlearn", "recover"])]
    for seed in per_seed:
        first = seed["methods"]["quickdrop"]["requests"][0]
        seed["methods"]["quickdrop"]["requests"] = [first, {**first, "label": "class 3", "after-recover": None}]
        for row_of_method in seed["methods"].values():
            row_of_method["rounds"] = rounds
    report = {"command": "c", "machine": "m", "seeds": [0, 1], "settings": suite.settings,
              "variants": {"": {"seeds": per_seed, "summary": summarise(per_seed, ("retrain", "quickdrop"))}}}
    table = markdown(suite, report)
    assert "QuickDrop, request by request:" in table and "Retrain-Or, request by request:" not in table
    assert "| class 9 | 98.00 ± 0.00 % | 1.00 ± 0.00 % | 1.00 ± 0.00 % | 98.00 ± 0.00 % | 97.00 ± 0.00 % |" in table
    assert "| class 3 | 98.00 ± 0.00 % | 1.00 ± 0.00 % | — | 98.00 ± 0.00 % | — |" in table
    plot(suite, report, tmp_path / "sequence.png")
    assert (tmp_path / "sequence.png").stat().st_size > 1000


def test_a_sweep_gets_a_table_row_per_variant(tmp_path):
    suite = SUITES["scale"]
    assert [v["scale"] for v in suite.variants.values()] == [1, 10, 50, 100, 200, 1000]
    variants = {}
    for variant in ("s=1", "s=100"):
        per_seed = [{**seed, "methods": {"quickdrop": seed["methods"]["quickdrop"]}} for seed in seeds()]
        variants[variant] = {"seeds": per_seed, "summary": summarise(per_seed, ("quickdrop",))}
    report = report_of(suite, variants)
    table = markdown(suite, report)
    # distillation 400 and 600 of 1000 s: 40 % and 60 %; QuickDrop 2.0 and 2.5 s, half of it client compute
    expected = ("| 98.00 ± 0.00 % | 600.0 ± 0.0 | 1000.0 ± 0.0 | 500.0 ± 100.0 | 50.0 ± 10.0 % | 0.00 ± 0.00 | "
                "1.00 ± 0.00 % | 1.00 ± 0.00 % | 97.00 ± 0.00 % | 2.25 ± 0.25 | 1.12 ± 0.12 |")
    assert f"| s=1 {expected}" in table and f"| s=100 {expected}" in table
    plot(suite, report, tmp_path / "scale.png")
    assert (tmp_path / "scale.png").stat().st_size > 1000


def test_the_overhead_suite_reports_training_only(tmp_path):
    suite = SUITES["overhead"]
    assert suite.methods == ()
    per_seed = [{**seed, "methods": {}} for seed in seeds()]
    report = {"command": "c", "machine": "m", "seeds": [0, 1], "settings": suite.settings,
              "variants": {"MNIST": {"seeds": per_seed, "summary": summarise(per_seed, ())}}}
    table = markdown(suite, report)
    assert "| MNIST | 98.00 ± 0.00 % | 600.0 ± 0.0 | 1000.0 ± 0.0 | 500.0 ± 100.0 | 50.0 ± 10.0 % | 0.00 ± 0.00 |\n" in table
    assert "R-Set" not in table
    plot(suite, report, tmp_path / "overhead.png")
    assert (tmp_path / "overhead.png").stat().st_size > 1000


def test_amethod_row_takes_the_relearning_from_its_own_later_run():
    split = {"forget-accuracy": 0.0, "retain-accuracy": 0.97}
    back = {"forget-accuracy": 0.95, "retain-accuracy": 0.97}
    results = {
        "stages": [{"name": "train", "run": 0, "request": None, "sample-gradients": 9, "bytes": 9},
                   {"name": "unlearn", "run": 1, "request": 0, "sample-gradients": 2, "bytes": 5},
                   {"name": "recover", "run": 1, "request": 0, "sample-gradients": 3, "bytes": 5},
                   {"name": "relearn", "run": 2, "request": 1, "sample-gradients": 7, "bytes": 5}],
        "requests": [{"index": 0, "run": 1, "action": "unlearn", "label": "class 9", "total-seconds": 2.0,
                      "seconds": {"unlearn": 0.5, "recover": 1.5}, "samples": {}, "before": back,
                      "after-unlearn": split, "after-recover": split},
                     {"index": 1, "run": 2, "action": "relearn", "label": "class 9", "total-seconds": 4.0,
                      "after-relearn": back}],
    }
    row = method_row(results, relearn=True)
    assert row["seconds"] == 2.0 and row["sample-gradients"] == 5 and row["bytes"] == 10
    assert (row["forget"], row["retain"]) == (0.0, 0.97)
    assert row["relearn"] == back and row["relearn-seconds"] == 4.0


def test_the_relearn_suite_adds_the_relearning_table_and_bars(tmp_path):
    suite = SUITES["relearn"]
    per_seed = seeds()
    for seed, (retrain, quick) in zip(per_seed, ((200.0, 4.0), (300.0, 5.0))):
        for method, seconds in (("retrain", retrain), ("quickdrop", quick)):
            del seed["methods"][method]["mia"]
            seed["methods"][method].update(relearn={"forget-accuracy": 0.95, "retain-accuracy": 0.97},
                                           **{"relearn-seconds": seconds})
    report = {"command": "c", "machine": "m", "seeds": [0, 1], "settings": suite.settings,
              "variants": {"": {"seeds": per_seed, "summary": summarise(per_seed, ("retrain", "quickdrop"))}}}
    table = markdown(suite, report)
    # Retrain-Or relearns in 200 and 300 s, QuickDrop in 4 and 5 s: 50x and 60x
    assert "| Retrain-Or | 95.00 ± 0.00 % | 97.00 ± 0.00 % | 250.00 ± 50.00 | 55.0 ± 5.0x |" in table
    assert "| QuickDrop | 95.00 ± 0.00 % | 97.00 ± 0.00 % | 4.50 ± 0.50 | 1.0 ± 0.0x |" in table
    assert "MIA on forget set" not in table  # the relearned models carry no unlearning metrics
    plot(suite, report, tmp_path / "relearn.png")
    assert (tmp_path / "relearn.png").stat().st_size > 1000


def test_client_targets_are_named_by_partition_size_and_class_targets_by_class():
    from qd_app.config import RunConfig
    from qd_app.core.data import partition_indices

    suite = SUITES["client-level"]
    config = RunConfig.from_run_config({**suite.settings, "seed": 0})
    sizes = [len(part) for part in partition_indices(config, suite.clients)]
    targets = target_requests(suite, config)
    assert list(targets) == ["largest client", "median client", "smallest client"]
    clients = {name: int(request["forget-client"]) for name, (_, request) in targets.items()}
    assert sizes[clients["largest client"]] == max(sizes) and sizes[clients["smallest client"]] == min(sizes)
    assert sorted(sizes).index(sizes[clients["median client"]]) == len(sizes) // 2
    label, request = targets["largest client"]
    assert label == f"client {clients['largest client']} ({max(sizes)} samples)" and request["forget-class"] == ""
    classes = target_requests(SUITES["class-level"], config)
    assert {name: request["forget-class"] for name, (_, request) in classes.items()} == {
        "class 0": "0", "class 3": "3", "class 9": "9"}


def test_per_target_tables_name_each_seeds_target_and_show_the_fit_gap():
    suite = SUITES["client-level"]
    per_seed = seeds()
    for seed, client, retrain_unseen in zip(per_seed, (7, 3), (0.975, 0.90)):
        seed["target"] = f"client {client} (100 samples)"
        for method, gap, unseen in (("retrain", 0.0, retrain_unseen), ("quickdrop", 0.02, 0.98)):
            seed["methods"][method].update({"fit-gap": gap, "mia-gap": 1.5 * gap, "tug-of-war": 1.0,
                                            "kl-vs-retrain": 0.0, "accuracy": {"unseen": unseen}})
        seed["methods"]["quickdrop"]["trained-unseen"] = 0.98
    report = {"command": "c", "machine": "m", "seeds": [0, 1], "settings": suite.settings,
              "variants": {"non-IID, largest client": {"seeds": per_seed,
                                                       "summary": summarise(per_seed, ("retrain", "quickdrop"))}}}
    table = markdown(suite, report)
    assert "### non-IID, largest client\n\nseed 0: client 7 (100 samples); seed 1: client 3 (100 samples)" in table
    assert "| F-Set − test on its classes |" in table and table.count("| 2.00 ± 0.00 % |") == 1
    assert "| MIA − test on its classes |" in table and table.count("| 3.00 ± 0.00 % |") == 1
    # seed 0: retraining loses 0.5 points, so F-Set, MIA and ToW are judged; seed 1: it loses 8 points, so the
    # client's data was irreplaceable and only the fit-gap (2 points here) is judged
    assert ("| 0 | client 7 (100 samples) | 1.00 / 0.00 | 97.00 / 98.00 | 1.00 / 1.00 | 3.00 / 0.00 | 1.000 | 0.50 |"
            in table)
    assert "| 1 | client 3 (100 samples) |" in table and "| 8.00 | 2.00 / 0.00 | 200x | met |" in table


def test_the_client_bar_judges_membership_by_the_mia_gap_where_the_report_has_it():
    def client(mia: float, **metrics) -> dict:
        return {"retain": 0.98, "seconds": 1.0, "forget": 0.98, "tug-of-war": 1.0, "fit-gap": 0.0, "mia": mia,
                "accuracy": {"unseen": 0.97}, "trained-unseen": 0.97, **metrics}

    quickdrop, retrain = client(0.30, **{"mia-gap": 0.02}), client(0.20, **{"mia-gap": -0.01}, seconds=100.0)
    assert client_misses(quickdrop, retrain) == []  # 10 points apart, but as often as unseen images of its classes
    assert client_misses({**quickdrop, "mia-gap": 0.07}, retrain) == ["MIA"]
    quickdrop.pop("mia-gap")  # an older report: the raw rate is judged
    assert client_misses(quickdrop, retrain) == ["MIA"]
    assert client_misses({**quickdrop, "mia": 0.24, "retain": 0.96}, retrain) == ["R-Set"]


def test_the_command_line_refuses_a_method_or_variant_the_suite_does_not_have(capsys):
    from qd_app.bench.__main__ import main

    for argv, message in ((["class-level", "--methods", "retrain,s2u"], "--methods: s2u not in suite class-level"),
                          (["client-level", "--variant", "CIFAR"], "--variant: none of CIFAR in suite client-level")):
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err


def test_the_bench_runs_a_staged_copy_of_exactly_the_apps_files(tmp_path):
    app = staged_app(tmp_path / "app")
    settings = [tomllib.loads((folder / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
                for folder in (app, PROJECT)]
    assert settings[0] == settings[1]
    for name in ("qd_app/server_app.py", "qd_app/server/experiment.py", "presets/paper-mnist.toml"):
        assert (app / name).read_bytes() == (PROJECT / name).read_bytes()
    assert not (app / "tests").exists() and not (app / ".venv").exists() and not (app / ".info").exists()


def test_resume_takes_a_seed_an_earlier_invocation_finished_and_runs_the_others(tmp_path, monkeypatch):
    runs = []

    def run_seed(link, suite, overrides, seed, folder, methods, trainings):
        runs.append(seed)
        folder.mkdir(parents=True, exist_ok=True)
        return {"": {"seed": seed, "methods": {}}}

    monkeypatch.setattr(bench_main, "run_seed", run_seed)
    suite = SUITES["relearn"]
    first, second, third = {}, {}, {}
    assert bench_main._seed_results(None, suite, {}, 0, tmp_path, {}, False, first) == {"": {"seed": 0, "methods": {}}}
    assert bench_main._seed_results(None, suite, {}, 0, tmp_path, {}, True, second)[""]["seed"] == 0
    bench_main._seed_results(None, suite, {}, 1, tmp_path, {}, True, second)
    assert runs == [0, 1] and second["resumed"] == [str(tmp_path / "seed-0.json")]
    other = replace(suite, methods=("retrain",))  # other methods: not the same results
    bench_main._seed_results(None, other, {}, 0, tmp_path, {}, True, third)
    assert runs == [0, 1, 0] and "resumed" not in third


def test_the_profile_times_plain_looped_and_batched_steps(tiny_mnist_dir, capsys):
    from qd_app.bench import profile

    profile.main(["--partition", "1", "--steps", "2", "--repeats", "1", "--data-dir", str(tiny_mnist_dir)])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][2:]
    assert [row.split(" | ")[0][2:] for row in rows] == list(profile.KINDS)
    assert rows[0].endswith("| 0.0 | 0.0 % |") and all(float(row.split(" | ")[1]) > 0 for row in rows)


def test_the_profile_counts_the_synthetic_images_share_of_arithmetic_per_client_and_federation(
        tiny_mnist_dir, capsys):
    from qd_app.bench import profile

    profile.main(["--flops", "--steps", "2", "--data-dir", str(tiny_mnist_dir)])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][2:]
    assert len(rows) == 11 and rows[-1].startswith("| federation")
    shares = [float(cell.rstrip(" %")) for cell in rows[-1].rstrip(" |").split(" | ")[-2:]]
    assert all(0 < share < 100 for share in shares)  # the matching adds arithmetic, never all of it
    plain, looped = (float(rows[0].split(" | ")[index]) for index in (2, 3))
    assert looped > plain > 0


def test_the_training_length_sweep_reports_retrain_or_and_the_speedup_per_length(tmp_path):
    suite = SUITES["training-length"]
    assert [v["num-server-rounds"] for v in suite.variants.values()] == [5, 10, 20, 30]
    report = report_of(suite, {"5 rounds": {"seeds": seeds(), "summary": summarise(seeds(), suite.methods)}})
    table = markdown(suite, report)
    assert "| QuickDrop faster by | Retrain-Or's sample gradients per QuickDrop's |" in table
    # Retrain-Or 300 and 500 s against 2.0 and 2.5 s: 150x and 200x; both rows 100 sample gradients
    assert "| 98.00 ± 0.00 % | 400.0 ± 100.0 | 175.0 ± 25.0x | 1.0 ± 0.0 |" in table
    plot(suite, report, tmp_path / "length.png")
    assert (tmp_path / "length.png").stat().st_size > 1000


def test_the_federation_size_sweep_runs_each_size_and_reports_round_time_and_memory(tmp_path):
    suite = SUITES["federation-size"]
    assert list(suite.variant_clients.values()) == [10, 20, 50, 100]
    assert suite.variants["100 clients, 10 % per round"] == {"fraction-train": 0.1}
    per_seed = [{**seed, "train-round-seconds": 60.0, "client-peak-mb": 900.0, "server-peak-mb": 700.0 + seed["seed"]}
                for seed in seeds()]
    report = report_of(suite, {"20 clients": {"seeds": per_seed, "summary": summarise(per_seed, suite.methods)}})
    table = markdown(suite, report)
    assert "| seconds per training round | a client process's peak (MB) | the server process's peak (MB) |" in table
    assert table.splitlines()[-1].endswith("| 60.0 ± 0.0 | 900.0 ± 0.0 | 700.5 ± 0.5 |")


def test_each_variant_runs_on_its_own_number_of_clients(tmp_path, monkeypatch):
    sizes = []

    class Link:  # no SuperLink: the seeds are not run
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            pass

    def seed_results(link, suite, overrides, seed, folder, trainings, resume, report):
        sizes.append((suite.clients, overrides))
        return {"": seeds()[0]}

    monkeypatch.setattr(bench_main, "SimulationSuperLink", Link)
    monkeypatch.setattr(bench_main, "staged_app", lambda folder: folder)
    monkeypatch.setattr(bench_main, "_seed_results", seed_results)
    monkeypatch.setattr(bench_main, "plot", lambda *args: None)
    args = argparse.Namespace(work=tmp_path, out=tmp_path / "results", resume=False, quick=True, methods=None,
                              variant=[])
    bench_main._run_suite(SUITES["federation-size"], args, [0], {}, ["federation-size", "--quick"])
    assert sizes == [(10, {}), (20, {}), (50, {}), (100, {"fraction-train": 0.1})]
    assert "| 100 clients, 10 % per round |" in (tmp_path / "results" / "federation-size-quick.md").read_text()
