"""The benchmark's command line: run a suite and write its JSON, Markdown tables and figure."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write_text
from ..config import RunConfig
from ..deploy.processes import staged_app
from ..errors import UserFacingError
from . import __doc__ as OVERVIEW
from . import decentralized
from .plots import plot
from .report import markdown, summarise
from .runner import run_seed
from .suites import SUITES, Suite
from .superlink import PROJECT, DeploymentLink, Link, SimulationSuperLink


def main(argv: list[str] | None = None) -> int:
    """Run suites and write each one's JSON, Markdown tables and plot."""
    parser = argparse.ArgumentParser(prog="python -m qd_app.bench", description=OVERVIEW.split("\n\n")[0])
    parser.add_argument("suites", nargs="*", metavar="suite",
                        help=f"one or more of {', '.join(sorted(SUITES))}; suites of one invocation with the same "
                             "training settings share the training of each seed")
    parser.add_argument("--quick", action="store_true", help="one seed")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", type=_setting,
                        help="override a run-config setting of the suite (TOML value), e.g. --set model-width=128")
    parser.add_argument("--methods", type=lambda text: tuple(text.split(",")), default=None, metavar="M1,M2",
                        help="run only these of each suite's methods (e.g. retrain,quickdrop)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME",
                        help="run only this variant of a suite that has named variants (e.g. non-IID); repeatable")
    parser.add_argument("--out", type=Path, default=PROJECT / "bench" / "results", help="where results go")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: <out>/../work)")
    parser.add_argument("--resume", action="store_true",
                        help="take each seed an earlier, interrupted invocation of the same suite, settings and "
                             "methods finished from the scratch folder instead of running it again")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="write the tables and figure of an earlier report again (beside it), with this "
                             "version's tables; runs nothing")
    args = parser.parse_args(argv)
    if args.render:
        return _render(parser, args.render)
    unknown = [name for name in args.suites if name not in SUITES]
    if unknown or not args.suites:
        parser.error(f"{'unknown suite ' + ', '.join(unknown) if unknown else 'no suite named'}: name one or more of "
                     f"{', '.join(sorted(SUITES))}, or --render a report")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the SuperLink and Ray head are stopped
    suites = [_selected(parser, SUITES[name], args) for name in dict.fromkeys(args.suites)]
    seeds = list(range(1 if args.quick else args.seeds))
    trainings: dict[str, Any] = {}  # one training per seed and settings, shared by the suites
    for suite in suites:
        _run_suite(suite, args, seeds, trainings, argv)
    return 0


def _selected(parser: argparse.ArgumentParser, suite: Suite, args: argparse.Namespace) -> Suite:
    """The suite with the command line's settings, methods and variants, or a usage error."""
    if args.set:
        overrides = dict(args.set)
        try:  # a bad value stops here, before any run
            RunConfig.from_run_config({**suite.settings, **overrides})
        except UserFacingError as exc:
            parser.error(str(exc))
        suite = replace(suite, settings={**suite.settings, **overrides})
    if args.methods is not None:
        unknown = [m for m in args.methods if m not in suite.methods]
        if unknown:
            parser.error(f"--methods: {', '.join(unknown)} not in suite {suite.name} "
                         f"(its methods: {', '.join(suite.methods) or 'none'})")
        suite = replace(suite, methods=args.methods)
    if args.variant and list(suite.variants) != [""]:  # a suite without named variants runs as it is
        variants = {name: suite.variants[name] for name in args.variant if name in suite.variants}
        if not variants:
            parser.error(f"--variant: none of {', '.join(args.variant)} in suite {suite.name} "
                         f"(its variants: {', '.join(suite.variants)})")
        suite = replace(suite, variants=variants)
    return suite


