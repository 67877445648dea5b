"""Public routes in Caddy through its admin API (PROTOCOL.md §9.8).

Differences from the original agent, on purpose (§17 items 10, 20, 23):
* the HTTPS server is found by its listen address (`caddy_https_listen`), not assumed `srv0`;
* drift is read from Caddy every time (no cached "last applied" hash), so a Caddy restart
  that dropped our routes is seen and healed on the next poll;
* a JSON array is always sent (never `null`); a failed read never becomes "no routes",
  which would delete routes we do not own;
* routes we did not create are kept: ours carry an `@id` *and* the `vars` handler holding
  `service_id` (what this agent and the original one write); anything else is foreign;
* a standalone agent's routes carry its owner mark (`techulus_owner` in that `vars`
  handler, and `<owner>-` before the `@id`, which Caddy wants unique): a registered agent
  owns the routes without a mark, a standalone one only those with its own, so the two
  never take each other's routes on one Caddy;
* routes with no upstream are neither written nor hashed, so they cause no perpetual drift;
* `log_append` is used when the Caddy build has it and left out when it does not;
* every request has a timeout; domains, ids and upstreams are validated before anything
  is sent (a bad route is skipped with one line, counted, and the others are written), the
  JSON sent is read back and must hold exactly the intended routes, and a non-200 answer
  raises with Caddy's own error text;
* an upstream must be `<IPv4>:<port>` inside the deployment networks (§9.9.4): a host name,
  loopback (`127.0.0.1:2019` would publish Caddy's own admin API on a public domain),
  link-local (`169.254.169.254`, cloud metadata) or `0.0.0.0` is refused, and so are the
  addresses of hosts rather than containers: a container subnet's gateway `10.200.X.1`
  (server X itself on its bridge: its sshd or exporters), its network and broadcast
  addresses, and WireGuard server addresses (10.100.0.0/16). The control plane sends
  deployment IPs only (§6.1.3: `<deployment ip>:<container port>`), so the default range is
  the containers' 10.200.0.0/16; a server address passes only when the operator lists a
  range of 10.100.0.0/16 in `caddy_upstream_networks` themselves;
* the read-modify-write of the route list is conditional (`If-Match` with the ETag of our
  read, retried on 412), so a route someone adds between our GET and PATCH is not lost.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote, urlsplit

import urllib3

from agent import validate
from agent.drift import caddy_hash
from agent.model import CaddyRoute, ExpectedState
from agent.problems import ProblemLog
from agent.settings import Settings
from agent.validate import InvalidValue

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024 * 1024
# Deployment IPs live in 10.200.0.0/16, one /24 per server (gateway .1, containers .2-.254,
# §9.9.4); server (WireGuard) addresses in 10.100.0.0/16 are hosts, never upstreams.
CONTAINER_RANGE = ipaddress.IPv4Network("10.200.0.0/16")
SERVER_RANGE = ipaddress.IPv4Network("10.100.0.0/16")
DEFAULT_UPSTREAM_NETWORKS = (str(CONTAINER_RANGE),)
_LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")
# The key of the owner mark in our `vars` handler (standalone agents only).
OWNER_VAR = "techulus_owner"
# Reads and writes of the route list when somebody else keeps changing it in between.
WRITE_ATTEMPTS = 5


class CaddyError(RuntimeError):
    """The admin API is unreachable, refused a change, or does not show what we sent."""


class ConfigChanged(CaddyError):
    """Caddy answered 412: the config changed since we read it (our write was not applied)."""


# --- pure parts --------------------------------------------------------------------------------


def managed_routes(routes: Sequence[CaddyRoute]) -> list[CaddyRoute]:
    """The routes we write: those with at least one upstream (§17 item 20)."""
    return [route for route in routes if route.upstreams]


def parse_upstream_networks(values: Sequence[str]) -> tuple[ipaddress.IPv4Network, ...]:
    """The upstream ranges of a setting; raises CaddyError naming a bad one."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.IPv4Network(str(value).strip()))
        except ValueError as exc:
            raise CaddyError(f"caddy upstream network {value!r} is not an IPv4 network: {exc}") from exc
    if not networks:
        raise CaddyError("no caddy upstream networks configured: every route would be refused")
    return tuple(networks)


