"""The CUDA path: run where a GPU is present, skipped elsewhere."""

from __future__ import annotations

import copy

import pytest
import torch

from qd_app.config import RunConfig
from qd_app.core.data import load_split
from qd_app.core.distillation import initial_synthetic_set, train_with_distillation
from qd_app.core.models import ModelSpec, build_model
from qd_app.core.training import make_optimizer, resolve_device, seeded_generator

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def test_auto_picks_the_gpu():
    assert resolve_device("auto").type == "cuda"


@pytest.mark.parametrize("batched", [True, False])
def test_training_with_distillation_on_the_gpu_matches_the_cpu(tiny_mnist_dir, batched):
    data = load_split("mnist", tiny_mnist_dir, True).subset(torch.arange(300))
    model = build_model(ModelSpec.from_config(RunConfig(model_width=8)), seed=0)
    store = initial_synthetic_set(data, scale=10, generator=seeded_generator(0))
    results = {}
    for device in (torch.device("cpu"), torch.device("cuda")):
        trained, synthetic = copy.deepcopy(model).to(device), copy.deepcopy(store)
        stats = train_with_distillation(
            trained, data, synthetic, optimizer=make_optimizer(trained, 0.05, momentum=0.9), image_lr=0.1,
            image_momentum=0.5, image_batch=4, epochs=1, batch_size=50, generator=seeded_generator(1),
            device=device, batched=batched)
        assert all(p.device.type == device.type for p in trained.parameters())
        assert synthetic.synthetic.images.device.type == "cpu"  # the store stays on the host
        results[device.type] = trained.to("cpu").state_dict(), synthetic.synthetic.images, stats
    (cpu_model, cpu_images, cpu_stats), (gpu_model, gpu_images, gpu_stats) = results["cpu"], results["cuda"]
    assert torch.allclose(cpu_images, gpu_images, atol=1e-3)
    for key in cpu_model:
        assert torch.allclose(cpu_model[key].float(), gpu_model[key].float(), atol=1e-3), key
    assert gpu_stats.distill_seconds > 0 and gpu_stats.sample_gradients == cpu_stats.sample_gradients
