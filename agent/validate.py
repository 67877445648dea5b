"""Validators for every value that comes from outside (control plane, state file, flags).

Each returns the value it accepts (possibly normalised) or raises InvalidValue with a
message that says what was wrong, so callers can name the field and the item in errors.

There is one strict grammar per kind of value (IPv4, IPv6, CIDR, host:port, WireGuard key,
host name, image reference, env key, container name, id, free text, path), written as
ASCII regular expressions rather than delegated to a library: `ipaddress` accepts a scoped
IPv6 literal whose zone id holds anything but `%` and `/` (newlines included), and
`str.isdigit()` / `int()` accept non-ASCII digits. No value has leading or trailing white
space, and none holds a control character or a Unicode line or paragraph separator,
because every one of them may end up in an argv, a config line or a path.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections.abc import Iterable, Mapping

from agent import crypto


class InvalidValue(ValueError):
    pass


def _got(value: object) -> str:
    """How a rejected value is shown: a missing one says so instead of `got None`; a long
    one is cut, so that a 5,000-character value cannot become a 5,000-character log line."""
    if value is None:
        return "but it is missing"
    text = repr(value)
    return f"got {text[:80]}..." if len(text) > 80 else f"got {text}"


_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_CONTAINER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,252}")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}")
_VOLUME_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_ASCII_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")
# Only hex digits, colons and the dots of an embedded IPv4 tail: no `%` zone id, ever.
_IPV6 = re.compile(r"[0-9A-Fa-f:.]{2,45}")
_PREFIX = re.compile(r"0|[1-9][0-9]{0,2}")
_PORT = re.compile(r"0|[1-9][0-9]{0,4}")
_WG_KEY = re.compile(r"[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=")
# The distribution reference grammar (docker/distribution reference.go), ASCII only, plus
# the control plane's `docker.io/<registry:port>/...` spelling (PROTOCOL.md §6.1).
_DOMAIN_PART = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)"
_DOMAIN = rf"{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*(?::[0-9]{{1,5}})?"
_PATH_PART = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_IMAGE = re.compile(
    rf"(?:docker\.io/)?(?:{_DOMAIN}/)?{_PATH_PART}(?:/{_PATH_PART})*(?::{_TAG})?(?:@{_DIGEST})?"
)
MAX_IMAGE = 512

# Format characters that are allowed in human text: the zero-width (non-)joiners that emoji
# and some scripts need. Every other format character (bidi overrides, BOM, ...) is refused:
# it can make a log line or a label read differently from what it holds.
_ALLOWED_FORMAT = frozenset("\u200c\u200d")
# Control (Cc: C0, DEL, C1 incl. NEL \x85), surrogate (Cs: unencodable), line and paragraph
# separators (Zl \u2028, Zp \u2029) and format characters (Cf).
_REFUSED_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp", "Cf"})


def bad_character(text: str) -> str | None:
    """The first character of `text` that no single-line value may hold, or None.

    `str.splitlines()` breaks at \\n \\r \\v \\f \\x1c-\\x1e \\x85 \\u2028 \\u2029: all of them
    are in the refused categories, so a text that passes is one line for every reader.
    """
    if text.isascii():
        found = _ASCII_CONTROL.search(text)
        return found.group() if found else None
    for char in text:
        if unicodedata.category(char) in _REFUSED_CATEGORIES and char not in _ALLOWED_FORMAT:
            return char
    return None


def _string(value: object, what: str) -> str:
    """A str with no surrounding white space and no control or separator characters."""
    if not isinstance(value, str):
        raise InvalidValue(f"{what} must be a string, {_got(value)}")
    bad = bad_character(value)
    if bad is not None:
        raise InvalidValue(f"{what} must not contain the control or separator character {bad!r}, {_got(value)}")
    if value != value.strip():
        raise InvalidValue(f"{what} must not start or end with white space, {_got(value)}")
    return value


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
    """Human text (service names): printable characters on one line, no surrounding white
    space; None is the empty text."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidValue(f"{what} must be a string, got {type(value).__name__}")
    if len(value) > max_len:
        raise InvalidValue(f"{what} must be at most {max_len} characters, got {len(value)}")
    return _string(value, what)


