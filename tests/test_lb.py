"""
Tests for L{txmesh.proxy.lb}: distribution, consistent hashing, exclusions
and panic mode, locality failover, and hash keys.  Pure values in, pure
values out: no reactor; every random source is seeded.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from txmesh.config.model import Endpoint, HashPolicy
from txmesh.proxy.lb import (
    NO_CONTEXT,
    ILoadBalancer,
    LeastRequest,
    LocalityAware,
    Maglev,
    PickContext,
    Random,
    RingHash,
    RoundRobin,
    build_balancer,
    hash_key_for,
    locality_tiers,
    next_prime,
)
from txmesh.proxy.stream import Headers

PROPERTY = settings(max_examples=12, deadline=None, derandomize=True, database=None)


def endpoints(n: int, weights: Sequence[int] | None = None, base: int = 0) -> list[Endpoint]:
    return [Endpoint(f"10.0.{(base + i) // 250}.{(base + i) % 250 + 1}", 8080, weight=weights[i] if weights else 1)
            for i in range(n)]


def keys(n: int, prefix: bytes = b"user-") -> list[bytes]:
    return [prefix + b"%d" % i for i in range(n)]


def counts(lb: ILoadBalancer, picks: int, context: PickContext = NO_CONTEXT) -> Counter:
    return Counter(lb.pick(context) for _ in range(picks))


def among(hosts: Sequence[Endpoint]) -> Callable[[Endpoint], bool]:
    chosen = frozenset(hosts)
    return lambda ep: ep in chosen


def assert_shares(case: SynchronousTestCase, counted: Counter, eps: Sequence[Endpoint], tolerance: float) -> None:
    """
    Each endpoint's share of C{counted} is its share of weight, within
    C{tolerance} (relative).
    """
    total_weight = sum(ep.weight for ep in eps)
    total = sum(counted.values())
    for ep in eps:
        expected = total * ep.weight / total_weight
        case.assertTrue(abs(counted[ep] - expected) <= tolerance * expected,
                        f"{ep} (weight {ep.weight}): {counted[ep]} picks, expected about {expected:.0f}")


def owners(lb: ILoadBalancer, ks: Sequence[bytes], **context) -> list[Endpoint | None]:
    return [lb.pick(PickContext(hash_key=k, **context)) for k in ks]


# Every policy, as a factory of (endpoints, rng, panic_threshold).
FACTORIES: dict[str, Callable[..., ILoadBalancer]] = {
    "round_robin": lambda eps, rng, panic=50: RoundRobin(eps, rng, panic),
    "random": lambda eps, rng, panic=50: Random(eps, rng, panic),
    "least_request": lambda eps, rng, panic=50: LeastRequest(eps, rng, panic),
    "ring_hash": lambda eps, rng, panic=50: RingHash(eps, 256, rng, panic),
    "maglev": lambda eps, rng, panic=50: Maglev(eps, 4099, rng, panic),
}


class InterfaceTests(SynchronousTestCase):
    """
    Every balancer provides L{ILoadBalancer} and answers C{None} when it has
    no endpoints.
    """

    def test_provides(self):
        eps = endpoints(3)
        for name, factory in FACTORIES.items():
            lb = factory(eps, random.Random(1))
            self.assertTrue(verifyObject(ILoadBalancer, lb), name)
            self.assertEqual(lb.endpoints, tuple(eps))
        self.assertTrue(verifyObject(ILoadBalancer, LocalityAware(lambda e: Random(e, random.Random(1)), eps, "r")))

    def test_empty(self):
        for name, factory in FACTORIES.items():
            lb = factory([], random.Random(1))
            self.assertIsNone(lb.pick(NO_CONTEXT), name)
            self.assertIsNone(lb.pick(PickContext(hash_key=b"k")), name)

    def test_duplicates_dropped(self):
        eps = endpoints(2)
        lb = RoundRobin(eps + eps, random.Random(1))
        self.assertEqual(lb.endpoints, tuple(eps))

    def test_single(self):
        eps = endpoints(1)
        for name, factory in FACTORIES.items():
            lb = factory(eps, random.Random(1))
            self.assertEqual({lb.pick(PickContext(hash_key=k)) for k in keys(20)}, {eps[0]}, name)

    def test_bad_weight(self):
        e = self.assertRaises(ValueError, RoundRobin, [Endpoint("10.0.0.1", 80, weight=0)])
        self.assertIn("10.0.0.1:80", str(e))
        self.assertIn("weight", str(e))

    def test_bad_panic_threshold(self):
        e = self.assertRaises(ValueError, Random, endpoints(2), None, 101)
        self.assertIn("panic_threshold", str(e))

    def test_maglev_table_size(self):
        self.assertIn("prime", str(self.assertRaises(ValueError, Maglev, endpoints(2), 1000)))
        self.assertRaises(ValueError, Maglev, endpoints(5), 3)
        self.assertEqual(next_prime(1000), 1009)
        self.assertEqual(next_prime(65537), 65537)

    def test_context_is_frozen(self):
        self.assertRaises(attrs.exceptions.FrozenInstanceError, setattr, NO_CONTEXT, "hash_key", b"x")


class RoundRobinTests(SynchronousTestCase):
    """
    L{RoundRobin}: exact rotation, smooth weights, fair skipping.
    """

    def test_rotation(self):
        """
        Equal weights: every window of N picks holds every endpoint once.
        """
        eps = endpoints(5)
        lb = RoundRobin(eps, random.Random(7))
        picks = [lb.pick(NO_CONTEXT) for _ in range(5000)]
        for i in range(0, 5000, 5):
            self.assertEqual(set(picks[i:i + 5]), set(eps))
        self.assertEqual(set(Counter(picks).values()), {1000})

    def test_start_offset(self):
        """
        Proxies start at different points of the rotation.
        """
        eps = endpoints(10)
        firsts = {RoundRobin(eps, random.Random(seed)).pick(NO_CONTEXT) for seed in range(20)}
        self.assertGreater(len(firsts), 1)

    def test_weighted_exact(self):
        eps = endpoints(3, [3, 1, 1])
        counted = counts(RoundRobin(eps, random.Random(1)), 20000)
        self.assertEqual([counted[ep] for ep in eps], [12000, 4000, 4000])

    def test_weighted_smooth(self):
        """
        Weights 3, 1, 1 interleave (nginx's smooth weighted round robin):
        the heavy host never runs three turns in a row.
        """
        a, b, c = eps = endpoints(3, [3, 1, 1])
        lb = RoundRobin(eps, random.Random(1))
        picks = [lb.pick(NO_CONTEXT) for _ in range(50)]
        for i in range(len(picks) - 2):
            self.assertNotEqual(picks[i:i + 3], [a, a, a])
        self.assertEqual(list(RoundRobin(eps)._schedule), [a, b, a, c, a])

    @given(st.lists(st.integers(1, 20), min_size=1, max_size=8))
    @PROPERTY
    def test_weighted_cycle(self, weights):
        """
        Over any whole number of cycles, each host's count is exactly
        proportional to its weight.
        """
        eps = endpoints(len(weights), weights)
        lb = RoundRobin(eps, random.Random(3))
        counted = counts(lb, sum(weights) * 2)
        self.assertEqual([counted[ep] for ep in eps], [2 * w for w in weights])

    def test_skip_keeps_fairness(self):
        """
        An unhealthy host's turn passes on without doubling its successor's.
        """
        eps = endpoints(5)
        lb = RoundRobin(eps, random.Random(2))
        counted = counts(lb, 4000, PickContext(unhealthy=among(eps[1:2])))
        self.assertEqual(counted[eps[1]], 0)
        self.assertEqual(set(counted.values()), {1000})


class RandomTests(SynchronousTestCase):
    """
    L{Random}: uniform or in proportion to weight.
    """

    def test_uniform(self):
        eps = endpoints(4)
        assert_shares(self, counts(Random(eps, random.Random(1)), 20000), eps, 0.05)

    def test_weighted(self):
        eps = endpoints(4, [1, 2, 3, 4])
        assert_shares(self, counts(Random(eps, random.Random(1)), 20000), eps, 0.08)

    def test_weighted_with_exclusion(self):
        """
        Among the remaining hosts, weights still hold.
        """
        eps = endpoints(4, [1, 2, 3, 4])
        counted = counts(Random(eps, random.Random(1)), 20000, PickContext(unhealthy=among(eps[3:])))
        self.assertEqual(counted[eps[3]], 0)
        assert_shares(self, counted, eps[:3], 0.08)


class LeastRequestTests(SynchronousTestCase):
    """
    L{LeastRequest}: power of two choices, per unit of weight.
    """

    def test_idle_uniform(self):
        eps = endpoints(4)
        assert_shares(self, counts(LeastRequest(eps, random.Random(1)), 20000), eps, 0.05)

    def test_idle_weighted(self):
        eps = endpoints(4, [1, 2, 3, 4])
        assert_shares(self, counts(LeastRequest(eps, random.Random(1)), 20000), eps, 0.08)

    def test_prefers_less_loaded(self):
        """
        Of two equal hosts the idle one always wins; among many, a loaded
        host is picked only when drawn against nothing better.
        """
        a, b = eps = endpoints(2)
        active = {a: 10, b: 0}
        context = PickContext(active_requests=active.__getitem__)
        self.assertEqual(counts(LeastRequest(eps, random.Random(1)), 1000, context), Counter({b: 1000}))

        eps = endpoints(10)
        active = dict.fromkeys(eps, 1)
        active[eps[0]] = 50
        counted = counts(LeastRequest(eps, random.Random(1)), 10000,
                         PickContext(active_requests=active.__getitem__))
        self.assertEqual(counted[eps[0]], 0)
        assert_shares(self, counted, eps[1:], 0.1)

    def test_load_per_weight(self):
        """
        Requests in flight are compared per unit of weight: a host of
        weight 4 with 2 in flight is less loaded than one of weight 1 with 1.
        """
        heavy, light = eps = endpoints(2, [4, 1])
        active = {heavy: 2, light: 1}
        counted = counts(LeastRequest(eps, random.Random(1)), 5000, PickContext(active_requests=active.__getitem__))
        self.assertGreater(counted[heavy], 0.95 * 5000)

    def test_proportional_load(self):
        """
        Load already in proportion to weight keeps traffic in proportion.
        """
        eps = endpoints(3, [1, 2, 4])
        active = {ep: 3 * ep.weight for ep in eps}
        counted = counts(LeastRequest(eps, random.Random(4)), 20000, PickContext(active_requests=active.__getitem__))
        assert_shares(self, counted, eps, 0.08)


class ConsistentHashMixin:
    """
    Consistent-hash behaviour shared by L{RingHash} and L{Maglev}.
    """

    def build(self, eps: Sequence[Endpoint], rng: random.Random | None = None) -> ILoadBalancer:
        raise NotImplementedError

    def test_same_key_same_host(self):
        eps = endpoints(5)
        lb = self.build(eps)
        first = owners(lb, keys(500))
        self.assertEqual(owners(lb, keys(500)), first)
        # Stable across instances (and so processes): a fixed hash, not hash().
        self.assertEqual(owners(self.build(list(reversed(eps))), keys(500)), first)

    def test_spread(self):
        """
        10,000 keys over 5 hosts: each host within 30% of its fair share.
        """
        eps = endpoints(5)
        assert_shares(self, Counter(owners(self.build(eps), keys(10000))), eps, 0.3)

    def test_weighted_spread(self):
        eps = endpoints(3, [1, 2, 3])
        assert_shares(self, Counter(owners(self.build(eps), keys(10000))), eps, 0.3)

    def test_no_key_random(self):
        """
        Without a key, picks spread over the hosts.
        """
        eps = endpoints(4)
        assert_shares(self, counts(self.build(eps, random.Random(5)), 8000), eps, 0.3)

    def test_exclusion_moves_only_its_keys(self):
        """
        Keys of an unhealthy host go elsewhere, consistently; other keys stay.
        """
        eps = endpoints(5)
        lb = self.build(eps)
        ks = keys(2000)
        before = owners(lb, ks)
        after = owners(lb, ks, unhealthy=among(eps[2:3]))
        self.assertEqual(owners(lb, ks, unhealthy=among(eps[2:3])), after)
        for b, a in zip(before, after, strict=True):
            if b == eps[2]:
                self.assertNotEqual(a, eps[2])
            else:
                self.assertEqual(a, b)
        # The dead host's keys are shared out, not dumped on one neighbour.
        self.assertGreater(len({a for b, a in zip(before, after, strict=True) if b == eps[2]}), 1)

    def test_retry_goes_to_another_host(self):
        eps = endpoints(5)
        lb = self.build(eps)
        for k in keys(200):
            first = lb.pick(PickContext(hash_key=k))
            second = lb.pick(PickContext(hash_key=k, tried=among([first])))
            self.assertNotEqual(second, first)
            self.assertEqual(lb.pick(PickContext(hash_key=k, tried=among([first]))), second)


def ring_hash(eps: Sequence[Endpoint], rng: random.Random | None = None) -> RingHash:
    return RingHash(eps, 1024, rng or random.Random(1))


def maglev(eps: Sequence[Endpoint], rng: random.Random | None = None) -> Maglev:
    return Maglev(eps, 65537, rng or random.Random(1))


class RingHashTests(ConsistentHashMixin, SynchronousTestCase):
    build = staticmethod(ring_hash)

    def test_points_per_weight(self):
        """
        A ring holds points in proportion to weight, one run per neighbour.
        """
        lb = RingHash(endpoints(1, [3]), 100)
        self.assertEqual(len(lb._hashes), 1)
        lb = RingHash(endpoints(2, [1, 3]), 100)
        self.assertLessEqual(len(lb._hashes), 400)
        self.assertGreater(len(lb._hashes), 100)


class MaglevTests(ConsistentHashMixin, SynchronousTestCase):
    build = staticmethod(maglev)

    def test_table_shares(self):
        """
        Table slots follow weights closely.
        """
        eps = endpoints(3, [1, 2, 5])
        table = Counter(Maglev(eps, 65537)._table)
        for i, ep in enumerate(eps):
            self.assertTrue(abs(table[i] / 65537 - ep.weight / 8) < 0.005, (ep.weight, table[i]))


class MembershipTests(SynchronousTestCase):
    """
    How many keys move when hosts come and go (ring hash with 1024 points
    per host, Maglev with 65537 slots).  A ring moves only the keys the
    host gains or loses; Maglev is allowed a little collateral movement.
    """

    BUILDERS = ((ring_hash, 0.0), (maglev, 0.02))

    @given(st.integers(1, 9), st.integers(0, 1000))
    @PROPERTY
    def test_add_host(self, n, base):
        """
        Adding a host to N moves at most about 1/(N+1) of the keys, nearly
        all of them to the new host.
        """
        eps = endpoints(n, base=base)
        new = Endpoint("192.168.7.7", 8080)
        ks = keys(2000, b"%d-" % base)
        for build, collateral in self.BUILDERS:
            before = owners(build(eps), ks)
            after = owners(build(eps + [new]), ks)
            moved = [a for b, a in zip(before, after, strict=True) if a != b]
            self.assertLessEqual(len(moved) / len(ks), 1 / (n + 1) + 0.05, build.__name__)
            self.assertLessEqual(sum(1 for a in moved if a != new) / len(ks), collateral, build.__name__)

    @given(st.integers(2, 9), st.integers(0, 1000), st.data())
    @PROPERTY
    def test_remove_host(self, n, base, data):
        """
        Removing a host moves the keys that were on it (and, for Maglev,
        very few others).
        """
        eps = endpoints(n, base=base)
        gone = eps[data.draw(st.integers(0, n - 1))]
        ks = keys(2000, b"%d-" % base)
        for build, collateral in self.BUILDERS:
            before = owners(build(eps), ks)
            after = owners(build([ep for ep in eps if ep != gone]), ks)
            stray = sum(1 for b, a in zip(before, after, strict=True) if b != gone and a != b)
            self.assertNotIn(gone, after)
            self.assertLessEqual(stray / len(ks), collateral, build.__name__)


class ExclusionTests(SynchronousTestCase):
    """
    Unhealthy hosts, panic mode and retried hosts, for every policy.
    """

    def contexts(self, **kw) -> list[PickContext]:
        return [PickContext(hash_key=k, **kw) for k in keys(1000)] + [PickContext(**kw)] * 1000

    def picks(self, lb: ILoadBalancer, **kw) -> Counter:
        return Counter(lb.pick(c) for c in self.contexts(**kw))

    def test_unhealthy_never_picked(self):
        eps = endpoints(5)
        for name, factory in FACTORIES.items():
            counted = self.picks(factory(eps, random.Random(1)), unhealthy=among(eps[:2]))
            self.assertEqual(set(counted), set(eps[2:]), name)

    def test_all_unhealthy_without_panic(self):
        eps = endpoints(4)
        for name, factory in FACTORIES.items():
            counted = self.picks(factory(eps, random.Random(1), 0), unhealthy=among(eps))
            self.assertEqual(set(counted), {None}, name)

    def test_all_unhealthy_panics(self):
        """
        With every host unhealthy, panic mode spreads across all of them.
        """
        eps = endpoints(4)
        for name, factory in FACTORIES.items():
            counted = self.picks(factory(eps, random.Random(1)), unhealthy=among(eps))
            self.assertEqual(set(counted), set(eps), name)

    def test_panic_threshold(self):
        """
        3 of 5 unhealthy (40% healthy) is below a 50% threshold: all hosts
        take traffic.  2 of 5 (60% healthy) is not.  A threshold of 30
        tolerates the first case too.
        """
        eps = endpoints(5)
        for name, factory in FACTORIES.items():
            counted = self.picks(factory(eps, random.Random(1)), unhealthy=among(eps[:3]))
            self.assertEqual(set(counted), set(eps), name)
            counted = self.picks(factory(eps, random.Random(1), 30), unhealthy=among(eps[:3]))
            self.assertEqual(set(counted), set(eps[3:]), name)
            counted = self.picks(factory(eps, random.Random(1)), unhealthy=among(eps[:2]))
            self.assertEqual(set(counted), set(eps[2:]), name)

    def test_panic_balances_across_all(self):
        eps = endpoints(4)
        counted = counts(RoundRobin(eps, random.Random(1)), 4000, PickContext(unhealthy=among(eps[:3])))
        self.assertEqual(set(counted.values()), {1000})

    def test_tried_avoided(self):
        eps = endpoints(5)
        for name, factory in FACTORIES.items():
            counted = self.picks(factory(eps, random.Random(1)), tried=among(eps[1:4]))
            self.assertEqual(set(counted), {eps[0], eps[4]}, name)

    def test_tried_and_unhealthy(self):
        eps = endpoints(5)
        for name, factory in FACTORIES.items():
            counted = self.picks(factory(eps, random.Random(1)), tried=among(eps[:2]), unhealthy=among(eps[4:]))
            self.assertEqual(set(counted), set(eps[2:4]), name)

    def test_all_tried_repeats(self):
        """
        When every healthy host was tried, a retry goes to one of them
        again rather than nowhere; never to an unhealthy one.
        """
        eps = endpoints(4)
        for name, factory in FACTORIES.items():
            counted = self.picks(factory(eps, random.Random(1)), tried=among(eps[:3]), unhealthy=among(eps[3:]))
            self.assertEqual(set(counted), set(eps[:3]), name)
        one = endpoints(1)
        for name, factory in FACTORIES.items():
            self.assertEqual(factory(one, random.Random(1)).pick(PickContext(tried=among(one))), one[0], name)

    def test_panic_honours_tried(self):
        eps = endpoints(5)
        for name, factory in FACTORIES.items():
            counted = self.picks(factory(eps, random.Random(1)), unhealthy=among(eps[:4]), tried=among(eps[1:2]))
            self.assertEqual(set(counted), set(eps) - {eps[1]}, name)

    @given(st.sampled_from(sorted(FACTORIES)), st.integers(1, 8), st.sets(st.integers(0, 7)),
           st.sets(st.integers(0, 7)), st.sampled_from([0, 50, 100]), st.integers(0, 2 ** 32))
    @settings(max_examples=60, deadline=None, derandomize=True, database=None)
    def test_exclusion_property(self, name, n, sick, tried, panic, seed):
        """
        For any mix of exclusions, a pick is C{None} only if no host is
        eligible, never an unhealthy host outside panic, and never a tried
        host while an eligible untried one exists.
        """
        eps = endpoints(n)
        sick_eps = {eps[i] for i in sick if i < n}
        tried_eps = {eps[i] for i in tried if i < n}
        lb = FACTORIES[name](eps, random.Random(seed), panic)
        healthy = [ep for ep in eps if ep not in sick_eps]
        in_panic = len(healthy) * 100 < panic * n
        eligible = eps if in_panic else healthy
        untried = [ep for ep in eligible if ep not in tried_eps]
        for context in [PickContext(hash_key=k, unhealthy=sick_eps.__contains__, tried=tried_eps.__contains__)
                        for k in keys(30)] + [PickContext(unhealthy=sick_eps.__contains__,
                                                          tried=tried_eps.__contains__)] * 30:
            ep = lb.pick(context)
            if not eligible:
                self.assertIsNone(ep)
            else:
                self.assertIn(ep, untried or eligible)


class LocalityTests(SynchronousTestCase):
    """
    L{LocalityAware} and L{locality_tiers}: nearest healthy tier first.
    """

    LOCAL = "us-east/a/1"

    def setUp(self):
        def ep(n, locality):
            return Endpoint(f"10.1.0.{n}", 80, locality=locality)

        self.subzone = [ep(1, "us-east/a/1"), ep(2, "us-east/a/1")]
        self.zone = [ep(3, "us-east/a/2")]
        self.region = [ep(4, "us-east/b/1"), ep(5, "us-east/b/2")]
        self.remote = [ep(6, "eu-west/a/1"), ep(7, "")]
        self.all = self.region + self.remote + self.zone + self.subzone

    def lb(self, policy="round_robin", **kw) -> ILoadBalancer:
        return build_balancer(policy, self.all, local_locality=self.LOCAL, rng=random.Random(1), **kw)

    def test_tiers(self):
        self.assertEqual(locality_tiers(self.all, self.LOCAL),
                         [tuple(self.subzone), tuple(self.zone), tuple(self.region), tuple(self.remote)])
        self.assertEqual(locality_tiers(self.all, "us-east"),
                         [tuple(self.region + self.zone + self.subzone), tuple(self.remote)])
        self.assertEqual(locality_tiers(self.all, ""), [tuple(self.all)])

    def test_prefers_local(self):
        for policy in ("round_robin", "random", "least_request", "consistent_hash"):
            lb = self.lb(policy)
            self.assertIsInstance(lb, LocalityAware)
            counted = Counter(lb.pick(PickContext(hash_key=k)) for k in keys(2000))
            self.assertEqual(set(counted), set(self.subzone), policy)

    def test_failover(self):
        """
        Each tier takes over when every host of the better tiers is
        unhealthy.
        """
        down: list[Endpoint] = []
        for policy in ("round_robin", "random", "least_request", "consistent_hash"):
            lb = self.lb(policy, panic_threshold=0)
            down = []
            for tier in (self.subzone, self.zone, self.region, self.remote):
                counted = Counter(lb.pick(PickContext(hash_key=k, unhealthy=among(down))) for k in keys(500))
                self.assertEqual(set(counted), set(tier), (policy, tier))
                down += tier
            self.assertIsNone(lb.pick(PickContext(unhealthy=among(down))))

    def test_partial_tier(self):
        """
        One healthy host of two (50%) keeps its tier out of panic and takes
        all the traffic.
        """
        counted = counts(self.lb(), 1000, PickContext(unhealthy=among(self.subzone[:1])))
        self.assertEqual(set(counted), set(self.subzone[1:]))

    def test_tier_panic(self):
        """
        A tier with some, but too few, healthy hosts panics within itself.
        """
        local = [Endpoint(f"10.2.0.{i}", 80, locality="r/z/s") for i in range(5)]
        far = [Endpoint("10.3.0.1", 80, locality="x/y/z")]
        lb = build_balancer("round_robin", local + far, local_locality="r/z/s", rng=random.Random(1))
        counted = counts(lb, 1000, PickContext(unhealthy=among(local[:3])))
        self.assertEqual(set(counted), set(local))

    def test_total_panic(self):
        counted = counts(self.lb(), 1400, PickContext(unhealthy=among(self.all)))
        self.assertEqual(set(counted), set(self.all))

    def test_retry_prefers_untried_elsewhere(self):
        counted = counts(self.lb(), 100, PickContext(tried=among(self.subzone)))
        self.assertEqual(set(counted), set(self.zone))
        counted = counts(self.lb(), 100, PickContext(tried=among(self.all)))
        self.assertEqual(set(counted), set(self.subzone))

    def test_single_tier_is_plain(self):
        lb = build_balancer("round_robin", self.subzone, local_locality=self.LOCAL)
        self.assertIsInstance(lb, RoundRobin)
        self.assertIsInstance(build_balancer("random", self.all), Random)


class BuildBalancerTests(SynchronousTestCase):
    """
    L{build_balancer} maps config to balancers.
    """

    def test_policies(self):
        eps = endpoints(3)
        self.assertIsInstance(build_balancer("round_robin", eps), RoundRobin)
        self.assertIsInstance(build_balancer("random", eps), Random)
        self.assertIsInstance(build_balancer("least_request", eps), LeastRequest)
        self.assertIsInstance(build_balancer("consistent_hash", eps), RingHash)
        self.assertIsInstance(build_balancer("consistent_hash", eps, HashPolicy(algorithm="ring_hash")), RingHash)
        maglev = build_balancer("consistent_hash", eps, HashPolicy(algorithm="maglev"))
        self.assertIsInstance(maglev, Maglev)
        self.assertEqual(len(maglev._table), 65537)
        maglev = build_balancer("consistent_hash", eps, HashPolicy(algorithm="maglev", table_size=5000))
        self.assertEqual(len(maglev._table), 5003)

    def test_panic_threshold_passed(self):
        eps = endpoints(2)
        lb = build_balancer("random", eps, panic_threshold=0)
        self.assertIsNone(lb.pick(PickContext(unhealthy=among(eps))))

    def test_unknown_policy(self):
        e = self.assertRaises(ValueError, build_balancer, "fastest", endpoints(2))
        self.assertIn("'fastest'", str(e))

    def test_unknown_algorithm(self):
        e = self.assertRaises(ValueError, build_balancer, "consistent_hash", endpoints(2),
                              HashPolicy(algorithm="jump"))
        self.assertIn("'jump'", str(e))


class HashKeyTests(SynchronousTestCase):
    """
    L{hash_key_for}: what a request is hashed on.
    """

    HEADERS = Headers([
        (b"host", b"shop"),
        (b"x-user", b"alice"),
        (b"cookie", b"theme=dark; session=\"abc123\""),
        (b"cookie", b"cart=42"),
        (b"x-user", b"bob"),
    ])

    def key(self, policy: HashPolicy, path: bytes = b"/cart?user=7&q=a%20b&flag", headers=None,
            source: bytes = b"10.9.8.7") -> bytes | None:
        return hash_key_for(policy, self.HEADERS if headers is None else headers, path, source)

    def test_header(self):
        self.assertEqual(self.key(HashPolicy(header=b"x-user")), b"alice")
        self.assertEqual(self.key(HashPolicy(header=b"X-User")), b"alice")
        self.assertIsNone(self.key(HashPolicy(header=b"x-tenant")))
        self.assertEqual(hash_key_for(HashPolicy(header=b"x-user"), [(b"x-user", b"carol")], b"/", b""), b"carol")

    def test_cookie(self):
        self.assertEqual(self.key(HashPolicy(cookie=b"session")), b"abc123")
        self.assertEqual(self.key(HashPolicy(cookie=b"cart")), b"42")
        self.assertEqual(self.key(HashPolicy(cookie=b"theme")), b"dark")
        self.assertIsNone(self.key(HashPolicy(cookie=b"sess")))
        self.assertIsNone(self.key(HashPolicy(cookie=b"session"), headers=Headers([])))

    def test_query_param(self):
        self.assertEqual(self.key(HashPolicy(query_param=b"user")), b"7")
        self.assertEqual(self.key(HashPolicy(query_param=b"q")), b"a b")
        self.assertEqual(self.key(HashPolicy(query_param=b"flag")), b"")
        self.assertIsNone(self.key(HashPolicy(query_param=b"use")))
        self.assertIsNone(self.key(HashPolicy(query_param=b"user"), path=b"/cart"))
        self.assertIsNone(self.key(HashPolicy(query_param=b"user"), path=b"/cart?x=1#user=7"))
        self.assertEqual(self.key(HashPolicy(query_param=b"user"), path=b"/c?a=1&user=9&user=10"), b"9")

    def test_source_ip(self):
        self.assertEqual(self.key(HashPolicy(source_ip=True)), b"10.9.8.7")
        self.assertIsNone(self.key(HashPolicy(source_ip=True), source=b""))

    def test_nothing(self):
        self.assertIsNone(self.key(HashPolicy()))

    def test_sticky_end_to_end(self):
        """
        The same cookie reaches the same host.
        """
        lb = build_balancer("consistent_hash", endpoints(5), HashPolicy(cookie=b"session", algorithm="maglev"))
        policy = HashPolicy(cookie=b"session")
        hosts = {lb.pick(PickContext(hash_key=hash_key_for(policy, self.HEADERS, b"/", b""))) for _ in range(20)}
        self.assertEqual(len(hosts), 1)