def _run_suite(suite: Suite, args: argparse.Namespace, seeds: list[int], trainings: dict[str, Any],
               argv: list[str] | None) -> None:
    """Every variant and seed of one suite; a suite of several targets gets a table per target and
    one pooled over them."""
    work = (args.work or args.out.parent / "work").resolve() / suite.name
    started = time.perf_counter()
    app = staged_app(work / "app")  # every run of the suite runs these files
    report: dict[str, Any] = {
        "suite": suite.name, "command": "python -m qd_app.bench " + " ".join(argv or sys.argv[1:]),
        "machine": _machine(), "seeds": seeds, "settings": suite.settings, "methods": list(suite.methods),
        "variants": {},
    }
    for variant, overrides in suite.variants.items():
        print(f"{suite.title} {variant}".strip(), flush=True)
        sized = replace(suite, clients=suite.variant_clients.get(variant, suite.clients))
        folder = work / (variant or "default").replace(" ", "-").replace("'", "")
        link = (SimulationSuperLink(work / "flwrhome", app) if suite.deployment is None
                else DeploymentLink(folder, sized.clients, **suite.deployment[variant], app=app))
        with link:
            per_seed = [_seed_results(link, sized, overrides, seed, folder, trainings, args.resume, report)
                        for seed in seeds]
        if suite.decentralized:  # its own tables (qd_app.bench.decentralized)
            report["variants"][variant] = {"seeds": per_seed}
            continue
        for target in per_seed[0]:
            results = [by_target[target] for by_target in per_seed]
            name = ", ".join(filter(None, (variant, target)))
            report["variants"][name] = {"seeds": results, "summary": summarise(results, suite.methods)}
        if len(per_seed[0]) > 1:
            pooled = [results for by_target in per_seed for results in by_target.values()]
            report["variants"][", ".join(filter(None, (variant, "pooled over targets")))] = {
                "seeds": pooled, "summary": summarise(pooled, suite.methods)}
    report["wall-seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    name = "-".join([suite.name] + (["quick"] if args.quick else []) + (list(args.methods) if args.methods else [])
                    + [v.replace(" ", "-").replace("'", "") for v in args.variant if v in suite.variants])
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (args.out / f"{name}.md").write_text(markdown(suite, report))
    plot(suite, report, args.out / f"{name}.png")
    print(f"wrote {args.out / name}.{{json,md,png}} after {report['wall-seconds'] / 60:.1f} min", flush=True)


def _seed_results(link: Link, suite: Suite, overrides: dict[str, Any], seed: int, folder: Path,
                  trainings: dict[str, Any], resume: bool, report: dict[str, Any]) -> dict[str, Any]:
    """One seed's results by target: run (and kept in ``folder/seed-<seed>.json``), or with
    ``resume`` taken from that file when an earlier invocation of the same suite, settings and
    methods wrote it (listed in the report's ``resumed``)."""
    saved = folder / f"seed-{seed}.json"
    key = json.loads(json.dumps({"suite": suite.name, "settings": suite.settings, "variant": overrides,
                                 "methods": list(suite.methods), "targets": list(suite.targets)}, default=str))
    earlier = json.loads(saved.read_text()) if resume and saved.is_file() else {}
    if earlier.get("key") == key:
        print(f"  seed {seed}: results of an earlier invocation ({saved})", flush=True)
        report.setdefault("resumed", []).append(str(saved))
        return earlier["results"]
    if suite.decentralized:
        results = decentralized.run_seed(link, suite, seed, folder / f"seed-{seed}")
    else:
        results = run_seed(link, suite, overrides, seed, folder / f"seed-{seed}", suite.methods, trainings)
    atomic_write_text(saved, json.dumps({"key": key, "results": results}, indent=1, default=str) + "\n")
    return results


def _render(parser: argparse.ArgumentParser, path: Path) -> int:
    """The Markdown tables and figure of a report JSON, written beside it."""
    try:
        report = json.loads(path.read_text())
        suite = replace(SUITES[report["suite"]], settings=report["settings"], methods=tuple(report["methods"]))
    except (OSError, ValueError, KeyError) as exc:
        parser.error(f"--render {path}: not a report of this benchmark ({exc})")
    path.with_suffix(".md").write_text(markdown(suite, report))
    plot(suite, report, path.with_suffix(".png"))
    print(f"wrote {path.with_suffix('.md')} and {path.with_suffix('.png').name}", flush=True)
    return 0


def _setting(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with a TOML value (a bare word is taken as a string)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return key, value


def _machine() -> str:
    import os  # pylint: disable=import-outside-toplevel
    import platform  # pylint: disable=import-outside-toplevel

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


if __name__ == "__main__":
    sys.exit(main())
