"""The QuickDrop paper's baselines as strategies, and their math (plain torch where possible).

- Retrain-Or (:class:`RetrainStrategy`): FedAvg from scratch without the forget data,
  with the training stage's own rounds, local epochs and batch size.
- SGA-Or: the QuickDrop stages on the *original* data (``data="original"`` of
  :class:`~qd_app.strategies.UnlearnStrategy` and :class:`~qd_app.strategies.RecoverStrategy`).
- FedEraser (Liu et al. 2021): :class:`UpdateHistory` stores every client's update
  every ``dt`` rounds of training; :class:`FedEraserCalibration` rebuilds the model
  from the stored rounds, each retained client training ``ceil(r * E)`` local epochs
  from the rebuilt model and its new update taking the norm of its stored one.
- FU-MP (Wang et al. 2022): clients report per-class mean activations of the prunable
  units (``prune-target``: the classifier's input features, or every conv channel as in
  the paper); :class:`FUMPPruning` scores them by TF-IDF for the forget classes and
  zeroes the highest-scoring ``prune-fraction`` of each layer; :class:`PrunedRecovery`
  recovers with the pruned units held at zero. Class-level only; no relearning.
- S2U (:class:`S2UStrategy`): client-level only; FedAvg rounds in which the forgotten
  client's aggregation weight is scaled down by ``s2u-scale`` and the others' scaled up
  (the weights are renormalised to sum to 1); unlearning and recovery in one phase.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from torch import nn

from .atomic import atomic_write_bytes
from .data import LabeledImages
from .federation import Federation
from .strategies import NUM_EXAMPLES, RecoverStrategy, StageStrategy, TrainingStrategy, _metrics

StateDict = dict[str, torch.Tensor]


class RetrainStrategy(TrainingStrategy):
    """Retrain-Or: FedAvg from scratch on the retain data (forgotten classes left out by every client)."""

    stage_name = "retrain"

    def __init__(self, federation: Federation, *, exclude_classes: list[int], **kwargs) -> None:
        super().__init__(federation, **kwargs)
        self.stage_config["exclude-classes"] = list(exclude_classes)


# --------------------------------------------------------------------------- FedEraser
def calibrated_update(new: StateDict, old: StateDict) -> StateDict:
    """FedEraser's calibration, per parameter tensor: the new direction with the old norm."""
    calibrated = {}
    for key, value in new.items():
        norm = value.float().norm()
        calibrated[key] = value * (old[key].float().norm() / norm) if norm > 0 else torch.zeros_like(value)
    return calibrated


def weighted_sum(updates: list[StateDict], weights: list[float]) -> StateDict:
    """Sum of the updates weighted by ``weights`` normalised to 1."""
    total = sum(weights)
    return {key: sum(update[key].double() * (w / total) for update, w in zip(updates, weights)).float()
            for key in updates[0]}


class UpdateHistory:
    """FedEraser's server-side record: every ``interval`` rounds of training (1, 1+dt, ...),
    the global model sent and each client's update, in ``folder/round-<k>.pt``."""

    def __init__(self, folder: Path, interval: int) -> None:
        self.folder = folder
        self.interval = interval

    def records(self, server_round: int) -> bool:
        """Whether a training round is one that is stored."""
        return self.interval > 0 and (server_round - 1) % self.interval == 0

    def save(self, server_round: int, global_model: StateDict, updates: dict[int, StateDict],
             num_examples: dict[int, int]) -> None:
        """Store one round atomically (updates keyed by partition id)."""
        buffer = io.BytesIO()
        torch.save({"global": global_model, "updates": updates, "num-examples": num_examples}, buffer)
        atomic_write_bytes(self.folder / f"round-{server_round}.pt", buffer.getvalue())

    def rounds(self) -> list[int]:
        """The stored rounds, in order."""
        return sorted(int(path.stem.split("-")[1]) for path in self.folder.glob("round-*.pt"))

    def load(self, server_round: int) -> dict:
        """One stored round: ``global``, ``updates`` and ``num-examples``."""
        return torch.load(self.folder / f"round-{server_round}.pt", weights_only=True)

    def size_bytes(self) -> int:
        """Server storage the history takes."""
        return sum(path.stat().st_size for path in self.folder.glob("round-*.pt"))


