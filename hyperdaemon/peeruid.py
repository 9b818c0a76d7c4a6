"""
Who is on the other end of a loopback TCP connection, and who listens on a
loopback port.

The daemon serves one user (SPEC.md, Security).  TCP carries no credentials,
but on Linux the kernel knows which uid owns each socket: we ask it through
C{sock_diag} netlink (an exact lookup of one socket), or failing that read
C{/proc/net/tcp}.  Both directions use it: the daemon asks who owns a
client's socket (L{peer_uid}, L{same_user}); a client asks who accepted its
connection (L{server_uid}, L{own_server}) or who listens on a port
(L{listener_uid}) before it trusts a daemon-shaped answer.

Elsewhere the uid cannot be learned: these functions return C{None}, the
daemon accepts every command and clients trust any daemon that answers an
identified C{PING}; the README says what that means.
"""

from __future__ import annotations

import errno
import os
import pwd
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
#: The kernel's TCP_LISTEN state (C{0A} in C{/proc/net/tcp}).
_TCP_LISTEN = 10

SUPPORTED = sys.platform.startswith("linux")


class UnknownPeer(Exception):
    """
    The kernel has no owned socket for that connection: it is gone, closed,
    or (a server's end) not accepted yet.
    """


def _sockid(local: tuple[str, int], remote: tuple[str, int]) -> bytes:
    return (
        struct.pack("!HH", local[1], remote[1])
        + socket.inet_aton(local[0]) + bytes(12)
        + socket.inet_aton(remote[0]) + bytes(12)
        + struct.pack("=III", 0, _NOCOOKIE, _NOCOOKIE)
    )


def _diag_by_netlink(local: tuple[str, int], remote: tuple[str, int]) -> tuple[int, int, int]:
    """
    The state, uid and inode of the IPv4 TCP socket the kernel would match
    to C{local} and C{remote} (a listener if C{remote} is C{0.0.0.0:0}).

    @raise UnknownPeer: if there is none.
    @raise OSError: if sock_diag cannot answer.
    """
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
        if -error == errno.ENOENT:
            raise UnknownPeer("no such socket")
        raise OSError(-error, os.strerror(-error))
    fields = _DIAG_MSG.unpack_from(reply, _HEADER.size)
    return fields[1], fields[8], fields[9]


def _uid_by_netlink(local: tuple[str, int], remote: tuple[str, int]) -> int:
    _, uid, inode = _diag_by_netlink(local, remote)
    if inode == 0:
        raise UnknownPeer("the socket is closed, or not accepted yet; its owner is unknown")
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
                    raise UnknownPeer(
                        "the socket is closed, or not accepted yet; its owner is unknown"
                    )
                return int(fields[7])
    raise UnknownPeer("no such socket in /proc/net/tcp")


def _hex6_address(address: tuple[str, int]) -> str:
    packed = socket.inet_pton(socket.AF_INET6, address[0])
    words = struct.unpack("=IIII", packed)
    return "".join(f"{word:08X}" for word in words) + f":{address[1]:04X}"


def _listener_uid_by_procfs(port: int, host: str) -> int | None:
    """
    L{listener_uid} from C{/proc/net/tcp} and C{/proc/net/tcp6}: the most
    specific listener wins, as in the kernel's own choice (an exact IPv4
    address, then an IPv4-mapped IPv6 one, then the IPv4 and IPv6 wildcards;
    C{/proc} does not say whether an IPv6 wildcard is IPv6-only, so it
    counts).
    """
    wanted = {
        ("/proc/net/tcp", _hex_address((host, port))): 4,
        ("/proc/net/tcp6", _hex6_address((f"::ffff:{host}", port))): 3,
        ("/proc/net/tcp", _hex_address(("0.0.0.0", port))): 2,
        ("/proc/net/tcp6", _hex6_address(("::", port))): 1,
    }
    best: tuple[int, int] | None = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as rows:
                next(rows)
                for line in rows:
                    fields = line.split()
                    rank = wanted.get((table, fields[1]))
                    if rank is not None and fields[3] == "0A" and (best is None or rank > best[0]):
                        best = (rank, int(fields[7]))
        except FileNotFoundError:
            continue  # no IPv6 on this machine
    return None if best is None else best[1]


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


def server_uid(sock: socket.socket) -> int | None:
    """
    The uid owning the server end of the connected IPv4 TCP client socket
    C{sock}: the socket its server accepted, so the answer holds for this
    connection whoever listens on the port later.  Ask once the server has
    answered something (a C{PING}): until it accepts the connection, its end
    has no owner yet.

    @return: the uid, or C{None} where the platform cannot tell.
    @raise UnknownPeer: if the server's end is not accepted yet, is closed,
        or is not on this machine.
    @raise OSError: if C{sock} is not connected.
    """
    return peer_uid(sock.getsockname(), sock.getpeername())


def listener_uid(port: int, host: str = "127.0.0.1") -> int | None:
    """
    The uid owning the socket that listens for TCP connections to
    C{host}:C{port} now: the one the kernel would hand a new connection,
    whether it is bound to C{host}, to the wildcard, or is a dual-stack IPv6
    socket.  A listener can change hands at any time: to trust what answers
    on the port, check the connection itself (L{server_uid}).

    @return: the uid, or C{None} if nothing listens there or the platform
        cannot tell.
    """
    if not SUPPORTED:
        return None
    try:
        state, uid, _ = _diag_by_netlink((host, port), ("0.0.0.0", 0))
    except UnknownPeer:
        return None
    except OSError:
        return _listener_uid_by_procfs(port, host)
    return uid if state == _TCP_LISTEN else None


def describe_uid(uid: int) -> str:
    """A uid for a message: C{"nobody (uid 65534)"}, or C{"uid 1234"}."""
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def own_server(transport: "ITransport") -> bool:
    """
    Whether the server end of a connected loopback TCP client C{transport}
    runs as this process's effective uid (L{server_uid}; ask after the
    server has answered).  Where the platform cannot tell, C{True}, as for
    L{same_user}.
    """
    try:
        uid = server_uid(transport.getHandle())
    except (UnknownPeer, OSError, ValueError):
        return False
    return uid is None or uid == os.geteuid()


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
