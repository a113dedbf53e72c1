"""When the feeder sends consecutive small elements as one message (a ``Bundle``).

Every message costs a few tens of microseconds in locks, system calls and
pickling on each side, whatever it holds. For small, cheap elements (200,000
ints through one step) that cost is the whole cost, so the feeder packs up to
``MAX_BUNDLE`` consecutive elements into one message; the user still sees
single elements, in order.

A bundle takes one credit per element, so capacities still count elements:
what may be in flight (the queues' capacities and the workers) is shared by
the bundles, and one bundle holds at most half of it (``_runtime``'s
``BUNDLE_SHARE``), so that one is computed while another is consumed. Small
elements therefore flow fastest behind a large queue (``tq.Queue(1024)``).
``BundlePolicy`` keeps latency low by bundling only when all of these hold
(each measured as the pipeline runs):

- the input is fast: ``next()`` on it takes under ``SLOW_INPUT_S`` on average
  (a slow input never waits to fill a bundle);
- elements are small on the wire: under ``SMALL_BYTES`` each, going in and
  coming out of the segment;
- the steps are cheap: a whole bundle costs a worker about ``BUDGET_S`` at most;
- a bundle stays under ``BUNDLE_BYTES`` in all.

It starts at one element per message and doubles while these hold.
"""

from __future__ import annotations

MAX_BUNDLE = 1024
SLOW_INPUT_S = 50e-6
SMALL_BYTES = 8 * 1024
BUDGET_S = 1e-3
BUNDLE_BYTES = 256 * 1024
_SMOOTHING = 0.1


class BundlePolicy:
    """How many elements the next message may hold (``limit``), from what was measured so far."""

    def __init__(self) -> None:
        self.limit = 1
        self._input_s = 0.0
        self._bytes_in = 0.0
        self._bytes_out = 0.0
        self._step_s = 0.0

    def observe_input(self, seconds: float) -> None:
        """Time one ``next()`` on the input took; a slow input stops bundling at once."""
        self._input_s += _SMOOTHING * (seconds - self._input_s)
        if self._input_s >= SLOW_INPUT_S:
            self.limit = 1

    def observe_message(self, nbytes: int, elements: int) -> None:
        """Size of a message the feeder sent."""
        self._bytes_in += _SMOOTHING * (nbytes / elements - self._bytes_in)

    def observe_downstream(self, step_s_per_element: float, bytes_out_per_element: float) -> None:
        """The slowest step's seconds per element, and the size of elements reaching the segment's end."""
        self._step_s = step_s_per_element
        self._bytes_out = bytes_out_per_element
        self._update()

    def _update(self) -> None:
        small = max(self._bytes_in, self._bytes_out) < SMALL_BYTES
        if self._input_s >= SLOW_INPUT_S or not small:
            self.limit = 1
            return
        affordable = MAX_BUNDLE if self._step_s <= 0 else int(BUDGET_S / self._step_s)
        affordable = min(affordable, int(BUNDLE_BYTES / max(self._bytes_in, self._bytes_out, 1.0)))
        self.limit = max(1, min(2 * self.limit, affordable, MAX_BUNDLE))
