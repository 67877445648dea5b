"""One strict grammar per kind of wire value: what each accepts, and the near misses
(zone ids, line breaks, Unicode separators, non-ASCII digits, white space) it refuses."""

from __future__ import annotations

import ipaddress

import pytest

from agent import validate
from agent.validate import InvalidValue

KEY = "A" * 43 + "="
# Every character a reader might take for the end of a line, and other invisible trouble.
SEPARATORS = ["\n", "\r", "\x00", "\x85", "\u2028", "\u2029", "\x0b", "\x0c", "\x1c", "\x1e", "\x7f", "\t", "\u202e", "\ufeff"]


def test_ipaddress_module_accepts_what_we_must_refuse():
    # The reason the grammars are ours: a scoped IPv6 literal carries any text in its zone id.
    ipaddress.ip_address("fe80::1%x\n[Interface]")
    with pytest.raises(InvalidValue):
        validate.ip_address("fe80::1%x\n[Interface]")


@pytest.mark.parametrize("value", ["10.0.0.1", "0.0.0.0", "255.255.255.255"])
def test_ipv4_accepts(value):
    assert str(validate.ipv4(value)) == value


@pytest.mark.parametrize(
    "value",
    ["10.0.0.01", "10.0.0", "10.0.0.256", " 10.0.0.1", "10.0.0.1 ", "10.0.0.1\n", "１0.0.0.1", "10.0.0.1/32", "", None, 1],
)
def test_ipv4_refuses(value):
    with pytest.raises(InvalidValue):
        validate.ipv4(value)


@pytest.mark.parametrize("value", ["fe80::1", "::1", "2001:db8::1", "::ffff:10.0.0.1", "2001:DB8::1"])
def test_ipv6_accepts(value):
    assert validate.ipv6(value) == ipaddress.IPv6Address(value)


@pytest.mark.parametrize(
    "value", ["fe80::1%eth0", "fe80::1%x\n6.6.6.6 www.google.com", "fe80::1 ", "[fe80::1]", "fe80::g", "fe80::1\u2028", ":::"]
)
def test_ipv6_refuses_zone_ids_and_junk(value):
    with pytest.raises(InvalidValue):
        validate.ipv6(value)
    with pytest.raises(InvalidValue):
        validate.ip_address(value)


def test_ip_address_is_canonical():
    assert validate.ip_address("2001:DB8:0::1") == "2001:db8::1"


@pytest.mark.parametrize("value", ["10.100.2.0/24", "10.100.2.7/32", "0.0.0.0/0", "fd00::/64"])
def test_cidr_accepts(value):
    validate.cidr(value)
    assert validate.cidr_list(value) == value


@pytest.mark.parametrize(
    "value",
    ["10.100.2.0", "10.100.2.0/33", "10.100.2.0/024", "10.100.2.0/24 ", "10.100.2.0/ 24", "fe80::%1/64",
     "10.100.2.0/24, 10.200.2.0/24", "10.100.2.0/24,", "10.100.2.0/24\n", "10.100.2.0/２4", "a/b"],
)
def test_cidr_list_refuses(value):
    with pytest.raises(InvalidValue):
        validate.cidr_list(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1.2.3.4:51820", ("1.2.3.4", 51820)), ("[fe80::1]:51820", ("[fe80::1]", 51820)),
     ("2001:db8::1:51820", ("2001:db8::1", 51820)), ("vpn.example.com:1", ("vpn.example.com", 1))],
)
def test_host_port_accepts(value, expected):
    assert validate.host_port(value) == expected


@pytest.mark.parametrize(
    "value",
    ["fe80::1%x\n[Interface]\nPreUp = cd; touch pwned:51820", "[fe80::1%eth0]:51820", "1.2.3.4:0", "1.2.3.4:65536",
     "1.2.3.4:051820", "1.2.3.4:５１８２０", "1.2.3.4", "1.2.3.4 :51820", " 1.2.3.4:51820", "a b:1", "example.com.:1",
     "exa#mple.com:1", ":51820"],
)
def test_host_port_refuses(value):
    with pytest.raises(InvalidValue):
        validate.host_port(value)


def test_wireguard_key_is_exactly_44_base64_characters():
    assert validate.wireguard_key(KEY) == KEY
    for bad in (KEY + "\n", " " + KEY, KEY[:-2] + "B=", "A" * 44, KEY.replace("A", "-", 1)):
        with pytest.raises(InvalidValue):
            validate.wireguard_key(bad)


@pytest.mark.parametrize("value", ["a.internal", "web-1.example.com", "A.Internal."])
def test_hostname_accepts_and_normalises(value):
    assert validate.hostname(value) == value.lower().rstrip(".")