class FedEraserCalibration(StageStrategy):
    """FedEraser's unlearning: one calibration round per stored training round.

    Start it from the stored global model of the first stored round. In round j the
    retained clients train from the current rebuilt model (leaving out ``exclude-classes``);
    each client's new update is rescaled to the norm of its stored update of the j-th
    stored round, and the rebuilt model moves by their sample-weighted average.

    Parameters
    ----------
    history : UpdateHistory
        The updates recorded during training.
    **kwargs
        As for :class:`StageStrategy` (``participants``: the retained clients;
        ``epochs``: ``ceil(r * local-epochs)``) plus ``exclude_classes``.
    """

    stage_name = "unlearn"
    message_type = MessageType.TRAIN

    def __init__(self, federation: Federation, *, history: UpdateHistory, exclude_classes: list[int],
                 **kwargs) -> None:
        super().__init__(federation, **kwargs)
        self.history = history
        self.stored_rounds = history.rounds()
        self.stage_config["exclude-classes"] = list(exclude_classes)
        self._current: StateDict = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Send the rebuilt model to the retained clients that the stored round holds."""
        self._current = arrays.to_torch_state_dict()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None,
                                                                                      MetricRecord | None]:
        """Calibrate every reply against the stored update and apply their weighted average."""
        valid = self._account(server_round, replies)
        stored = self.history.load(self.stored_rounds[server_round - 1])
        updates, weights = [], []
        for reply in valid:
            partition = self.federation.partition_of(reply.metadata.src_node_id)
            if partition not in stored["updates"]:
                continue
            model = next(iter(reply.content.array_records.values())).to_torch_state_dict()
            new = {key: model[key] - self._current[key] for key in model}
            updates.append(calibrated_update(new, stored["updates"][partition]))
            weights.append(float(stored["num-examples"][partition]))
        self.finish_round()
        if not updates:
            return None, None
        step = weighted_sum(updates, weights)
        rebuilt = {key: self._current[key] + step[key].to(self._current[key].dtype) for key in self._current}
        return ArrayRecord(rebuilt), None


# --------------------------------------------------------------------------- FU-MP
@dataclass(frozen=True)
class PrunableLayer:
    """A layer of units that FU-MP scores and prunes.

    ``module`` names where the units' activations are read: for conv channels the ReLU
    after the conv (one unit per channel, its spatial mean); for features the
    classifier (one unit per input feature, read from its input). ``parameters`` are
    the ``(parameter name, dimension)`` slices that carry the units and are zeroed with
    them.
    """

    module: str
    per_channel: bool
    parameters: tuple[tuple[str, int], ...]

    def activations(self, module_input: torch.Tensor, module_output: torch.Tensor) -> torch.Tensor:
        """``(batch, units)`` activations of this layer's units."""
        return module_output.mean(dim=(2, 3)) if self.per_channel else module_input.flatten(1)

    def width(self, model: nn.Module) -> int:
        """Number of units."""
        name, dim = self.parameters[0]
        return model.get_parameter(name).shape[dim]


