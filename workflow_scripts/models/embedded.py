"""Models shipped inside a PyPI package (``embedded:<name>`` in the config): runs need no Hub."""

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from workflow_scripts.stage import StageError


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside a PyPI package (``embedded:<name>`` in the config): runs need no Hub."""

    package: str  # import name of the package
    install: str  # the command that installs it (said in the error when it is missing)

    def folder(self, config_key: str) -> Path:
        """The installed package's folder; a StageError naming ``config_key`` when it is missing."""
        import importlib.util

        spec = importlib.util.find_spec(self.package)
        if spec is None:
            raise StageError(
                f"{config_key}: the embedded model package {self.package!r} is not installed; run `{self.install}`"
            )
        return Path(next(iter(spec.submodule_search_locations)))

    def record(self) -> dict:
        """What an artifact records about it: the package and its version, never a machine path."""
        from importlib import metadata

        dists = metadata.packages_distributions().get(self.package) or []
        return {"package": self.package, "version": metadata.version(dists[0]) if dists else None}


def embedded_model(name: str, known: Mapping[str, EmbeddedModel], config_key: str) -> EmbeddedModel | None:
    """The embedded model ``name`` names (``embedded:<key>``), None for any other name."""
    if not name.startswith("embedded:"):
        return None
    key = name.split(":", 1)[1]
    if key not in known:
        raise StageError(f"{config_key}: unknown embedded model {key!r}; known: {', '.join(known)}")
    return known[key]
