"""The gRPC options of every channel and server the mesh opens: keepalive pings and connection timeouts."""

from __future__ import annotations

# A peer that stops answering without closing its connection (its host dropped off the network,
# its process stopped) is otherwise noticed only by TCP's retransmission timeout, minutes later.
# Pings bound that to KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS, also on a connection with no
# call running, so the next call does not find a dead connection first.
KEEPALIVE_TIME_MS = 10_000
KEEPALIVE_TIMEOUT_MS = 5_000
# gRPC takes its minimum reconnect backoff as the time one connection attempt may take: a
# connect that hangs (a SYN nobody answers) is given up after this long instead of 20 s.
CONNECT_TIMEOUT_MS = 5_000
INITIAL_RECONNECT_BACKOFF_MS = 250
MAX_RECONNECT_BACKOFF_MS = 5_000
# Servers accept pings this often: half the clients' interval, so jitter never earns a client a
# strike (too many pings → GOAWAY "too_many_pings", which would defeat the pings).
MIN_PING_INTERVAL_MS = KEEPALIVE_TIME_MS // 2

Options = list[tuple[str, int]]


def client_options(max_message_bytes: int | None = None) -> Options:
    """Options for a channel to a mesh server; `max_message_bytes` bounds both directions."""
    options = [
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        # Recent gRPC cores wait for any ping's ack this long (default 60 s), keepalive pings too:
        # without it a silent peer was noticed after 70 s, not 15.
        ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),  # 0: keep pinging an idle connection
        ("grpc.min_reconnect_backoff_ms", CONNECT_TIMEOUT_MS),
        ("grpc.initial_reconnect_backoff_ms", INITIAL_RECONNECT_BACKOFF_MS),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
    ]
    if max_message_bytes is not None:
        options += [("grpc.max_send_message_length", max_message_bytes),
                    ("grpc.max_receive_message_length", max_message_bytes)]  # fmt: skip
    return options


def server_options() -> Options:
    """Options for a mesh server: accept the clients' pings, and ping clients that went quiet."""
    return [
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ]
