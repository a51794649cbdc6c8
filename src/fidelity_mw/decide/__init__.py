"""Pure decision logic: no I/O, no clock reads; time and randomness come in as arguments."""
