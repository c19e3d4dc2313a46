"""The daemon: named sessions that outlive their clients, served over a Unix socket.

``_protocol`` frames and checks messages, ``_paths`` finds and guards the
socket, ``_sessions`` holds the daemon's sessions, processes and remote
subscriptions, ``_server`` serves connections, ``_client`` is the Python
client. The wire format is documented in ``docs/protocol.md``.
"""
