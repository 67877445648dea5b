"""systemd's notify protocol (READY=1, WATCHDOG=1, STATUS=…) and journal entries, without libsystemd.

Does nothing when NOTIFY_SOCKET (or the journal socket) is missing, so the agent runs the
same outside systemd.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(message: str, environ: dict[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.debug("sd_notify(%s) failed: %s", message, exc)
        return False
    return True


JOURNAL_SOCKET = "/run/systemd/journal/socket"


def journal(message: str, priority: int = 6, unit: str = "", socket_path: str = JOURNAL_SOCKET) -> bool:
    """One entry in the journal (native protocol), tagged `techulus-agent`. `unit` sets
    OBJECT_SYSTEMD_UNIT, which `journalctl -u UNIT` shows for entries sent by root: a
    command run by hand (`agent upgrade`) can so speak in the agent unit's journal.
    Does nothing (returns False) where no journald listens."""
    fields = {"MESSAGE": message, "PRIORITY": str(priority), "SYSLOG_IDENTIFIER": "techulus-agent"}
    if unit:
        fields["OBJECT_SYSTEMD_UNIT"] = unit
    payload = b""
    for key, value in fields.items():
        data = value.encode()
        if b"\n" in data:  # the protocol's binary form: name, newline, 64-bit LE length, data
            payload += key.encode() + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"
        else:
            payload += key.encode() + b"=" + data + b"\n"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(socket_path)
            sock.sendall(payload)
    except OSError as exc:
        log.debug("journal entry not sent: %s", exc)
        return False
    return True
