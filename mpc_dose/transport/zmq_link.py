"""ZeroMQ transport: PUB/SUB telemetry, DEALER/ROUTER commands with an ack per command id,
CURVE encryption with a ZAP allow-list (deny by default: a CURVE server needs the clients'
public keys). The only module that opens ZeroMQ sockets.

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
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import zmq
from zmq.auth.thread import ThreadAuthenticator

from ..errors import ConfigError
from ..protocol.codec import MAX_MESSAGE_BYTES, Envelope, decode, decode_frame, encode
from ..protocol.messages import Ack, ProtocolError, RemoteProtocolError, _Message

__all__ = ["Keys", "generate_keys", "load_allow_list", "describe_keys", "Authenticator",
           "Telemetry", "TelemetryReader", "CommandServer", "CommandClient", "new_epoch"]

_LOCAL = ("127.0.0.1", "localhost", "[::1]")
#: the ZAP domain of every CURVE server socket (the authenticator judges this domain)
_ZAP_DOMAIN = "mpc_dose"


def new_epoch() -> str:
    """A random id for this process start (messages are ordered per src and epoch)."""
    return secrets.token_hex(4)


def _check_local(address: str, secure: bool) -> None:
    if not isinstance(address, str) or not address.startswith(("tcp://", "ipc://",
                                                                "inproc://")):
        raise ConfigError(f"address {address!r}: expected tcp://HOST:PORT (or ipc://PATH)")
    if secure or address.startswith(("ipc://", "inproc://")):
        return
    host = address.split("://", 1)[-1].rsplit(":", 1)[0]
    if host not in _LOCAL:
        raise ConfigError(f"address {address!r}: without CURVE keys only loopback "
                          f"(127.0.0.1) is allowed; give keys to use {host!r}")


def _z85(key: bytes) -> str:
    return key.decode("ascii", "replace")


@dataclass(frozen=True)
class Keys:
    """CURVE keys of one party: its own pair; for a client, the servers' public keys; for a
    server, the public keys of the clients it lets in (its allow-list, by name).

    Made from the files ``mpc-dose keys`` writes (``NAME.key`` public, ``NAME.key_secret``
    secret; secret keys never go into the repository). Keys are Z85 text (40 characters).
    """

    public: bytes
    secret: bytes
    #: the server key for every address not in *servers*
    server_public: bytes | None = None
    #: address -> that server's public key
    servers: Mapping[str, bytes] = field(default_factory=dict)
    #: name -> public key of a client this server lets in; empty: a CURVE server refuses to
    #: start (deny by default)
    clients: Mapping[str, bytes] = field(default_factory=dict)

    @classmethod
    def load(cls, secret_file: str | Path, server_public_file: str | Path | None = None, *,
             servers: Mapping[str, str | Path] | None = None,
             allow: Sequence[str | Path] = ()) -> Keys:
        """Own pair from *secret_file*; servers' keys from *server_public_file* (default)
        and *servers* (address -> file); the allow-list from *allow* (key files, or folders
        whose ``*.key`` files are read)."""
        import zmq.auth

        public, secret = _certificate(secret_file, "--keys")
        if secret is None:
            raise ConfigError(f"keys: {str(secret_file)!r} holds no secret key (expected "
                              f"the NAME.key_secret file)")
        server = None
        if server_public_file is not None:
            server, _ = _certificate(server_public_file, "--server-key")
        by_address = {address: _certificate(path, "--server-key")[0]
                      for address, path in (servers or {}).items()}
        return cls(public, secret, server, by_address, load_allow_list(allow) if allow else {})

    def server_key(self, address: str) -> bytes | None:
        return self.servers.get(address, self.server_public)


def _certificate(path: str | Path, flag: str) -> tuple[bytes, bytes | None]:
    import zmq.auth

    try:
        return zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{flag} {str(path)!r}: not a CURVE key file ({err})") from None


def load_allow_list(paths: Sequence[str | Path]) -> dict[str, bytes]:
    """Client public keys by name (the file's stem) from key files and folders of them.

    Raises
    ------
    ConfigError
        For a path that is neither, a folder with no ``*.key`` file, or a file with no key.
    """
    out: dict[str, bytes] = {}
    for path in map(Path, paths):
        files = sorted(path.glob("*.key")) if path.is_dir() else [path]
        if path.is_dir() and not files:
            raise ConfigError(f"--allow-keys {str(path)!r}: the folder holds no *.key file")
        if not path.exists():
            raise ConfigError(f"--allow-keys {str(path)!r}: no such file or folder")
        for file in files:
            public, _ = _certificate(file, "--allow-keys")
            out[file.stem] = public
    return out


def generate_keys(directory: str | Path, name: str) -> tuple[Path, Path]:
    """Write a CURVE key pair ``name.key`` / ``name.key_secret`` into *directory*."""
    import zmq.auth

    Path(directory).mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(directory), name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def describe_keys(keys: Keys) -> list[str]:
    """What a process says at start-up about its CURVE keys (names and key prefixes)."""
    lines = [f"CURVE: own public key {_z85(keys.public)[:8]}..."]
    if keys.clients:
        lines.append(f"CURVE: allowing {len(keys.clients)} client key(s): " + ", ".join(
            f"{name} ({_z85(key)[:8]}...)" for name, key in sorted(keys.clients.items())))
    return lines


class Authenticator:
    """ZAP allow-list (Ironhouse) for the CURVE servers of one context: only clients whose
    public keys are on *allowed* (name -> key) complete the handshake; everyone else fails
    it and delivers nothing. Each refusal is kept in :attr:`refused` (a thread-safe queue of
    dicts: time, key, address) for the process to write to its audit log.

    CURVE server sockets set ``ZAP_ENFORCE_DOMAIN``: a server whose process has started no
    authenticator refuses every client (deny by default) instead of accepting them all.
    """

    def __init__(self, context: zmq.Context, allowed: Mapping[str, bytes]) -> None:
        if not allowed:
            raise ConfigError("CURVE allow-list: no client key given; a server would refuse "
                              "everyone (give --allow-keys)")
        self._names = {bytes(key): name for name, key in allowed.items()}
        self.refused: deque[dict] = deque(maxlen=10000)
        self._auth = _ZapHandler(context, self)
        self._auth.start()
        self._auth.configure_curve_callback(domain=_ZAP_DOMAIN, credentials_provider=self)

    def callback(self, domain: str, key: bytes) -> bool:
        """pyzmq's credentials-provider hook: is the Z85 *key* on the allow-list?"""
        if key in self._names:
            return True
        self.refused.append({"t_wall": time.time(), "key": _z85(key),
                             "address": self._auth.last_address, "domain": domain})
        return False

    def name_of(self, key: bytes) -> str:
        return self._names.get(key, "unknown")

    def drain(self) -> list[dict]:
        """The refusals since the last call (oldest first)."""
        out = []
        while self.refused:
            out.append(self.refused.popleft())
        return out

    def stop(self) -> None:
        self._auth.stop()


class _ZapHandler(ThreadAuthenticator):
    """pyzmq's ZAP handler thread, remembering the address of the request being judged
    (its credentials hook sees only the key) and naming allowed clients by their key."""

    last_address = ""

    def __init__(self, context: zmq.Context, owner: Authenticator) -> None:
        super().__init__(context)
        self.owner = owner

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        self.last_address = msg[3].decode("utf-8", "replace") if len(msg) > 3 else ""
        await super().handle_zap_message(msg)

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.owner.name_of(client_public_key)


def _common(sock: zmq.Socket) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
    sock.setsockopt(zmq.HEARTBEAT_TTL, 3000)


def _server_keys(sock: zmq.Socket, keys: Keys | None, address: str) -> None:
    if keys is not None:
        if not keys.clients:
            raise ConfigError(f"{address}: a CURVE server needs the public keys of the clients "
                              f"it lets in (--allow-keys); without an allow-list it would "
                              f"accept any client")
        sock.curve_secretkey, sock.curve_publickey = keys.secret, keys.public
        sock.curve_server = True
        # no ZAP handler running -> every handshake fails (libzmq's default is to let all in)
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        sock.zap_domain = _ZAP_DOMAIN.encode()


def _client_keys(sock: zmq.Socket, keys: Keys | None, address: str) -> None:
    if keys is not None:
        server = keys.server_key(address)
        if server is None:
            raise ConfigError(f"{address}: a CURVE client needs this server's public key "
                              f"(--server-key FILE or --server-key ADDRESS=FILE)")
        sock.curve_secretkey, sock.curve_publickey = keys.secret, keys.public
        sock.curve_serverkey = server


def _open(context: zmq.Context, kind: int, address: str, keys: Keys | None, *,
          server: bool, options: dict[int, int]) -> zmq.Socket:
    """A socket with the common options, *options*, CURVE keys as server or client, bound
    (server) or connected (client) to *address* (loopback only without keys)."""
    _check_local(address, keys is not None)
    sock = context.socket(kind)
    _common(sock)
    for option, value in options.items():
        sock.setsockopt(option, value)
    try:
        if server:
            _server_keys(sock, keys, address)
            sock.bind(address)
        else:
            _client_keys(sock, keys, address)
            sock.connect(address)
    except BaseException:
        sock.close(0)
        raise
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
        except (zmq.Again, ProtocolError):  # full queue, or a frame that cannot be encoded
            self.dropped += 1


class TelemetryReader(_Decoder):
    """SUB to one or more telemetry publishers."""

    def __init__(self, context: zmq.Context, addresses: list[str], *,
                 keys: Keys | None = None, hwm: int = 10000) -> None:
        super().__init__()
        self.sock = context.socket(zmq.SUB)
        _common(self.sock)
        self.sock.setsockopt(zmq.RCVHWM, hwm)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        for address in addresses:
            _check_local(address, keys is not None)
            _client_keys(self.sock, keys, address)  # applies to the connect that follows
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

    def frames(self, timeout_s: float = 0.0, limit: int | None = None
               ) -> Iterator[tuple[bytes, Envelope | RemoteProtocolError]]:
        """The frames waiting (after up to *timeout_s* for the first), at most *limit*,
        each with its client's routing id: a valid envelope, or the refusal (counted in
        :attr:`rejected`) for a server that answers refused commands."""
        if timeout_s > 0 and not self.sock.poll(int(timeout_s * 1000)):
            return
        count = 0
        while limit is None or count < limit:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            count += 1
            if len(frames) != 2:
                item = RemoteProtocolError(f"expected one frame, got {len(frames) - 1}")
            else:
                item = decode_frame(frames[1].bytes)
            if isinstance(item, RemoteProtocolError):
                self.rejected[item.code] += 1
            yield frames[0].bytes, item

    def receive(self, timeout_s: float = 0.0) -> Iterator[tuple[bytes, Envelope]]:
        """The valid envelopes waiting (refused frames are counted and dropped)."""
        for identity, item in self.frames(timeout_s):
            if isinstance(item, Envelope):
                yield identity, item

    def reply(self, identity: bytes, message: _Message, t_sim: float | None = None) -> bool:
        """Send *message* to one client; False when it is gone or not keeping up."""
        try:
            self.sock.send_multipart([identity, self.frame(message, t_sim)], zmq.NOBLOCK)
            return True
        except (zmq.Again, zmq.ZMQError, ProtocolError):
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
