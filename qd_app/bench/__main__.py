"""The benchmark's command line: run a suite and write its JSON, Markdown tables and figure."""

from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..config import RunConfig
from ..errors import UserFacingError
from . import __doc__ as OVERVIEW
from .plots import plot
from .report import markdown, summarise
from .runner import run_seed
from .suites import SUITES
from .superlink import PROJECT, DeploymentLink, SimulationSuperLink


def main(argv: list[str] | None = None) -> int:
    """Run a suite and write its JSON, Markdown table and plot."""
    parser = argparse.ArgumentParser(prog="python -m qd_app.bench", description=OVERVIEW.split("\n\n")[0])
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument("--quick", action="store_true", help="one seed")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", type=_setting,
                        help="override a run-config setting of the suite (TOML value), e.g. --set model-width=128")
    parser.add_argument("--out", type=Path, default=PROJECT / "bench" / "results", help="where results go")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: <out>/../work)")
    args = parser.parse_args(argv)
    suite = SUITES[args.suite]
    if args.set:
        overrides = dict(args.set)
        try:  # a bad value stops here, before any run
            RunConfig.from_run_config({**suite.settings, **overrides})
        except UserFacingError as exc:
            parser.error(str(exc))
        suite = replace(suite, settings={**suite.settings, **overrides})
    seeds = list(range(1 if args.quick else args.seeds))
    work = (args.work or args.out.parent / "work").resolve() / suite.name
    started = time.perf_counter()
    report: dict[str, Any] = {
        "suite": suite.name, "command": "python -m qd_app.bench " + " ".join(argv or sys.argv[1:]),
        "machine": _machine(), "seeds": seeds, "settings": suite.settings, "variants": {},
    }
    for variant, overrides in suite.variants.items():
        print(f"{suite.title} {variant}".strip(), flush=True)
        folder = work / (variant or "default").replace(" ", "-").replace("'", "")
        link = (SimulationSuperLink(work / "flwrhome") if suite.deployment is None
                else DeploymentLink(folder, suite.clients, **suite.deployment[variant]))
        with link:
            results = [run_seed(link, suite, overrides, seed, folder / f"seed-{seed}", suite.methods)
                       for seed in seeds]
        report["variants"][variant] = {"seeds": results, "summary": summarise(results, suite.methods)}
    report["wall-seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    name = suite.name + ("-quick" if args.quick else "")
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (args.out / f"{name}.md").write_text(markdown(suite, report))
    plot(suite, report, args.out / f"{name}.png")
    print(f"wrote {args.out / name}.{{json,md,png}} after {report['wall-seconds'] / 60:.1f} min", flush=True)
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