def prunable_layers(model: nn.Module, target: str) -> list[PrunableLayer]:
    """The units FU-MP works on (``prune-target``).

    ``channels`` (the FU-MP paper's): every conv layer's output channels, with the norm's
    affine parameters that follow. ``features``: the inputs of the last linear layer (the
    last block's pooled feature map, channel x position); on an instance-norm ConvNet
    each channel's spatial mean is pinned by the norm, so channel means barely tell
    classes apart, while these units do.
    """
    modules = list(model.named_modules())
    if target == "features":
        name = [name for name, module in modules if isinstance(module, nn.Linear)][-1]
        return [PrunableLayer(name, False, ((f"{name}.weight", 1),))]
    layers = []
    for index, (name, module) in enumerate(modules):
        if not isinstance(module, nn.Conv2d):
            continue
        parameters = [(f"{name}.weight", 0), (f"{name}.bias", 0)]
        for follower_name, follower in modules[index + 1:]:
            if isinstance(follower, (nn.GroupNorm, nn.BatchNorm2d)) and follower.affine:
                parameters += [(f"{follower_name}.weight", 0), (f"{follower_name}.bias", 0)]
            if isinstance(follower, nn.ReLU):
                layers.append(PrunableLayer(follower_name, True, tuple(parameters)))
                break
    return layers


