"""
Who is on the other end of a loopback TCP connection.

The daemon serves one user (SPEC.md, Security).  TCP carries no credentials,
but on Linux the kernel knows which uid owns the client's socket: we ask it
through C{sock_diag} netlink (an exact lookup of one socket), or failing that
read C{/proc/net/tcp}.  Elsewhere the uid cannot be learned and
L{peer_uid} returns C{None}; the README says what that means.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from twisted.internet.interfaces import ITransport

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_NOCOOKIE = 0xFFFFFFFF
_HEADER = struct.Struct("=IHHII")
# inet_diag_msg: family, state, timer, retrans, sockid (48 bytes), expires,
# rqueue, wqueue, uid, inode.
_DIAG_MSG = struct.Struct("=BBBB48sIIIII")

SUPPORTED = sys.platform.startswith("linux")


class UnknownPeer(Exception):
    """The kernel has no socket for that connection (it is already gone)."""


def _sockid(local: tuple[str, int], remote: tuple[str, int]) -> bytes:
    return (
        struct.pack("!HH", local[1], remote[1])
        + socket.inet_aton(local[0]) + bytes(12)
        + socket.inet_aton(remote[0]) + bytes(12)
        + struct.pack("=III", 0, _NOCOOKIE, _NOCOOKIE)
    )


def _uid_by_netlink(local: tuple[str, int], remote: tuple[str, int]) -> int:
    request = struct.pack("=BBBBI", socket.AF_INET, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF)
    request += _sockid(local, remote)
    message = _HEADER.pack(_HEADER.size + len(request), _SOCK_DIAG_BY_FAMILY,
                           _NLM_F_REQUEST, 1, 0) + request
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(1.0)
        nl.sendto(message, (0, 0))
        reply = nl.recv(8192)
    length, kind, _, _, _ = _HEADER.unpack_from(reply)
    if kind == _NLMSG_ERROR:
        (error,) = struct.unpack_from("=i", reply, _HEADER.size)
        if error == 0:
            raise OSError("empty sock_diag answer")
        raise UnknownPeer(f"no such socket (errno {-error})")
    fields = _DIAG_MSG.unpack_from(reply, _HEADER.size)
    uid, inode = fields[8], fields[9]
    if inode == 0:
        raise UnknownPeer("the client closed its socket; its owner is unknown")
    return uid


def _hex_address(address: tuple[str, int]) -> str:
    (packed,) = struct.unpack("=I", socket.inet_aton(address[0]))
    return f"{packed:08X}:{address[1]:04X}"


def _uid_by_procfs(local: tuple[str, int], remote: tuple[str, int]) -> int:
    want_local, want_remote = _hex_address(local), _hex_address(remote)
    with open("/proc/net/tcp", encoding="ascii") as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[1] == want_local and fields[2] == want_remote:
                if fields[9] == "0":
                    raise UnknownPeer("the client closed its socket; its owner is unknown")
                return int(fields[7])
    raise UnknownPeer("no such socket in /proc/net/tcp")


def peer_uid(server: tuple[str, int], client: tuple[str, int]) -> int | None:
    """
    The uid owning the client end of the IPv4 TCP connection between
    C{server} (our accepted socket's address) and C{client} (its peer).

    @return: the uid, or C{None} where the platform cannot tell.
    @raise UnknownPeer: if the client's socket no longer exists, is not on
        this machine, or is closed (an orphaned socket reports uid 0, which
        must not pass for root).
    """
    if not SUPPORTED:
        return None
    try:
        return _uid_by_netlink(client, server)
    except OSError:
        return _uid_by_procfs(client, server)


def same_user(transport: "ITransport") -> bool:
    """
    Whether the peer of a connected loopback TCP C{transport} runs as this
    process's effective uid.  Where the platform cannot tell, C{True}: the
    C{hyperd} password and the 0600 discovery file still protect the data.
    """
    host, peer = transport.getHost(), transport.getPeer()
    try:
        uid = peer_uid((host.host, host.port), (peer.host, peer.port))
    except (UnknownPeer, OSError, ValueError):
        return False
    return uid is None or uid == os.geteuid()
