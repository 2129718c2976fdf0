"""
L{PilotClient}: the proxy's end of the pilot channel (see C{docs/channel.md}).

It keeps one channel open to any of its pilot addresses, announces the
proxy with a L{Hello}, applies each L{Push} as a whole and answers L{Ack} or
L{Nack}. When the channel drops or the pilot refuses, it reconnects to the
next address after a jittered exponential backoff; meanwhile the proxy keeps
serving whatever it last applied.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from OpenSSL import crypto
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import clientFromString, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from txmesh.config.errors import ConfigError
from txmesh.pilot import messages
from txmesh.pilot.keepalive import Keepalive
from txmesh.pilot.messages import (
    ROOT_CA_SECRET,
    SECRETS,
    Ack,
    CertificateDenied,
    CertificateIssued,
    CertificateRequest,
    ChannelDecoder,
    ChannelProtocolError,
    Hello,
    Nack,
    Ping,
    Pong,
    Push,
    Refused,
    encode,
    unknown_resource_types,
)
from txmesh.proxy.tls import load_certificates
from txmesh.proxy.workload_identity import IdentityError, WorkloadIdentity

__all__ = ["APPLIED_TYPES", "PilotClient", "backoff_delay", "pilot_tls_options"]

log = Logger()

APPLIED_TYPES = ("listeners", "clusters")
"""The resource types a push may carry that the proxy applies as config."""


def pilot_tls_options(server_name: str | None, ca_pem: bytes, address: str,
                      identity: WorkloadIdentity | None = None, now: float | None = None) -> Any:
    """
    TLS options for the channel to the pilot at C{address}: its certificate
    must chain to the mesh root and carry C{server_name}, or, by default,
    the host C{address} dials; the proxy presents its workload certificate
    when it has a valid one.

    @param ca_pem: the mesh root from the bootstrap; the trust bundle the
        pilot sent with the last certificate is trusted too (root rotation).
    @param address: a client endpoint string, e.g. C{tcp:127.0.0.1:15010}.
    @param now: the current time, to tell whether the certificate is valid.
    """
    from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS, trustRootFromCertificates

    if server_name is None:
        endpoint = clientFromString(None, address)
        # TCP4/6 endpoints keep the host as _host, HostnameEndpoint as _hostText.
        host = getattr(endpoint, "_host", None) or getattr(endpoint, "_hostText", None)
        server_name = host if isinstance(host, str) and host else "txmesh-pilot"
    bundle = ca_pem
    if identity is not None and identity.roots_pem:
        bundle += b"\n" + identity.roots_pem
    roots = [Certificate(crypto.X509.from_cryptography(c)) for c in load_certificates(bundle, "ca_file")]
    client_certificate = None
    extra: dict[str, Any] = {}
    if identity is not None and now is not None and identity.valid_at(now):
        chain = load_certificates(identity.chain_pem)
        client_certificate = PrivateCertificate.loadPEM(identity.key_pem + _pem_of(chain[0]))
        if len(chain) > 1:
            extra["extraCertChain"] = [crypto.X509.from_cryptography(c) for c in chain[1:]]
    return optionsForClientTLS(server_name, trustRoot=trustRootFromCertificates(roots),
                               clientCertificate=client_certificate, extraCertificateOptions=extra or None)


def _pem_of(certificate: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return certificate.public_bytes(serialization.Encoding.PEM)


def message_time(t: float) -> str:
    """
    @return: POSIX time C{t} as ISO 8601 UTC, for log lines.
    """
    import datetime

    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="seconds")


def backoff_delay(attempt: int, rng: Any, base: float, cap: float) -> float:
    """
    Full-jitter exponential backoff: a uniform draw in
    C{[0, min(cap, base * 2 ** attempt)]}.

    @param attempt: failures in a row before this wait, from 0.
    @param rng: provides C{uniform(a, b)} (a L{random.Random}).
    @param base: seconds; the ceiling of the first wait.
    @param cap: seconds; no wait's ceiling exceeds it.
    @return: seconds to wait.
    """
    # min() before the power would overflow a float after ~1000 attempts.
    ceiling = cap if attempt >= 64 else min(cap, base * 2**attempt)
    return rng.uniform(0, ceiling)


@implementer(IHandshakeListener)
class _ChannelProtocol(Protocol):
    """
    One connection to a pilot; it only moves bytes and hands messages to
    its L{PilotClient}.
    """

    def __init__(self, client: PilotClient, address: str):
        self._client = client
        self.address = address
        self._decoder = ChannelDecoder()
        self.keepalive: Keepalive | None = None

    def connectionMade(self) -> None:
        self._client._channel_open(self)
        self.keepalive = self._client._keepalive_for(self)
        if self.keepalive is not None:
            self.keepalive.start()

    def handshakeCompleted(self) -> None:
        self._client._channel_verified(self)

    def send(self, message: messages.Message) -> None:
        if self.transport is not None:
            self.transport.write(encode(message))

    def dataReceived(self, data: bytes) -> None:
        if self.keepalive is not None:
            self.keepalive.received()
        try:
            received = self._decoder.receive_data(data)
        except ChannelProtocolError as e:
            self._client._protocol_error(self, e.reason)
            return
        for message in received:
            self._client._received(self, message)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        if self.keepalive is not None:
            self.keepalive.stop()
        self._client._channel_lost(self, reason)


class _ChannelFactory(Factory):
    noisy = False

    def __init__(self, client: PilotClient, address: str):
        self._client = client
        self._address = address

    def buildProtocol(self, addr: Any) -> _ChannelProtocol:
        protocol = _ChannelProtocol(self._client, self._address)
        protocol.factory = self
        return protocol


class PilotClient:
    """
    Keeps the proxy's channel to a pilot open and applies what it pushes.

    A push is turned into a config document C{{"listeners": [...],
    "clusters": [...]}} (a type the push leaves out keeps the last pushed
    value, or C{[]}) and passed to C{apply}; pushes are applied one at a
    time, in the order received.

    @ivar connected_address: the address of the open channel, or C{None}.
    @ivar acked_version: the version of the last push applied and acked.
    @ivar last_error: the last thing that went wrong (a refused push, a
        refusal, a failed connection), for the operator; kept until replaced.
    @ivar versions: resource type to the last applied version, sent in
        L{Hello} so a pilot can resume.
    """

    def __init__(
        self,
        addresses: Sequence[str],
        node: messages.Node,
        reactor: Any,
        apply: Callable[[dict], Any],
        rng: Any,
        backoff_base: float = 0.5,
        backoff_max: float = 15.0,
        credential: str = "",
        tls: Callable[[str], Any] | None = None,
        keepalive: tuple[float, float] | None = (15.0, 45.0),
        identity: WorkloadIdentity | None = None,
    ):
        """
        @param addresses: Twisted client endpoint strings of the pilot
            replicas (e.g. C{tcp:127.0.0.1:15010}), tried in turn.
        @param node: who the proxy is, sent in L{Hello}.
        @param reactor: provides C{IReactorTime} and what the endpoints need.
        @param apply: called with each pushed document; returns (or fires a
            L{Deferred}) when applied, raises (or fails with) L{ConfigError}
            to refuse it. Any other exception refuses it too.
        @param rng: provides C{uniform(a, b)}, for the backoff jitter.
        @param backoff_base: seconds; ceiling of the first reconnect wait.
        @param backoff_max: seconds; cap of any reconnect wait.
        @param credential: the bootstrap credential sent in L{Hello}.
        @param tls: given an address, the TLS client connection creator to
            wrap its connection with (see L{txmesh.proxy.tls}); C{None} for a
            plaintext channel.
        @param keepalive: C{(interval, timeout)} in seconds: ping a pilot
            quiet for C{interval}, reconnect to another after C{timeout} of
            silence (see L{Keepalive}); C{None} for no keepalive.
        @param identity: the proxy's workload identity, to get and renew
            certificates for over the channel (and to present as the TLS
            client certificate once it has one); C{None} for none.
        @raise ValueError: if C{addresses} is empty.
        """
        if not addresses:
            raise ValueError("addresses: list at least one pilot address")
        self._addresses = list(addresses)
        self._node = node
        self._reactor = reactor
        self._apply = apply
        self._rng = rng
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._credential = credential
        self._tls = tls
        self._keepalive = keepalive
        self._identity = identity
        self._csr_id = 0
        self._renewal: Any = None
        self._next_index = 0
        self._attempt = 0
        self._running = False
        self._channel: _ChannelProtocol | None = None
        self._connecting: Deferred | None = None
        self._retry: Any = None
        self._queue: list[tuple[_ChannelProtocol, Push]] = []
        self._applying = False
        self._resources: dict[str, list] = {}
        self.connected_address: str | None = None
        self.acked_version: str | None = None
        self.last_error: str | None = None
        self.versions: dict[str, str] = {}

    # Lifecycle

    def start(self) -> None:
        """
        Start connecting; returns at once.
        """
        if self._running:
            return
        self._running = True
        self._connect()

    def stop(self) -> None:
        """
        Close the channel and stop reconnecting.
        """
        self._running = False
        for call in (self._retry, self._renewal):
            if call is not None and call.active():
                call.cancel()
        self._retry = self._renewal = None
        if self._connecting is not None:
            self._connecting.cancel()
        if self._channel is not None:
            channel, self._channel = self._channel, None
            self.connected_address = None
            channel.transport.abortConnection()

    def status(self) -> dict[str, Any]:
        """
        @return: what the admin endpoint shows: the connected address (or
            C{None}), the last acked version, per-type versions, the last
            error, and the workload identity (its SPIFFE ID, whether it has a
            certificate, when it ends and renews, how many roots it trusts).
        """
        status: dict[str, Any] = {
            "connected": self.connected_address,
            "acked_version": self.acked_version,
            "versions": dict(self.versions),
            "last_error": self.last_error,
        }
        identity = self._identity
        if identity is not None:
            status["identity"] = {
                "spiffe_id": identity.spiffe_id,
                "certificate": identity.chain_pem is not None,
                "not_after": message_time(identity.not_after) if identity.chain_pem is not None else None,
                "renew_at": message_time(identity.renew_at()) if identity.chain_pem is not None else None,
                "roots": identity.roots_pem.count(b"BEGIN CERTIFICATE") if identity.roots_pem else 0,
            }
        return status

    # Connecting

    def _connect(self) -> None:
        self._retry = None
        if not self._running:
            return
        address = self._addresses[self._next_index % len(self._addresses)]
        self._next_index += 1
        try:
            endpoint = clientFromString(self._reactor, address)
            if self._tls is not None:
                endpoint = wrapClientTLS(self._tls(address), endpoint)
        except Exception as e:
            self._failed(address, f"invalid pilot address: {e}")
            return
        d = self._connecting = endpoint.connect(_ChannelFactory(self, address))

        def done(result: Any) -> None:
            self._connecting = None

        def failed(failure: Any) -> None:
            self._connecting = None
            if self._running:
                self._failed(address, f"cannot connect: {failure.getErrorMessage()}")

        d.addCallbacks(done, failed)

    def _failed(self, address: str, error: str) -> None:
        self.last_error = f"{address}: {error}"
        log.warn("pilot {address}: {error}", address=address, error=error)
        self._schedule_reconnect()

    def _schedule_reconnect(self) -> None:
        if not self._running or self._retry is not None:
            return
        delay = backoff_delay(self._attempt, self._rng, self._backoff_base, self._backoff_max)
        self._attempt += 1
        self._retry = self._reactor.callLater(delay, self._connect)

    # The channel

    def _channel_open(self, channel: _ChannelProtocol) -> None:
        if not self._running:
            channel.transport.abortConnection()
            return
        self._channel = channel
        if self._tls is None:
            self._channel_verified(channel)
        identity = self._identity
        # A valid workload certificate (presented by TLS) is the credential;
        # the join token is only for getting the first one.
        has_certificate = identity is not None and identity.valid_at(self._reactor.seconds())
        credential = "" if has_certificate else self._credential
        channel.send(Hello(node=self._node, credential=credential, versions=dict(self.versions)))
        if identity is not None and (not has_certificate or self._reactor.seconds() >= identity.renew_at()):
            self._request_certificate()

    def _channel_verified(self, channel: _ChannelProtocol) -> None:
        """
        The channel reaches a pilot: at once on plaintext, once the TLS
        handshake verified the pilot's certificate otherwise (a port that
        accepts but is not a pilot never counts as connected).
        """
        if channel is not self._channel:
            return
        self.connected_address = channel.address
        log.info("pilot channel open to {address}", address=channel.address)

    # The workload certificate

    def _request_certificate(self) -> None:
        if self._renewal is not None and self._renewal.active():
            self._renewal.cancel()
        self._renewal = None
        if self._channel is None or self._identity is None:
            return  # asked for again when the next channel opens
        self._csr_id += 1
        self._channel.send(CertificateRequest(id=self._csr_id, csr=self._identity.new_request().decode("ascii")))

    def _certificate(self, message: CertificateIssued | CertificateDenied) -> None:
        if message.id != self._csr_id:
            return  # an answer to a request overtaken by a newer one
        identity = self._identity
        if isinstance(message, CertificateDenied):
            self.last_error = f"certificate denied: {message.reason}"
            log.error("the pilot refused to sign this proxy's certificate: {reason}", reason=message.reason)
            retry = self._backoff_max
        else:
            try:
                identity.install(message.chain.encode("ascii"), message.roots.encode("ascii"),
                                 self._reactor.seconds())
            except IdentityError as e:
                self.last_error = f"certificate unusable: {e}"
                log.error("the certificate the pilot signed is unusable: {error}", error=str(e))
                retry = self._backoff_max
            else:
                log.info("workload certificate for {identity} valid until {until}", identity=identity.spiffe_id,
                         until=message_time(identity.not_after))
                retry = max(0.0, identity.renew_at() - self._reactor.seconds())
        self._renewal = self._reactor.callLater(retry, self._request_certificate)

    def _keepalive_for(self, channel: _ChannelProtocol) -> Keepalive | None:
        if self._keepalive is None:
            return None
        interval, timeout = self._keepalive

        def expired(quiet: float) -> None:
            self.last_error = f"{channel.address}: no word from the pilot in {quiet:.0f} s"
            log.warn("{error}; reconnecting", error=self.last_error)
            channel.transport.abortConnection()

        return Keepalive(self._reactor, interval, timeout, lambda ping_id: channel.send(Ping(id=ping_id)), expired)

    def _channel_lost(self, channel: _ChannelProtocol, reason: Any) -> None:
        self._queue = [(c, p) for c, p in self._queue if c is not channel]
        if channel is not self._channel:
            return
        self._channel = None
        self.connected_address = None
        if self._running:
            log.info("pilot channel to {address} closed; serving the last applied config",
                     address=channel.address)
            self._schedule_reconnect()

    def _protocol_error(self, channel: _ChannelProtocol, reason: str) -> None:
        self.last_error = f"{channel.address}: protocol error: {reason}"
        log.error("pilot {address}: protocol error, closing the channel: {reason}",
                  address=channel.address, reason=reason)
        channel.close()

    def _received(self, channel: _ChannelProtocol, message: messages.Message) -> None:
        if channel is not self._channel:
            return
        if isinstance(message, Push):
            self._queue.append((channel, message))
            self._apply_next()
        elif isinstance(message, Refused):
            self.last_error = f"{channel.address}: refused: {message.reason}"
            log.error("pilot {address} refused this proxy: {reason}", address=channel.address,
                      reason=message.reason)
            channel.close()
        elif isinstance(message, Ping):
            channel.send(Pong(id=message.id))
        elif isinstance(message, Pong):
            pass
        elif isinstance(message, (CertificateIssued, CertificateDenied)):
            self._certificate(message)
        else:
            self._protocol_error(channel, f"unexpected {message.TYPE} message from the pilot")

    # Applying pushes

    def _document(self, push: Push) -> dict[str, list]:
        resources = dict(self._resources)
        for rtype in APPLIED_TYPES:
            if rtype in push.resources:
                resources[rtype] = push.resources[rtype]
        return {rtype: list(resources.get(rtype, [])) for rtype in APPLIED_TYPES}

    def _apply_secrets(self, push: Push) -> None:
        """
        Take the mesh trust bundle a push carries (C{secrets}, the entry
        named C{ROOTCA}): a root rotation reaches the proxy this way.

        @raise ConfigError: the bundle is missing or does not parse.
        """
        if SECRETS not in push.resources or self._identity is None:
            return
        bundles = [s for s in push.resources[SECRETS] if s.get("name") == ROOT_CA_SECRET]
        if not bundles or not isinstance(bundles[0].get("trust_bundle"), str):
            raise ConfigError("pilot push", "secrets", f"no {ROOT_CA_SECRET} entry with a trust_bundle")
        try:
            self._identity.update_roots(bundles[0]["trust_bundle"].encode("ascii"))
        except (IdentityError, UnicodeEncodeError) as e:
            raise ConfigError("pilot push", f"secrets.{ROOT_CA_SECRET}.trust_bundle", str(e)) from None

    def _apply_next(self) -> None:
        if self._applying or not self._queue:
            return
        channel, push = self._queue.pop(0)
        skipped = unknown_resource_types(push)
        if skipped:
            log.warn("pilot push {version}: skipping resource types {types}", version=push.version,
                     types=", ".join(skipped))
        document = self._document(push)
        self._applying = True
        d = maybeDeferred(self._apply_secrets, push)
        d.addCallback(lambda _: self._apply(document))

        def applied(_: Any) -> None:
            # Only what was applied: a resuming pilot may skip what is named.
            for rtype in (*APPLIED_TYPES, SECRETS):
                if rtype in push.resources:
                    self.versions[rtype] = push.type_version(rtype)
            for rtype in APPLIED_TYPES:
                self._resources[rtype] = document[rtype]
            self.acked_version = push.version
            self._attempt = 0
            channel.send(Ack(nonce=push.nonce, version=push.version))

        def refused(failure: Any) -> None:
            if failure.check(ConfigError):
                error = str(failure.value)
            else:
                error = f"{type(failure.value).__name__}: {failure.value}"
                log.failure("applying pilot push {version}", failure, version=push.version)
            self.last_error = f"push {push.version} refused: {error}"
            log.error("pilot push {version} refused, keeping the last applied config: {error}",
                      version=push.version, error=error)
            channel.send(Nack(nonce=push.nonce, version=push.version, error=error or "refused"))

        def next_push(_: Any) -> None:
            self._applying = False
            self._apply_next()

        d.addCallbacks(applied, refused)
        d.addBoth(next_push)