@torch.no_grad()
def activation_statistics(model: nn.Module, layers: list[PrunableLayer], data: LabeledImages, num_classes: int,
                          batch_size: int, device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per layer, the per-class sum over samples of every unit's (post-ReLU) activation
    (``(K, units)``), and the per-class sample counts."""
    model.eval()
    modules = dict(model.named_modules())
    captured: list[torch.Tensor] = []
    hooks = [modules[layer.module].register_forward_hook(
        lambda _m, inputs, output, layer=layer: captured.append(layer.activations(inputs[0], output)))
        for layer in layers]
    sums: list[torch.Tensor | None] = [None] * len(layers)
    try:
        for start in range(0, len(data), batch_size):
            labels = data.labels[start:start + batch_size].to(device)
            captured.clear()
            model(data.images[start:start + batch_size].to(device))
            one_hot = nn.functional.one_hot(labels, num_classes).double()
            for index, activations in enumerate(captured):
                batch_sum = one_hot.T @ activations.double()
                sums[index] = batch_sum if sums[index] is None else sums[index] + batch_sum
    finally:
        for hook in hooks:
            hook.remove()
    sums = [s.cpu() if s is not None else torch.zeros(num_classes, layer.width(model), dtype=torch.float64)
            for s, layer in zip(sums, layers)]
    return sums, torch.bincount(data.labels, minlength=num_classes).double()


def tf_idf_scores(class_means: torch.Tensor, targets: list[int]) -> torch.Tensor:
    """FU-MP's unit scores for the target classes, summed over them (``class_means``: ``(K, units)``).

    TF_j = A_t,j / sum_j A_t,j;  IDF_j = log(K / (1 + #{c : A_c,j >= mean_c A_c,j})).
    """
    num_classes = class_means.shape[0]
    above_mean = (class_means >= class_means.mean(dim=0, keepdim=True)).sum(dim=0)
    idf = torch.log(num_classes / (1.0 + above_mean.double()))
    scores = torch.zeros(class_means.shape[1], dtype=torch.float64)
    for target in targets:
        activation = class_means[target].double()
        scores += activation / activation.sum().clamp_min(1e-12) * idf
    return scores


def prune(state: StateDict, layers: list[PrunableLayer], units: list[list[int]]) -> StateDict:
    """Zero the parameter slices of the given units of every layer."""
    pruned = {key: value.clone() for key, value in state.items()}
    for layer, indices in zip(layers, units):
        for name, dim in layer.parameters:
            pruned[name].index_fill_(dim, torch.tensor(indices, dtype=torch.long), 0)
    return pruned


class FUMPPruning(StageStrategy):
    """FU-MP's unlearning: one round of activation statistics from the clients, then pruning.

    The clients (``query.activation_stats``) return per-class activation sums of every
    unit of :func:`prunable_layers` (``prune_target``) on their data; the server averages
    them, scores the units by TF-IDF for the forget classes and zeroes the top
    ``prune_fraction`` of each layer. The pruned units are kept in :attr:`pruned` for
    :class:`PrunedRecovery`.
    """

    stage_name = "unlearn"
    message_type = f"{MessageType.QUERY}.activation_stats"

    def __init__(self, federation: Federation, *, model: nn.Module, forget_classes: list[int],
                 prune_fraction: float, prune_target: str, **kwargs) -> None:
        super().__init__(federation, **kwargs)
        self.model = model
        self.forget_classes = list(forget_classes)
        self.prune_fraction = prune_fraction
        self.layers = prunable_layers(model, prune_target)
        self.pruned: list[list[int]] = []
        self._arrays: ArrayRecord | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Ask the clients for their activation statistics under the current model."""
        self._arrays = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None,
                                                                                      MetricRecord | None]:
        """Average the statistics, score the units and return the pruned model."""
        sums = None
        counts = None
        for reply in self._account(server_round, replies):
            stats = reply.content["statistics"]
            layer_sums = [torch.tensor(stats[f"layer-{i}"], dtype=torch.float64).view(len(stats["counts"]), -1)
                          for i in range(len(self.layers))]
            reply_counts = torch.tensor(stats["counts"], dtype=torch.float64)
            sums = layer_sums if sums is None else [a + b for a, b in zip(sums, layer_sums)]
            counts = reply_counts if counts is None else counts + reply_counts
        self.pruned = []
        for layer_sum in sums:
            means = layer_sum / counts.clamp_min(1).unsqueeze(1)
            scores = tf_idf_scores(means, self.forget_classes)
            count = max(1, math.ceil(self.prune_fraction * len(scores)))
            self.pruned.append(torch.argsort(scores, descending=True)[:count].tolist())
        pruned = prune(self._arrays.to_torch_state_dict(), self.layers, self.pruned)
        self.finish_round()
        return ArrayRecord(pruned), None


class PrunedRecovery(RecoverStrategy):
    """Recovery that holds FU-MP's pruned units at zero after every aggregation."""

    def __init__(self, federation: Federation, *, layers: list[PrunableLayer], pruned: list[list[int]],
                 **kwargs) -> None:
        super().__init__(federation, **kwargs)
        self.layers, self.pruned = layers, pruned

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None,
                                                                                      MetricRecord | None]:
        """FedAvg, then zero the pruned units again."""
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            return None, metrics
        return ArrayRecord(prune(arrays.to_torch_state_dict(), self.layers, self.pruned)), metrics


# --------------------------------------------------------------------------- S2U
class S2UStrategy(TrainingStrategy):
    """S2U: FedAvg on the original data with the forgotten clients' weights scaled down.

    Parameters
    ----------
    forgotten_nodes : list[int]
        Nodes of the clients being forgotten; their aggregation weight (number of
        examples) is multiplied by ``scale``; FedAvg's normalisation scales the others up.
    scale : float
        Down-scaling factor of the forgotten clients' weights (``s2u-scale``, default 0.1).
    exclude_classes : list[int]
        Classes forgotten earlier, left out of every client's data.
    """

    stage_name = "s2u"

    def __init__(self, federation: Federation, *, forgotten_nodes: list[int], scale: float,
                 exclude_classes: list[int], **kwargs) -> None:
        super().__init__(federation, **kwargs)
        self.forgotten_nodes = set(forgotten_nodes)
        self.scale = scale
        self.stage_config["exclude-classes"] = list(exclude_classes)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None,
                                                                                      MetricRecord | None]:
        """Weighted average with the forgotten clients' weights scaled down."""
        models, weights = [], []
        for reply in self._account(server_round, replies):
            weight = float(_metrics(reply)[NUM_EXAMPLES])
            if reply.metadata.src_node_id in self.forgotten_nodes:
                weight *= self.scale
            models.append(next(iter(reply.content.array_records.values())).to_torch_state_dict())
            weights.append(weight)
        self.finish_round()
        if not models or sum(weights) == 0:
            return None, None
        return ArrayRecord(weighted_sum(models, weights)), None
