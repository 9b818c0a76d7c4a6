"""
Unit tests for L{hyperdaemon.peeruid} over real loopback sockets (plain
C{socket}, ephemeral ports; no Twisted reactor).  Linux only.
"""

from __future__ import annotations

import os
import socket

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from hyperdaemon import peeruid
from hyperdaemon.peeruid import UnknownPeer, _uid_by_netlink, _uid_by_procfs, peer_uid, same_user

#: A uid that is not ours, for the tests that can create sockets as another
#: user (only root can).
OTHER_UID = 65534

Address = tuple[str, int]


class PeerUidTests(SynchronousTestCase):
    if not peeruid.SUPPORTED:
        skip = "peer uids are only looked up on Linux"

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
        self.addCleanup(s.close)
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
        self.addCleanup(accepted.close)
        server_address, client_address = accepted.getsockname(), accepted.getpeername()
        # Sanity: the server's view of the client is the client's own address.
        self.assertEqual(client_address, client.getsockname())
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
            raise SkipTest("only root can create a socket owned by another uid")

    # -- tests ----------------------------------------------------------------

    def test_peer_uid_of_a_connected_client_is_our_euid(self) -> None:
        server, client = self.connected_pair()
        self.assertEqual(peer_uid(server, client), os.geteuid())

    def test_netlink_gives_our_euid_for_our_client(self) -> None:
        server, client = self.connected_pair()
        self.assertEqual(_uid_by_netlink(client, server), os.geteuid())

    def test_procfs_gives_our_euid_for_our_client(self) -> None:
        server, client = self.connected_pair()
        self.assertEqual(_uid_by_procfs(client, server), os.geteuid())

    def test_netlink_and_procfs_agree(self) -> None:
        server, client = self.connected_pair()
        self.assertEqual(_uid_by_netlink(client, server), _uid_by_procfs(client, server))

    def test_netlink_and_procfs_agree_on_distinct_loopback_addresses(self) -> None:
        # Different server and client addresses catch a swapped or
        # mis-ordered address encoding that 127.0.0.1 on both ends hides.
        server, client = self.connected_pair(server_host="127.0.0.2", client_host="127.0.0.3")
        self.assertEqual(server[0], "127.0.0.2")
        self.assertEqual(client[0], "127.0.0.3")
        self.assertEqual(_uid_by_netlink(client, server), os.geteuid())
        self.assertEqual(_uid_by_procfs(client, server), os.geteuid())
        self.assertEqual(peer_uid(server, client), os.geteuid())

    def test_peer_uid_names_another_users_client(self) -> None:
        self.require_root()
        server, client = self.connected_pair(client_uid=OTHER_UID)
        self.assertEqual(peer_uid(server, client), OTHER_UID)

    def test_netlink_and_procfs_agree_on_another_users_client(self) -> None:
        self.require_root()
        server, client = self.connected_pair(client_uid=OTHER_UID)
        self.assertEqual(_uid_by_netlink(client, server), OTHER_UID)
        self.assertEqual(_uid_by_procfs(client, server), OTHER_UID)

    def test_netlink_raises_unknown_peer_for_a_tuple_with_no_socket(self) -> None:
        local, remote = self.absent_pair()
        self.assertRaises(UnknownPeer, _uid_by_netlink, local, remote)

    def test_procfs_raises_unknown_peer_for_a_tuple_with_no_socket(self) -> None:
        local, remote = self.absent_pair()
        self.assertRaises(UnknownPeer, _uid_by_procfs, local, remote)

    def test_peer_uid_raises_unknown_peer_for_a_tuple_with_no_socket(self) -> None:
        server, client = self.absent_pair()
        self.assertRaises(UnknownPeer, peer_uid, server, client)

    def test_same_user_accepts_our_own_client(self) -> None:
        server, client = self.connected_pair()
        self.assertTrue(same_user(self.transport_for(server, client)))

    def test_same_user_refuses_a_peer_that_is_gone(self) -> None:
        server, client = self.absent_pair()
        self.assertFalse(same_user(self.transport_for(server, client)))

    def test_same_user_refuses_another_users_client(self) -> None:
        self.require_root()
        server, client = self.connected_pair(client_uid=OTHER_UID)
        self.assertFalse(same_user(self.transport_for(server, client)))
