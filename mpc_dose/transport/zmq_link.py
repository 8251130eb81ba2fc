"""ZeroMQ transport: PUB/SUB telemetry, DEALER/ROUTER commands with an ack per command id,
CURVE encryption with a ZAP allow-list. The only module that opens ZeroMQ sockets.

Socket options follow the protocol research (docs/protocol.md): ``LINGER=0``, bounded
high-water marks and ``MAXMSGSIZE``, ZMTP heartbeats (1 s / 3 s), ``IMMEDIATE`` on the
command client (no command queues for a peer that is not there), ``ROUTER_MANDATORY`` on the
server, and sends that never block (a full queue is a liveness fault, counted, not waited
on). Without CURVE keys a socket binds or connects to loopback only.
"""

from __future__ import annotations

import os
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import zmq

from ..errors import ConfigError
from ..protocol.codec import MAX_MESSAGE_BYTES, Envelope, decode, encode
from ..protocol.messages import Ack, ProtocolError, _Message

__all__ = ["Keys", "generate_keys", "Authenticator", "Telemetry", "TelemetryReader",
           "CommandServer", "CommandClient", "new_epoch"]

_LOCAL = ("127.0.0.1", "localhost", "[::1]")


def new_epoch() -> str:
    """A random id for this process start (messages are ordered per src and epoch)."""
    return secrets.token_hex(4)


def _check_local(address: str, secure: bool) -> None:
    if secure or address.startswith(("ipc://", "inproc://")):
        return
    host = address.split("://", 1)[-1].rsplit(":", 1)[0]
    if host not in _LOCAL:
        raise ConfigError(f"address {address!r}: without CURVE keys only loopback "
                          f"(127.0.0.1) is allowed; give keys to use {host!r}")


@dataclass(frozen=True)
class Keys:
    """CURVE keys of one party: its own pair and, for a client, the server's public key.

    Made from the files ``mpc-dose keys`` writes (``NAME.key`` public, ``NAME.key_secret``
    secret; secret keys never go into the repository).
    """

    public: bytes
    secret: bytes
    server_public: bytes | None = None

    @classmethod
    def load(cls, secret_file: str | Path, server_public_file: str | Path | None = None
             ) -> Keys:
        import zmq.auth

        public, secret = zmq.auth.load_certificate(str(secret_file))
        if secret is None:
            raise ConfigError(f"keys: {str(secret_file)!r} holds no secret key (expected "
                              f"the NAME.key_secret file)")
        server = None
        if server_public_file is not None:
            server, _ = zmq.auth.load_certificate(str(server_public_file))
        return cls(public, secret, server)


def generate_keys(directory: str | Path, name: str) -> tuple[Path, Path]:
    """Write a CURVE key pair ``name.key`` / ``name.key_secret`` into *directory*."""
    import zmq.auth

    Path(directory).mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(directory), name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


class Authenticator:
    """ZAP allow-list (Ironhouse): only clients whose public keys are in *allowed_dir* get
    through; everyone else fails the handshake and delivers nothing."""

    def __init__(self, context: zmq.Context, allowed_dir: str | Path) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        if not Path(allowed_dir).is_dir():
            raise ConfigError(f"allowed keys: {str(allowed_dir)!r} is not a directory")
        self._auth = ThreadAuthenticator(context)
        self._auth.start()
        self._auth.configure_curve(domain="*", location=str(allowed_dir))

    def stop(self) -> None:
        self._auth.stop()


def _common(sock: zmq.Socket) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
    sock.setsockopt(zmq.HEARTBEAT_TTL, 3000)


def _server_keys(sock: zmq.Socket, keys: Keys | None) -> None:
    if keys is not None:
        sock.curve_secretkey, sock.curve_publickey = keys.secret, keys.public
        sock.curve_server = True


def _client_keys(sock: zmq.Socket, keys: Keys | None) -> None:
    if keys is not None:
        if keys.server_public is None:
            raise ConfigError("keys: a client needs the server's public key")
        sock.curve_secretkey, sock.curve_publickey = keys.secret, keys.public
        sock.curve_serverkey = keys.server_public


def _open(context: zmq.Context, kind: int, address: str, keys: Keys | None, *,
          server: bool, options: dict[int, int]) -> zmq.Socket:
    """A socket with the common options, *options*, CURVE keys as server or client, bound
    (server) or connected (client) to *address* (loopback only without keys)."""
    _check_local(address, keys is not None)
    sock = context.socket(kind)
    _common(sock)
    for option, value in options.items():
        sock.setsockopt(option, value)
    if server:
        _server_keys(sock, keys)
        sock.bind(address)
    else:
        _client_keys(sock, keys)
        sock.connect(address)
    return sock


class _Sender:
    """Envelopes out with this sender's src, epoch and rising seq; never blocks.

    *on_send*, when set, sees every envelope before its bytes leave (the audit log: what
    was sent is recorded first, with the seq and time it carries).
    """

    def __init__(self, sock: zmq.Socket, src: str, epoch: str | None) -> None:
        self.sock, self.src, self.epoch = sock, src, epoch or new_epoch()
        self.seq = 0
        self.dropped = 0
        self.on_send: Callable[[Envelope], None] | None = None

    def frame(self, message: _Message, t_sim: float | None) -> bytes:
        envelope = Envelope(message, self.src, self.epoch, self.seq, time.time(), t_sim)
        data = encode(envelope)
        self.seq += 1
        if self.on_send is not None:
            self.on_send(envelope)
        return data