@pytest.mark.parametrize("value", ["a b.internal", "a\n.internal", "-a.internal", "a..internal", "\u212a.internal", "a.internal ", "", "*.a"])
def test_hostname_refuses(value):
    with pytest.raises(InvalidValue):
        validate.hostname(value)


def test_hostname_wildcard_only_when_allowed():
    assert validate.hostname("*.example.com", allow_wildcard=True) == "*.example.com"


@pytest.mark.parametrize(
    "value",
    ["nginx", "docker.io/library/nginx:1.27", "host:5000/app", "docker.io/host:5000/app", "localhost/app:v1",
     "nginx@sha256:" + "a" * 64, "nginx:1.27@sha256:" + "c" * 64, "registry.example.com/a/b_c/d-e:tag.1"],
)
def test_image_reference_accepts(value):
    assert validate.image_reference(value) == value


@pytest.mark.parametrize(
    "value",
    ["--privileged", "nginx latest", "nginx\n--privileged", "reg/x:1,push=false", "nginx:", "nginx:-x", "Nginx", "a//b",
     "nginx@sha256:abc", "nginx\u2028", "x" * 600, "nginx:tag "],
)
def test_image_reference_refuses(value):
    with pytest.raises(InvalidValue):
        validate.image_reference(value)


@pytest.mark.parametrize("bad", SEPARATORS)
def test_free_text_refuses_every_separator_and_control(bad):
    with pytest.raises(InvalidValue):
        validate.free_text(f"Web{bad}App", "serviceName")


@pytest.mark.parametrize("value", ["Web App", "Café ☕", "family 👨\u200d👩\u200d👧", ""])
def test_free_text_accepts_printable_text(value):
    assert validate.free_text(value, "serviceName") == value


@pytest.mark.parametrize("value", [" Web", "Web ", "x" * 257, 5, "\ud800"])
def test_free_text_refuses_padding_length_and_non_text(value):
    with pytest.raises(InvalidValue):
        validate.free_text(value, "serviceName")


def test_names_keys_ids_and_paths():
    assert validate.env_key("DATABASE_URL") == "DATABASE_URL"
    assert validate.container_name("svc-1.a_b") == "svc-1.a_b"
    assert validate.identifier("44444444-4444-4444-8444-444444444444") == "44444444-4444-4444-8444-444444444444"
    assert validate.container_path("/var/lib/data") == "/var/lib/data"
    for check, value in [(validate.env_key, "A B"), (validate.env_key, "A\n"), (validate.container_name, "a\n"),
                         (validate.identifier, "abc "), (validate.identifier, "x" * 129), (validate.identifier, ".."),
                         (validate.container_path, "/data\u2028x"), (validate.container_path, "/data "),
                         (validate.container_path, "/a/../etc"), (validate.volume_name, "a\nb")]:
        with pytest.raises(InvalidValue):
            check(value)


def test_rejections_show_a_bounded_value():
    with pytest.raises(InvalidValue) as caught:
        validate.identifier("x" * 5000, "deploymentId")
    assert len(str(caught.value)) < 300


def test_one_line_text_and_argv():
    assert validate.one_line_text("a = b\n[Peer]\n", "wg0.conf") == ["a = b", "[Peer]"]
    for text in ("a\rb\n", "a\u2028b\n", "a\x00\n", "no newline"):
        with pytest.raises(InvalidValue):
            validate.one_line_text(text, "wg0.conf")
    validate.argv(["podman", "run", "--label=x=Café"])
    with pytest.raises(InvalidValue):
        validate.argv(["podman", "--name=a\nb"])


def test_env_file_reads_back_as_podman_reads_it():
    env = {"A": "1", "URL": "postgres://u:p@h/db?x=y", "EMPTY": "", "SPACES": "  a b  ", "HASH": "#not a comment"}
    text = "".join(f"{key}={value}\n" for key, value in env.items())
    validate.check_env_file(text, env)
    assert validate.env_file_entries("  A=1\r\n# c\n\nB=x=y\n") == [("A", "1"), ("B", "x=y")]
    with pytest.raises(InvalidValue, match="host"):
        validate.env_file_entries("HOME\n")


@pytest.mark.parametrize(
    "env",
    [{"A": "1\nB=2"}, {"A": "1\r"}, {"A": "x\x00"}, {"A": '"multi'}, {"A": "'x'"}, {"A B": "1"}, {"#A": "1"}],
)
def test_env_values_that_podman_would_read_otherwise_are_refused(env):
    text = "".join(f"{key}={value}\n" for key, value in env.items())
    with pytest.raises(InvalidValue):
        validate.check_env_file(text, env)


def test_env_file_that_does_not_match_its_variables_is_refused():
    with pytest.raises(InvalidValue, match="read back"):
        validate.check_env_file("A=1\nB=2\n", {"A": "1"})
