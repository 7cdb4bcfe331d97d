"""The extension points: one registry per kind of part, and the plugins that fill them.

Every registry is a dict from a name (the config value, the CLI choice) to a class or an
:class:`~pyro_vae.inference.estimators.Estimator`. The package fills them when its layers are
imported; a plugin -- a module named by ``pyro-vae --plugin MODULE`` or installed under the
entry-point group ``pyro_vae.plugins`` -- adds entries by plain assignment::

    from pyro_vae import PRIORS
    PRIORS["my-laplace"] = MyLaplacePrior

Each entry remembers which plugin module registered it (:meth:`Registry.source`), so a run can
record the plugins its parts came from and refuse to load when one of them is missing. This
module imports nothing from the package: the config layer reads the registries' names from
here without importing the layers that fill them.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator
from typing import Any

from .errors import ConfigError

#: The plugin module whose import is under way (entries registered now belong to it).
_loading: list[str] = []
#: Plugin modules imported so far, in order.
_loaded: list[str] = []
#: Entry-point group of installed plugin packages.
ENTRY_POINT_GROUP = "pyro_vae.plugins"


class Registry(dict):
    """A name -> part dict that records the plugin that registered each name.

    Args:
        kind: what the entries are ("prior", "encoder", ...), for error messages.
    """

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self._sources: dict[str, str | None] = {}

    def __setitem__(self, name: str, value: Any) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        super().__setitem__(name, value)
        self._sources[name] = _loading[-1] if _loading else None

    def update(self, *args: Any, **kwargs: Any) -> None:  # route through __setitem__
        for name, value in dict(*args, **kwargs).items():
            self[name] = value

    def source(self, name: str) -> str | None:
        """The plugin module that registered ``name``, or None for the package's own."""
        return self._sources.get(name)

    def get_or_raise(self, name: str) -> Any:
        """The entry, or ConfigError naming the choices (and plugins) when it is unknown."""
        if name not in self:
            hint = "" if _loaded else "; parts from your own module need --plugin MODULE"
            raise ConfigError(f"unknown {self.kind} {name!r}; choose one of: "
                              f"{', '.join(sorted(self))}{hint}")
        return self[name]


PRIORS = Registry("prior")
ENCODERS = Registry("encoder")
LIKELIHOODS = Registry("likelihood")
ESTIMATORS = Registry("estimator")
DATASETS = Registry("dataset")


@contextlib.contextmanager
def _registering_for(module: str) -> Iterator[None]:
    _loading.append(module)
    try:
        yield
    finally:
        _loading.pop()


def load_plugin(module: str) -> None:
    """Import ``module`` so that it can register parts; a module already loaded is skipped.

    Raises:
        ConfigError: the module cannot be found, or importing it fails (the error's first line).
    """
    if module in _loaded:
        return
    with _registering_for(module):
        try:
            if module in sys.modules:  # imported before as a library: its entries are ours
                importlib.reload(sys.modules[module])
            else:
                importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and module.startswith(e.name):
                raise ConfigError(f"plugin {module!r} not found: is it installed, or on "
                                  f"PYTHONPATH?") from None
            raise ConfigError(f"plugin {module!r} failed to import: {e}") from None
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure in user code: one line
            first = str(e).splitlines()[0] if str(e) else ""
            raise ConfigError(f"plugin {module!r} failed to import: {type(e).__name__}"
                              f"{': ' + first if first else ''}") from None
    _loaded.append(module)


def load_entry_point_plugins() -> list[str]:
    """Import every installed package's ``pyro_vae.plugins`` entry point; return their modules."""
    from importlib.metadata import entry_points

    modules = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        module = ep.value.split(":", 1)[0]
        load_plugin(module)
        modules.append(module)
    return modules


def loaded_plugins() -> list[str]:
    """The plugin modules imported in this process, in order."""
    return list(_loaded)


def plugins_for(parts: dict[str, tuple[Registry, str]]) -> list[str]:
    """The plugin modules that registered the named parts (``{role: (registry, name)}``)."""
    return sorted({src for registry, name in parts.values()
                   if (src := registry.source(name)) is not None})


def require_plugins(needed: list[str], what: str) -> None:
    """Refuse (ConfigError) when a plugin that ``what`` was made with is not loaded here.

    Nothing named by a run folder is ever imported on its own: the user loads it by name.
    """
    missing = [m for m in needed if m not in _loaded]
    if missing:
        flags = " ".join(f"--plugin {m}" for m in missing)
        raise ConfigError(f"{what} needs plugin {', '.join(missing)}, which is not loaded; run "
                          f"pyro-vae {flags} ... (or pyro_vae.load_plugin({missing[0]!r}) "
                          f"from Python)")
