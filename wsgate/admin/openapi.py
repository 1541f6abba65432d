"""The admin API's OpenAPI 3.1 document, served at ``/openapi.json``."""

from __future__ import annotations

import copy
import functools
from typing import Any

__all__ = ["openapi_document"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Errors"), description)


_AUTH_ERRORS = {
    "401": _error("Missing or wrong bearer token"),
    "403": _error("No admin token is configured: the management API is disabled"),
}

_POLICY = {
    "type": "object",
    "description": "A policy table: `policy` names it, the other keys are its settings"
    " (see docs/policies.md).",
    "required": ["policy"],
    "properties": {"policy": {"type": "string"}},
    "additionalProperties": True,
}

_POLICIES = {"type": "array", "items": _ref("Policy")}

_SECRET = {
    "description": "A key (at least 16 visible ASCII characters), or"
    ' {"env": "VARIABLE"} to read it from the environment. Responses mask it.',
    "oneOf": [
        {"type": "string"},
        {
            "type": "object",
            "required": ["env"],
            "properties": {"env": {"type": "string"}},
            "additionalProperties": False,
        },
    ],
}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["field", "message"],
        "properties": {
            "field": {
                "type": ["string", "null"],
                "description": "The bad field, relative to the request body (e.g. `path`,"
                " `policies[0].calls`); other items as `collection.key.field`; null for the"
                " request as a whole.",
            },
            "message": {"type": "string"},
        },
    },
    "Errors": {
        "type": "object",
        "required": ["errors"],
        "properties": {"errors": {"type": "array", "items": _ref("Error")}},
    },
    "Policy": _POLICY,
    "Api": {
        "type": "object",
        "description": "The same keys as an [[apis]] table of the config file. `name` comes"
        " from the URL when omitted.",
        "properties": {
            "name": {"type": "string", "pattern": "^[a-z0-9][a-z0-9-]*$"},
            "display_name": {"type": "string"},
            "path": {"type": "string", "description": 'URL suffix; "" is the root API'},
            "service_url": {"type": "string", "description": "ws:// or wss:// backend URL"},
            "max_message_size": {"type": "integer", "minimum": 0},
            "idle_timeout": {"type": "number", "minimum": 0},
            "backend_ca_file": {"type": "string"},
            "products": {"type": "array", "items": {"type": "string"}},
            "subscription_required": {"type": "boolean"},
            "subscription_key_header": {"type": "string"},
            "subscription_key_query": {"type": "string"},
            "policies": _POLICIES,
            "inherit_policies": {"type": "boolean"},
        },
        "additionalProperties": False,
    },
    "Product": {
        "type": "object",
        "description": "The same keys as a [[products]] table of the config file.",
        "properties": {
            "id": {"type": "string"},
            "display_name": {"type": "string"},
            "subscription_required": {"type": "boolean"},
            "policies": _POLICIES,
            "inherit_policies": {"type": "boolean"},
        },
        "additionalProperties": False,
    },
    "Subscription": {
        "type": "object",
        "description": "The same keys as a [[subscriptions]] table of the config file."
        ' Responses show keys masked ("****" and their last 4 characters).',
        "properties": {
            "id": {"type": "string"},
            "scope": {"type": "string", "description": 'A product id, an API name, or "all"'},
            "primary_key": _SECRET,
            "secondary_key": _SECRET,
            "state": {"type": "string", "enum": ["active", "suspended"]},
        },
        "additionalProperties": False,
    },
    "Connection": {
        "type": "object",
        "required": ["id", "api", "caller_ip", "connected_since", "last_activity"],
        "properties": {
            "id": {"type": "string", "description": "The pair's correlation id"},
            "api": {"type": "string"},
            "caller_ip": {"type": "string"},
            "connected_since": {"type": "string", "format": "date-time"},
            "last_activity": {"type": "string", "format": "date-time"},
            "messages_from_client": {"type": "integer"},
            "messages_from_backend": {"type": "integer"},
            "bytes_from_client": {"type": "integer"},
            "bytes_from_backend": {"type": "integer"},
            "unit_id": {
                "type": "string",
                "description": "[cluster] only: the unit holding the pair (see /units)",
            },
        },
    },
    "Unit": {
        "type": "object",
        "description": "One live unit of a [cluster] (a process serving the gateway).",
        "required": ["id", "started", "config_version", "open_pairs"],
        "properties": {
            "id": {"type": "string", "description": "host-pid-random, new at each start"},
            "addresses": {"type": "array", "items": {"type": "string"}},
            "admin_address": {"type": ["string", "null"]},
            "pid": {"type": "integer"},
            "started": {"type": "string", "format": "date-time"},
            "config_version": {
                "type": "integer",
                "description": "Version of the shared configuration the unit runs",
            },
            "open_pairs": {"type": "integer"},
        },
    },
    "Stale": {
        "type": "object",
        "required": ["errors", "version"],
        "properties": {
            "errors": {"type": "array", "items": _ref("Error")},
            "version": {"type": "integer", "description": "The current version"},
        },
    },
    "Status": {
        "type": "object",
        "required": ["status"],
        "properties": {
            "status": {"type": "string"},
            "active_pairs": {"type": "integer"},
            "capacity": {"type": "integer"},
        },
    },
    "Deleted": {
        "type": "object",
        "required": ["deleted"],
        "properties": {
            "deleted": {"type": "string"},
            "terminated": {"type": "integer", "description": "APIs only: pairs closed (1001)"},
        },
    },
    "Terminated": {
        "type": "object",
        "properties": {
            "terminated": {"type": "string"},
            "code": {"type": "integer"},
            "reason": {"type": "string"},
            "unit_id": {"type": "string", "description": "[cluster] only: the pair's unit"},
        },
    },
    "Reloaded": {
        "type": "object",
        "properties": {
            "status": {"type": "string"},
            "apis": {"type": "array", "items": {"type": "string"}},
            "warnings": {"type": "array", "items": {"type": "string"}},
        },
    },
}

