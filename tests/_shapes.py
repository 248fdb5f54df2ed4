"""Odd sizes shared by every op test (docs/STYLE.md rule 9): primes, non-powers of two, one element,
one past a block boundary."""

FLAT_SIZES = (1, 7, 1023, 65537)
SMALL_FLAT_SIZES = (1, 7, 1023)
