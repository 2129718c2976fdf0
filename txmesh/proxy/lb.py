"""
Load balancers, pure: given the endpoints of a cluster (fixed at
construction) and a L{PickContext} per request, choose one endpoint.

Semantics follow Envoy (and so Istio's C{DestinationRule}
C{loadBalancer}):

  - C{round_robin}: smooth weighted round robin (nginx's, on a precomputed
    cycle), which is a plain rotation when every weight is equal;
  - C{random}: a weighted random endpoint;
  - C{least_request}: power of two choices, comparing requests in flight
    per unit of weight;
  - C{consistent_hash}: a ketama-style hash ring (L{RingHash}) or a Maglev
    lookup table (L{Maglev}), keyed on a request value chosen by a
    L{HashPolicy} (see L{hash_key_for});
  - locality-aware failover (L{LocalityAware}) around any of them.

Exclusions come in two kinds.  Unhealthy hosts (ejected by outlier
detection, failing active health checks) are skipped, unless so many are
unhealthy that the balancer enters I{panic mode}: when fewer than
C{panic_threshold} percent of the hosts are healthy, it balances across all
of them, as Envoy does, rather than crushing the healthy few.  Hosts
already tried by a retry are avoided whenever another eligible host exists;
when every eligible host has been tried, one of them is chosen again (as
Envoy's C{previous_hosts} retry predicate does once its attempts run out),
so a retry on a one-host cluster still has somewhere to go.  A pick returns
C{None} only when there is no eligible host at all: no endpoints, or none
healthy with panic mode off (C{panic_threshold=0}).

Everything is computed at construction; a pick allocates nothing on the
common path (the chosen host is healthy and untried).  The slow path, taken
when the first choice is excluded, counts health across the hosts once and
then walks the balancer's own fallback order.
"""

from __future__ import annotations

import hashlib
import math
import random
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Sequence
from urllib.parse import unquote_to_bytes

import attrs
from zope.interface import Attribute, Interface, implementer

from txmesh.config.model import Endpoint, HashPolicy

DEFAULT_PANIC_THRESHOLD = 50
"""Envoy's C{healthy_panic_threshold} default, in percent."""

DEFAULT_RING_POINTS = 1024
"""Ring points per unit of endpoint weight (L{RingHash})."""

MAX_RING_POINTS = 1 << 18
"""Ring points above which a ring's points per weight are scaled down."""

DEFAULT_MAGLEV_TABLE_SIZE = 65537
"""Envoy's default Maglev table size (a prime)."""

MAX_ROUND_ROBIN_SCHEDULE = 1 << 16
"""Longest weighted round-robin cycle; heavier weights are scaled down."""

LOCALITY_LEVELS = 3
"""A locality is C{region/zone/subzone}."""

POLICIES = ("round_robin", "random", "least_request", "consistent_hash")
"""The policy names L{build_balancer} accepts."""

HASH_ALGORITHMS = ("ring_hash", "maglev")
"""The C{HashPolicy.algorithm} values L{build_balancer} accepts."""

_REJECTION_TRIES = 4
_SMOOTH_WORK = 1 << 20
_MODEL_DEFAULT_TABLE_SIZE = attrs.fields(HashPolicy).table_size.default


def _no_requests(endpoint: Endpoint) -> int:
    return 0


def _never(endpoint: Endpoint) -> bool:
    return False


def _always(endpoint: Endpoint) -> bool:
    return True


@attrs.frozen(slots=True)
class PickContext:
    """
    What a balancer may know about one request.

    @ivar hash_key: the request's consistent-hash key (see L{hash_key_for}),
        or C{None}: consistent-hash balancers then pick at random.
    @ivar active_requests: requests in flight to an endpoint.
    @ivar unhealthy: whether an endpoint is ejected or failing health
        checks; such endpoints are skipped except in panic mode.
    @ivar tried: whether an endpoint was already tried for this request by
        an earlier attempt; such endpoints are avoided while others remain.
    """

    hash_key: bytes | None = None
    active_requests: Callable[[Endpoint], int] = _no_requests
    unhealthy: Callable[[Endpoint], bool] = _never
    tried: Callable[[Endpoint], bool] = _never


NO_CONTEXT = PickContext()
"""A context with no key, no load and no exclusions."""


