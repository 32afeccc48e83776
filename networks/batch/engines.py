"""The in-process engine: the planned cases run here, one after another, the next ones read ahead in threads.

The Ray engine (:mod:`networks.batch.ray_engine`) runs the same cases with the same :func:`process_case`; an engine
decides only where a case runs.
"""

from __future__ import annotations

import itertools
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from networks.batch.core import Result
from networks.batch.volumes import Case, VolumeSegmenter, process_case, read_case


class ReadAhead:
    """Iterates ``(case, {"image": volume})``, reading up to ``num_workers`` cases ahead in threads (inline for 0).

    A reading error is raised by ``take_volume(item)``, in the consumer. Nothing here keeps a volume once it is handed
    over, so the caller can release it (``dict.pop``) while its case is still being segmented."""

    def __init__(self, cases: list[Case], load, num_workers: int) -> None:
        self.load = load
        self.upcoming = iter(cases)
        self.pool = ThreadPoolExecutor(num_workers) if num_workers > 0 else None
        self.queue = deque(self._start(case) for case in itertools.islice(self.upcoming, max(num_workers, 1)))

    def _start(self, case: Case):
        return case, (self.pool.submit(read_case, self.load, case) if self.pool else None)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[Case, dict]:
        if not self.queue:
            if self.pool:
                self.pool.shutdown()
            raise StopIteration
        case, future = self.queue.popleft()
        following = next(self.upcoming, None)
        if following is not None:
            self.queue.append(self._start(following))
        return case, (future.result() if future else read_case(self.load, case))


def process_here(cases: list[Case], runner: VolumeSegmenter, num_workers: int,
                 record: Callable[[Result], None]) -> None:
    """Process every case in this process; ``record(result)`` as each one finishes."""
    for case, item in ReadAhead(cases, runner.load, num_workers):
        record(process_case(runner, case, item))
