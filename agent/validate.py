"""Validators for every value that comes from outside (control plane, state file, flags).

Each returns the value it accepts (possibly normalised) or raises InvalidValue with a
message that says what was wrong, so callers can name the field and the item in errors.
The rules are strict where a value ends up in an argv, a config line or a path.
"""

from __future__ import annotations

import ipaddress
import re

from agent import crypto


class InvalidValue(ValueError):
    pass


def _got(value: object) -> str:
    """How a rejected value is shown: a missing one says so instead of `got None`."""
    return "but it is missing" if value is None else f"got {value!r}"


_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_CONTAINER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,252}")
_IMAGE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,511}")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}")
_VOLUME_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def identifier(value: object, what: str = "id") -> str:
    """Ids used in labels, names and paths: no `/`, no leading `-` or `.`, not `..`."""
    if not isinstance(value, str) or not _ID.fullmatch(value) or ".." in value:
        raise InvalidValue(f"{what} must be 1-128 characters of [A-Za-z0-9_.-] starting with a letter or digit, {_got(value)}")
    return value


def container_name(value: object) -> str:
    if not isinstance(value, str) or not _CONTAINER_NAME.fullmatch(value):
        raise InvalidValue(f"container name must match [A-Za-z0-9][A-Za-z0-9_.-]*, {_got(value)}")
    return value


def free_text(value: object, what: str, max_len: int = 256) -> str:
    """Human text (service names): any printable characters, no control characters."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidValue(f"{what} must be a string, got {type(value).__name__}")
    if _CONTROL.search(value) or len(value) > max_len:
        raise InvalidValue(f"{what} must be at most {max_len} characters with no control characters (newline, tab, NUL)")
    return value


def image_reference(value: object) -> str:
    """An image reference that can never be read as an option or split into two arguments."""
    if not isinstance(value, str) or not value:
        raise InvalidValue("image must be a non-empty string")
    if value.startswith("-"):
        raise InvalidValue(f"image must not start with '-' (it would be read as an option): {value!r}")
    if not _IMAGE.fullmatch(value):
        raise InvalidValue(f"image must be a registry reference without whitespace or shell characters, {_got(value)}")
    return value


def env_key(value: object) -> str:
    if not isinstance(value, str) or not _ENV_KEY.fullmatch(value):
        raise InvalidValue(f"environment variable name must match [A-Za-z_][A-Za-z0-9_]*, {_got(value)}")
    return value


def volume_name(value: object) -> str:
    if not isinstance(value, str) or not _VOLUME_NAME.fullmatch(value) or ".." in value:
        raise InvalidValue(f"volume name must be [A-Za-z0-9_.-] without '/' or '..', {_got(value)}")
    return value


def container_path(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise InvalidValue(f"containerPath must be an absolute path, {_got(value)}")
    if _CONTROL.search(value) or ":" in value or "," in value or len(value) > 1024:
        raise InvalidValue(f"containerPath must not contain control characters, ':' or ',': {value!r}")
    if any(part == ".." for part in value.split("/")):
        raise InvalidValue(f"containerPath must not contain '..': {value!r}")
    return value


def ipv4(value: object, what: str = "IP address") -> ipaddress.IPv4Address:
    if not isinstance(value, str):
        raise InvalidValue(f"{what} must be a string, {_got(value)}")
    try:
        return ipaddress.IPv4Address(value)
    except ValueError as exc:
        raise InvalidValue(f"{what} is not an IPv4 address: {value!r}") from exc


def ip_address(value: object, what: str = "IP address") -> str:
    if not isinstance(value, str):
        raise InvalidValue(f"{what} must be a string, {_got(value)}")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError as exc:
        raise InvalidValue(f"{what} is not an IP address: {value!r}") from exc


def container_ip(value: object, subnet: ipaddress.IPv4Network) -> str:
    address = ipv4(value, "ipAddress")
    if address not in subnet:
        raise InvalidValue(f"ipAddress {address} is outside this server's container subnet {subnet}")
    host = int(address) - int(subnet.network_address)
    if host < 2 or host > subnet.num_addresses - 2:
        raise InvalidValue(f"ipAddress {address} is the network, gateway or broadcast address of {subnet}")
    return str(address)


def port(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise InvalidValue(f"{what} must be an integer 1..65535, {_got(value)}")
    return value


def bounded_int(value: object, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidValue(f"{what} must be an integer {low}..{high}, {_got(value)}")
    return value


def hostname(value: object, what: str = "hostname", allow_wildcard: bool = False) -> str:
    """An RFC 1123 host name (lower-cased); with allow_wildcard a leading `*.` is accepted."""
    if not isinstance(value, str) or not value or len(value) > 253:
        raise InvalidValue(f"{what} must be a host name, {_got(value)}")
    name = value.lower().rstrip(".")
    labels = name.split(".")
    if allow_wildcard and labels[0] == "*":
        labels = labels[1:]
    if not labels or not all(_LABEL.fullmatch(label) for label in labels):
        raise InvalidValue(f"{what} is not a valid host name: {value!r}")
    return name


def host_port(value: object, what: str = "address") -> tuple[str, int]:
    """`ipv4:port`, `[ipv6]:port`, `hostname:port`, or `ipv6:port` without brackets (the
    control plane writes a peer endpoint as `<publicIp>:51820`, whatever the address family;
    WireGuard's own parser splits at the last colon too)."""
    if not isinstance(value, str) or ":" not in value:
        raise InvalidValue(f"{what} must look like host:port, {_got(value)}")
    host, _, port_text = value.rpartition(":")
    if not port_text.isdigit():
        raise InvalidValue(f"{what} has no numeric port: {value!r}")
    number = port(int(port_text), f"{what} port")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError as exc:
            raise InvalidValue(f"{what} has an invalid IPv6 address: {value!r}") from exc
        return host, number
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            hostname(host, what)
    return host, number


def cidr_list(value: object, what: str = "allowedIps") -> str:
    """Comma-separated CIDRs (kept verbatim: the hash compares the literal string)."""
    if not isinstance(value, str) or not value:
        raise InvalidValue(f"{what} must be a non-empty comma-separated list of CIDRs")
    for part in value.split(","):
        try:
            ipaddress.ip_network(part.strip(), strict=False)
        except ValueError as exc:
            raise InvalidValue(f"{what} contains an invalid CIDR {part!r}") from exc
        if part != part.strip():
            raise InvalidValue(f"{what} must not contain spaces: {value!r}")
    return value


def wireguard_key(value: object, what: str = "publicKey") -> str:
    if not isinstance(value, str):
        raise InvalidValue(f"{what} must be a string")
    try:
        crypto.decode_wireguard_key(value)
    except ValueError as exc:
        raise InvalidValue(f"{what}: {exc}") from exc
    return value