class ILoadBalancer(Interface):
    """
    Chooses an endpoint of a fixed set for each request.
    """

    endpoints = Attribute("The endpoints balanced across, a tuple without duplicates.")

    def pick(context: PickContext) -> Endpoint | None:
        """
        @return: the endpoint for this request, or C{None} if no endpoint
            is eligible.
        """


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def _unique(endpoints: Iterable[Endpoint]) -> tuple[Endpoint, ...]:
    seen: dict[Endpoint, None] = {}
    for ep in endpoints:
        if ep.weight < 1:
            raise ValueError(f"endpoint {ep}: weight must be at least 1, got {ep.weight}")
        seen.setdefault(ep, None)
    return tuple(seen)


def _check_threshold(panic_threshold: float) -> float:
    if not 0 <= panic_threshold <= 100:
        raise ValueError(f"panic_threshold must be between 0 and 100 (percent), got {panic_threshold}")
    return panic_threshold


def _acceptor(endpoints: Sequence[Endpoint], context: PickContext, panic_threshold: float,
              total_panic: bool) -> Callable[[Endpoint], bool] | None:
    """
    Decide, for one pick, which hosts are acceptable.

    @param total_panic: whether panic mode may apply when no host at all is
        healthy (L{LocalityAware} fails over to the next locality instead).
    @return: a predicate admitting at least one of C{endpoints}, or C{None}
        if none is eligible.
    """
    unhealthy, tried = context.unhealthy, context.tried
    healthy = healthy_untried = untried = 0
    for ep in endpoints:
        if tried(ep):
            if not unhealthy(ep):
                healthy += 1
        else:
            untried += 1
            if not unhealthy(ep):
                healthy += 1
                healthy_untried += 1
    if healthy * 100 < panic_threshold * len(endpoints) and (healthy or total_panic):
        if untried:
            return lambda ep: not tried(ep)
        return _always
    if healthy_untried:
        return lambda ep: not unhealthy(ep) and not tried(ep)
    if healthy:
        return lambda ep: not unhealthy(ep)
    return None


@implementer(ILoadBalancer)
class LoadBalancer:
    """
    What every balancer here shares: the fast path, panic mode and retry
    avoidance.  A subclass supplies C{_candidate}, its first choice, and
    C{_fallback}, which walks on from that choice to an acceptable host.
    """

    __slots__ = ("endpoints", "panic_threshold")

    def __init__(self, endpoints: Sequence[Endpoint], panic_threshold: float = DEFAULT_PANIC_THRESHOLD):
        """
        @param endpoints: the hosts; duplicates are dropped.
        @param panic_threshold: percent of healthy hosts below which
            health is ignored; 0 disables panic mode.
        @raise ValueError: for a weight below 1 or a threshold outside 0-100.
        """
        self.endpoints = _unique(endpoints)
        self.panic_threshold = _check_threshold(panic_threshold)

    def pick(self, context: PickContext) -> Endpoint | None:
        ep = self._candidate(context)
        if ep is None or not (context.unhealthy(ep) or context.tried(ep)):
            return ep
        return self._settle(context, ep, True)

    def _settle(self, context: PickContext, first: Endpoint, total_panic: bool) -> Endpoint | None:
        accept = _acceptor(self.endpoints, context, self.panic_threshold, total_panic)
        if accept is None:
            return None
        if accept(first):
            return first
        return self._fallback(context, first, accept)

    def _candidate(self, context: PickContext) -> Endpoint | None:
        """
        @return: the first choice, ignoring exclusions; C{None} only when
            there are no endpoints.
        """
        raise NotImplementedError

    def _fallback(self, context: PickContext, first: Endpoint,
                  accept: Callable[[Endpoint], bool]) -> Endpoint | None:
        """
        @return: a host that C{accept} admits (one exists), chosen after
            C{first} was refused.
        """
        raise NotImplementedError


