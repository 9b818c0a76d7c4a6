"""
Unit tests for L{hyperdaemon.peeruid} over real loopback sockets (plain
C{socket}, ephemeral ports; no Twisted reactor).  Linux only; the tests
with a socket of another uid need root.
"""

from __future__ import annotations

import os
import socket
from typing import Callable, Iterator, TypeVar

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from hyperdaemon import peeruid
from hyperdaemon.peeruid import (
    UnknownPeer,
    _listener_uid_by_procfs,
    _uid_by_netlink,
    _uid_by_procfs,
    describe_uid,
    listener_uid,
    own_server,
    peer_uid,
    same_user,
    server_uid,
)

#: A uid that is not ours, for the tests that can create sockets as another
#: user (only root can).
OTHER_UID = 65534

Address = tuple[str, int]
T = TypeVar("T")


class SocketsTestCase:
    """Tests whose sockets (in C{self.sockets}) are closed after them."""

    @pytest.fixture(autouse=True)
    def _sockets(self) -> Iterator[None]:
        self.sockets: list[socket.socket] = []
        yield
        for s in reversed(self.sockets):
            s.close()


@pytest.mark.skipif(not peeruid.SUPPORTED, reason="peer uids are only looked up on Linux")
class PeerUidTests(SocketsTestCase):

    def sock(self, owner_uid: int | None = None) -> socket.socket:
        """A TCP socket closed after the test, created as C{owner_uid}."""
        if owner_uid is None or owner_uid == os.geteuid():
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        else:
            # The kernel records the creating euid as the socket's owner.
            saved = os.geteuid()
            os.seteuid(owner_uid)
            try:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            finally:
                os.seteuid(saved)
        self.sockets.append(s)
        return s

    def connected_pair(
        self,
        server_host: str = "127.0.0.1",
        client_host: str = "127.0.0.1",
        client_uid: int | None = None,
    ) -> tuple[Address, Address]:
        """
        Connect a client to a server over loopback; return the accepted
        socket's address and its peer's, as the server sees them.
        """
        listener = self.sock()
        listener.bind((server_host, 0))
        listener.listen(1)
        client = self.sock(client_uid)
        client.bind((client_host, 0))
        client.connect(listener.getsockname())
        accepted, _ = listener.accept()
        self.sockets.append(accepted)
        server_address, client_address = accepted.getsockname(), accepted.getpeername()
        # Sanity: the server's view of the client is the client's own address.
        assert client_address == client.getsockname()
        return server_address, client_address

    def absent_pair(self) -> tuple[Address, Address]:
        """Two addresses that no connection can have: both ports are held, unconnected."""
        held = []
        for _ in range(2):
            s = self.sock()
            s.bind(("127.0.0.1", 0))
            held.append(s.getsockname())
        return held[0], held[1]

    def transport_for(self, server: Address, client: Address) -> StringTransport:
        return StringTransport(
            hostAddress=IPv4Address("TCP", *server), peerAddress=IPv4Address("TCP", *client)
        )

    def require_root(self) -> None:
        if os.geteuid() != 0:
            pytest.skip("only root can create a socket owned by another uid")

    # -- tests ----------------------------------------------------------------

    def test_peer_uid_of_a_connected_client_is_our_euid(self) -> None:
        server, client = self.connected_pair()
        assert peer_uid(server, client) == os.geteuid()

    def test_netlink_gives_our_euid_for_our_client(self) -> None:
        server, client = self.connected_pair()
        assert _uid_by_netlink(client, server) == os.geteuid()

    def test_procfs_gives_our_euid_for_our_client(self) -> None:
        server, client = self.connected_pair()
        assert _uid_by_procfs(client, server) == os.geteuid()

    def test_netlink_and_procfs_agree(self) -> None:
        server, client = self.connected_pair()
        assert _uid_by_netlink(client, server) == _uid_by_procfs(client, server)

    def test_netlink_and_procfs_agree_on_distinct_loopback_addresses(self) -> None:
        # Different server and client addresses catch a swapped or
        # mis-ordered address encoding that 127.0.0.1 on both ends hides.
        server, client = self.connected_pair(server_host="127.0.0.2", client_host="127.0.0.3")
        assert server[0] == "127.0.0.2"
        assert client[0] == "127.0.0.3"
        assert _uid_by_netlink(client, server) == os.geteuid()
        assert _uid_by_procfs(client, server) == os.geteuid()
        assert peer_uid(server, client) == os.geteuid()

    def test_peer_uid_names_another_users_client(self) -> None:
        self.require_root()
        server, client = self.connected_pair(client_uid=OTHER_UID)
        assert peer_uid(server, client) == OTHER_UID

    def test_netlink_and_procfs_agree_on_another_users_client(self) -> None:
        self.require_root()
        server, client = self.connected_pair(client_uid=OTHER_UID)
        assert _uid_by_netlink(client, server) == OTHER_UID
        assert _uid_by_procfs(client, server) == OTHER_UID

    def test_netlink_raises_unknown_peer_for_a_tuple_with_no_socket(self) -> None:
        local, remote = self.absent_pair()
        with pytest.raises(UnknownPeer):
            _uid_by_netlink(local, remote)

    def test_procfs_raises_unknown_peer_for_a_tuple_with_no_socket(self) -> None:
        local, remote = self.absent_pair()
        with pytest.raises(UnknownPeer):
            _uid_by_procfs(local, remote)

    def test_peer_uid_raises_unknown_peer_for_a_tuple_with_no_socket(self) -> None:
        server, client = self.absent_pair()
        with pytest.raises(UnknownPeer):
            peer_uid(server, client)

    def test_same_user_accepts_our_own_client(self) -> None:
        server, client = self.connected_pair()
        assert same_user(self.transport_for(server, client))

    def test_same_user_refuses_a_peer_that_is_gone(self) -> None:
        server, client = self.absent_pair()
        assert not same_user(self.transport_for(server, client))

    def test_same_user_refuses_another_users_client(self) -> None:
        self.require_root()
        server, client = self.connected_pair(client_uid=OTHER_UID)
        assert not same_user(self.transport_for(server, client))


