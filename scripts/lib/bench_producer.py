"""A producer for scripts/bench: accept a records file through the Python API.

    python bench_producer.py EDGE_YAML RECORDS_JSONL BATCH

Each batch of BATCH lines is one ``Producer.send_many`` (one commit). At the
end it prints one JSON line: the wall-clock times at which the first and the
last batch were accepted, the records accepted, and this process's own CPU
seconds and bytes written to disk while accepting, so the bench can count them as the edge's.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from edge.api import Producer

STREAM = "bench"


def main(config: str, records: str, batch: int) -> int:
    with open(records, encoding="utf-8") as f:
        values = [json.loads(line) for line in f]
    cpu_before, written_before = cpu_s(), written()
    first = last = None
    accepted = 0
    with Producer(config) as producer:
        for start in range(0, len(values), batch):
            accepted += len(producer.send_many(STREAM, values[start : start + batch]))
            last = time.time()
            first = first or last
    print(
        json.dumps(
            {
                "first": first,
                "last": last,
                "accepted": accepted,
                "cpu_s": cpu_s() - cpu_before,
                "write_bytes": written() - written_before,
            }
        )
    )
    return 0


def cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def written() -> int:
    # Reading the records file is the bench's work, not the producer's.
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split(":", 1)[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
