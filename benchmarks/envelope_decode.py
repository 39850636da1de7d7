"""What decoding one events-topic message costs the processor (issue 22, ADR 0158), CPU only, no services:

    python -m benchmarks.envelope_decode [--base REV] [--events 20000] [--repeat 7]

Two sets of messages: as the gateway writes them (`tally.schemas.envelope.encode`, batches of 100 sharing a
receipt time, each event its own time) and as the drain benchmarks load them (`kafka_bench.envelope`). For
each, µs per event of this checkout's `tally.processors.decode.decode`, of REV's (its decode.py loaded beside
this checkout's packages) and of the model (`Envelope.from_bytes`): best of --repeat, the three interleaved.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

from benchmarks import kafka_bench
from benchmarks.stack import ROOT
from tally.processors import decode as this
from tally.schemas.envelope import Envelope, encode


def gateway_messages(count: int) -> list[bytes]:
    """Batches of 100 as the gateway encodes them: one receipt time per batch, the producer's time per event."""
    start = datetime(2026, 3, 1, 10, 0, tzinfo=timezone.utc)
    out = []
    for n in range(count):
        received_at = start + timedelta(milliseconds=n // 100 * 7)
        event = {"specversion": "1.0", "id": f"evt-{n:08d}", "source": "shop/api", "type": "api.request",
                 "time": received_at - timedelta(microseconds=1 + n * 997 % 900_000), "subject": f"customer-{n % 500}",
                 "data": {"tokens": 1 + n % 50, "model": "m-small", "region": "eu", "latency_ms": n % 97 / 4}}
        out.append(encode(event, "tenant-a", received_at))
    return out


def loader_messages(count: int) -> list[bytes]:
    now = datetime(2026, 3, 1, 10, 0, tzinfo=timezone.utc)
    return [kafka_bench.envelope(n, "bench", now)[1] for n in range(count)]


def module_of(rev: str) -> ModuleType:
    """REV's tally/processors/decode.py as a module of its own, importing this checkout's packages."""
    source = subprocess.run(["git", "show", f"{rev}:tally/processors/decode.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "base_decode.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("base_decode", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # where a library resolves the module's annotations (msgspec does)
    spec.loader.exec_module(module)
    return module


def per_event_us(decoder: Callable[[bytes], Any], messages: list[bytes]) -> float:
    start = time.process_time()
    for raw in messages:
        decoder(raw)
    return (time.process_time() - start) / len(messages) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.envelope_decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="main", help="the revision whose decoder to compare with")
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    base = module_of(args.base)
    decoders = {f"base {args.base}": base.decode, "this checkout": this.decode, "model": Envelope.from_bytes}
    for name, messages in (("gateway's batches", gateway_messages(args.events)),
                           ("drain benchmark's events", loader_messages(args.events))):
        if [base.decode(m) for m in messages[:200]] != [this.decode(m) for m in messages[:200]]:
            sys.exit(f"{name}: the two decoders give different events")
        runs: dict[str, list[float]] = {label: [] for label in decoders}
        for _ in range(args.repeat):
            for label, decoder in decoders.items():
                runs[label].append(per_event_us(decoder, messages))
        best = {label: min(times) for label, times in runs.items()}
        figures = ", ".join(f"{label} {us:.2f}" for label, us in best.items())
        print(f"{name} ({len(messages[0])} bytes each): µs per event, best of {args.repeat}: {figures}; "
              f"this/base {best['this checkout'] / best[f'base {args.base}']:.2f}")


if __name__ == "__main__":
    main()
