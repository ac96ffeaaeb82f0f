"""Benchmark: every unlearning method from the same trained model, side by side.

    python -m qd_app.bench <suite> [--quick] [--seeds N] [--set KEY=VALUE ...] [--out DIR] [--work DIR]

Each suite drives the real app with ``flwr run`` against a private simulation
SuperLink (:mod:`qd_app.bench.superlink`). Per seed it trains once (QuickDrop
training, which also leaves the clients' stores and FedEraser's history), then runs
every method with ``phase=unlearn`` on a copy of that trained experiment, so all
start from the same model, partitions and machine, in one invocation. It reads each
run's results.json, measures the final models (membership inference, tug-of-war and
output KL against Retrain-Or) and writes ``<out>/<suite>.json``, ``<suite>.md`` and
``<suite>.png``. Retrain-Or runs with the training stage's own settings.

The ``decentralized`` suite compares HDUS, which has no global model, with FedAvg and
QuickDrop (:mod:`~qd_app.bench.decentralized`). The suites are in
:mod:`~qd_app.bench.suites`, running them in :mod:`~qd_app.bench.runner`, the tables in :mod:`~qd_app.bench.report` and the
figures in :mod:`~qd_app.bench.plots`.
"""
