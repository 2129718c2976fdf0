"""
Kubernetes service-account tokens as a proxy's bootstrap credential, as
Istio takes them: the pilot asks the API server, with a C{TokenReview},
whether a token is valid and for whom.

    POST /apis/authentication.k8s.io/v1/tokenreviews
    {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
     "spec": {"token": "<the proxy's token>", "audiences": [...]}}

The answer's C{status} says C{authenticated}, the user
(C{system:serviceaccount:<namespace>:<name>}) and, when C{audiences} were
asked for, which of them the token is good for.  The pilot authenticates to
the API server with its own service-account token (read again for every
review: kubelet rotates it) and needs the right to create
C{tokenreviews} (the C{system:auth-delegator} ClusterRole).

Successful reviews are cached, keyed by the token's SHA-256, until the
token's own expiry (read from its payload without checking the signature:
it only shortens the cache) or ten minutes, whichever comes first.

L{review_result} and L{service_account_of} are pure; L{TokenReviewer} is the
HTTP shell around them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"
REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
CACHE_TTL = 600.0
"""The longest a successful review is trusted without asking again (seconds)."""
CACHE_SIZE = 1024
DEFAULT_TIMEOUT = 10.0
"""Seconds a review may take (connecting included) before the proxy is refused."""
MAX_TOKEN_LENGTH = 16384


class TokenReviewError(Exception):
    """
    A service-account token was not accepted, or could not be checked.

    @ivar reason: why, for a person; safe to send back to the proxy (it
        holds neither token).
    """

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


@attrs.frozen
class ServiceAccount:
    """
    Whom the API server says a token belongs to.

    @ivar namespace: the service account's namespace.
    @ivar name: the service account's name.
    @ivar uid: the service account's uid, or C{""}.
    """

    namespace: str
    name: str
    uid: str = ""


def service_account_of(username: str) -> tuple[str, str]:
    """
    Split a Kubernetes user name C{system:serviceaccount:<namespace>:<name>}.

    @return: C{(namespace, name)}.
    @raise ValueError: the user is not a service account.
    """
    if not isinstance(username, str) or not username.startswith(SERVICE_ACCOUNT_PREFIX):
        raise ValueError(f"the token is for user {username!r}, not a service account "
                         f"({SERVICE_ACCOUNT_PREFIX}<namespace>:<name>)")
    parts = username[len(SERVICE_ACCOUNT_PREFIX):].split(":")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"the token is for user {username!r}, which is not of the form "
                         f"{SERVICE_ACCOUNT_PREFIX}<namespace>:<name>")
    return parts[0], parts[1]


def unverified_expiry(token: str) -> float | None:
    """
    @return: the C{exp} claim of a JWT, read without checking anything
        else, or C{None} when the token is not a JWT or has no usable
        C{exp} (legacy Secret-based tokens have none).
    """
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, UnicodeDecodeError):
        return None
    exp = payload.get("exp") if isinstance(payload, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, (int, float)) or not math.isfinite(exp):
        return None
    return float(exp)


def _status_message(body: Any) -> str:
    if isinstance(body, Mapping) and isinstance(body.get("message"), str) and body["message"]:
        return body["message"]
    return "no message"


def review_result(code: int, body: Any, audiences: Iterable[str] = ()) -> ServiceAccount:
    """
    Read the API server's answer to a C{TokenReview}.

    @param code: the HTTP status.
    @param body: the decoded JSON body.
    @param audiences: the audiences asked for; when some were, the
        answer's C{status.audiences} must name one of them (an API server
        that ignores audiences leaves it empty).
    @return: the token's service account.
    @raise TokenReviewError: the token is not a valid service-account token,
        or the API server refused the pilot's own credentials.
    """
    if code in (401, 403):
        what = "Unauthorized" if code == 401 else "Forbidden"
        hint = ("check kubernetes_auth.token_file in mesh.yaml" if code == 401 else
                "the pilot's service account needs to create tokenreviews (ClusterRole system:auth-delegator)")
        raise TokenReviewError(f"the Kubernetes API refused the pilot's own credentials (HTTP {code} {what}: "
                               f"{_status_message(body)}): {hint}")
    if code not in (200, 201):
        raise TokenReviewError(f"the Kubernetes API answered the token review with HTTP {code}: "
                               f"{_status_message(body)}")
    status = body.get("status") if isinstance(body, Mapping) else None
    if not isinstance(status, Mapping):
        raise TokenReviewError("the Kubernetes API answered something that is not a TokenReview (no status)")
    if status.get("authenticated") is not True:
        error = status.get("error")
        raise TokenReviewError("the Kubernetes API did not authenticate the service-account token: "
                               f"{error if isinstance(error, str) and error else 'no reason given'}")
    wanted = list(audiences)
    if wanted:
        granted = status.get("audiences")
        granted = [a for a in granted if isinstance(a, str)] if isinstance(granted, list) else []
        if not set(granted) & set(wanted):
            raise TokenReviewError(f"the service-account token is not for any of the audiences {wanted} "
                                   f"(the Kubernetes API answered {granted})")
    user = status.get("user")
    user = user if isinstance(user, Mapping) else {}
    try:
        namespace, name = service_account_of(user.get("username"))
    except ValueError as e:
        raise TokenReviewError(str(e)) from None
    uid = user.get("uid")
    return ServiceAccount(namespace, name, uid if isinstance(uid, str) else "")


class ReviewCache:
    """
    Successful reviews, keyed by the token's SHA-256 (the cache holds no
    token), each until the token expires or L{CACHE_TTL}, whichever is
    first; the oldest entries go first past C{size}.
    """

    def __init__(self, clock: IReactorTime, ttl: float = CACHE_TTL, size: int = CACHE_SIZE):
        self._clock = clock
        self._ttl = ttl
        self._size = size
        self._entries: OrderedDict[str, tuple[float, ServiceAccount]] = OrderedDict()

    @staticmethod
    def key(token: str) -> str:
        return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()

    def get(self, token: str) -> ServiceAccount | None:
        """
        @return: the cached account for C{token}, or C{None}.
        """
        key = self.key(token)
        entry = self._entries.get(key)
        if entry is None:
            return None
        until, account = entry
        if self._clock.seconds() >= until:
            del self._entries[key]
            return None
        return account

    def put(self, token: str, account: ServiceAccount) -> None:
        """
        Remember a successful review (not at all if the token expires now).
        """
        now = self._clock.seconds()
        until = now + self._ttl
        exp = unverified_expiry(token)
        if exp is not None:
            until = min(until, exp)
        if until <= now:
            return
        key = self.key(token)
        self._entries.pop(key, None)
        self._entries[key] = (until, account)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


def _failure_text(failure: Failure) -> str:
    message = failure.getErrorMessage()
    inner = getattr(failure.value, "reasons", None)
    if inner:
        message = "; ".join(r.getErrorMessage() for r in inner) or message
    return f"{failure.type.__name__}: {message}"


class TokenReviewer:
    """
    Checks service-account tokens with the Kubernetes API server.

    @ivar api: the API server's base URL.
    @ivar audiences: the audiences a token must be for (empty: the API
        server's own).
    @ivar reviews: how many reviews were sent to the API server.
    """

    log = Logger()

    def __init__(
        self,
        api: str,
        reactor: Any,
        token_file: str | None = None,
        ca_file: str | None = None,
        audiences: Iterable[str] = (),
        timeout: float = DEFAULT_TIMEOUT,
        client: Any = None,
        cache: ReviewCache | None = None,
    ):
        """
        @param api: C{https://host:port} (or C{http://} for C{kubectl
            proxy} and tests).
        @param reactor: connects, and times the timeout and the cache.
        @param token_file: the pilot's own bearer token, read again for
            every review; C{None} sends none.
        @param ca_file: PEM certificates to trust for an C{https} api.
        @param audiences: the audiences asked for in each review.
        @param timeout: seconds a review may take.
        @param client: a treq-like client (C{post(url, data=, headers=)});
            by default one over an C{Agent} trusting C{ca_file}.
        @param cache: the cache of successful reviews; by default one on
            C{reactor}'s clock.
        @raise ValueError: C{ca_file} cannot be read or holds no certificate.
        """
        self.api = api.rstrip("/")
        self.audiences = tuple(audiences)
        self.reviews = 0
        self._reactor = reactor
        self._token_file = token_file
        self._timeout = timeout
        self._cache = cache if cache is not None else ReviewCache(reactor)
        if client is None:
            import treq.client
            from twisted.web.client import Agent, HTTPConnectionPool

            from txmesh.pilot.registry.kubernetes import _https_policy

            kwargs: dict[str, Any] = {"pool": HTTPConnectionPool(reactor, persistent=False),
                                      "connectTimeout": timeout}
            if ca_file is not None:
                try:
                    kwargs["contextFactory"] = _https_policy(reactor, ca_file)
                except OSError as e:
                    raise ValueError(f"cannot read {ca_file}: {e.strerror or e}") from None
                except ValueError as e:
                    raise ValueError(f"{ca_file}: {e}") from None
            client = treq.client.HTTPClient(Agent(reactor, **kwargs))
        self._client = client

    def _headers(self) -> dict[str, list[str]]:
        headers = {"Accept": ["application/json"], "Content-Type": ["application/json"]}
        if self._token_file is not None:
            try:
                with open(self._token_file, encoding="utf-8") as f:
                    token = f.read().strip()
            except OSError as e:
                raise TokenReviewError(f"cannot read the pilot's own Kubernetes token {self._token_file}: "
                                       f"{e.strerror or e}") from None
            if token:
                headers["Authorization"] = [f"Bearer {token}"]
        return headers

    def review(self, token: str) -> defer.Deferred[ServiceAccount]:
        """
        Ask the API server (or the cache) whose token C{token} is.

        @return: a Deferred firing with the L{ServiceAccount}, or failing
            with L{TokenReviewError}; cancelling it cancels the request.
        """
        if not token or len(token) > MAX_TOKEN_LENGTH:
            return defer.fail(TokenReviewError("the service-account token is empty or too long"))
        cached = self._cache.get(token)
        if cached is not None:
            return defer.succeed(cached)
        try:
            headers = self._headers()
        except TokenReviewError as e:
            return defer.fail(e)
        spec: dict[str, Any] = {"token": token}
        if self.audiences:
            spec["audiences"] = list(self.audiences)
        body = json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec})
        self.reviews += 1
        request = defer.maybeDeferred(self._client.post, self.api + REVIEW_PATH, data=body.encode(),
                                      headers=headers)
        request.addCallback(self._read)
        timed_out: list[bool] = []
        cancelled: list[bool] = []

        def expire() -> None:
            timed_out.append(True)
            request.cancel()

        def cancel(_: defer.Deferred[ServiceAccount]) -> None:
            # Whoever waited gave up (the proxy left): stop the request too.
            cancelled.append(True)
            request.cancel()

        timer = self._reactor.callLater(self._timeout, expire)
        result: defer.Deferred[ServiceAccount] = defer.Deferred(cancel)

        def settle(outcome: Any) -> None:
            if timer.active():
                timer.cancel()
            if cancelled:
                return
            if isinstance(outcome, Failure):
                if not outcome.check(TokenReviewError):
                    outcome = Failure(TokenReviewError(self._unreachable(outcome, bool(timed_out))))
                result.errback(outcome)
                return
            try:
                account = self._reviewed(outcome, token)
            except TokenReviewError as e:
                result.errback(e)
                return
            result.callback(account)

        request.addBoth(settle)
        return result

    def _read(self, response: Any) -> defer.Deferred[tuple[int, Any]]:
        def decode(content: bytes) -> tuple[int, Any]:
            try:
                return response.code, json.loads(content)
            except (ValueError, UnicodeDecodeError):
                if response.code in (401, 403):
                    return response.code, None
                raise TokenReviewError(f"the Kubernetes API answered the token review with HTTP {response.code} "
                                       "and a body that is not JSON") from None

        return response.content().addCallback(decode)

    def _unreachable(self, failure: Failure, timed_out: bool) -> str:
        if timed_out:
            reason = f"cannot reach the Kubernetes API at {self.api}: no answer in {self._timeout:g} s"
        else:
            reason = f"cannot reach the Kubernetes API at {self.api}: {_failure_text(failure)}"
        self.log.warn("token review failed: {reason}", reason=reason)
        return reason

    def _reviewed(self, answer: tuple[int, Any], token: str) -> ServiceAccount:
        code, body = answer
        account = review_result(code, body, self.audiences)
        self._cache.put(token, account)
        return account


def reviewer_from_settings(source: str, auth: Any, reactor: Any) -> TokenReviewer:
    """
    Make the reviewer C{mesh.yaml}'s C{kubernetes_auth} describes.

    @param source: the file, for errors.
    @param auth: L{txmesh.pilot.mesh_config.KubernetesAuth}.
    @raise txmesh.config.errors.ConfigError: C{ca_file} cannot be used.
    """
    from txmesh.config.errors import ConfigError

    try:
        return TokenReviewer(auth.api, reactor, token_file=auth.token_file, ca_file=auth.ca_file,
                             audiences=auth.audiences)
    except ValueError as e:
        hint = " (not running in a pod? set api, token_file and ca_file)" if auth.ca_file.startswith(
            "/var/run/secrets/kubernetes.io/") else ""
        raise ConfigError(source, "kubernetes_auth.ca_file", f"{e}{hint}") from None
