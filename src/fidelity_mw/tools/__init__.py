"""Command-line tools: `check` (validate a policy file), `map` (where each
layer's state lives), `audit` (find scattered retry, breaker and limiter code)
and the `fidelity-mw` entry point that runs them."""
