"""Linux-only observation: /proc readers and the netlink process connector.

Nothing outside this package reads ``/proc`` or opens netlink sockets, so the
portable core never depends on Linux.
"""