_COLLECTIONS = (
    ("apis", "name", "Api", "API"),
    ("products", "id", "Product", "product"),
    ("subscriptions", "id", "Subscription", "subscription"),
)


_IF_MATCH = {
    "name": "If-Match",
    "in": "header",
    "required": False,
    "description": "The configuration version the change was built on (the `ETag` of a"
    ' read, e.g. `"7"`): if it is no longer current the answer is 409 with the current'
    " version, and nothing changes. Without it the change applies to the current version.",
    "schema": {"type": "string"},
}

_ETAG = {
    "ETag": {
        "description": 'The configuration version, quoted (`"7"`); with [cluster], the'
        " version of the document shared by every unit",
        "schema": {"type": "string"},
    }
}

_WRITE_ERRORS = {
    "503": _error("[cluster]: Redis did not answer within `timeout`; nothing changed"),
}


def _tagged(response: dict[str, Any]) -> dict[str, Any]:
    return {**response, "headers": _ETAG}


def _stale(description: str) -> dict[str, Any]:
    return {
        "description": description + "; or If-Match names a version that is no longer"
        " current (the body then has `version`)",
        "content": {"application/json": {"schema": {"oneOf": [_ref("Errors"), _ref("Stale")]}}},
    }


def _collection_paths(name: str, key: str, schema: str, noun: str) -> dict[str, Any]:
    tag = [name]
    param = {"name": key, "in": "path", "required": True, "schema": {"type": "string"}}
    body = {"required": True, "content": {"application/json": {"schema": _ref(schema)}}}
    item = _tagged(_json(_ref(schema), f"The {noun} (secrets masked)"))
    delete: dict[str, Any] = {
        "tags": tag,
        "summary": f"Delete a {noun}",
        "operationId": f"delete_{name}",
        "parameters": [_IF_MATCH],
        "responses": {
            "200": _tagged(_json(_ref("Deleted"), "Deleted")),
            "400": _error("A bad If-Match"),
            "404": _error(f"No such {noun}"),
            "409": _stale(f"Other items still refer to the {noun}"),
            **_WRITE_ERRORS,
            **_AUTH_ERRORS,
        },
    }
    if name == "apis":
        delete["description"] = "Open pairs keep flowing unless `terminate=true`."
        delete["parameters"] = [
            _IF_MATCH,
            {
                "name": "terminate",
                "in": "query",
                "required": False,
                "description": "Also close the API's open pairs with 1001",
                "schema": {"type": "boolean", "default": False},
            },
        ]
    return {
        f"/{name}": {
            "get": {
                "tags": tag,
                "summary": f"List every {noun}",
                "operationId": f"list_{name}",
                "responses": {
                    "200": _tagged(
                        _json(
                            {
                                "type": "object",
                                "properties": {name: {"type": "array", "items": _ref(schema)}},
                            },
                            f"Every {noun}",
                        )
                    ),
                    **_AUTH_ERRORS,
                },
            },
            "post": {
                "tags": tag,
                "summary": f"Create a {noun} (its {key} in the body)",
                "operationId": f"create_{name}",
                "parameters": [_IF_MATCH],
                "requestBody": body,
                "responses": {
                    "201": item,
                    "400": _error("Invalid: each bad field is named"),
                    "409": _stale(f"The {key} (or a path or key) is already used"),
                    **_WRITE_ERRORS,
                    **_AUTH_ERRORS,
                },
            },
        },
        f"/{name}/{{{key}}}": {
            "parameters": [param],
            "get": {
                "tags": tag,
                "summary": f"Get a {noun}",
                "operationId": f"get_{name}",
                "responses": {"200": item, "404": _error(f"No such {noun}"), **_AUTH_ERRORS},
            },
            "put": {
                "tags": tag,
                "summary": f"Create or replace a {noun}",
                "operationId": f"put_{name}",
                "parameters": [_IF_MATCH],
                "requestBody": body,
                "responses": {
                    "200": item,
                    "201": item,
                    "400": _error("Invalid: each bad field is named"),
                    "409": _stale("A path, name or key is already used"),
                    **_WRITE_ERRORS,
                    **_AUTH_ERRORS,
                },
            },
            "patch": {
                "tags": tag,
                "summary": f"Change some fields of a {noun} (JSON merge patch)",
                "operationId": f"patch_{name}",
                "parameters": [_IF_MATCH],
                "requestBody": {
                    "required": True,
                    "content": {"application/merge-patch+json": {"schema": {"type": "object"}}},
                },
                "responses": {
                    "200": item,
                    "400": _error("Invalid: each bad field is named"),
                    "404": _error(f"No such {noun}"),
                    "409": _stale("A path, name or key is already used"),
                    **_WRITE_ERRORS,
                    **_AUTH_ERRORS,
                },
            },
            "delete": delete,
        },
    }


