"""
Kubernetes service-account tokens as the proxies' bootstrap credential:
the pure parts of L{txmesh.pilot.token_review}, C{kubernetes_auth} in
C{mesh.yaml}, and the secure channel with a reviewer pointed at the fake
API server (L{tests.k8s_fake}).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
from typing import Any

from cryptography import x509
from twisted.internet import defer, reactor, task
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tests.k8s_fake import FakeKubernetes
from tests.test_pilot_channel import LABELS, _PilotCase
from txmesh.config.errors import ConfigError
from txmesh.identity import certificate_identity
from txmesh.pilot.channel_security import Admission, ca_directory, token_authority
from txmesh.pilot.mesh_config import KubernetesAuth, load_pilot_settings
from txmesh.pilot.messages import (
    CertificateIssued,
    CertificateRequest,
    ChannelDecoder,
    Hello,
    Node,
    Ping,
    Pong,
    Push,
    Refused,
    encode,
)
from txmesh.pilot.server import PilotChannelProtocol
from txmesh.pilot.token_review import (
    CACHE_TTL,
    ReviewCache,
    ServiceAccount,
    TokenReviewer,
    TokenReviewError,
    review_result,
    reviewer_from_settings,
    service_account_of,
    unverified_expiry,
)
from txmesh.proxy.pilot_client import pilot_tls_options
from txmesh.proxy.workload_identity import WorkloadIdentity, token_service_account


def jwt(payload: dict[str, Any]) -> str:
    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256'})}.{part(payload)}.c2ln"


def answer(username: str = "system:serviceaccount:default:web", **status: Any) -> dict[str, Any]:
    body = {"authenticated": True, "user": {"username": username, "uid": "u-1"}}
    body.update(status)
    return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": body}


class ServiceAccountNameTests(SynchronousTestCase):
    """
    L{service_account_of} and L{unverified_expiry}.
    """

    def test_service_account(self) -> None:
        self.assertEqual(service_account_of("system:serviceaccount:shop:reviews"), ("shop", "reviews"))

    def test_not_a_service_account(self) -> None:
        for name in ("admin", "system:node:worker-1", "system:serviceaccount:shop", "system:serviceaccount::web",
                     "system:serviceaccount:shop:", "system:serviceaccount:a:b:c", None):
            with self.subTest(name=name):
                self.assertRaises(ValueError, service_account_of, name)
        e = self.assertRaises(ValueError, service_account_of, "jane@example.com")
        self.assertIn("not a service account", str(e))

    def test_expiry(self) -> None:
        self.assertEqual(unverified_expiry(jwt({"exp": 1700000000})), 1700000000.0)
        self.assertIsNone(unverified_expiry(jwt({"sub": "x"})))
        self.assertIsNone(unverified_expiry(jwt({"exp": "soon"})))
        self.assertIsNone(unverified_expiry("not-a-jwt"))
        self.assertIsNone(unverified_expiry("a.!!!.c"))

    def test_proxy_reads_no_account_from_a_service_account_token(self) -> None:
        """
        The proxy takes its service account from a join token only; with a
        Kubernetes token it needs C{pilot.service_account}.
        """
        self.assertIsNone(token_service_account(jwt({"sub": "system:serviceaccount:default:web", "exp": 1})))


class ReviewResultTests(SynchronousTestCase):
    """
    L{review_result}: the API server's answer to a reason or an account.
    """

    def test_authenticated(self) -> None:
        self.assertEqual(review_result(201, answer()), ServiceAccount("default", "web", "u-1"))

    def error(self, code: int, body: Any, audiences: tuple[str, ...] = ()) -> str:
        return self.assertRaises(TokenReviewError, review_result, code, body, audiences).reason

    def test_not_authenticated(self) -> None:
        reason = self.error(201, {"status": {"user": {}, "error": "[invalid bearer token, token expired]"}})
        self.assertEqual(reason, "the Kubernetes API did not authenticate the service-account token: "
                                 "[invalid bearer token, token expired]")
        self.assertIn("no reason given", self.error(201, {"status": {"authenticated": False}}))

    def test_not_a_service_account(self) -> None:
        self.assertIn("'kubernetes-admin', not a service account", self.error(201, answer("kubernetes-admin")))

    def test_pilot_credentials(self) -> None:
        unauthorized = self.error(401, {"kind": "Status", "message": "Unauthorized"})
        self.assertIn("refused the pilot's own credentials (HTTP 401", unauthorized)
        self.assertIn("kubernetes_auth.token_file", unauthorized)
        forbidden = self.error(403, {"message": "tokenreviews.authentication.k8s.io is forbidden"})
        self.assertIn("refused the pilot's own credentials (HTTP 403", forbidden)
        self.assertIn("system:auth-delegator", forbidden)

    def test_other_errors(self) -> None:
        self.assertIn("HTTP 500: boom", self.error(500, {"message": "boom"}))
        self.assertIn("not a TokenReview", self.error(201, {"kind": "Status"}))
        self.assertIn("not a TokenReview", self.error(201, ["x"]))

    def test_audiences(self) -> None:
        self.assertEqual(review_result(201, answer(audiences=["txmesh", "x"]), ["txmesh"]).name, "web")
        self.assertIn("not for any of the audiences ['txmesh']", self.error(201, answer(), ("txmesh",)))
        self.assertIn("not for any of the audiences", self.error(201, answer(audiences=["api"]), ("txmesh",)))


class ReviewCacheTests(SynchronousTestCase):
    """
    L{ReviewCache} on a fake clock.
    """

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(1000)
        self.cache = ReviewCache(self.clock, size=3)
        self.account = ServiceAccount("default", "web")

    def test_until_token_expiry(self) -> None:
        token = jwt({"exp": 1060})
        self.cache.put(token, self.account)
        self.clock.advance(59)
        self.assertEqual(self.cache.get(token), self.account)
        self.clock.advance(1)
        self.assertIsNone(self.cache.get(token))
        self.assertEqual(len(self.cache), 0)

    def test_at_most_ttl(self) -> None:
        token = jwt({"exp": 1000 + 3 * CACHE_TTL})
        self.cache.put(token, self.account)
        self.clock.advance(CACHE_TTL - 1)
        self.assertEqual(self.cache.get(token), self.account)
        self.clock.advance(1)
        self.assertIsNone(self.cache.get(token))

    def test_token_without_expiry(self) -> None:
        self.cache.put("legacy-token", self.account)
        self.clock.advance(CACHE_TTL - 1)
        self.assertEqual(self.cache.get("legacy-token"), self.account)
        self.clock.advance(1)
        self.assertIsNone(self.cache.get("legacy-token"))

    def test_expired_token_not_cached(self) -> None:
        self.cache.put(jwt({"exp": 999}), self.account)
        self.assertEqual(len(self.cache), 0)

    def test_keyed_by_digest_and_bounded(self) -> None:
        for i in range(5):
            self.cache.put(f"token-{i}", ServiceAccount("default", f"sa{i}"))
        self.assertEqual(len(self.cache), 3)
        self.assertIsNone(self.cache.get("token-0"))
        self.assertEqual(self.cache.get("token-4").name, "sa4")
        self.assertNotIn("token-4", repr(self.cache._entries))


class _Response:
    def __init__(self, code: int, body: Any):
        self.code = code
        self._body = body

    def content(self) -> defer.Deferred:
        return defer.succeed(json.dumps(self._body).encode())


class _Client:
    """
    A treq-like client: records each post, answers with C{response} (or
    never, when it is C{None}).
    """

    def __init__(self, response: _Response | None = None):
        self.response = response
        self.posts: list[tuple[str, dict[str, Any], dict[str, list[str]]]] = []
        self.cancelled = 0

    def post(self, url: str, data: bytes, headers: dict[str, list[str]]) -> defer.Deferred:
        self.posts.append((url, json.loads(data), headers))
        if self.response is not None:
            return defer.succeed(self.response)

        def cancel(d: defer.Deferred) -> None:
            self.cancelled += 1

        return defer.Deferred(cancel)


class TokenReviewerTests(SynchronousTestCase):
    """
    L{TokenReviewer} with a stub client on a fake clock.
    """

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.token_file = os.path.join(self.dir, "token")
        with open(self.token_file, "w") as f:
            f.write("pilot-token-1\n")

    def reviewer(self, client: _Client, **kwargs: Any) -> TokenReviewer:
        return TokenReviewer("https://k8s.example:6443/", self.clock, token_file=self.token_file, client=client,
                             **kwargs)

    def test_request(self) -> None:
        client = _Client(_Response(201, answer()))
        reviewer = self.reviewer(client, audiences=["txmesh"], timeout=2)
        client.response = _Response(201, answer(audiences=["txmesh"]))
        account = self.successResultOf(reviewer.review("sa-token"))
        self.assertEqual(account, ServiceAccount("default", "web", "u-1"))
        [(url, body, headers)] = client.posts
        self.assertEqual(url, "https://k8s.example:6443/apis/authentication.k8s.io/v1/tokenreviews")
        self.assertEqual(body, {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                                "spec": {"token": "sa-token", "audiences": ["txmesh"]}})
        self.assertEqual(headers["Authorization"], ["Bearer pilot-token-1"])

    def test_token_file_read_for_every_review(self) -> None:
        client = _Client(_Response(201, answer()))
        reviewer = self.reviewer(client)
        self.successResultOf(reviewer.review("a"))
        with open(self.token_file, "w") as f:
            f.write("pilot-token-2")
        self.successResultOf(reviewer.review("b"))
        self.assertEqual([h["Authorization"] for _, _, h in client.posts],
                         [["Bearer pilot-token-1"], ["Bearer pilot-token-2"]])
        self.assertNotIn("audiences", client.posts[0][1]["spec"])

    def test_unreadable_token_file(self) -> None:
        os.remove(self.token_file)
        failure = self.failureResultOf(self.reviewer(_Client(_Response(201, answer()))).review("a"), TokenReviewError)
        self.assertIn("cannot read the pilot's own Kubernetes token", failure.value.reason)

    def test_cached(self) -> None:
        client = _Client(_Response(201, answer()))
        reviewer = self.reviewer(client)
        token = jwt({"exp": 100})
        self.successResultOf(reviewer.review(token))
        self.clock.advance(99)
        self.successResultOf(reviewer.review(token))
        self.assertEqual(reviewer.reviews, 1)
        self.clock.advance(1)
        self.successResultOf(reviewer.review(token))
        self.assertEqual(reviewer.reviews, 2)

    def test_failures_not_cached(self) -> None:
        client = _Client(_Response(201, {"status": {"error": "nope"}}))
        reviewer = self.reviewer(client)
        self.failureResultOf(reviewer.review("t"), TokenReviewError)
        self.failureResultOf(reviewer.review("t"), TokenReviewError)
        self.assertEqual(len(client.posts), 2)

    def test_timeout(self) -> None:
        client = _Client(None)
        d = self.reviewer(client, timeout=2).review("t")
        self.assertNoResult(d)
        self.clock.advance(2)
        failure = self.failureResultOf(d, TokenReviewError)
        self.assertEqual(failure.value.reason,
                         "cannot reach the Kubernetes API at https://k8s.example:6443: no answer in 2 s")
        self.assertEqual(client.cancelled, 1)

    def test_cancel_passes_through(self) -> None:
        client = _Client(None)
        d = self.reviewer(client).review("t")
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_empty_token(self) -> None:
        self.failureResultOf(self.reviewer(_Client()).review(""), TokenReviewError)


class _SlowBackend:
    """
    A backend whose decision on each hello is a Deferred the test fires.
    """

    def __init__(self) -> None:
        self.decisions: list[defer.Deferred] = []
        self.registered: list[Any] = []

    def authenticate(self, hello: Hello, peer_identity: str | None) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.decisions.append(d)
        return d

    def register(self, channel: Any) -> None:
        self.registered.append(channel)

    def unregister(self, channel: Any) -> None:
        self.registered.remove(channel)


class DeferredHelloTests(SynchronousTestCase):
    """
    L{PilotChannelProtocol} with a backend that decides later.
    """

    def setUp(self) -> None:
        self.backend = _SlowBackend()
        self.channel = PilotChannelProtocol(self.backend, task.Clock(), None)
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)

    def send(self, *messages: Any) -> None:
        self.channel.dataReceived(b"".join(encode(m) for m in messages))

    def received(self) -> list[Any]:
        return ChannelDecoder().receive_data(self.transport.value())

    def test_queued_until_admitted(self) -> None:
        self.send(Hello(node=Node(id="p1", labels=LABELS)), Ping(id=1), Ping(id=2))
        self.assertEqual(self.received(), [])
        self.backend.decisions[0].callback(Admission(identity="spiffe://cluster.local/ns/default/sa/web"))
        self.assertEqual(self.received(), [Pong(id=1), Pong(id=2)])
        self.assertEqual(self.channel.identity, "spiffe://cluster.local/ns/default/sa/web")
        self.assertEqual(self.backend.registered, [self.channel])

    def test_refused_drops_queue(self) -> None:
        self.send(Hello(node=Node(id="p1", labels=LABELS)), Ping(id=1))
        self.backend.decisions[0].callback(Admission(refusal="no"))
        self.assertEqual(self.received(), [Refused(reason="no")])
        self.assertTrue(self.transport.disconnecting)

    def test_failure_refuses(self) -> None:
        self.send(Hello(node=Node(id="p1", labels=LABELS)))
        self.backend.decisions[0].errback(RuntimeError("the backend broke"))
        self.assertEqual(self.received(), [Refused(reason="the pilot could not check the credential: "
                                                          "the backend broke")])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_closed_meanwhile(self) -> None:
        self.send(Hello(node=Node(id="p1", labels=LABELS)), Ping(id=1))
        decision = self.backend.decisions[0]
        self.channel.connectionLost(None)
        self.assertTrue(decision.called)  # cancelled, and the CancelledError handled
        self.assertEqual((self.received(), self.backend.registered), ([], []))

    def test_decided_after_close(self) -> None:
        """
        A backend that answers anyway when cancelled: the answer is dropped.
        """
        self.backend.authenticate = (  # type: ignore[method-assign]
            lambda hello, peer: defer.Deferred(lambda d: d.callback(Admission(identity="spiffe://x/ns/a/sa/b"))))
        self.send(Hello(node=Node(id="p1", labels=LABELS)), Ping(id=1))
        self.channel.connectionLost(None)
        self.assertEqual((self.received(), self.backend.registered, self.channel.identity), ([], [], None))

    def test_second_hello_while_pending(self) -> None:
        self.send(Hello(node=Node(id="p1", labels=LABELS)), Hello(node=Node(id="p1", labels=LABELS)))
        self.assertTrue(self.transport.disconnecting)

    def test_queue_bounded(self) -> None:
        self.send(Hello(node=Node(id="p1", labels=LABELS)),
                  *[Ping(id=i) for i in range(PilotChannelProtocol.MAX_QUEUED + 1)])
        self.assertTrue(self.transport.disconnecting)


class KubernetesAuthConfigTests(SynchronousTestCase):
    """
    C{kubernetes_auth} in C{mesh.yaml}.
    """

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, True)

    def load(self, text: str) -> Any:
        with open(os.path.join(self.dir, "mesh.yaml"), "w") as f:
            f.write(text)
        return load_pilot_settings(self.dir)

    def error(self, text: str) -> ConfigError:
        return self.assertRaises(ConfigError, self.load, text)

    def test_absent(self) -> None:
        self.assertIsNone(self.load("trust_domain: example.org\n").kubernetes_auth)

    def test_in_cluster_defaults(self) -> None:
        self.assertEqual(self.load("kubernetes_auth: {}\n").kubernetes_auth, KubernetesAuth(
            "https://kubernetes.default.svc", "/var/run/secrets/kubernetes.io/serviceaccount/token",
            "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt", ()))
        self.assertEqual(self.load("kubernetes_auth:\n").kubernetes_auth.api, "https://kubernetes.default.svc")

    def test_all_fields(self) -> None:
        auth = self.load("kubernetes_auth:\n  api: https://10.0.0.1:6443\n  token_file: pilot-token\n"
                         "  ca_file: /etc/k8s/ca.crt\n  audiences: [txmesh-pilot, istio-ca]\n").kubernetes_auth
        self.assertEqual(auth, KubernetesAuth("https://10.0.0.1:6443", os.path.join(self.dir, "pilot-token"),
                                              "/etc/k8s/ca.crt", ("txmesh-pilot", "istio-ca")))

    def test_http_has_no_defaults(self) -> None:
        auth = self.load("kubernetes_auth: {api: 'http://127.0.0.1:8001'}\n").kubernetes_auth
        self.assertEqual((auth.token_file, auth.ca_file), (None, None))

    def test_errors(self) -> None:
        cases = [
            ("kubernetes_auth: [1]\n", "kubernetes_auth", "expected a mapping"),
            ("kubernetes_auth: {api: 'ftp://x'}\n", "kubernetes_auth.api", "expected an http:// or https:// URL"),
            ("kubernetes_auth: {api: 'http://x', ca_file: ca}\n", "kubernetes_auth.ca_file", "only used with an https"),
            ("kubernetes_auth: {audiences: txmesh}\n", "kubernetes_auth.audiences", "expected a list"),
            ("kubernetes_auth: {audiences: ['']}\n", "kubernetes_auth.audiences", "non-empty strings"),
            ("kubernetes_auth: {token_file: ''}\n", "kubernetes_auth.token_file", "non-empty string"),
            ("kubernetes_auth: {tokenfile: x}\n", "kubernetes_auth.tokenfile", "unknown field"),
        ]
        for text, field, reason in cases:
            with self.subTest(text=text):
                e = self.error(text)
                self.assertEqual(e.source, os.path.join(self.dir, "mesh.yaml"))
                self.assertEqual(e.field, field)
                self.assertIn(reason, e.reason)

    def test_unreadable_ca_file(self) -> None:
        auth = KubernetesAuth("https://10.0.0.1:6443", None, os.path.join(self.dir, "missing.crt"))
        e = self.assertRaises(ConfigError, reviewer_from_settings, "mesh.yaml", auth, task.Clock())
        self.assertEqual(e.field, "kubernetes_auth.ca_file")
        self.assertIn("cannot read", e.reason)


class ServiceAccountTokenChannelTests(_PilotCase):
    """
    The secure channel with a reviewer pointed at the fake API server.
    """

    security = True

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.fake = FakeKubernetes(reactor, token="pilot-sa-token")
        self.fake.start()
        self.addCleanup(lambda: self.fake.stop())
        yield super().setUp()
        self.token_file = os.path.join(self.dir, "pilot-token")
        with open(self.token_file, "w") as f:
            f.write("pilot-sa-token\n")
        self.reviewer = TokenReviewer(self.fake.url, reactor, token_file=self.token_file, timeout=5)
        # The pilot's ChannelSecurity is this object: give it the reviewer.
        self.channel_security.reviewer = self.reviewer

    @defer.inlineCallbacks
    def admitted(self, credential: str, namespace: str = "default") -> Any:
        address = f"tcp:127.0.0.1:{self.pilot.channel_port.getHost().port}"
        tls = pilot_tls_options(None, self.channel_security.root_pem, address, None, reactor.seconds())
        client = yield self.connect(tls)
        client.send(Hello(node=Node(id="p1", namespace=namespace, labels=LABELS), credential=credential))
        first = yield client.next()
        return client, first

    def sa_token(self, namespace: str = "default", name: str = "web") -> str:
        return self.fake.service_account_token(namespace, name, exp=reactor.seconds() + 3600)

    def audited(self) -> list[dict]:
        with open(self.audit_path) as f:
            return [json.loads(line) for line in f]

    @defer.inlineCallbacks
    def test_admitted_and_certified(self) -> Any:
        client, push = yield self.admitted(self.sa_token())
        self.assertIsInstance(push, Push)
        self.assertEqual(self.pilot.channels[0].identity, "spiffe://cluster.local/ns/default/sa/web")
        identity = WorkloadIdentity("spiffe://cluster.local/ns/default/sa/web")
        client.send(CertificateRequest(id=1, csr=identity.new_request().decode()))
        issued = yield client.next()
        self.assertIsInstance(issued, CertificateIssued)
        leaf = x509.load_pem_x509_certificates(issued.chain.encode())[0]
        self.assertEqual(certificate_identity(leaf), identity.spiffe_id)
        self.assertEqual(self.fake.reviews, [{"token": self.fake.reviews[0]["token"]}])

    @defer.inlineCallbacks
    def test_not_single_use_and_cached(self) -> Any:
        token = self.sa_token()
        first, push = yield self.admitted(token)
        self.assertIsInstance(push, Push)
        first.transport.loseConnection()
        yield first.closed()
        again, push = yield self.admitted(token)
        self.assertIsInstance(push, Push)
        self.assertEqual(len(self.fake.reviews), 1)
        self.assertEqual(self.reviewer.reviews, 1)

    @defer.inlineCallbacks
    def test_same_token_reviewed_again_after_cache(self) -> Any:
        token = self.sa_token()
        first, push = yield self.admitted(token)
        self.assertIsInstance(push, Push)
        self.reviewer._cache = ReviewCache(reactor)
        again, push = yield self.admitted(token)
        self.assertIsInstance(push, Push)
        self.assertEqual(len(self.fake.reviews), 2)

    @defer.inlineCallbacks
    def test_unknown_token_refused(self) -> Any:
        client, refused = yield self.admitted(jwt({"sub": "system:serviceaccount:default:web", "exp": 2e9}))
        self.assertIsInstance(refused, Refused)
        self.assertIn("did not authenticate the service-account token", refused.reason)
        self.assertIn("service account token is not valid", refused.reason)
        yield client.closed()
        self.assertEqual(self.pilot.channels, [])
        [record] = self.audited()
        self.assertEqual((record["method"], record["decision"]), ("HELLO", "DENY"))
        self.assertEqual(record["reason"], refused.reason)

    @defer.inlineCallbacks
    def test_namespace_mismatch_refused(self) -> Any:
        client, refused = yield self.admitted(self.sa_token(namespace="payments"))
        self.assertIsInstance(refused, Refused)
        self.assertEqual(refused.reason, "the service-account token is for namespace 'payments', but the proxy "
                                         "says it is in 'default'")

    @defer.inlineCallbacks
    def test_audience(self) -> Any:
        self.reviewer.audiences = ("txmesh-pilot",)
        client, refused = yield self.admitted(self.sa_token())
        self.assertIsInstance(refused, Refused)
        self.assertIn("invalid for the target audiences ['txmesh-pilot']", refused.reason)
        token = self.fake.service_account_token("default", "web", exp=reactor.seconds() + 3600,
                                                audiences=("txmesh-pilot",))
        client, push = yield self.admitted(token)
        self.assertIsInstance(push, Push)

    @defer.inlineCallbacks
    def test_api_down_refused(self) -> Any:
        yield self.fake.stop()
        client, refused = yield self.admitted(self.sa_token())
        self.assertIsInstance(refused, Refused)
        self.assertTrue(refused.reason.startswith(f"cannot reach the Kubernetes API at {self.fake.url}: "),
                        refused.reason)
        self.assertIn("refused", refused.reason.split(": ", 1)[1])

    @defer.inlineCallbacks
    def test_api_too_slow_refused(self) -> Any:
        self.fake.review_delay = 5
        self.reviewer._timeout = 0.3
        client, refused = yield self.admitted(self.sa_token())
        self.assertIsInstance(refused, Refused)
        self.assertEqual(refused.reason, f"cannot reach the Kubernetes API at {self.fake.url}: no answer in 0.3 s")

    @defer.inlineCallbacks
    def test_pilot_token_rejected(self) -> Any:
        self.fake.token = "rotated-elsewhere"
        client, refused = yield self.admitted(self.sa_token())
        self.assertIsInstance(refused, Refused)
        self.assertIn("the Kubernetes API refused the pilot's own credentials (HTTP 401", refused.reason)

    @defer.inlineCallbacks
    def test_pilot_may_not_review(self) -> Any:
        self.fake.may_review = False
        client, refused = yield self.admitted(self.sa_token())
        self.assertIsInstance(refused, Refused)
        self.assertIn("(HTTP 403 Forbidden", refused.reason)
        self.assertIn("system:auth-delegator", refused.reason)

    @defer.inlineCallbacks
    def test_messages_after_hello_answered_in_order(self) -> Any:
        self.fake.review_delay = 0.3
        address = f"tcp:127.0.0.1:{self.pilot.channel_port.getHost().port}"
        client = yield self.connect(pilot_tls_options(None, self.channel_security.root_pem, address, None,
                                                      reactor.seconds()))
        identity = WorkloadIdentity("spiffe://cluster.local/ns/default/sa/web")
        client.send(Hello(node=Node(id="p1", labels=LABELS), credential=self.sa_token()))
        client.send(Ping(id=1))
        client.send(CertificateRequest(id=2, csr=identity.new_request().decode()))
        client.send(Ping(id=3))
        answers = []
        for _ in range(4):
            answers.append((yield client.next(timeout=5)))
        self.assertIsInstance(answers[0], Push)
        self.assertEqual(answers[1], Pong(id=1))
        self.assertIsInstance(answers[2], CertificateIssued)
        self.assertEqual(answers[2].id, 2)
        self.assertEqual(answers[3], Pong(id=3))

    @defer.inlineCallbacks
    def test_proxy_leaves_during_review(self) -> Any:
        self.fake.review_delay = 0.3
        address = f"tcp:127.0.0.1:{self.pilot.channel_port.getHost().port}"
        client = yield self.connect(pilot_tls_options(None, self.channel_security.root_pem, address, None,
                                                      reactor.seconds()))
        client.send(Hello(node=Node(id="p1", labels=LABELS), credential=self.sa_token()))
        client.send(Ping(id=1))
        for _ in range(100):
            if self.fake.reviews:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(len(self.fake.reviews), 1)
        client.transport.abortConnection()
        yield client.closed()
        yield task.deferLater(reactor, 0.5, lambda: None)
        self.assertEqual(self.pilot.channels, [])
        self.assertEqual(self.audited(), [])

    @defer.inlineCallbacks
    def test_join_tokens_unchanged(self) -> Any:
        token = token_authority(ca_directory(self.dir)).create("default", "web", reactor.seconds(), 3600)
        client, push = yield self.admitted(token)
        self.assertIsInstance(push, Push)
        again, refused = yield self.admitted(token)
        self.assertIn("was used already", refused.reason)
        self.assertEqual(self.fake.reviews, [])

    @defer.inlineCallbacks
    def test_no_credential_names_both(self) -> Any:
        client, refused = yield self.admitted("")
        self.assertIn("a Kubernetes service-account token", refused.reason)

    @defer.inlineCallbacks
    def test_without_reviewer_a_jwt_is_explained(self) -> Any:
        self.channel_security.reviewer = None
        client, refused = yield self.admitted(self.sa_token())
        self.assertIsInstance(refused, Refused)
        self.assertIn("accepts only with kubernetes_auth", refused.reason)
