"""Unlearning methods, one module each, found by name through :data:`REGISTRY`.

The ``method`` setting is a registered name or, for a method of your own, an import
path ``package.module:ClassName`` of an :class:`~qd_app.server.method.UnlearningMethod`
subclass (the way Flower names its components). A new method is a module of its own
and one line here; the server side knows none of them by name.
"""

from __future__ import annotations

import importlib

from ..errors import ConfigError
from ..server.method import MethodContext, UnlearningMethod

REGISTRY: dict[str, str] = {
    "quickdrop": "qd_app.methods.quickdrop:QuickDrop",
    "retrain": "qd_app.methods.retrain:Retrain",
    "sga": "qd_app.methods.sga:SGA",
    "federaser": "qd_app.methods.federaser:FedEraser",
    "fu-mp": "qd_app.methods.fu_mp:FUMP",
    "s2u": "qd_app.methods.s2u:S2U",
    "ispf": "qd_app.methods.ispf:ISPF",
    "ispf-is": "qd_app.methods.ispf:ISPFInhibitedSynthesis",
    "ispf-pf": "qd_app.methods.ispf:ISPFPostFilter",
    "gkt": "qd_app.methods.ispf:GKT",
    "blockf": "qd_app.methods.ispf:BlockF",
    "hdus": "qd_app.methods.hdus:HDUS",
}

__all__ = ["REGISTRY", "MethodContext", "UnlearningMethod", "resolve_method"]


def resolve_method(method: str) -> UnlearningMethod:
    """The method a ``method`` setting names: a registered name or ``package.module:ClassName``."""
    path = REGISTRY.get(method, method)
    module_name, _, class_name = path.partition(":")
    if not class_name:
        raise ConfigError(f"invalid setting method={method!r}: must be one of {', '.join(REGISTRY)}, "
                          "or the import path of your own method, 'package.module:ClassName'")
    try:
        found = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"invalid setting method={method!r}: cannot import {path} ({exc})") from None
    if not (isinstance(found, type) and issubclass(found, UnlearningMethod)):
        raise ConfigError(f"invalid setting method={method!r}: {path} is not an UnlearningMethod subclass")
    return found()