def image_reference(value: object) -> str:
    """An image reference (`[registry[:port]/]path[:tag][@digest]`), which can never be read
    as an option or split into two arguments."""
    if not isinstance(value, str) or not value:
        raise InvalidValue("image must be a non-empty string")
    if value.startswith("-"):
        raise InvalidValue(f"image must not start with '-' (it would be read as an option): {_got(value)}")
    if len(value) > MAX_IMAGE or not _IMAGE.fullmatch(value):
        raise InvalidValue(f"image must be a registry reference [registry/]name[:tag][@digest], {_got(value)}")
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
    """An absolute path inside a container, as the right-hand side of `--volume=host:path`."""
    if not isinstance(value, str) or not value.startswith("/"):
        raise InvalidValue(f"containerPath must be an absolute path, {_got(value)}")
    if len(value) > 1024:
        raise InvalidValue(f"containerPath must be at most 1024 characters, got {len(value)}")
    _string(value, "containerPath")
    if ":" in value or "," in value:
        raise InvalidValue(f"containerPath must not contain ':' or ',': {_got(value)}")
    if any(part == ".." for part in value.split("/")):
        raise InvalidValue(f"containerPath must not contain '..': {_got(value)}")
    return value


def ipv4(value: object, what: str = "IP address") -> ipaddress.IPv4Address:
    if not isinstance(value, str):
        raise InvalidValue(f"{what} must be a string, {_got(value)}")
    if not _IPV4.fullmatch(value):
        raise InvalidValue(f"{what} is not an IPv4 address (a.b.c.d): {_got(value)}")
    return ipaddress.IPv4Address(value)


def ipv6(value: object, what: str = "IP address") -> ipaddress.IPv6Address:
    """An IPv6 address without a zone id (`fe80::1%eth0` is refused: the zone is free text)."""
    if not isinstance(value, str):
        raise InvalidValue(f"{what} must be a string, {_got(value)}")
    if not _IPV6.fullmatch(value):
        raise InvalidValue(f"{what} is not an IPv6 address (hex digits, ':' and '.', no zone id): {_got(value)}")
    try:
        return ipaddress.IPv6Address(value)
    except ValueError as exc:
        raise InvalidValue(f"{what} is not an IPv6 address: {_got(value)}") from exc


def ip_address(value: object, what: str = "IP address") -> str:
    """An IPv4 or IPv6 address, returned in canonical form."""
    if isinstance(value, str) and ":" in value:
        return str(ipv6(value, what))
    return str(ipv4(value, what))


def cidr(value: object, what: str = "CIDR") -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """`address/prefix` (host bits may be set, as WireGuard allows)."""
    if not isinstance(value, str) or value.count("/") != 1:
        raise InvalidValue(f"{what} must look like address/prefix, {_got(value)}")
    address, _, prefix = value.partition("/")
    if not _PREFIX.fullmatch(prefix):
        raise InvalidValue(f"{what} has no numeric prefix length: {_got(value)}")
    parsed = ipv6(address, what) if ":" in address else ipv4(address, what)
    if int(prefix) > parsed.max_prefixlen:
        raise InvalidValue(f"{what} prefix /{prefix} is longer than {parsed.max_prefixlen}: {_got(value)}")
    return ipaddress.ip_network(f"{parsed}/{int(prefix)}", strict=False)


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
    """An RFC 1123 host name of ASCII labels (lower-cased, one trailing dot dropped); with
    allow_wildcard a leading `*.` is accepted."""
    if not isinstance(value, str) or not value or len(value) > 253 or not value.isascii():
        raise InvalidValue(f"{what} must be an ASCII host name of at most 253 characters, {_got(value)}")
    name = value.lower()
    if name.endswith("."):
        name = name[:-1]
    labels = name.split(".")
    if allow_wildcard and labels[0] == "*":
        labels = labels[1:]
    if not labels or not all(_LABEL.fullmatch(label) for label in labels):
        raise InvalidValue(f"{what} is not a valid host name: {_got(value)}")
    return name


def host_port(value: object, what: str = "address") -> tuple[str, int]:
    """`ipv4:port`, `[ipv6]:port`, `hostname:port`, or `ipv6:port` without brackets (the
    control plane writes a peer endpoint as `<publicIp>:51820`, whatever the address family;
    WireGuard's own parser splits at the last colon too). Returns the host as written."""
    if not isinstance(value, str) or ":" not in value:
        raise InvalidValue(f"{what} must look like host:port, {_got(value)}")
    host, _, port_text = value.rpartition(":")
    if not _PORT.fullmatch(port_text):
        raise InvalidValue(f"{what} has no numeric port: {_got(value)}")
    number = port(int(port_text), f"{what} port")
    if host.startswith("[") and host.endswith("]"):
        ipv6(host[1:-1], what)
    elif ":" in host:
        ipv6(host, what)
    elif _IPV4.fullmatch(host):
        ipv4(host, what)
    else:
        hostname(host, what)
        if host.endswith("."):
            raise InvalidValue(f"{what} host must not end with a dot: {_got(value)}")
    return host, number


