"""The management model behind the admin API: change a running gateway's config safely.

The gateway's configuration is kept as a *document*: the tables of the config
file (re-read from ``config.source``), with the changes made through the
management API laid over them (:data:`~wsgate.admin.state.Overrides`: per API,
product or subscription, a replacement table or a deletion). Every change builds
the whole new document and validates it with :func:`wsgate.config.parse_config`,
so each rule of the config file (unique names and paths, references between
tables, policy settings...) applies to the API exactly as to the file. A valid
change is written to the state file first, then served from the next handshake
on with :meth:`Gateway.update_config`; open pairs are untouched.

Objects that a change leaves equal are kept (the same Python objects), so the
policy state the gateway keeps per policy object (rate-limit counters...)
survives changes to other APIs.
"""

from __future__ import annotations

import copy
import re
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import structlog
import trio

from wsgate.config import Config, parse_config, read_toml
from wsgate.errors import ConfigError

from . import serialize
from .state import (
    COLLECTIONS,
    Overrides,
    dump_state,
    empty_overrides,
    read_state,
    remove_stale_temporaries,
    write_atomic,
)

if TYPE_CHECKING:
    from wsgate.gateway import Gateway

__all__ = [
    "KEYS",
    "Conflict",
    "Invalid",
    "ManagementError",
    "Manager",
    "NotFound",
    "Problem",
    "StaleVersion",
    "StorageError",
    "Unavailable",
    "manager_for",
    "register_manager",
]

#: The field naming an item of each collection (it is also its URL segment).
KEYS = {"apis": "name", "products": "id", "subscriptions": "id"}

_NOUNS = {"apis": "API", "products": "product", "subscriptions": "subscription"}

#: Label given to parse_config, stripped from its problem lines again.
_LABEL = "config"

_SEGMENT = r'(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*")'
_KEY_RE = re.compile(rf"({_SEGMENT}(?:\[\d+\]|\.{_SEGMENT})*): (.*)", re.DOTALL)
_ITEM_RE = re.compile(r"(apis|products|subscriptions)\[(\d+)\](.*)", re.DOTALL)

Problem = dict[str, Any]  # {"field": str | None, "message": str}


def problem(field: str | None, message: str) -> Problem:
    """One entry of an error response's ``errors`` list."""
    return {"field": field, "message": message}


class ManagementError(Exception):
    """A request the management API refuses; ``problems`` go to the JSON body."""

    status = 400

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{p['field']}: {p['message']}" for p in problems))


class Invalid(ManagementError):
    """400: the change would make the configuration invalid."""


class NotFound(ManagementError):
    """404: no such API, product, subscription or connection."""

    status = 404


class Conflict(ManagementError):
    """409: a name, path or key is taken, or the item is still referenced."""

    status = 409


class StorageError(ManagementError):
    """500: the state file could not be written; the change was not applied."""

    status = 500


class StaleVersion(Conflict):
    """409: ``If-Match`` named a version of the configuration that is no longer current."""

    def __init__(self, current: int, given: int) -> None:
        self.version = current
        super().__init__(
            [
                problem(
                    None,
                    f"the configuration is at version {current}, not {given} (If-Match):"
                    " read it again, then retry the change",
                )
            ]
        )


class Unavailable(ManagementError):
    """503: the shared configuration store ([cluster] Redis) did not answer in time."""

    status = 503


_managers: weakref.WeakKeyDictionary[Gateway, Manager] = weakref.WeakKeyDictionary()


def register_manager(gateway: Gateway, manager: Manager) -> None:
    """Make ``manager`` the one :func:`manager_for` returns for ``gateway`` ([cluster])."""
    _managers[gateway] = manager


def manager_for(gateway: Gateway, state_file: Path | None = None) -> Manager:
    """The one :class:`Manager` of ``gateway``, created (and its state loaded) on first use.

    The admin server and the SIGHUP handler share it, so a reload keeps the
    management API's changes. Raises ConfigError if the state file cannot be
    applied to the running configuration.
    """
    manager = _managers.get(gateway)
    if manager is None:
        manager = Manager(gateway, state_file)
        manager.load_state()
        _managers[gateway] = manager
    elif state_file is not None and manager.state_file != state_file:
        if manager.state_file is not None:
            raise ValueError(f"the gateway is already managed with state file {manager.state_file}")
        manager.state_file = state_file
        manager.load_state()
    return manager