def _weighted_schedule(endpoints: Sequence[Endpoint]) -> tuple[Endpoint, ...]:
    """
    One cycle of smooth weighted round robin: each host of weight w takes
    w/g of the cycle's turns (g the weights' greatest common divisor),
    interleaved.  Small cycles follow nginx's algorithm exactly (each turn,
    every host gains its weight, the richest is chosen and pays the total);
    cycles too long for that are built earliest-deadline-first (Envoy's
    scheduler), the k-th turn of a host falling due at (k - 1/2)/w.
    """
    weights = [ep.weight for ep in endpoints]
    total = sum(weights)
    if total > MAX_ROUND_ROBIN_SCHEDULE:
        weights = [max(1, round(w * MAX_ROUND_ROBIN_SCHEDULE / total)) for w in weights]
    g = 0
    for w in weights:
        g = math.gcd(g, w)
    weights = [w // g for w in weights]
    total = sum(weights)
    n = len(weights)
    if total * n > _SMOOTH_WORK:
        turns = [((k - 0.5) / w, i) for i, w in enumerate(weights) for k in range(1, w + 1)]
        turns.sort()
        return tuple(endpoints[i] for _, i in turns)
    current = [0] * n
    schedule = []
    for _ in range(total):
        best = 0
        for i in range(n):
            current[i] += weights[i]
            if current[i] > current[best]:
                best = i
        current[best] -= total
        schedule.append(endpoints[best])
    return tuple(schedule)


class RoundRobin(LoadBalancer):
    """
    Each endpoint in turn, as often as its weight says, interleaved
    smoothly (weights 3, 1, 1 go C{A B A C A}, not C{A A A B C}); equal
    weights give a plain rotation.  The cycle is precomputed, so a pick is
    an index.  An excluded host's turn passes to the next acceptable host
    in the cycle, so the others keep their proportions.
    """

    __slots__ = ("_schedule", "_next")

    def __init__(self, endpoints: Sequence[Endpoint], rng: random.Random | None = None,
                 panic_threshold: float = DEFAULT_PANIC_THRESHOLD):
        """
        @param rng: picks the starting point, so that many proxies do not
            march in step.
        """
        super().__init__(endpoints, panic_threshold)
        eps = self.endpoints
        if len({ep.weight for ep in eps}) <= 1:
            self._schedule = eps
        else:
            self._schedule = _weighted_schedule(eps)
        self._next = (rng or random.Random()).randrange(len(self._schedule)) if eps else 0

    def _candidate(self, context: PickContext) -> Endpoint | None:
        schedule = self._schedule
        if not schedule:
            return None
        i = self._next
        self._next = i + 1 if i + 1 < len(schedule) else 0
        return schedule[i]

    def _fallback(self, context: PickContext, first: Endpoint,
                  accept: Callable[[Endpoint], bool]) -> Endpoint | None:
        schedule = self._schedule
        n = len(schedule)
        i = self._next
        for _ in range(n):
            ep = schedule[i]
            i = i + 1 if i + 1 < n else 0
            if accept(ep):
                self._next = i
                return ep
        return None  # unreachable: the acceptor admits some endpoint


class _Sampling(LoadBalancer):
    """
    Weighted random sampling of endpoints, shared by L{Random} and
    L{LeastRequest}.
    """

    __slots__ = ("_rng", "_random", "_cumulative", "_total")

    def __init__(self, endpoints: Sequence[Endpoint], rng: random.Random | None = None,
                 panic_threshold: float = DEFAULT_PANIC_THRESHOLD):
        super().__init__(endpoints, panic_threshold)
        self._rng = rng or random.Random()
        self._random = self._rng.random
        eps = self.endpoints
        if len({ep.weight for ep in eps}) <= 1:
            self._cumulative: list[int] | None = None
        else:
            running = 0
            self._cumulative = []
            for ep in eps:
                running += ep.weight
                self._cumulative.append(running)
        self._total = sum(ep.weight for ep in eps)

    def _sample(self) -> Endpoint:
        cumulative = self._cumulative
        if cumulative is None:
            return self.endpoints[int(self._random() * len(self.endpoints))]
        return self.endpoints[bisect_right(cumulative, self._random() * self._total)]

    def _eligible(self, accept: Callable[[Endpoint], bool]) -> list[Endpoint]:
        return [ep for ep in self.endpoints if accept(ep)]


class Random(_Sampling):
    """
    A random endpoint, with probability proportional to its weight.
    """

    __slots__ = ()

    def _candidate(self, context: PickContext) -> Endpoint | None:
        if not self.endpoints:
            return None
        return self._sample()

    def _fallback(self, context: PickContext, first: Endpoint,
                  accept: Callable[[Endpoint], bool]) -> Endpoint | None:
        # Redrawing keeps the choice proportional among acceptable hosts;
        # after a few misses, draw from the list of them.
        for _ in range(_REJECTION_TRIES):
            ep = self._sample()
            if accept(ep):
                return ep
        eligible = self._eligible(accept)
        return self._rng.choices(eligible, [ep.weight for ep in eligible])[0]


class LeastRequest(_Sampling):
    """
    Power of two choices (Envoy's least-request default): of two endpoints
    drawn at random (in proportion to weight), the one with fewer requests
    in flight per unit of weight; on a tie, the first drawn, so that idle
    hosts share traffic in proportion to their weights.
    """

    __slots__ = ()

    def _pair(self) -> tuple[Endpoint, Endpoint]:
        eps = self.endpoints
        n = len(eps)
        if n == 1:
            return eps[0], eps[0]
        if self._cumulative is None:
            rnd = self._random
            i = int(rnd() * n)
            j = int(rnd() * (n - 1))
            return eps[i], eps[j + 1 if j >= i else j]
        a = self._sample()
        b = self._sample()
        if b is a:
            b = self._sample()
        return a, b

    def _candidate(self, context: PickContext) -> Endpoint | None:
        eps = self.endpoints
        n = len(eps)
        if n <= 1:
            return eps[0] if n else None
        return self._better(context.active_requests, *self._pair())

    def _better(self, active: Callable[[Endpoint], int], a: Endpoint, b: Endpoint) -> Endpoint:
        if a is b:
            return a
        return b if active(b) * a.weight < active(a) * b.weight else a

    def _fallback(self, context: PickContext, first: Endpoint,
                  accept: Callable[[Endpoint], bool]) -> Endpoint | None:
        active = context.active_requests
        for _ in range(_REJECTION_TRIES):
            a, b = self._pair()
            if accept(a):
                return self._better(active, a, b) if accept(b) else a
            if accept(b):
                return b
        eligible = self._eligible(accept)
        if len(eligible) == 1:
            return eligible[0]
        a, b = self._rng.choices(eligible, [ep.weight for ep in eligible], k=2)
        return self._better(active, a, b)


class _Hashing(LoadBalancer):
    """
    What the consistent-hash balancers share: the key's 64-bit hash (a
    random one when the request has no key) and a remembered position to
    walk on from when the first choice is refused.
    """

    __slots__ = ("_rng", "_position")

    def __init__(self, endpoints: Sequence[Endpoint], rng: random.Random | None,
                 panic_threshold: float):
        super().__init__(endpoints, panic_threshold)
        self._rng = rng or random.Random()
        self._position = 0

    def _key_hash(self, context: PickContext) -> int:
        key = context.hash_key
        if key is None:
            return self._rng.getrandbits(64)
        return _hash64(key)


class RingHash(_Hashing):
    """
    A ketama-style consistent-hash ring: each endpoint places points on a
    64-bit ring, as many as C{points_per_weight} times its weight; a key
    belongs to the first point at or after its hash.  An endpoint's points
    depend only on its address and weight, so adding or removing one host
    moves only the keys it gains or loses.

    A refused host passes the key to the next distinct host along the
    ring, so retries and ejections move keys consistently too.
    """

    __slots__ = ("_hashes", "_owners")

    def __init__(self, endpoints: Sequence[Endpoint], points_per_weight: int = DEFAULT_RING_POINTS,
                 rng: random.Random | None = None, panic_threshold: float = DEFAULT_PANIC_THRESHOLD):
        """
        @param points_per_weight: ring points for each unit of weight; when
            the ring would exceed L{MAX_RING_POINTS} it is scaled down.
        @param rng: draws the hash of requests without a key.
        @raise ValueError: if C{points_per_weight} is below 1.
        """
        if points_per_weight < 1:
            raise ValueError(f"points_per_weight must be at least 1, got {points_per_weight}")
        super().__init__(endpoints, rng, panic_threshold)
        eps = self.endpoints
        total = sum(ep.weight for ep in eps)
        if total * points_per_weight > MAX_RING_POINTS:
            points_per_weight = max(1, MAX_RING_POINTS // total)
        points: list[tuple[int, int]] = []
        for index, ep in enumerate(eps):
            name = f"{ep.host}:{ep.port}_".encode()
            for i in range(ep.weight * points_per_weight):
                points.append((_hash64(name + b"%d" % i), index))
        points.sort()
        # A point followed by another of the same owner decides nothing
        # (every hash up to the later one lands on the same host): keep the
        # last of each run, so that neighbours on the ring differ.
        keep = [p for k, p in enumerate(points)
                if points[(k + 1) % len(points)][1] != p[1]] if len(eps) > 1 else points[-1:]
        self._hashes = array("Q", [h for h, _ in keep])
        self._owners = array("I", [i for _, i in keep])

    def _candidate(self, context: PickContext) -> Endpoint | None:
        hashes = self._hashes
        if not hashes:
            return None
        i = bisect_left(hashes, self._key_hash(context))
        if i == len(hashes):
            i = 0
        self._position = i
        return self.endpoints[self._owners[i]]

    def _fallback(self, context: PickContext, first: Endpoint,
                  accept: Callable[[Endpoint], bool]) -> Endpoint | None:
        owners, eps = self._owners, self.endpoints
        n = len(owners)
        i = self._position
        for _ in range(n):
            i = i + 1 if i + 1 < n else 0
            ep = eps[owners[i]]
            if accept(ep):
                return ep
        return None  # unreachable: the acceptor admits some endpoint


def is_prime(n: int) -> bool:
    """
    @return: whether C{n} is prime (trial division; table sizes are small).
    """
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def next_prime(n: int) -> int:
    """
    @return: the least prime at or above C{n}.
    """
    while not is_prime(n):
        n += 1
    return n


class Maglev(_Hashing):
    """
    Maglev consistent hashing (Eisenbud et al., NSDI 2016, as in Envoy): a
    lookup table of prime size where every endpoint claims slots in turn,
    each following its own permutation of the table (an offset and a skip
    from the hash of its address), heavier endpoints more often.  Lookup is
    one index; adding or removing a host moves little more than its own
    share of keys.

    A refused host passes the key on to the owner of the next acceptable
    slot, which is as well mixed as the table itself.
    """

    __slots__ = ("_table",)

    def __init__(self, endpoints: Sequence[Endpoint], table_size: int = DEFAULT_MAGLEV_TABLE_SIZE,
                 rng: random.Random | None = None, panic_threshold: float = DEFAULT_PANIC_THRESHOLD):
        """
        @param table_size: slots, a prime larger than the number of endpoints
            (use L{next_prime} to round a size up).
        @param rng: draws the hash of requests without a key.
        @raise ValueError: if C{table_size} is not a prime or is too small.
        """
        super().__init__(endpoints, rng, panic_threshold)
        eps = self.endpoints
        if not is_prime(table_size):
            raise ValueError(f"table_size must be a prime, got {table_size}")
        if eps and table_size < len(eps):
            raise ValueError(f"table_size {table_size} is smaller than the {len(eps)} endpoints")
        self._table = array("I", self._populate(eps, table_size)) if eps else array("I")

    @staticmethod
    def _populate(eps: Sequence[Endpoint], size: int) -> list[int]:
        positions: list[int] = []
        skips: list[int] = []
        for ep in eps:
            digest = hashlib.blake2b(f"{ep.host}:{ep.port}".encode(), digest_size=16).digest()
            positions.append(int.from_bytes(digest[:8], "big") % size)
            skips.append(int.from_bytes(digest[8:], "big") % (size - 1) + 1 if size > 1 else 1)
        weights = [ep.weight for ep in eps]
        heaviest = max(weights)
        # A host of the heaviest weight claims a slot every round; one of a
        # third of that weight every third round (Envoy's weighted Maglev).
        due = [0] * len(eps)
        table = [-1] * size
        filled = 0
        rounds = 0
        while filled < size:
            rounds += 1
            for i, w in enumerate(weights):
                if rounds * w < due[i]:
                    continue
                due[i] += heaviest
                p, skip = positions[i], skips[i]
                while table[p] >= 0:
                    p += skip
                    if p >= size:
                        p -= size
                table[p] = i
                p += skip
                positions[i] = p - size if p >= size else p
                filled += 1
                if filled == size:
                    break
        return table

    def _candidate(self, context: PickContext) -> Endpoint | None:
        table = self._table
        if not table:
            return None
        i = self._key_hash(context) % len(table)
        self._position = i
        return self.endpoints[table[i]]

    def _fallback(self, context: PickContext, first: Endpoint,
                  accept: Callable[[Endpoint], bool]) -> Endpoint | None:
        table, eps = self._table, self.endpoints
        n = len(table)
        i = self._position
        for _ in range(n):
            i = i + 1 if i + 1 < n else 0
            ep = eps[table[i]]
            if accept(ep):
                return ep
        return None  # unreachable: the acceptor admits some endpoint


def _shared_levels(local: Sequence[str], locality: str) -> int:
    shared = 0
    for mine, theirs in zip(local, locality.split("/") if locality else (), strict=False):
        if mine != theirs:
            break
        shared += 1
    return shared


def locality_tiers(endpoints: Sequence[Endpoint], local_locality: str) -> list[tuple[Endpoint, ...]]:
    """
    Group endpoints by how much of the proxy's locality they share.

    @param local_locality: the proxy's C{region/zone/subzone} (a prefix such
        as C{region} or C{region/zone} is fine).
    @return: non-empty groups, best first: same subzone, same zone, same
        region, elsewhere (endpoints without a locality are elsewhere).
    """
    local = local_locality.split("/")[:LOCALITY_LEVELS] if local_locality else []
    by_level: dict[int, list[Endpoint]] = {}
    for ep in endpoints:
        by_level.setdefault(_shared_levels(local, ep.locality), []).append(ep)
    return [tuple(by_level[level]) for level in sorted(by_level, reverse=True)]


@implementer(ILoadBalancer)
class LocalityAware:
    """
    Prefer endpoints near the proxy (Istio's locality failover): endpoints
    are tiered by the share of C{region/zone/subzone} they have in common
    with the proxy, and the best tier with a healthy endpoint takes the
    traffic, balanced by its own balancer (with its own panic mode while
    it has any healthy host).  Retries prefer an untried host of any tier
    to a tried one of a better tier.  When no endpoint of any tier is
    healthy, panic mode (if enabled) balances across all of them.
    """

    __slots__ = ("endpoints", "_tiers", "_factory", "_all")

    def __init__(self, inner_factory: Callable[[Sequence[Endpoint]], LoadBalancer],
                 endpoints: Sequence[Endpoint], local_locality: str):
        """
        @param inner_factory: builds the balancer of each tier (and of all
            endpoints, for panic); it must return a L{LoadBalancer} of this
            module.
        @param local_locality: the proxy's C{region/zone/subzone}.
        """
        self.endpoints = _unique(endpoints)
        self._tiers = tuple(inner_factory(tier) for tier in locality_tiers(self.endpoints, local_locality))
        self._factory = inner_factory
        # Built on first need: a Maglev table per tier is enough to carry.
        self._all: LoadBalancer | None = None

    def pick(self, context: PickContext) -> Endpoint | None:
        tiers = self._tiers
        if not tiers:
            return None
        unhealthy, tried = context.unhealthy, context.tried
        repeat = None
        # Tiers are never empty, so every tier has a first choice.
        for tier in tiers:
            ep = tier._candidate(context)
            if ep is None:
                continue
            if not (unhealthy(ep) or tried(ep)):
                return ep
            chosen = tier._settle(context, ep, False)
            if chosen is None:
                continue
            if not tried(chosen):
                return chosen
            if repeat is None:
                repeat = chosen
        if repeat is not None:
            return repeat
        if self._all is None:
            self._all = self._factory(self.endpoints)
        return self._all.pick(context)


def _balancer_factory(policy: str, hash_policy: HashPolicy | None, rng: random.Random,
                      panic_threshold: float) -> Callable[[Sequence[Endpoint]], LoadBalancer]:
    if policy == "round_robin":
        return lambda eps: RoundRobin(eps, rng, panic_threshold)
    if policy == "random":
        return lambda eps: Random(eps, rng, panic_threshold)
    if policy == "least_request":
        return lambda eps: LeastRequest(eps, rng, panic_threshold)
    if policy == "consistent_hash":
        hp = hash_policy or HashPolicy()
        size = hp.table_size
        if hp.algorithm == "ring_hash":
            points = size if size else DEFAULT_RING_POINTS
            return lambda eps: RingHash(eps, points, rng, panic_threshold)
        if hp.algorithm == "maglev":
            # The model's default size suits a ring; Maglev wants a table
            # far larger than the host count.
            table = next_prime(size) if size and size != _MODEL_DEFAULT_TABLE_SIZE else DEFAULT_MAGLEV_TABLE_SIZE
            return lambda eps: Maglev(eps, table, rng, panic_threshold)
        raise ValueError(f"unknown consistent hash algorithm {hp.algorithm!r}; "
                         f"expected one of {', '.join(HASH_ALGORITHMS)}")
    raise ValueError(f"unknown load balancing policy {policy!r}; expected one of {', '.join(POLICIES)}")


def build_balancer(policy: str, endpoints: Sequence[Endpoint], hash_policy: HashPolicy | None = None,
                   local_locality: str = "", rng: random.Random | None = None,
                   panic_threshold: float = DEFAULT_PANIC_THRESHOLD) -> ILoadBalancer:
    """
    Build the balancer a cluster's config asks for.

    @param policy: C{round_robin}, C{random}, C{least_request} or
        C{consistent_hash}.
    @param hash_policy: for C{consistent_hash}: the algorithm (C{ring_hash},
        whose C{table_size} is ring points per unit of weight, or C{maglev},
        whose C{table_size} is rounded up to a prime; the model's default
        size means Maglev's own default, 65537).
    @param local_locality: the proxy's locality; when given and the
        endpoints span more than one tier, a L{LocalityAware} balancer.
    @param rng: the source of randomness (a seeded one in tests).
    @param panic_threshold: percent of healthy hosts below which health is
        ignored; 0 disables panic mode.
    @raise ValueError: for an unknown policy or algorithm, or bad values.
    """
    factory = _balancer_factory(policy, hash_policy, rng or random.Random(), panic_threshold)
    if local_locality:
        unique = _unique(endpoints)
        if len(locality_tiers(unique, local_locality)) > 1:
            return LocalityAware(factory, unique, local_locality)
    return factory(endpoints)


def _query_value(path_query: bytes, name: bytes) -> bytes | None:
    q = path_query.find(b"?")
    if q < 0:
        return None
    query = path_query[q + 1:]
    h = query.find(b"#")
    if h >= 0:
        query = query[:h]
    for part in query.split(b"&"):
        key, eq, value = part.partition(b"=")
        if unquote_to_bytes(key.replace(b"+", b" ")) == name:
            return unquote_to_bytes(value.replace(b"+", b" "))
    return None


def _cookie_value(head_headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for header, value in head_headers:
        if header != b"cookie":
            continue
        for part in value.split(b";"):
            key, eq, val = part.strip().partition(b"=")
            if eq and key == name:
                val = val.strip()
                if len(val) >= 2 and val[0] == 0x22 and val[-1] == 0x22:
                    val = val[1:-1]
                return val
    return None


def hash_key_for(policy: HashPolicy, head_headers: Iterable[tuple[bytes, bytes]], path_query: bytes,
                 source_ip: bytes) -> bytes | None:
    """
    The value a request is hashed on (Istio's C{consistentHash}).

    @param head_headers: the request's headers, C{(name, value)} pairs with
        lower-case names (a L{txmesh.proxy.stream.Headers} will do).
    @param path_query: the request target, e.g. C{/cart?user=7}; query
        names and values are percent-decoded.
    @param source_ip: the downstream peer's address.
    @return: the first value of C{policy.header}, the value of cookie
        C{policy.cookie} (surrounding quotes removed), the value of query
        parameter C{policy.query_param}, or C{source_ip}, whichever the
        policy names; C{None} if the request has none (it is then balanced
        at random).
    """
    if policy.header is not None:
        name = policy.header.lower()
        for header, value in head_headers:
            if header == name:
                return value
        return None
    if policy.cookie is not None:
        return _cookie_value(head_headers, policy.cookie)
    if policy.query_param is not None:
        return _query_value(path_query, policy.query_param)
    if policy.source_ip:
        return source_ip or None
    return None
