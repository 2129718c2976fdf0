"""
The pilot's end of the pilot ↔ proxy channel: a thin Twisted shell around
the sans-IO L{txmesh.pilot.messages} layer (see C{docs/channel.md}).

Node metadata: the channel's L{Node <txmesh.pilot.messages.Node>} has no
ports, so a proxy announces its inbound listener port and its app's port as
the labels C{txmesh.io/inbound-port} and C{txmesh.io/app-port} (decimal
strings).  Both must be given for the proxy to get an inbound listener; a
value that is not a port number refuses the proxy.
"""

from __future__ import annotations

from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from txmesh.identity import certificate_identity
from txmesh.pilot import messages
from txmesh.pilot.channel_security import Admission
from txmesh.pilot.keepalive import Keepalive
from txmesh.pilot.messages import (
    PROTOCOL_VERSION,
    Ack,
    CertificateRequest,
    ChannelDecoder,
    ChannelProtocolError,
    Hello,
    Message,
    Nack,
    Ping,
    Pong,
    ProxySyncState,
    Push,
    Refused,
    SyncStatus,
    encode,
)
from txmesh.pilot.metrics import PilotMetrics
from txmesh.pilot.snapshot import RESOURCE_TYPES, Node, Snapshot

INBOUND_PORT_LABEL = "txmesh.io/inbound-port"
APP_PORT_LABEL = "txmesh.io/app-port"
OUTBOUND_ADDRESS_LABEL = "txmesh.io/outbound-address"


class PilotBackend(TypingProtocol):
    """
    What a channel needs from the pilot (L{txmesh.pilot.service.PilotService}).
    """

    def register(self, channel: PilotChannelProtocol) -> Snapshot | None:
        """
        Add a channel whose proxy said hello; return its first snapshot.
        """

    def unregister(self, channel: PilotChannelProtocol) -> None:
        """
        Forget a channel that closed.
        """

    def authenticate(self, hello: Hello, peer_identity: str | None) -> Admission | Deferred[Admission]:
        """
        Check a proxy's hello (its credential or client certificate, for its
        node).

        @param peer_identity: the SPIFFE ID of the verified client
            certificate, or C{None}.
        @return: the decision, or a Deferred of it when it takes a network
            round trip (a service-account token reviewed by the Kubernetes
            API); the channel cancels it if the proxy leaves first.
        """

    def sign(self, channel: PilotChannelProtocol, request: CertificateRequest) -> Message:
        """
        Answer a proxy's CSR.

        @return: L{CertificateIssued} or L{CertificateDenied}.
        """


def _port(labels: dict[str, str], key: str) -> int | None:
    if key not in labels:
        return None
    text = labels[key]
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"node.labels.{key}: must be a port number (1-65535), not {text!r}")
    return int(text)


def snapshot_node(node: messages.Node) -> Node:
    """
    @return: the snapshot builder's view of a channel node, with the ports
        taken from the C{txmesh.io/*-port} labels.
    @raise ValueError: a port label is not a port number.
    """
    labels = dict(node.labels)
    return Node(
        id=node.id,
        workload=node.workload or "unknown",
        namespace=node.namespace,
        app=node.app or "unknown",
        version=node.version or "unknown",
        labels=tuple(sorted(labels.items())),
        locality=node.locality,
        inbound_port=_port(labels, INBOUND_PORT_LABEL),
        app_port=_port(labels, APP_PORT_LABEL),
        outbound_address=labels.get(OUTBOUND_ADDRESS_LABEL) or None,
    )


