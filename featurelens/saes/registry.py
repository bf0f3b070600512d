"""Architecture registry: ``cfg.json`` names the architecture; loading dispatches through here."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from featurelens.errors import UsageError

if TYPE_CHECKING:
    from featurelens.saes.base import SAE

_REGISTRY: dict[str, type[SAE]] = {}
S = TypeVar("S", bound="type[SAE]")


def register(cls: S) -> S:
    """Class decorator: make an SAE class loadable by its ``architecture`` name."""
    name = cls.architecture
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"SAE architecture {name!r} registered twice")
    _REGISTRY[name] = cls
    return cls


def get_architecture(name: str) -> type[SAE]:
    # every architecture is registered by then: importing this module runs featurelens/saes/__init__.py
    # first, which imports each architecture module
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UsageError(
            f"unknown SAE architecture {name!r}: known ones are {', '.join(sorted(_REGISTRY))}"
        ) from None


def architectures() -> list[str]:
    return sorted(_REGISTRY)