class _Decoder:
    """Frames in, envelopes out; bad frames are counted by reason and dropped."""

    def __init__(self) -> None:
        self.rejected: Counter[str] = Counter()

    def decode(self, data: bytes) -> Envelope | None:
        try:
            return decode(data)
        except ProtocolError as err:
            self.rejected[err.code] += 1
            return None

    def _single_frames(self, timeout_s: float = 0.0) -> Iterator[Envelope]:
        """Every valid one-frame message waiting on ``self.sock`` (after up to *timeout_s*
        for the first), without blocking."""
        if timeout_s > 0 and not self.sock.poll(int(timeout_s * 1000)):
            return
        while True:
            try:
                data = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            envelope = self.decode(data)
            if envelope is not None:
                yield envelope


class Telemetry(_Sender):
    """PUB: measurements, pump status, alarms and heartbeats to every subscriber."""

    def __init__(self, context: zmq.Context, address: str, *, src: str,
                 epoch: str | None = None, keys: Keys | None = None, hwm: int = 10000) -> None:
        sock = _open(context, zmq.PUB, address, keys, server=True,
                     options={zmq.SNDHWM: hwm})
        super().__init__(sock, src, epoch)

    def send(self, message: _Message, t_sim: float | None = None) -> None:
        try:
            self.sock.send(self.frame(message, t_sim), zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1


class TelemetryReader(_Decoder):
    """SUB to one or more telemetry publishers."""

    def __init__(self, context: zmq.Context, addresses: list[str], *,
                 keys: Keys | None = None, hwm: int = 10000) -> None:
        super().__init__()
        self.sock = context.socket(zmq.SUB)
        _common(self.sock)
        self.sock.setsockopt(zmq.RCVHWM, hwm)
        _client_keys(self.sock, keys)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        for address in addresses:
            _check_local(address, keys is not None)
            self.sock.connect(address)

    def drain(self, timeout_s: float = 0.0) -> Iterator[Envelope]:
        """Every valid message waiting (after up to *timeout_s* for the first)."""
        return self._single_frames(timeout_s)


class CommandServer(_Sender, _Decoder):
    """ROUTER: commands in from clients (each with its routing id), answers back to it.
    With CURVE on, only clients on the ZAP allow-list get through the handshake."""

    def __init__(self, context: zmq.Context, address: str, *, src: str,
                 epoch: str | None = None, keys: Keys | None = None) -> None:
        sock = _open(context, zmq.ROUTER, address, keys, server=True,
                     options={zmq.ROUTER_MANDATORY: 1, zmq.SNDHWM: 1000})
        _Sender.__init__(self, sock, src, epoch)
        _Decoder.__init__(self)

    def receive(self, timeout_s: float = 0.0) -> Iterator[tuple[bytes, Envelope]]:
        if timeout_s > 0 and not self.sock.poll(int(timeout_s * 1000)):
            return
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(frames) != 2:
                self.rejected["schema"] += 1
                continue
            envelope = self.decode(frames[1].bytes)
            if envelope is not None:
                yield frames[0].bytes, envelope

    def reply(self, identity: bytes, message: _Message, t_sim: float | None = None) -> bool:
        """Send *message* to one client; False when it is gone or not keeping up."""
        try:
            self.sock.send_multipart([identity, self.frame(message, t_sim)], zmq.NOBLOCK)
            return True
        except (zmq.Again, zmq.ZMQError):
            self.dropped += 1
            return False


class CommandClient(_Sender, _Decoder):
    """DEALER: commands to one server with an ack per ``cmd_id`` and bounded retries
    (Lazy Pirate on the same socket: the bridge answers a repeated ``cmd_id`` with its
    cached ack, so a retry never applies a command twice). A missing ack is "unknown",
    never "applied"."""

    def __init__(self, context: zmq.Context, address: str, *, src: str,
                 epoch: str | None = None, keys: Keys | None = None) -> None:
        sock = _open(context, zmq.DEALER, address, keys, server=False,
                     options={zmq.IMMEDIATE: 1, zmq.SNDHWM: 100})
        _Sender.__init__(self, sock, src, epoch)
        _Decoder.__init__(self)
        self.inbox: list[Envelope] = []
        self.retries_used = 0

    def send(self, message: _Message, t_sim: float | None = None) -> bool:
        try:
            self.sock.send(self.frame(message, t_sim), zmq.NOBLOCK)
            return True
        except zmq.Again:
            self.dropped += 1
            return False

    def request(self, message: _Message, *, t_sim: float | None = None,
                timeout_s: float = 1.0, retries: int = 2) -> Ack | None:
        """Send a command and wait for its ack (other messages go to :attr:`inbox`)."""
        cmd_id = getattr(message, "cmd_id", None)
        for attempt in range(retries + 1):
            if attempt:
                self.retries_used += 1
            self.send(message, t_sim)
            deadline = time.monotonic() + timeout_s
            while (left := deadline - time.monotonic()) > 0:
                if not self.sock.poll(int(left * 1000) + 1):
                    continue
                for envelope in self.receive():
                    if isinstance(envelope.message, Ack) and envelope.message.cmd_id == cmd_id:
                        return envelope.message
                    self.inbox.append(envelope)
        return None

    def receive(self) -> Iterator[Envelope]:
        """Every valid answer waiting."""
        return self._single_frames()
