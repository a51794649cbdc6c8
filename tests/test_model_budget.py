"""The retry budget (MemoryStore.budget_* over retry.BudgetWindow) against RefBudget.

The documented rule (docs/outbound.md): over a sliding window, retries <= budget_ratio x requests +
budget_min_per_s x window; a refused retry spends nothing; retries are not
requests (retrying never earns more retries). Arbitrary sequences of
top-level requests, retry attempts and clock advances on two hosts.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from fidelity_mw.policy import RetryConfig
from fidelity_mw.state.memory import MemoryStore
from reference_model import RefBudget

T0 = 1_000.0
HOSTS = ["budget:a.internal", "budget:b.internal:8443"]

retry_configs = st.builds(
    RetryConfig,
    budget_ratio=st.sampled_from([0.0, 0.1, 0.2, 0.5, 1.0, 2.5]),
    budget_min_per_s=st.sampled_from([0.0, 0.1, 0.3, 1.0, 3.0]),
    budget_window_s=st.sampled_from([1.0, 2.0, 10.0]),
)


class BudgetAgainstModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = T0
        self.store = MemoryStore()
        self.spent = dict.fromkeys(HOSTS, 0)
        self.refused = dict.fromkeys(HOSTS, 0)

    @initialize(cfg=retry_configs)
    def setup(self, cfg: RetryConfig) -> None:
        self.cfg = cfg
        self.model = {
            host: RefBudget(cfg.budget_ratio, cfg.budget_min_per_s, cfg.budget_window_s)
            for host in HOSTS
        }

    @rule(host=st.sampled_from(HOSTS), n=st.integers(1, 6))
    def requests(self, host: str, n: int) -> None:
        for _ in range(n):
            self.store.budget_request_now(host, self.cfg, self.now)
            self.model[host].request(self.now)

    @rule(host=st.sampled_from(HOSTS), n=st.integers(1, 4))
    def retries(self, host: str, n: int) -> None:
        for _ in range(n):
            accepted = self.model[host].allowed(self.now)
            allowed, source, age = self.store.budget_try_retry_now(host, self.cfg, self.now)
            assert (source, age) == ("memory", 0.0)
            assert allowed in accepted, (allowed, accepted, self.model[host])
            if allowed:
                self.model[host].spend(self.now)
                self.spent[host] += 1
            else:
                self.refused[host] += 1

    @rule(tenths=st.integers(0, 13))
    def advance_window_tenths(self, tenths: int) -> None:
        self.now += tenths * self.cfg.budget_window_s / 10

    @rule(dt=st.floats(0.0, 4.0, allow_nan=False))
    def advance(self, dt: float) -> None:
        self.now += dt

    @invariant()
    def budgets_are_per_host(self) -> None:
        assert set(self.store.budgets) <= set(HOSTS)


BudgetAgainstModel.TestCase.settings = settings(
    max_examples=120, stateful_step_count=50, deadline=None
)
TestBudgetAgainstModel = BudgetAgainstModel.TestCase


def test_a_count_at_a_rounding_edge_stays_for_its_whole_bucket() -> None:
    """1001.0 - 1000.1 over 0.1 rounds down to 8.99...: the window must still rotate
    once per instant, or a request counted at 1001.0 ages a bucket at once and leaves
    the window early (here: before 0.95 s)."""
    from fidelity_mw.decide.budget import BudgetWindow

    window = BudgetWindow(RetryConfig(budget_window_s=1.0))
    window.request(T0)
    window.request(T0 + 1.0)
    assert window.totals(T0 + 1.0) == (1, 0)
    assert window.totals(T0 + 1.95) == (1, 0)