@pytest.mark.skipif(not peeruid.SUPPORTED, reason="socket owners are only looked up on Linux")
class ServerAndListenerUidTests(SocketsTestCase):
    """The client's side: who accepted our connection, who listens on a port."""

    def as_uid(self, uid: int | None, make: Callable[[], T]) -> T:
        """C{make()} run with the effective uid C{uid} (the owner of what it creates)."""
        if uid is None or uid == os.geteuid():
            return make()
        if os.geteuid() != 0:
            pytest.skip("only root can create a socket owned by another uid")
        saved = os.geteuid()
        os.seteuid(uid)
        try:
            return make()
        finally:
            os.seteuid(saved)

    def listener(self, host: str = "127.0.0.1", owner: int | None = None,
                 family: socket.AddressFamily = socket.AF_INET,
                 v6only: bool | None = None) -> tuple[socket.socket, int]:
        s = self.as_uid(owner, lambda: socket.socket(family, socket.SOCK_STREAM))
        self.sockets.append(s)
        if v6only is not None:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        s.bind((host, 0))
        s.listen()
        return s, s.getsockname()[1]

    def client(self, port: int) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sockets.append(s)
        return s

    def accept(self, listener: socket.socket, owner: int | None = None) -> socket.socket:
        accepted, _ = self.as_uid(owner, listener.accept)
        self.sockets.append(accepted)
        return accepted

    # -- server_uid -------------------------------------------------------------

    def test_server_uid_of_a_connection_we_accepted_is_our_euid(self) -> None:
        listener, port = self.listener()
        client = self.client(port)
        self.accept(listener)
        assert server_uid(client) == os.geteuid()

    def test_server_uid_names_the_user_who_accepted_the_connection(self) -> None:
        # The listener is ours; the process that accepted is another user's:
        # it is the one that reads what we send.
        listener, port = self.listener()
        client = self.client(port)
        self.accept(listener, owner=OTHER_UID)
        assert server_uid(client) == OTHER_UID

    def test_server_uid_of_another_users_daemon(self) -> None:
        listener, port = self.listener(owner=OTHER_UID)
        client = self.client(port)
        self.accept(listener, owner=OTHER_UID)
        assert server_uid(client) == OTHER_UID

    def test_server_uid_is_unknown_until_the_server_accepts(self) -> None:
        _, port = self.listener()
        client = self.client(port)
        with pytest.raises(UnknownPeer):
            server_uid(client)

    def test_server_uid_is_unknown_once_the_server_closed_its_end(self) -> None:
        listener, port = self.listener()
        client = self.client(port)
        self.accept(listener).close()
        with pytest.raises(UnknownPeer):
            server_uid(client)

    def test_own_server_for_a_twisted_client_transport(self) -> None:
        listener, port = self.listener()
        theirs = self.client(port)
        self.accept(listener, owner=OTHER_UID)
        mine = self.client(port)
        self.accept(listener)

        class Transport:
            """What own_server uses of a Twisted TCP client transport."""

            def __init__(self, sock: socket.socket) -> None:
                self.sock = sock

            def getHandle(self) -> socket.socket:
                return self.sock

        assert not own_server(Transport(theirs))  # type: ignore[arg-type]
        assert own_server(Transport(mine))  # type: ignore[arg-type]

    # -- listener_uid -----------------------------------------------------------

    def test_listener_uid_of_our_listener(self) -> None:
        _, port = self.listener()
        assert listener_uid(port) == os.geteuid()

    def test_listener_uid_of_another_users_listener(self) -> None:
        _, port = self.listener(owner=OTHER_UID)
        assert listener_uid(port) == OTHER_UID
        assert listener_uid(port, "127.0.0.1") == OTHER_UID

    def test_listener_uid_of_a_wildcard_listener(self) -> None:
        _, port = self.listener("0.0.0.0", owner=OTHER_UID)
        assert listener_uid(port) == OTHER_UID

    def test_listener_uid_of_a_dual_stack_ipv6_listener(self) -> None:
        if not socket.has_ipv6:
            pytest.skip("no IPv6")
        _, port = self.listener("::", owner=OTHER_UID, family=socket.AF_INET6, v6only=False)
        assert listener_uid(port) == OTHER_UID

    def test_an_ipv6_only_listener_does_not_hold_the_ipv4_port(self) -> None:
        if not socket.has_ipv6:
            pytest.skip("no IPv6")
        _, port = self.listener("::", owner=OTHER_UID, family=socket.AF_INET6, v6only=True)
        assert listener_uid(port) is None

    def test_listener_uid_is_none_where_nothing_listens(self) -> None:
        s = socket.socket()
        self.sockets.append(s)
        s.bind(("127.0.0.1", 0))  # bound, never listening
        assert listener_uid(s.getsockname()[1]) is None

    def test_a_connection_is_not_a_listener(self) -> None:
        # The port of our own end of a connection: nothing listens there.
        listener, port = self.listener()
        client = self.client(port)
        self.accept(listener)
        assert listener_uid(client.getsockname()[1]) is None

    def test_procfs_agrees_with_netlink_on_listeners(self) -> None:
        _, ours = self.listener()
        _, theirs = self.listener(owner=OTHER_UID)
        _, wildcard = self.listener("0.0.0.0", owner=OTHER_UID)
        nothing = socket.socket()
        self.sockets.append(nothing)
        nothing.bind(("127.0.0.1", 0))
        for port in (ours, theirs, wildcard, nothing.getsockname()[1]):
            assert _listener_uid_by_procfs(port, "127.0.0.1") == listener_uid(port), port

    def test_listener_uid_falls_back_to_procfs(self, monkeypatch: pytest.MonkeyPatch) -> None:
        _, port = self.listener(owner=OTHER_UID)

        def broken(local: Address, remote: Address) -> tuple[int, int, int]:
            raise OSError("sock_diag is not available")

        monkeypatch.setattr(peeruid, "_diag_by_netlink", broken)
        assert listener_uid(port) == OTHER_UID

    def test_describe_uid(self) -> None:
        assert describe_uid(0) == "root (uid 0)"
        assert describe_uid(2_000_000_123) == "uid 2000000123"