def check_upstream(value: str, networks: Sequence[ipaddress.IPv4Network]) -> None:
    """`<IPv4>:<port>` inside `networks`; raises InvalidValue saying why not.

    Addresses that reach this host or its provider rather than a deployment are refused
    even when a wide network (0.0.0.0/0) is configured; loopback only passes when a
    configured network is itself loopback (tests, with local HTTP servers as upstreams).
    """
    host, _ = validate.host_port(value, "upstream")
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        raise InvalidValue(f"upstream {value!r} must be an IPv4 deployment address with a port, not a host name") from None
    for kind, bad in (("unspecified", address.is_unspecified), ("link-local", address.is_link_local),
                      ("multicast", address.is_multicast), ("reserved", address.is_reserved)):
        if bad:
            raise InvalidValue(f"upstream {value!r} is a {kind} address, never a deployment")
    inside = [network for network in networks if address in network]
    if address.is_loopback and not any(network.subnet_of(_LOOPBACK) for network in inside):
        raise InvalidValue(f"upstream {value!r} is a loopback address (it would publish a local service of this server)")
    if address in CONTAINER_RANGE and int(address) & 0xFF in (0, 1, 255):
        role = {0: "network", 1: "gateway (the server itself)", 255: "broadcast"}[int(address) & 0xFF]
        subnet = ipaddress.IPv4Network(f"{address}/24", strict=False)
        raise InvalidValue(f"upstream {value!r} is the {role} address of container subnet {subnet}, never a deployment")
    if address in SERVER_RANGE and not any(network.subnet_of(SERVER_RANGE) for network in inside):
        raise InvalidValue(f"upstream {value!r} is a server's WireGuard address (a host, never a deployment)")
    if not inside:
        allowed = ", ".join(map(str, networks))
        raise InvalidValue(f"upstream {value!r} is outside the deployment networks {allowed}")


def sort_routes(
    routes: Sequence[CaddyRoute], networks: Sequence[ipaddress.IPv4Network] | None = None
) -> tuple[list[CaddyRoute], list[str]]:
    """(the routes safe to send, one problem per skipped route); of two routes with the same
    id the one listed first is kept."""
    if networks is None:
        networks = parse_upstream_networks(DEFAULT_UPSTREAM_NETWORKS)
    usable: list[CaddyRoute] = []
    problems: list[str] = []
    seen: dict[str, str] = {}
    for index, route in enumerate(routes):
        label = f"caddy route #{index}"
        try:
            domain = validate.hostname(route.domain, "domain", allow_wildcard=True)
            label = f"caddy route {domain}"
            if domain != route.domain:
                raise InvalidValue("domain must be lower case without a trailing dot")
            validate.free_text(route.id, "id")
            if not route.id:
                raise InvalidValue("id must not be empty")
            if route.id in seen:
                raise InvalidValue(f"id {route.id!r} is also used by the route for {seen[route.id]}")
            if route.service_id:
                validate.identifier(route.service_id, "serviceId")
            for upstream in route.upstreams:
                check_upstream(upstream, networks)
        except InvalidValue as exc:
            problems.append(f"{label}: {exc}; skipped")
            continue
        seen[route.id] = route.domain
        usable.append(route)
    return usable, problems


def validate_routes(
    routes: Sequence[CaddyRoute], networks: Sequence[ipaddress.IPv4Network] | None = None
) -> list[str]:
    """Every problem with the routes (empty when all of them are safe to send)."""
    return sort_routes(routes, networks)[1]


