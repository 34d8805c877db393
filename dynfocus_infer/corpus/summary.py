"""What a corpus run reports at its end: throughput of this run, failures by kind over the whole output."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class CorpusSummary:
    """total: manifest rows; already_written: rows a previous run wrote (skipped by --resume); answered / failed:
    rows this run wrote; failures_by_kind: error rows of the whole output by kind (video_decode, request,
    internal); duplicates_removed: extra rows of ids found in two shards (see shards.deduplicate)."""

    output: str
    output_format: str
    total: int
    already_written: int
    answered: int
    failed: int
    generated_tokens: int
    wall_s: float
    failures_by_kind: dict = field(default_factory=dict)
    shards: int = 0
    duplicates_removed: int = 0

    @property
    def processed(self) -> int:
        return self.answered + self.failed

    @property
    def videos_per_s(self) -> float:
        return self.processed / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "processed": self.processed, "videos_per_s": round(self.videos_per_s, 3),
                "tokens_per_s": round(self.tokens_per_s, 3)}

    def report(self) -> str:
        failures = ", ".join(f"{kind} {count}" for kind, count in sorted(self.failures_by_kind.items())) or "none"
        return (f"corpus: {self.processed} rows this run ({self.answered} answered, {self.failed} failed), "
                f"{self.already_written} already written, {self.total} in the manifest\n"
                f"corpus: {self.videos_per_s:.2f} videos/s, {self.tokens_per_s:.1f} generated tokens/s over "
                f"{self.wall_s:.1f} s\n"
                f"corpus: failures by kind (whole output): {failures}\n"
                f"corpus: {self.shards} {self.output_format} shard(s), one row per id, in {self.output}")
