"""decide/ is the pure core: importing it pulls in no adapter and no policy loader."""

from __future__ import annotations

import json
import subprocess
import sys

from fidelity_mw.decide import (
    BreakerSpec,
    BreakerState,
    BudgetSpec,
    BudgetWindow,
    RetrySpec,
    gcra,
    plan_retry,
)
from fidelity_mw.policy import BreakerConfig, RetryConfig

_FORBIDDEN = ("starlette", "httpx", "redis", "opentelemetry", "anyio")


def test_importing_decide_imports_no_adapter_and_nothing_else_of_the_package() -> None:
    code = "import json, sys\nimport fidelity_mw.decide\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    loaded = json.loads(out)
    for prefix in _FORBIDDEN:
        assert not [m for m in loaded if m == prefix or m.startswith(prefix + ".")], prefix
    others = [
        m for m in loaded if m.startswith("fidelity_mw.") and not m.startswith("fidelity_mw.decide")
    ]
    assert others == []


def test_policy_configs_and_frozen_specs_drive_the_same_arithmetic() -> None:
    cfg = BreakerConfig(min_calls=2, failure_ratio=0.5, open_jitter=0.0)
    spec = BreakerSpec(min_calls=2, failure_ratio=0.5, open_jitter=0.0)
    a, b = BreakerState(cfg), BreakerState(spec)
    for state in (a, b):
        gate = state.gate(0.0, lambda: 0.5)
        state.record(gate.epoch, gate.probe_id, "failure", 0.0, lambda: 0.5)
        gate = state.gate(0.0, lambda: 0.5)
        state.record(gate.epoch, gate.probe_id, "failure", 0.0, lambda: 0.5)
    assert a.state == b.state == "open"
    assert a.open_until == b.open_until
    rcfg, rspec = RetryConfig(), RetrySpec()
    for params in (rcfg, rspec):
        plan = plan_retry(
            cfg=params,
            attempt=1,
            idempotent=True,
            replayable=True,
            downstream_exhausted=False,
            retry_after_s=None,
            status=503,
            remaining_s=None,
            rng=lambda: 0.5,
        )
        assert plan.retry
        assert plan.delay_s == 0.05
    w1, w2 = BudgetWindow(rcfg), BudgetWindow(BudgetSpec())
    assert w1.try_retry(0.0) == w2.try_retry(0.0)
    assert gcra(0.0, 0.0, 0.1, 1.0).allowed


def test_every_public_name_resolves_lazily() -> None:
    code = (
        "import sys, fidelity_mw\n"
        "assert 'fidelity_mw.inbound' not in sys.modules\n"
        "for name in fidelity_mw.__all__:\n"
        "    assert getattr(fidelity_mw, name) is not None, name\n"
        "from fidelity_mw import FidelityMiddleware, Policy, current\n"
        "assert FidelityMiddleware.__module__.startswith('fidelity_mw.')\n"
        "try:\n"
        "    fidelity_mw.nope\n"
        "except AttributeError:\n"
        "    print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "ok"