def check_body(body: list[Any], foreign: list[Any], wanted: Sequence[CaddyRoute], owner: str = "") -> None:
    """Refuse (CaddyError) unless the JSON we are about to send decodes to the foreign routes
    unchanged followed by exactly `wanted`, each matching one host and nothing else."""
    decoded = json.loads(json.dumps(body))
    ours = decoded[len(foreign) :]
    if (
        decoded[: len(foreign)] != json.loads(json.dumps(foreign))
        or len(ours) != len(wanted)
        or not all(is_ours(route, owner) for route in ours)
        or [parse_route(route, owner) for route in ours] != list(wanted)
        or [route.get("match") for route in ours] != [[{"host": [route.domain]}] for route in wanted]
    ):
        raise CaddyError("the routes to send do not read back as the intended routes; nothing was changed")


def caddy_id(route_id: str, owner: str = "") -> str:
    """The `@id` of a route in Caddy: the route's id, after the owner mark if there is one."""
    return f"{owner}-{route_id}" if owner else route_id


def render_route(route: CaddyRoute, log_append: bool, owner: str = "") -> dict[str, Any]:
    variables: dict[str, Any] = {"handler": "vars", "service_id": route.service_id}
    if owner:
        variables[OWNER_VAR] = owner
    handlers: list[dict[str, Any]] = [variables]
    if log_append:
        handlers.append({"handler": "log_append", "key": "service_id", "value": "{http.vars.service_id}"})
    handlers.append({"handler": "reverse_proxy", "upstreams": [{"dial": upstream} for upstream in route.upstreams]})
    return {"@id": caddy_id(route.id, owner), "match": [{"host": [route.domain]}], "handle": handlers}


def is_ours(route: Any, owner: str = "") -> bool:
    """Written by this agent: an `@id` and a `vars` handler with service_id, whose owner mark
    is `owner` ("" = none: the registered agent's and the original one's routes)."""
    if not isinstance(route, dict) or not isinstance(route.get("@id"), str) or not route.get("@id"):
        return False
    if owner and not (route["@id"].startswith(f"{owner}-") and len(route["@id"]) > len(owner) + 1):
        return False
    handlers = route.get("handle")
    if not isinstance(handlers, list):
        return False
    return any(
        isinstance(h, dict) and h.get("handler") == "vars" and "service_id" in h and h.get(OWNER_VAR, "") == owner
        for h in handlers
    )


def parse_route(route: dict[str, Any], owner: str = "") -> CaddyRoute:
    """§9.8.4: one of our route objects back as a CaddyRoute (its id without the owner mark)."""
    domain = ""
    matchers = route.get("match")
    if isinstance(matchers, list) and matchers and isinstance(matchers[0], dict):
        hosts = matchers[0].get("host")
        if isinstance(hosts, list) and hosts and isinstance(hosts[0], str):
            domain = hosts[0]
    service_id = ""
    upstreams: list[str] = []
    for handler in route.get("handle") or []:
        if not isinstance(handler, dict):
            continue
        if handler.get("handler") == "vars" and isinstance(handler.get("service_id"), str):
            service_id = handler["service_id"]
        elif handler.get("handler") == "reverse_proxy":
            for upstream in handler.get("upstreams") or []:
                if isinstance(upstream, dict) and isinstance(upstream.get("dial"), str):
                    upstreams.append(upstream["dial"])
    route_id = route["@id"]
    if owner and route_id.startswith(f"{owner}-"):
        route_id = route_id[len(owner) + 1 :]
    return CaddyRoute(route_id, domain, tuple(upstreams), service_id)


def config_etag(path: str, body: bytes) -> str | None:
    """The ETag Caddy gives `GET <path>`: `"<path> <FNV-1a 32 of the body, hex>"`.

    Caddy 2.6 sends it as an HTTP trailer, which urllib3 drops, so it is computed from the
    exact bytes received (Caddy hashes what it writes). None when `If-Match` cannot carry
    the path (Caddy splits the header on white space).
    """
    if any(ch.isspace() or ch == '"' for ch in path):
        return None
    value = 0x811C9DC5
    for byte in body:
        value = ((value ^ byte) * 0x01000193) & 0xFFFFFFFF
    return f'"{path} {value:08x}"'


