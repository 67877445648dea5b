"""Adapters for the outside tools the agent drives (podman, dnsmasq, caddy, wireguard, the OS)."""
