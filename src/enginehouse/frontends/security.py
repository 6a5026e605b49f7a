"""Who may use which API, and TLS: Triton's restricted-API and SSL options for both protocols.

``--http-restricted-api`` / ``--grpc-restricted-protocol`` take ``<apis>:<header>=<value>``:
requests to any of the comma-separated API groups must carry that header with that value,
else 403 / PERMISSION_DENIED. The groups are Triton's (``health``, ``metadata``, ``inference``,
``shared-memory``, ``model-config``, ``model-repository``, ``statistics``, ``trace``,
``logging``). TLS takes a server certificate and key, and with mutual TLS a root certificate
that client certificates must chain to. Both are parsed once, at start; the request path
only looks a group up in a dict, and not at all when nothing is restricted. Kept free of the
core so that gRPC worker processes import it cheaply.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from enginehouse.errors import PermissionDeniedError

API_GROUPS = (
    "health",
    "metadata",
    "inference",
    "shared-memory",
    "model-config",
    "model-repository",
    "statistics",
    "trace",
    "logging",
)


@dataclass(frozen=True, slots=True)
class Restriction:
    """The header (lower case) and value that open a restricted API group."""

    header: str
    value: str


class RestrictedApis:
    """The API groups that need a header, parsed from Triton-style specs."""

    def __init__(self, rules: Mapping[str, Restriction] | None = None) -> None:
        self.rules: dict[str, Restriction] = dict(rules or {})

    def __bool__(self) -> bool:
        return bool(self.rules)

    @classmethod
    def parse(cls, specs: Iterable[str]) -> RestrictedApis:
        """``["model-repository,shared-memory:admin-key=secret", ...]``; ValueError names
        what is wrong (an unknown group, a group restricted twice, a missing header)."""
        rules: dict[str, Restriction] = {}
        for spec in specs:
            groups, colon, pair = spec.partition(":")
            header, equals, value = pair.partition("=")
            if not colon or not equals or not header.strip() or not groups.strip():
                raise ValueError(f"'{spec}': expected <api>[,<api>...]:<header>=<value>")
            for group in (g.strip() for g in groups.split(",")):
                if group not in API_GROUPS:
                    raise ValueError(
                        f"'{spec}': unknown API '{group}', expected one of {', '.join(API_GROUPS)}"
                    )
                if group in rules:
                    raise ValueError(f"'{spec}': API '{group}' is restricted twice")
                rules[group] = Restriction(header.strip().lower(), value)
        return cls(rules)

    def check(self, group: str, headers: Mapping[str, str]) -> None:
        """Refuse with 403 / PERMISSION_DENIED unless ``headers`` (lower-case names) open
        ``group``."""
        rule = self.rules.get(group)
        if rule is not None and headers.get(rule.header) != rule.value:
            raise PermissionDeniedError(
                f"this API ({group}) is restricted: the request needs the '{rule.header}' "
                "header that the server was started with"
            )

    def headers_for(self, group: str) -> list[tuple[str, str]]:
        """The header a trusted in-server caller sends to use ``group``."""
        rule = self.rules.get(group)
        return [(rule.header, rule.value)] if rule is not None else []

    def to_json(self) -> str:
        return json.dumps({group: asdict(rule) for group, rule in self.rules.items()})

    @classmethod
    def from_json(cls, text: str) -> RestrictedApis:
        return cls({group: Restriction(**rule) for group, rule in json.loads(text).items()})


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """A server's certificate and key; ``root`` verifies client certificates when
    ``mutual`` is set."""

    cert: str
    key: str
    root: str = ""
    mutual: bool = False

    @classmethod
    def from_flags(
        cls, use_ssl: bool, cert: Path | None, key: Path | None, root: Path | None, mutual: bool
    ) -> TlsSettings | None:
        """The settings a protocol's ``--*-use-ssl`` family asks for (None: plain TCP);
        ValueError names a missing or unreadable file."""
        if not use_ssl and not mutual:
            return None
        if cert is None or key is None:
            raise ValueError("TLS needs both a server certificate and a server key")
        if mutual and root is None:
            raise ValueError("mutual TLS needs a root certificate to verify clients with")
        for path in (cert, key, root):
            if path is not None and not path.is_file():
                raise ValueError(f"TLS file {path} does not exist")
        return cls(str(cert), str(key), str(root) if root else "", mutual)

    def ssl_context(self) -> ssl.SSLContext:
        """A server-side context for the HTTP listener."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        if self.root:
            context.load_verify_locations(self.root)
        if self.mutual:
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TlsSettings | None:
        value = json.loads(text)
        return cls(**value) if value else None