def listen_matches(entry: str, wanted: str) -> bool:
    """Does a server `listen` entry serve `wanted` (`:443`, `0.0.0.0:443`, `tcp/:443`...)?"""
    if "/" in entry:
        entry = entry.split("/", 1)[1]
    if entry == wanted:
        return True
    host, _, port = entry.rpartition(":")
    wanted_host, _, wanted_port = wanted.rpartition(":")
    if port != wanted_port:
        return False
    return wanted_host in ("", host) or host in ("", "0.0.0.0", "[::]")


def find_server(servers: Any, wanted: str) -> str:
    if not isinstance(servers, dict) or not servers:
        raise CaddyError("Caddy's config has no HTTP servers (apps.http.servers is empty)")
    for name in sorted(servers):
        server = servers[name]
        listen = server.get("listen") if isinstance(server, dict) else None
        if isinstance(listen, list) and any(isinstance(e, str) and listen_matches(e, wanted) for e in listen):
            return name
    described = ", ".join(f"{n} {s.get('listen') if isinstance(s, dict) else '?'}" for n, s in sorted(servers.items()))
    raise CaddyError(f"no Caddy server listens on {wanted} (servers: {described})")


# --- the adapter -------------------------------------------------------------------------------


class CaddySync:
    """ConfigSync for public routes. `owner` "" is the registered agent; a standalone agent
    passes its owner mark, which marks its routes (see the module docstring)."""

    name = "caddy"

    def __init__(
        self, settings: Settings, *, owner: str = "", upstream_networks: Sequence[str] | None = None
    ) -> None:
        if owner:
            try:
                validate.identifier(owner, "caddy route owner")
            except InvalidValue as exc:
                raise CaddyError(str(exc)) from None
        self.settings = settings
        self.owner = owner
        # Where upstreams may point: `caddy_upstream_networks`, else every server's container
        # range (not the whole mesh: its 10.100/16 half is servers). The keyword override is
        # for tests on 127.0.0.0/8.
        configured = upstream_networks
        if configured is None:
            configured = settings.caddy_upstream_networks
        self.upstream_networks = parse_upstream_networks(tuple(configured or DEFAULT_UPSTREAM_NETWORKS))
        url = settings.caddy_admin_url.rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise CaddyError(f"caddy_admin_url must be an http(s) URL, got {settings.caddy_admin_url!r}")
        self.admin_url = url
        self.listen = settings.caddy_https_listen
        timeout = float(settings.caddy_timeout)
        # Caddy restarts its admin listener around config loads (and after a rejected one)
        # and drops kept-alive connections, so every request uses a fresh connection
        # ("Connection: close") and a reset is retried after a short pause. Every request we
        # send is idempotent: PATCH replaces the whole route list.
        self._http = urllib3.PoolManager(
            num_pools=2, maxsize=2, timeout=urllib3.Timeout(connect=min(timeout, 3.0), read=timeout),
            retries=urllib3.Retry(
                total=3, connect=3, read=3, status=0, other=0, redirect=False, raise_on_status=False,
                allowed_methods=None, backoff_factor=0.05,
            ),
        )
        mode = str(settings.caddy_log_append).lower()
        if mode not in ("auto", "true", "false"):
            raise CaddyError(f"caddy_log_append must be auto, true or false, got {mode!r}")
        # None = not known yet: try it, and fall back once if this Caddy build lacks the module.
        self._log_append: bool | None = None if mode == "auto" else mode == "true"
        # Conditional writes; turned off for good if this Caddy's ETags are not what we compute.
        self._if_match = True
        self.problems = ProblemLog(log, "caddy", cleared="routes are all valid again")

    # ConfigSync ---------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Check the admin API answers and the HTTPS server exists."""
        name = self.server_name()
        log.info("caddy: admin API at %s answers; routes go to server %s", self.admin_url, name)

    def expected_hash(self, state: ExpectedState) -> str:
        return caddy_hash(managed_routes(self.usable(state.caddy_routes)))

    def usable(self, routes: Sequence[CaddyRoute]) -> list[CaddyRoute]:
        """The routes that are sent; the skipped ones are reported once (then counted)."""
        usable, problems = sort_routes(routes, self.upstream_networks)
        self.problems.report(problems)
        return usable

    def actual_hash(self) -> str:
        return caddy_hash(self.live_routes())

    def apply(self, state: ExpectedState) -> None:
        self.apply_routes(state.caddy_routes)

    # ---------------------------------------------------------------------------------------------

    def server_name(self) -> str:
        return find_server(self._get("/config/apps/http/servers"), self.listen)

    def live_routes(self) -> list[CaddyRoute]:
        routes = self._get_routes(self.server_name())
        return [parse_route(route, self.owner) for route in routes if is_ours(route, self.owner)]

    def remove_own(self) -> bool:
        """Remove our routes, keeping every other (a standalone agent going down); True
        when there were any. A Caddy that cannot be asked holds none that matter now (the
        example's host has no Caddy at all), so that is False, logged at DEBUG."""
        if not self.owns_configuration():
            return False
        self.apply_routes([])
        return True

    def owns_configuration(self) -> bool:
        """Whether Caddy holds routes of ours (False when it cannot be asked)."""
        try:
            return bool(self.live_routes())
        except CaddyError as exc:
            log.debug("caddy: cannot tell whether routes of ours exist: %s", exc)
            return False

    def apply_routes(self, routes: Sequence[CaddyRoute]) -> None:
        """Skip the bad routes, write the rest (keeping foreign routes), verify.

        When every listed route is bad nothing is changed: that is a broken list, not a
        request to take every public route down."""
        listed = list(routes)
        usable, problems = sort_routes(listed, self.upstream_networks)
        if listed and not usable:
            raise CaddyError("refusing to change Caddy routes (nothing was changed): " + "; ".join(problems[:5]))
        self.problems.report(problems)
        wanted = managed_routes(usable)
        server = self.server_name()
        config_path = f"/config/apps/http/servers/{server}/routes"
        path = f"/config/apps/http/servers/{quote(server, safe='')}/routes"
        refused_body: bytes | None = None
        for _attempt in range(WRITE_ATTEMPTS):
            raw, body, etag = self._get_for_update(path, config_path)
            existing = self._route_list(raw, server)
            foreign = [route for route in existing if not is_ours(route, self.owner)]
            clash = {r.get("@id") for r in foreign if isinstance(r, dict)} & {caddy_id(r.id, self.owner) for r in wanted}
            if clash:
                raise CaddyError(f"routes not written by the agent already use the @id {', '.join(sorted(map(str, clash)))}")
            try:
                self._write_routes(path, foreign, wanted, raw is not None, etag)
                break
            except ConfigChanged:
                if body == refused_body and self._if_match:
                    # The same bytes were refused twice: this Caddy hashes differently from
                    # config_etag(). Write unconditionally rather than never at all.
                    log.warning("caddy: If-Match is refused although the routes did not change; writing without it")
                    self._if_match = False
                refused_body = body
                log.info("caddy: the routes of %s changed between our read and our write; reading them again", server)
        else:
            raise CaddyError(
                f"the routes of Caddy server {server} changed under every one of {WRITE_ATTEMPTS} writes; nothing was changed"
            )
        live = self.live_routes()
        if caddy_hash(live) != caddy_hash(wanted):
            missing = sorted({r.id for r in wanted} - {r.id for r in live})
            raise CaddyError(f"Caddy does not show the routes just written (missing: {', '.join(missing) or 'none'})")
        log.info("caddy: %d routes on server %s (%d foreign kept)", len(wanted), server, len(foreign))

    # HTTP ----------------------------------------------------------------------------------------

    def _write_routes(self, path: str, foreign: list[Any], wanted: list[CaddyRoute], exists: bool, etag: str | None) -> None:
        """One conditional write; falls back once without log_append when this Caddy lacks it."""
        use_log_append = self._log_append is not False
        try:
            self._put_routes(path, foreign, wanted, use_log_append, exists, etag)
        except ConfigChanged:
            raise
        except CaddyError as exc:
            if not (self._log_append is None and "log_append" in str(exc)):
                raise
            log.warning("caddy: this Caddy build has no log_append handler; routes are written without it")
            self._log_append = False
            # A refused write changed nothing, so the ETag still holds.
            self._put_routes(path, foreign, wanted, False, exists, etag)
        else:
            if use_log_append and wanted:
                self._log_append = True

    def _put_routes(
        self, path: str, foreign: list[Any], wanted: list[CaddyRoute], log_append: bool, exists: bool, etag: str | None
    ) -> None:
        body = foreign + [render_route(route, log_append, self.owner) for route in wanted]
        check_body(body, foreign, wanted, self.owner)
        # PATCH replaces an existing value, only if it is still what we read (If-Match: Caddy
        # answers 412 otherwise); PUT creates a missing one and fails (409) if it appeared
        # meanwhile. Both get a JSON array.
        if exists:
            headers = {"If-Match": etag} if etag and self._if_match else {}
            self._send("PATCH", path, body, headers)
        else:
            self._send("PUT", path, body, {})

    def _get_for_update(self, path: str, config_path: str) -> tuple[Any, bytes, str | None]:
        """GET `path`: (decoded value or None when missing, the raw body, its ETag)."""
        status, data, headers = self._request("GET", path)
        if status == 404:
            return None, data, None
        value = self._decode_get(path, status, data)
        # Caddy >= 2.7 sends the ETag as a header; 2.6 only as a trailer (computed then).
        etag = headers.get("Etag") or config_etag(config_path, data)
        return value, data, etag

    def _get_routes(self, server: str) -> list[Any]:
        return self._route_list(self._get(f"/config/apps/http/servers/{quote(server, safe='')}/routes"), server)

    @staticmethod
    def _route_list(routes: Any, server: str) -> list[Any]:
        if routes is None:
            return []
        if not isinstance(routes, list):
            raise CaddyError(f"Caddy returned {type(routes).__name__} for the routes of {server}, expected a list")
        return routes

    def _get(self, path: str) -> Any:
        status, data, _ = self._request("GET", path)
        if status == 404:
            return None
        return self._decode_get(path, status, data)

    @staticmethod
    def _decode_get(path: str, status: int, data: bytes) -> Any:
        if status != 200:
            raise CaddyError(f"GET {path} from Caddy answered {status}: {_error_text(data)}")
        try:
            return json.loads(data or b"null")
        except json.JSONDecodeError as exc:
            raise CaddyError(f"GET {path} from Caddy returned invalid JSON: {exc}") from exc

    def _send(self, method: str, path: str, body: list[Any], headers: dict[str, str]) -> None:
        status, data, _ = self._request(method, path, json.dumps(body).encode(), headers)
        if status == 412 or (status == 409 and method == "PUT"):
            raise ConfigChanged(f"Caddy refused {method} {path} ({status}): {_error_text(data)}")
        if status != 200:
            raise CaddyError(f"Caddy refused {method} {path} ({status}): {_error_text(data)}")

    def _request(
        self, method: str, path: str, body: bytes | None = None, extra_headers: dict[str, str] | None = None
    ) -> tuple[int, bytes, Any]:
        url = self.admin_url + path
        headers = {"Connection": "close", **(extra_headers or {})}
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            response = self._http.request(method, url, body=body, headers=headers, preload_content=False)
        except urllib3.exceptions.HTTPError as exc:
            raise CaddyError(f"Caddy admin API at {self.admin_url} is unreachable: {exc}") from exc
        try:
            data = response.read(MAX_BODY + 1)
            if len(data) > MAX_BODY:
                raise CaddyError(f"{method} {path}: Caddy's answer exceeds {MAX_BODY} bytes")
        except urllib3.exceptions.HTTPError as exc:
            raise CaddyError(f"{method} {path}: reading Caddy's answer failed: {exc}") from exc
        finally:
            response.release_conn()
        return response.status, data, response.headers


def _error_text(data: bytes) -> str:
    text = data.decode("utf-8", errors="replace").strip()
    try:
        decoded = json.loads(text)
        if isinstance(decoded, dict) and isinstance(decoded.get("error"), str):
            return decoded["error"][:2000]
    except json.JSONDecodeError:
        pass
    return text[:2000] or "(empty body)"