def cidr_list(value: object, what: str = "allowedIps") -> str:
    """Comma-separated CIDRs without spaces (kept verbatim: the hash compares the literal string)."""
    if not isinstance(value, str) or not value:
        raise InvalidValue(f"{what} must be a non-empty comma-separated list of CIDRs, {_got(value)}")
    if len(value) > 4096:
        raise InvalidValue(f"{what} must be at most 4096 characters, got {len(value)}")
    if any(char.isspace() for char in value):
        raise InvalidValue(f"{what} must not contain spaces, {_got(value)}")
    for part in value.split(","):
        try:
            cidr(part, "CIDR")
        except InvalidValue as exc:
            raise InvalidValue(f"{what} contains an invalid CIDR {part[:60]!r} ({exc})") from None
    return value


def wireguard_key(value: object, what: str = "publicKey") -> str:
    """44 characters of standard base64 decoding to 32 bytes, nothing around them."""
    if not isinstance(value, str) or not _WG_KEY.fullmatch(value):
        raise InvalidValue(f"{what} must be a 44-character base64 WireGuard key, {_got(value)}")
    try:
        crypto.decode_wireguard_key(value)
    except ValueError as exc:
        raise InvalidValue(f"{what}: {exc}") from exc
    return value


def one_line_text(text: str, what: str) -> list[str]:
    """The lines of a rendered config text; raises unless every line is free of control and
    separator characters, so that every reader (wg-quick's `read`, dnsmasq, Python's
    `splitlines`) sees exactly the same lines."""
    if not text.endswith("\n"):
        raise InvalidValue(f"{what} does not end with a newline")
    lines = text[:-1].split("\n")
    for number, line in enumerate(lines, 1):
        bad = bad_character(line)
        if bad is not None:
            raise InvalidValue(f"{what} line {number} holds the control or separator character {bad!r}")
    return lines


def argv(args: Iterable[str], what: str = "command") -> None:
    """Every argument of a command we start is a str without NUL, control or separator characters."""
    for arg in args:
        if not isinstance(arg, str):
            raise InvalidValue(f"{what}: argument {arg!r} is not a string")
        bad = bad_character(arg)
        if bad is not None:
            raise InvalidValue(f"{what}: argument {arg[:60]!r} holds the control or separator character {bad!r}")


#: Linux's MAX_ARG_STRLEN (32 pages): the longest `KEY=VALUE` string, its NUL included,
#: that an environment handed to execve may hold (podman's, then the container's).
MAX_ENV_ENTRY = 32 * 4096


def env_value(key: str, value: object) -> str:
    """A container's environment value, carried byte for byte through an environment:
    anything (line breaks, quotes, `=`, any Unicode) except what no environment can hold
    (NUL, text that is not UTF-8) or what execve refuses (longer than MAX_ENV_ENTRY)."""
    env_key(key)
    if not isinstance(value, str):
        raise InvalidValue(f"environment variable {key} must be a string, got {type(value).__name__}")
    if "\x00" in value:
        raise InvalidValue(f"environment variable {key} contains a NUL character, which no environment can carry")
    try:
        size = len(key) + 2 + len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidValue(f"environment variable {key} is not valid Unicode text (a lone surrogate)") from None
    if size > MAX_ENV_ENTRY:
        raise InvalidValue(
            f"environment variable {key} is {size - len(key) - 2} bytes long; "
            f"name and value must stay under {MAX_ENV_ENTRY // 1024} KiB (Linux's MAX_ARG_STRLEN)"
        )
    return value


def env_file_entries(text: str) -> list[tuple[str, str]]:
    """An env file as podman's `--env-file` reads it (pkg/env: lines split at \\n, a trailing
    \\r dropped, leading blanks trimmed, `#` lines skipped, KEY=VALUE split at the first `=`;
    a line without `=` imports the host's variable, so it is an error here)."""
    entries = []
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw[:-1] if raw.endswith("\r") else raw
        line = line.lstrip(" \t")
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise InvalidValue(f"env file line {number} has no '=' (podman would import the host's {key[:40]!r})")
        entries.append((key, value))
    return entries


def check_env_file(text: str, env: Mapping[str, str]) -> None:
    """Raise unless `text` reads back, as every podman reads it, as exactly `env` in order
    (the env file carries only the few variables podman itself reads, see agent/host/podman.py).

    Podman >= 4.7 reads a value that opens with a quote as possibly spanning lines, so such a
    value is refused too: one podman would read it differently from another."""
    for key, value in env.items():
        env_key(key)
        if value[:1] in ("\"", "'", "`"):
            raise InvalidValue(f"environment variable {key} starts with a quote, which podman 4.7+ may read across lines")
        if "\n" in value or "\r" in value or "\x00" in value:
            raise InvalidValue(f"environment variable {key} contains a line break or NUL, which an env file cannot carry")
    if env_file_entries(text) != list(env.items()):
        raise InvalidValue("the env file does not read back as the intended variables")