class Manager:
    """Reads and changes ``gateway``'s APIs, products and subscriptions.

    Changes are serialized (one at a time), persisted to ``state_file`` (if
    any) before they are applied, and applied with ``gateway.update_config``.
    """

    def __init__(self, gateway: Gateway, state_file: Path | None = None) -> None:
        self.gateway = gateway
        self.state_file = state_file
        self._overrides = empty_overrides()
        self._lock = trio.Lock()
        self._log = structlog.get_logger("wsgate.admin")
        self._base = self._base_document(gateway.config)
        #: Version of the managed document (APIs, products, subscriptions): +1 per
        #: change; with [cluster] it is the shared document's version in Redis.
        self.version = 1

    # -- reading -------------------------------------------------------------------
    def list_items(self, collection: str) -> list[dict[str, Any]]:
        """Every item of ``collection`` as a JSON table, secrets masked."""
        return [serialize.table(item) for item in getattr(self.gateway.config, collection)]

    def get(self, collection: str, key: str) -> dict[str, Any]:
        """One item as a JSON table, secrets masked; NotFound if there is none."""
        item = self._find(collection, key)
        if item is None:
            raise NotFound([problem(None, f"no {_NOUNS[collection]} {key!r}")])
        return serialize.table(item)

    def exists(self, collection: str, key: str) -> bool:
        """True if ``collection`` has an item ``key`` in the running configuration."""
        return self._find(collection, key) is not None

    @property
    def overrides(self) -> Overrides:
        """The management API's changes (a copy), as stored in the state file."""
        return copy.deepcopy(self._overrides)

    def _find(self, collection: str, key: str) -> Any:
        field = KEYS[collection]
        items = getattr(self.gateway.config, collection)
        return next((item for item in items if getattr(item, field) == key), None)

    # -- changing ------------------------------------------------------------------
    async def create(
        self, collection: str, body: object, *, expect: int | None = None
    ) -> tuple[str, dict[str, Any]]:
        """Add an item whose name/id is in ``body``; Conflict if it exists."""
        field = KEYS[collection]
        if not isinstance(body, Mapping):
            raise Invalid([problem(None, "the request body must be a JSON object")])
        key = body.get(field)
        if not isinstance(key, str):
            message = "missing required key" if key is None else "must be a string"
            raise Invalid([problem(field, message)])
        async with self._lock:
            self._expect(expect)
            if self.exists(collection, key):
                raise Conflict([problem(field, f"{_NOUNS[collection]} {key!r} already exists")])
            await self._change(collection, key, self._checked(collection, key, body))
        return key, self.get(collection, key)

    async def put(
        self, collection: str, key: str, body: object, *, expect: int | None = None
    ) -> tuple[bool, dict[str, Any]]:
        """Create or replace item ``key`` with ``body``; True if it was created."""
        async with self._lock:
            self._expect(expect)
            created = not self.exists(collection, key)
            await self._change(collection, key, self._checked(collection, key, body))
        return created, self.get(collection, key)

    async def patch(
        self, collection: str, key: str, body: object, *, expect: int | None = None
    ) -> dict[str, Any]:
        """Merge ``body`` into item ``key`` (RFC 7396 JSON merge patch: null removes a key)."""
        async with self._lock:
            self._expect(expect)
            current = self._raw(collection, key)
            if current is None:
                raise NotFound([problem(None, f"no {_NOUNS[collection]} {key!r}")])
            patch = self._checked(collection, key, body)
            await self._change(collection, key, _merge_patch(current, patch))
        return self.get(collection, key)

    async def delete(self, collection: str, key: str, *, expect: int | None = None) -> None:
        """Remove item ``key``; Conflict if other items still refer to it."""
        async with self._lock:
            self._expect(expect)
            if not self.exists(collection, key):
                raise NotFound([problem(None, f"no {_NOUNS[collection]} {key!r}")])
            overrides = self.overrides
            if self._in_base(collection, key):
                overrides[collection][key] = None
            else:
                overrides[collection].pop(key, None)
            try:
                config = self._build(self._document(self._base, overrides), None)
            except Invalid as exc:
                raise Conflict(
                    [
                        problem(None, f"{_NOUNS[collection]} {key!r} is still referenced"),
                        *exc.problems,
                    ]
                ) from None
            await self._commit(overrides, config, f"{collection}/{key} deleted")

    async def reload(self) -> list[str]:
        """Re-read the config file and serve it, with the management changes laid over it.

        On any problem the running configuration stays and Invalid lists them.
        Returns warnings (settings that only take effect at restart).
        """
        async with self._lock:
            source = self.gateway.config.source
            if source is None:
                raise Invalid([problem(None, "the gateway was not started from a config file")])
            try:
                base = await self._read_base(source)
                parsed = self._parse(self._document(base, self._overrides), None, reload=True)
            except ConfigError as exc:
                problems = [problem(None, line) for line in exc.problems]
                self._log.warning("config_reload_failed", config=str(source), errors=problems)
                raise Invalid(problems) from None
            except Invalid as exc:
                self._log.warning("config_reload_failed", config=str(source), errors=exc.problems)
                raise
            running = self.gateway.config.gateway
            warnings = [
                f"gateway.{name} differs in {source}: it takes effect at the next restart"
                for name in ("listen", "tls")
                if getattr(parsed.gateway, name) != getattr(running, name)
            ]
            for table in ("admin", "cluster"):
                if getattr(parsed, table) != getattr(self.gateway.config, table):
                    warnings.append(
                        f"[{table}] differs in {source}: it takes effect at the next restart"
                    )
            config = self._adopt(parsed, reload=True)
            self._base = base
            self.version += 1
            self.gateway.update_config(config)
            self._log.info(
                "config_reloaded",
                config=str(source),
                apis=[api.name for api in config.apis],
                warnings=warnings,
            )
            return warnings

    def load_state(self) -> None:
        """Apply the state file's changes to the running configuration (at start)."""
        if self.state_file is None:
            return
        remove_stale_temporaries(self.state_file)
        overrides = read_state(self.state_file)
        if not any(overrides.values()):
            return
        try:
            config = self._build(self._document(self._base, overrides), None)
        except Invalid as exc:
            raise ConfigError(
                [
                    f"{self.state_file}: {p['field']}: {p['message']}"
                    if p["field"]
                    else f"{self.state_file}: {p['message']}"
                    for p in exc.problems
                ]
                + [
                    f"{self.state_file}: the management API's saved changes do not fit the"
                    " config file; fix the file, or move the state file away to start from"
                    " the config file alone"
                ]
            ) from None
        self._overrides = overrides
        self.gateway.update_config(config)
        self._log.info(
            "state_loaded",
            state_file=str(self.state_file),
            changed={c: sorted(overrides[c]) for c in COLLECTIONS if overrides[c]},
        )

    # -- internals -----------------------------------------------------------------
    def _expect(self, expect: int | None) -> None:
        """StaleVersion unless ``expect`` (If-Match) is None or the current version."""
        if expect is not None and expect != self.version:
            raise StaleVersion(self.version, expect)

    async def _read_base(self, source: Path) -> dict[str, Any]:
        """The config file's tables, for a reload (ConfigError if unusable)."""
        return await trio.to_thread.run_sync(read_toml, source)

    def _checked(self, collection: str, key: str, body: object) -> dict[str, Any]:
        """``body`` as the table of item ``key`` (its name/id filled in from the URL)."""
        if not isinstance(body, Mapping):
            raise Invalid([problem(None, "the request body must be a JSON object")])
        field = KEYS[collection]
        given = body.get(field, key)
        if given != key:
            raise Invalid(
                [
                    problem(
                        field,
                        f"{given!r} differs from {key!r} in the URL; renaming is not supported"
                        f" (create the new {_NOUNS[collection]} and delete the old one)",
                    )
                ]
            )
        return copy.deepcopy(_keyed(field, key, body))

    async def _change(self, collection: str, key: str, table: dict[str, Any]) -> None:
        """Validate and apply ``table`` as item ``key`` (the lock is held)."""
        overrides = self.overrides
        overrides[collection][key] = table
        document = self._document(self._base, overrides)
        conflicts = self._conflicts(collection, key, table, document)
        if conflicts:
            raise Conflict(conflicts)
        config = self._build(document, (collection, key))
        await self._commit(overrides, config, f"{collection}/{key} set")

    async def _commit(self, overrides: Overrides, config: Config, change: str) -> None:
        if self.state_file is not None:
            # Not cancellable: once written, the change is applied too.
            try:
                await trio.to_thread.run_sync(write_atomic, self.state_file, dump_state(overrides))
            except OSError as exc:
                self._log.error(
                    "state_file_write_failed", state_file=str(self.state_file), error=str(exc)
                )
                raise StorageError(
                    [problem(None, f"cannot write the state file, nothing changed: {exc}")]
                ) from exc
        self._overrides = overrides
        self.version += 1
        self.gateway.update_config(config)
        self._log.info("config_changed", change=change, version=self.version)

    def _in_base(self, collection: str, key: str) -> bool:
        items = self._base.get(collection)
        field = KEYS[collection]
        return isinstance(items, list) and any(
            isinstance(item, Mapping) and item.get(field) == key for item in items
        )

    def _raw(self, collection: str, key: str) -> dict[str, Any] | None:
        """Item ``key`` as its table in the document (file or management), or None."""
        field = KEYS[collection]
        for item in self._document(self._base, self._overrides).get(collection, []):
            if isinstance(item, Mapping) and item.get(field) == key:
                return copy.deepcopy(dict(item))
        return None

    @staticmethod
    def _document(base: Mapping[str, Any], overrides: Overrides) -> dict[str, Any]:
        """``base`` with ``overrides`` laid over it: replaced in place, deleted, or appended."""
        document = {name: value for name, value in base.items() if name not in COLLECTIONS}
        for collection in COLLECTIONS:
            field = KEYS[collection]
            items = base.get(collection, [])
            pending = dict(overrides.get(collection, {}))
            if not isinstance(items, list):
                document[collection] = items  # invalid: parse_config says so
                continue
            merged: list[Any] = []
            for item in items:
                key = item.get(field) if isinstance(item, Mapping) else None
                if isinstance(key, str) and key in pending:
                    table = pending.pop(key)
                    if table is not None:
                        merged.append(_keyed(field, key, table))
                else:
                    merged.append(item)
            merged.extend(
                _keyed(field, key, table) for key, table in pending.items() if table is not None
            )
            if merged or collection in base:
                document[collection] = merged
        return document

    def _conflicts(
        self, collection: str, key: str, table: Mapping[str, Any], document: Mapping[str, Any]
    ) -> list[Problem]:
        """What in ``table`` collides with another item (409 rather than 400)."""
        running = self.gateway.config
        found: list[Problem] = []
        if collection == "apis":
            path = table.get("path")
            if isinstance(path, str):
                bare = path.strip("/")
                for other in document.get("apis", []):
                    if not isinstance(other, Mapping) or other.get("name") == key:
                        continue
                    other_path = other.get("path")
                    if isinstance(other_path, str) and other_path.strip("/") == bare:
                        found.append(
                            problem("path", f"path {bare!r} is used by API {other.get('name')!r}")
                        )
            if running.product(key) is not None:
                found.append(
                    problem("name", f"{key!r} is a product id; API names and product ids differ")
                )
        elif collection == "products":
            if any(api.name == key for api in running.apis):
                found.append(
                    problem("id", f"{key!r} is an API name; product ids and API names differ")
                )
        elif collection == "subscriptions":
            for name in ("primary_key", "secondary_key"):
                value = table.get(name)
                if isinstance(value, str) and any(
                    value in sub.keys for sub in running.subscriptions if sub.id != key
                ):
                    found.append(
                        problem(name, "another subscription has this key; keys must be unique")
                    )
        return found

    def _build(self, document: Mapping[str, Any], edited: tuple[str, str] | None) -> Config:
        """The Config to serve for ``document``, or Invalid naming every bad field."""
        return self._adopt(self._parse(document, edited))

    def _parse(
        self, document: Mapping[str, Any], edited: tuple[str, str] | None, *, reload: bool = False
    ) -> Config:
        """Validate ``document`` with parse_config; Invalid lists every problem."""
        source = self.gateway.config.source
        try:
            return parse_config(document, source=_LABEL, base_dir=source.parent if source else None)
        except ConfigError as exc:
            raise Invalid(
                [self._problem(line, document, edited, reload) for line in exc.problems]
            ) from None

    def _adopt(self, parsed: Config, *, reload: bool = False) -> Config:
        """``parsed`` made servable by the running gateway.

        The listener settings (listen, tls, and [admin]) stay those of the running
        gateway; the rest of [gateway] is only taken from the file on reload. Items
        equal to running ones are kept as the same objects, with the per-policy
        state the gateway holds for them.
        """
        running = self.gateway.config
        changes: dict[str, Any] = {"source": running.source}
        if reload:
            gateway = attrs.evolve(
                parsed.gateway, listen=running.gateway.listen, tls=running.gateway.tls
            )
            changes["gateway"] = running.gateway if gateway == running.gateway else gateway
        else:
            changes["gateway"] = running.gateway
        changes["admin"] = running.admin
        changes["cluster"] = running.cluster  # fixed while the gateway runs, like [admin]
        for collection in COLLECTIONS:
            field = KEYS[collection]
            old = {getattr(item, field): item for item in getattr(running, collection)}
            changes[collection] = tuple(
                old[key] if (key := getattr(item, field)) in old and old[key] == item else item
                for item in getattr(parsed, collection)
            )
        try:
            return attrs.evolve(parsed, **changes)
        except ValueError as exc:  # defensive: parse_config already checked every rule
            raise Invalid([problem(None, str(exc))]) from None

    def _problem(
        self,
        line: str,
        document: Mapping[str, Any],
        edited: tuple[str, str] | None,
        reload: bool,
    ) -> Problem:
        """A parse_config problem line as {field, message}, the field relative to the body."""
        text = line.removeprefix(f"{_LABEL}: ")
        match = _KEY_RE.fullmatch(text)
        if match is None:
            return problem(None, text)
        key, message = match.groups()
        item = _ITEM_RE.fullmatch(key)
        if item is None or reload:
            return problem(key, message)
        collection, index, rest = item.group(1), int(item.group(2)), item.group(3)
        items = document.get(collection)
        entry = items[index] if isinstance(items, list) and index < len(items) else None
        name = entry.get(KEYS[collection]) if isinstance(entry, Mapping) else None
        if not isinstance(name, str):
            return problem(key, message)
        if edited == (collection, name):
            return problem(rest.removeprefix(".") or None, message)
        return problem(f"{collection}.{name}{rest}", message)

    def _base_document(self, config: Config) -> dict[str, Any]:
        """The running configuration's tables: the config file's, if it still matches."""
        if config.source is not None:
            try:
                from_file = read_toml(config.source)
                parsed = parse_config(from_file, source=_LABEL, base_dir=config.source.parent)
            except ConfigError as exc:
                self._log.warning(
                    "config_file_unusable",
                    config=str(config.source),
                    errors=exc.problems,
                    detail="management changes start from the running configuration",
                )
            else:
                if all(getattr(parsed, c) == getattr(config, c) for c in COLLECTIONS):
                    return from_file
                self._log.warning(
                    "config_file_changed",
                    config=str(config.source),
                    detail="the file differs from the running configuration;"
                    " management changes start from the running one (POST /reload reads"
                    " the file)",
                )
        document: dict[str, Any] = {
            collection: [serialize.table(item, mask=False) for item in getattr(config, collection)]
            for collection in COLLECTIONS
        }
        for table, api in zip(document["apis"], config.apis, strict=True):
            # Config resolves an unset subscription_required from the API's products:
            # leave it unset when it is that value, so it follows later product changes.
            products = [config.product(product_id) for product_id in api.products]
            derived = any(p.subscription_required for p in products if p is not None)
            if api.subscription_required == derived:
                del table["subscription_required"]
        return document


def _keyed(field: str, key: str, table: Mapping[str, Any]) -> dict[str, Any]:
    """``table`` with ``field`` (name or id) set to ``key``, first."""
    return {field: key, **{name: value for name, value in table.items() if name != field}}


def _merge_patch(target: dict[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """RFC 7396: objects merge recursively, null removes a key, anything else replaces."""
    result = dict(target)
    for name, value in patch.items():
        if value is None:
            result.pop(name, None)
        elif isinstance(value, Mapping) and isinstance(result.get(name), Mapping):
            result[name] = _merge_patch(dict(result[name]), value)
        else:
            result[name] = copy.deepcopy(value)
    return result
