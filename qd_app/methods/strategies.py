"""Stage strategies that several methods share: training, recovery and relearning.

A method names the classes it uses in class attributes of its
:class:`~qd_app.methods.base.UnlearningMethod`, so a subclass can swap one.
"""

from __future__ import annotations

from .. import protocol
from ..server.federation import Federation
from ..server.strategy import StageStrategy


class TrainingStrategy(StageStrategy):
    """Federated training by local SGD on every client's data (FedAvg), forgotten classes
    (``exclude_classes``) left out."""

    stage_name = "train"
    message_type = protocol.TRAIN

    def __init__(self, federation: Federation, *, exclude_classes: list[int] | None = None, **kwargs) -> None:
        super().__init__(federation, **kwargs)
        if exclude_classes is not None:
            self.stage_config[protocol.EXCLUDE_CLASSES] = list(exclude_classes)


class RecoverStrategy(StageStrategy):
    """Recovery: SGD on the retain data (QuickDrop: synthetic images plus the real augmentation samples).

    Parameters
    ----------
    exclude_classes : list[int]
        Classes forgotten so far (left out of every client's recovery data).
    data : str
        ``synthetic`` (QuickDrop: store and augmentation) or ``original`` (the baselines).
    **kwargs
        As for :class:`~qd_app.server.strategy.StageStrategy` (``participants``: the
        clients not forgotten).
    """

    stage_name = "recover"
    message_type = protocol.message_type(protocol.TRAIN, protocol.RECOVER)

    def __init__(self, federation: Federation, *, exclude_classes: list[int], data: str = protocol.SYNTHETIC,
                 **kwargs) -> None:
        super().__init__(federation, **kwargs)
        self.stage_config.update(
            {protocol.EXCLUDE_CLASSES: list(exclude_classes), protocol.RELEARN_CLASSES: [], protocol.DATA: data}
        )


class RelearnStrategy(RecoverStrategy):
    """Relearning: SGD on the stage's data with the relearned classes or client back in.

    Parameters
    ----------
    relearn_classes : list[int]
        Class-level relearning: the classes coming back; each client repeats their
        samples so that each one it holds weighs half as much as the rest of its data
        (one class: about a third; they would otherwise be a tenth of it and come back
        slowly). Empty for a client.
    **kwargs
        As for :class:`RecoverStrategy` (``participants``: the clients not forgotten,
        a relearned client included).
    """

    stage_name = "relearn"
    message_type = protocol.message_type(protocol.TRAIN, protocol.RELEARN)

    def __init__(self, federation: Federation, *, relearn_classes: list[int], **kwargs) -> None:
        super().__init__(federation, **kwargs)
        self.stage_config[protocol.RELEARN_CLASSES] = list(relearn_classes)
