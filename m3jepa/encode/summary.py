"""What an encode run did: per store rows, time, throughput, bytes and whether it was cached."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StoreResult:
    """One store of one run. Rows, seconds and times are this process's share of the work."""

    split: str
    modality: str
    encoder: str
    path: str
    rows: int  # rows in the store
    encoded: int = 0  # rows this process encoded now (0 when cached or already done)
    seconds: float = 0.0
    bytes_written: int = 0
    skipped: int = 0  # rows listed in the manifest's skipped
    cached: bool = False
    read_s: float = 0.0  # waiting for decoded batches (the DataLoader workers)
    compute_s: float = 0.0  # the encoder forward pass
    write_s: float = 0.0  # shard writes

    @property
    def rows_per_s(self) -> float:
        """Encoded rows per wall-clock second (0 when nothing was encoded)."""
        return self.encoded / self.seconds if self.seconds > 0 else 0.0


@dataclass
class EncodeSummary:
    """All stores of one run, with a plain-text table for the terminal."""

    stores: list[StoreResult] = field(default_factory=list)
    note: str = ""  # e.g. "all 6 stores cached; no encoder loaded"
    world_size: int = 1
    rank: int = 0  # the rank that made (and prints) this summary

    @property
    def encoded(self) -> int:
        """Rows encoded by this process."""
        return sum(s.encoded for s in self.stores)

    @property
    def seconds(self) -> float:
        """Seconds spent encoding, summed over stores."""
        return sum(s.seconds for s in self.stores)

    @property
    def bytes_written(self) -> int:
        """Bytes of shards this process wrote."""
        return sum(s.bytes_written for s in self.stores)

    def table(self) -> str:
        """A fixed-width table: one line per store, then the totals (and the note)."""
        head = ("split", "modality", "encoder", "rows", "encoded", "skipped", "seconds", "rows/s",
                "MB written", "cached")
        lines = [_row(s.split, s.modality, s.encoder, s.rows, s.encoded, s.skipped, f"{s.seconds:.1f}",
                      f"{s.rows_per_s:.1f}", f"{s.bytes_written / 1e6:.2f}", "yes" if s.cached else "no")
                 for s in self.stores]
        rate = self.encoded / self.seconds if self.seconds > 0 else 0.0
        cached = f"{sum(s.cached for s in self.stores)}/{len(self.stores)}"
        total = _row("total", "", "", sum(s.rows for s in self.stores), self.encoded,
                     sum(s.skipped for s in self.stores), f"{self.seconds:.1f}", f"{rate:.1f}",
                     f"{self.bytes_written / 1e6:.2f}", cached)
        widths = [max(len(str(c)) for c in col) for col in zip(head, *lines, total, strict=True)]
        fmt = "  ".join(f"{{:<{w}}}" if i < 3 else f"{{:>{w}}}" for i, w in enumerate(widths))
        rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
        out = [fmt.format(*head), rule, *(fmt.format(*r) for r in lines), rule, fmt.format(*total)]
        if self.world_size > 1:
            out.append(f"(rank {self.rank} of {self.world_size}: encoded/seconds/MB are this rank's share)")
        if self.note:
            out.append(self.note)
        return "\n".join(out)


def _row(*cells: object) -> tuple[str, ...]:
    return tuple(str(c) for c in cells)
