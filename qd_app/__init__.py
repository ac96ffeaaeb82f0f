"""qd_app: federated unlearning with Flower (QuickDrop and baselines)."""