@functools.cache
def _document() -> dict[str, Any]:
    paths: dict[str, Any] = {
        "/health": {
            "get": {
                "tags": ["probes"],
                "summary": "Liveness: 200 while the process runs",
                "operationId": "health",
                "security": [],
                "responses": {"200": _json(_ref("Status"), "Alive")},
            }
        },
        "/ready": {
            "get": {
                "tags": ["probes"],
                "summary": "Readiness: 200 while the gateway accepts connections",
                "operationId": "ready",
                "security": [],
                "responses": {
                    "200": _json(_ref("Status"), "Accepting connections"),
                    "503": _json(_ref("Status"), "Starting or draining"),
                },
            }
        },
        "/metrics": {
            "get": {
                "tags": ["probes"],
                "summary": "Prometheus metrics (text exposition format)",
                "operationId": "metrics",
                "security": [],
                "responses": {
                    "200": {
                        "description": "Every metric (docs/metrics.md)",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "tags": ["probes"],
                "summary": "This document",
                "operationId": "openapi",
                "security": [],
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1 document")},
            }
        },
        "/connections": {
            "get": {
                "tags": ["connections"],
                "summary": "List open pairs",
                "operationId": "list_connections",
                "parameters": [
                    {
                        "name": "api",
                        "in": "query",
                        "required": False,
                        "description": "Only this API's pairs",
                        "schema": {"type": "string"},
                    }
                ],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "connections": {"type": "array", "items": _ref("Connection")},
                                "incomplete": {
                                    "type": "string",
                                    "description": "[cluster] only, when Redis did not answer:"
                                    " which part is missing (the other units' pairs)",
                                },
                            },
                        },
                        "Open pairs, oldest first; with [cluster], every live unit's",
                    ),
                    **_AUTH_ERRORS,
                },
            }
        },
        "/connections/{id}": {
            "parameters": [
                {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "get": {
                "tags": ["connections"],
                "summary": "One open pair",
                "operationId": "get_connection",
                "responses": {
                    "200": _json(_ref("Connection"), "The pair"),
                    "404": _error("No such open pair (on any unit)"),
                    "503": _error("[cluster]: not here, and Redis did not answer"),
                    **_AUTH_ERRORS,
                },
            },
            "delete": {
                "tags": ["connections"],
                "summary": "Close one pair with 1008 and a reason",
                "operationId": "terminate_connection",
                "requestBody": {
                    "required": False,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {"reason": {"type": "string"}},
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json(_ref("Terminated"), "Closing (on whichever unit holds it)"),
                    "404": _error("No unit holds such an open pair"),
                    "503": _error("[cluster]: not here, and Redis did not answer"),
                    **_AUTH_ERRORS,
                },
            },
        },
        "/units": {
            "get": {
                "tags": ["connections"],
                "summary": "[cluster]: every live unit",
                "operationId": "list_units",
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "units": {"type": "array", "items": _ref("Unit")},
                                "unit_id": {"type": "string", "description": "This unit"},
                            },
                        },
                        "Live units, oldest first",
                    ),
                    "404": _error("No [cluster] table: this gateway is the only unit"),
                    "503": _error("Redis did not answer"),
                    **_AUTH_ERRORS,
                },
            }
        },
        "/reload": {
            "post": {
                "tags": ["config"],
                "summary": "Re-read the config file (like SIGHUP)",
                "description": "On any problem the running configuration stays. Changes made"
                " through this API are laid over the file again.",
                "operationId": "reload",
                "responses": {
                    "200": _json(_ref("Reloaded"), "Reloaded"),
                    "400": _error("The file is invalid; nothing changed"),
                    **_AUTH_ERRORS,
                },
            }
        },
    }
    for collection in _COLLECTIONS:
        paths.update(_collection_paths(*collection))
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "wsgate admin API",
            "version": "1",
            "description": "Manage and observe a running wsgate WebSocket gateway."
            " Send `Authorization: Bearer <token>` to every endpoint but the probes.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearerAuth": []}],
        "tags": [
            {"name": "probes", "description": "Open: health, readiness, metrics"},
            {"name": "apis"},
            {"name": "products"},
            {"name": "subscriptions"},
            {"name": "connections"},
            {"name": "config"},
        ],
        "paths": paths,
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
        },
    }


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the admin API (a fresh copy)."""
    return copy.deepcopy(_document())
