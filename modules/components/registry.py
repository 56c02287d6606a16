"""Small named registries: one per swappable component family.

A family (``projector``, ``vision_encoder``, ``var_decoder``...) maps short names used in YAML
to builder callables. Configs never hold import strings: a YAML says ``name: mlp`` and the
family's registry turns it into a module. An unknown name fails with the valid choices, and the
config loader (``experiments.config``) checks every ``name`` at load time, before anything runs.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Dict, List

# family name -> Registry; filled as component modules are imported.
REGISTRIES: Dict[str, "Registry"] = {}


class UnknownComponentError(KeyError):
    """Raised for a component name that no builder is registered under."""

    def __str__(self) -> str:  # KeyError would repr() the message and add quotes
        return str(self.args[0])


class Registry:
    """Maps names to builders for one component family.

    >>> PROJECTORS = Registry("projector")
    >>> @PROJECTORS.register("linear")
    ... def build_linear(cfg): ...
    """

    def __init__(self, family: str):
        if family in REGISTRIES:
            raise ValueError(f"registry for family {family!r} already exists")
        self.family = family
        self._builders: Dict[str, Callable[..., Any]] = {}
        REGISTRIES[family] = self

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._builders:
                raise ValueError(f"{self.family} {name!r} registered twice")
            self._builders[name] = fn
            return fn

        return deco

    def names(self) -> List[str]:
        return sorted(self._builders)

    def __contains__(self, name: str) -> bool:
        return name in self._builders

    def get(self, name: str, where: str = "") -> Callable[..., Any]:
        if name not in self._builders:
            loc = f" at {where}" if where else ""
            raise UnknownComponentError(
                f"unknown {self.family} {name!r}{loc}; valid choices: {', '.join(self.names())}"
            )
        return self._builders[name]

    def build(self, cfg: Any, *args: Any, **kwargs: Any) -> Any:
        """Build from a typed config whose ``name`` field selects the builder."""
        return self.get(cfg.name)(cfg, *args, **kwargs)


class ComponentConfig:
    """Mixin for a family's config dataclass: ``family`` names the registry that ``name`` is
    checked against when a config is loaded (``experiments.config.validate_components``)."""

    family: ClassVar[str] = ""