class PilotChannelProtocol(Protocol):
    """
    One proxy's channel.  Its first message must be L{Hello}; after that the
    pilot pushes snapshots and the proxy answers them.

    Pushes carry only the resource types whose content differs from what the
    proxy has (per-type content versions); a proxy that reconnects with the
    versions of the current config in its hello gets no push at all.

    @ivar node: the proxy's node, once it said hello.
    @ivar sync: its L{ProxySyncState}, once it said hello.
    @ivar snapshot: the newest snapshot for it (pushed, or already held).
    @ivar applied: resource type to the version the proxy has applied, as
        far as the pilot knows (from its hello, then from its ACKs).
    @ivar identity: the SPIFFE ID the proxy proved (join token,
        service-account token or client certificate), the only one signed
        for it; C{None} on a plaintext pilot.

    While the backend decides on the hello asynchronously, the messages
    that follow it are queued (at most L{MAX_QUEUED}) and handled in order
    once the proxy is admitted; they are dropped if it is refused.
    """

    log = Logger()
    MAX_QUEUED = 64

    def __init__(self, backend: PilotBackend, clock: IReactorTime, keepalive: tuple[float, float] | None = None,
                 metrics: PilotMetrics | None = None):
        """
        @param backend: the pilot.
        @param clock: schedules the keepalive.
        @param keepalive: C{(interval, timeout)} in seconds, or C{None} for
            none (see L{Keepalive}).
        @param metrics: counts pushes, ACKs, NACKs and refusals; C{None}
            for none.
        """
        self._backend = backend
        self._metrics = metrics
        self._clock = clock
        self._keepalive_settings = keepalive
        self._keepalive: Keepalive | None = None
        self._decoder = ChannelDecoder()
        self._nonces = 0
        self._closing = False
        self._registered = False
        self._authenticating: Deferred[Admission] | None = None
        self._queued: list[Any] = []
        self._sent: dict[str, str] = {}
        self._in_flight: dict[str, str] = {}
        self.node: Node | None = None
        self.sync: ProxySyncState | None = None
        self.snapshot: Snapshot | None = None
        self.applied: dict[str, str] = {}
        self.identity: str | None = None

    def connectionMade(self) -> None:
        if self._keepalive_settings is not None:
            interval, timeout = self._keepalive_settings
            self._keepalive = Keepalive(
                self._clock, interval, timeout,
                lambda ping_id: self.transport.write(encode(Ping(id=ping_id))),
                lambda quiet: self._close(f"no word from the proxy in {quiet:.0f} s"),
            )
            self._keepalive.start()

    def _close(self, reason: str) -> None:
        self.log.warn("closing pilot channel from {peer}: {reason}", peer=self._peer(), reason=reason)
        self._closing = True
        self.transport.loseConnection()

    def _peer(self) -> str:
        if self.node is not None:
            return self.node.id
        return str(self.transport.getPeer()) if self.transport is not None else "?"

    def _refuse(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.proxies_refused.inc()
        self.transport.write(encode(Refused(reason=reason)))
        self._close(f"refused: {reason}")

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if self._keepalive is not None:
            self._keepalive.received()
        try:
            received = self._decoder.receive_data(data)
            for message in received:
                if self._closing:
                    return
                if self._authenticating is not None:
                    self._queue(message)
                    continue
                self._handle(message)
        except ChannelProtocolError as e:
            self._close(e.reason)

    def _queue(self, message: Any) -> None:
        """
        Keep a message that came while the hello is being decided.
        """
        if isinstance(message, Hello):
            raise ChannelProtocolError("hello sent twice")
        if len(self._queued) >= self.MAX_QUEUED:
            raise ChannelProtocolError(f"more than {self.MAX_QUEUED} messages before the hello was answered")
        self._queued.append(message)

    def _handle(self, message: Any) -> None:
        if self.sync is None:
            if not isinstance(message, Hello):
                self._refuse(f"the first message must be hello, not {message.TYPE}")
                return
            self._hello(message)
        elif isinstance(message, Hello):
            raise ChannelProtocolError("hello sent twice")
        elif isinstance(message, Ack):
            acked = self.sync.acked(message.nonce, message.version)
            if self._metrics is not None:
                self._metrics.acks.inc()
            if acked:
                self.applied.update(self._in_flight)
        elif isinstance(message, Nack):
            nacked = self.sync.nacked(message.nonce, message.version, message.error)
            if self._metrics is not None:
                self._metrics.nacks.inc()
            if nacked:
                # The proxy kept what it had: the next push compares with that.
                self._sent = dict(self.applied)
                self.log.warn(
                    "proxy {node} rejected version {version}: {error}",
                    node=self.sync.node_id, version=message.version, error=message.error,
                )
        elif isinstance(message, Ping):
            self.transport.write(encode(Pong(id=message.id)))
        elif isinstance(message, Pong):
            pass
        elif isinstance(message, CertificateRequest):
            self.transport.write(encode(self._backend.sign(self, message)))
        else:
            raise ChannelProtocolError(f"a proxy does not send {message.TYPE} messages")

    def _peer_identity(self) -> str | None:
        """
        @return: the SPIFFE ID of the client certificate the proxy presented
            (TLS has verified it against the mesh root), or C{None}.
        """
        get = getattr(self.transport, "getPeerCertificate", None)
        certificate = get() if get is not None else None
        return certificate_identity(certificate) if certificate is not None else None

    def _hello(self, hello: Hello) -> None:
        if hello.protocol_version != PROTOCOL_VERSION:
            self._refuse(f"protocol version {hello.protocol_version} is not spoken here (only {PROTOCOL_VERSION})")
            return
        admission = self._backend.authenticate(hello, self._peer_identity())
        if isinstance(admission, Deferred):
            self._authenticating = admission
            admission.addCallbacks(self._decided, self._undecided, callbackArgs=(hello,))
            admission.addErrback(self._crashed)
            return
        self._admit(hello, admission)

    def _decided(self, admission: Admission, hello: Hello) -> None:
        """
        The backend decided on the hello: admit or refuse the proxy, then
        handle what it sent meanwhile.
        """
        self._authenticating = None
        queued, self._queued = self._queued, []
        if self._closing:
            return
        self._admit(hello, admission)
        try:
            for message in queued:
                if self._closing or self.sync is None:
                    return
                self._handle(message)
        except ChannelProtocolError as e:
            self._close(e.reason)

    def _undecided(self, failure: Failure) -> None:
        """
        The backend could not decide on the hello: refuse the proxy.
        """
        self._authenticating = None
        self._queued = []
        if failure.check(CancelledError) or self._closing:
            return
        self.log.failure("could not check the hello of {peer}", failure, peer=self._peer())
        self._refuse(f"the pilot could not check the credential: {failure.getErrorMessage() or failure.type.__name__}")

    def _crashed(self, failure: Failure) -> None:
        self.log.failure("pilot channel from {peer}: error after the hello", failure, peer=self._peer())
        if not self._closing:
            self._close("internal error")

    def _admit(self, hello: Hello, admission: Admission) -> None:
        if admission.refusal is not None:
            self._refuse(admission.refusal)
            return
        self.identity = admission.identity
        try:
            node = snapshot_node(hello.node)
        except ValueError as e:
            self._refuse(str(e))
            return
        self.node = node
        self.sync = ProxySyncState(node.id)
        self.applied = {t: v for t, v in hello.versions.items() if t in RESOURCE_TYPES}
        self._sent = dict(self.applied)
        self._registered = True
        snapshot = self._backend.register(self)
        if snapshot is not None:
            self.push(snapshot)

    def push(self, snapshot: Snapshot) -> bool:
        """
        Send the resource types of C{snapshot} whose content the proxy does
        not have (or has not been sent) yet.

        @return: whether a push was sent.
        """
        if self.sync is None or self._closing:
            return False
        self.snapshot = snapshot
        changed = {t: v for t, v in snapshot.per_type_versions.items() if self._sent.get(t) != v}
        if not changed:
            if self.sync.status is SyncStatus.NOT_SENT:
                self.sync.resumed(snapshot.version)
            return False
        self._nonces += 1
        nonce = str(self._nonces)
        self._sent.update(changed)
        self._in_flight = changed
        self.sync.pushed(snapshot.version, nonce)
        resources = {t: snapshot.resources[t] for t in changed}
        self.transport.write(encode(Push(version=snapshot.version, nonce=nonce, resources=resources,
                                         versions=changed)))
        if self._metrics is not None:
            self._metrics.pushed(changed)
        return True

    def connectionLost(self, reason: Failure = None) -> None:
        self._closing = True
        if self._keepalive is not None:
            self._keepalive.stop()
        pending, self._authenticating = self._authenticating, None
        if pending is not None:
            # The proxy left before its hello was decided: stop asking.
            self._queued = []
            pending.cancel()
        if self._registered:
            self._registered = False
            self._backend.unregister(self)


class PilotChannelFactory(Factory):
    """
    Makes a L{PilotChannelProtocol} per accepted connection.
    """

    def __init__(self, backend: PilotBackend, clock: IReactorTime, keepalive: tuple[float, float] | None = None,
                 metrics: PilotMetrics | None = None):
        """
        @param backend: the pilot.
        @param clock: schedules each channel's keepalive.
        @param keepalive: C{(interval, timeout)} in seconds, or C{None}.
        @param metrics: given to each channel, or C{None}.
        """
        self._backend = backend
        self._clock = clock
        self._keepalive = keepalive
        self._metrics = metrics

    def buildProtocol(self, addr: object) -> PilotChannelProtocol:
        protocol = PilotChannelProtocol(self._backend, self._clock, self._keepalive, self._metrics)
        protocol.factory = self
        return protocol
