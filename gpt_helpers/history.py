"""The record of a training run: one row per logged step, saved to and loaded from JSON or CSV."""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import GPTHelpersError


@dataclass
class HistoryRecord:
    """One logged step. ``eval_*`` fields are ``None`` on steps without an evaluation."""

    step: int
    epoch: float
    tokens_seen: int
    learning_rate: float
    train_loss: float | None = None
    eval_loss: float | None = None
    eval_perplexity: float | None = None
    tokens_per_second: float | None = None
    elapsed_seconds: float = 0.0


@dataclass
class History:
    """Every logged step of a run, in order, plus run-level facts (device, precision, parameters…)."""

    records: list[HistoryRecord] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def log(self, **values: Any) -> HistoryRecord:
        """Add a row (merging into the last row when it has the same step)."""
        if self.records and self.records[-1].step == values["step"]:
            for key, value in values.items():
                if value is not None:
                    setattr(self.records[-1], key, value)
            return self.records[-1]
        record = HistoryRecord(**values)
        self.records.append(record)
        return record

    def __len__(self) -> int:
        return len(self.records)

    def column(self, name: str, *, skip_missing: bool = True) -> tuple[list[int], list[Any]]:
        """Steps and values of one column, skipping steps where it is missing."""
        steps, values = [], []
        for record in self.records:
            value = getattr(record, name)
            if value is None and skip_missing:
                continue
            steps.append(record.step)
            values.append(value)
        return steps, values

    @property
    def eval_records(self) -> list[HistoryRecord]:
        return [r for r in self.records if r.eval_loss is not None]

    @property
    def best(self) -> HistoryRecord | None:
        """The evaluated step with the lowest validation loss."""
        evaluated = [r for r in self.eval_records if math.isfinite(r.eval_loss)]
        return min(evaluated, key=lambda r: r.eval_loss) if evaluated else None

    @property
    def final(self) -> HistoryRecord | None:
        return self.records[-1] if self.records else None

    def summary(self) -> dict[str, Any]:
        """The facts of a run that every report shows (``TrainResult``, the training panel, model cards), defined once.

        ``epochs`` counts full passes over the examples an epoch trains on; ``examples_seen`` is steps × global
        batch; ``tokens_per_second`` is the median of the logged training speeds.

        >>> h = History(info={"device": "cpu", "global_batch_size": 4})
        >>> _ = h.log(step=5, epoch=0.5, tokens_seen=100, learning_rate=1e-3, train_loss=2.0, elapsed_seconds=3.0)
        >>> h.summary()["steps"], h.summary()["examples_seen"], h.summary()["device"]
        (5, 20, 'cpu')
        """
        if not self.records:
            raise GPTHelpersError("The history has no records: train first, or load the run's history.json.")
        info, config, final, best = self.info, self.info.get("config", {}), self.final, self.best
        speeds = [r.tokens_per_second for r in self.records if r.tokens_per_second]
        batch = info.get("global_batch_size", config.get("batch_size"))
        return {
            "steps": final.step,
            "epochs": round(final.epoch, 2),
            "examples_seen": final.step * batch if batch else None,
            "tokens_seen": final.tokens_seen,
            "training_seconds": round(final.elapsed_seconds, 1),
            "tokens_per_second": statistics.median(speeds) if speeds else None,
            "device": info.get("device"),
            "precision": info.get("precision"),
            "parameters": info.get("parameters"),
            "trainable_parameters": info.get("trainable_parameters"),
            "train_examples": info.get("train_examples"),
            "batch_size": batch,
            "learning_rate": config.get("learning_rate"),
            "lr_schedule": config.get("lr_schedule"),
            "warmup_steps": config.get("warmup_steps"),
            "weight_decay": config.get("weight_decay"),
            "seed": config.get("seed"),
            "stop_reason": info.get("stop_reason"),
            "best_step": best.step if best else None,
            "best_validation_loss": best.eval_loss if best else None,
            "best_validation_perplexity": best.eval_perplexity if best else None,
        }

    def summary_line(self) -> str:
        """:meth:`summary` in one line of text.

        >>> h = History()
        >>> _ = h.log(step=2, epoch=0.25, tokens_seen=64, learning_rate=1e-3, train_loss=2.0, tokens_per_second=10.0,
        ...           elapsed_seconds=6.4)
        >>> h.summary_line()
        '2 steps (0.25 epochs, 64 target tokens) in 6.4 s, median 10 tokens/s'
        """
        facts = self.summary()
        line = (
            f"{facts['steps']:,} steps ({facts['epochs']:g} epochs, {facts['tokens_seen']:,} target tokens) in "
            f"{facts['training_seconds']:g} s"
        )
        if facts["tokens_per_second"]:
            line += f", median {facts['tokens_per_second']:,.0f} tokens/s"
        if facts["best_step"] is not None:
            line += (
                f"; best validation perplexity {facts['best_validation_perplexity']:.2f} at step {facts['best_step']:,}"
            )
        return line

    def to_dict(self) -> dict[str, Any]:
        return {"info": self.info, "records": [asdict(r) for r in self.records]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> History:
        names = {f.name for f in fields(HistoryRecord)}
        return cls(
            records=[HistoryRecord(**{k: v for k, v in row.items() if k in names}) for row in data.get("records", [])],
            info=dict(data.get("info", {})),
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write JSON (``.json``) or CSV (``.csv``) atomically; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
        if path.suffix == ".csv":
            with temporary.open("w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=[f.name for f in fields(HistoryRecord)])
                writer.writeheader()
                writer.writerows(asdict(r) for r in self.records)
        else:
            temporary.write_text(json.dumps(self.to_dict(), indent=1), encoding="utf-8")
        os.replace(temporary, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> History:
        """Read a history written by :meth:`save` (JSON or CSV)."""
        path = Path(path)
        if not path.exists():
            raise GPTHelpersError(f"History file '{path}' does not exist. Training writes it as <out>/history.json.")
        if path.suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as handle:
                rows = list(csv.DictReader(handle))
            types = {f.name: f.type for f in fields(HistoryRecord)}
            records = []
            for row in rows:
                values = {}
                for key, text in row.items():
                    if text in ("", None):
                        values[key] = None
                    elif "int" in str(types[key]) and "float" not in str(types[key]):
                        values[key] = int(text)
                    else:
                        values[key] = float(text)
                records.append(HistoryRecord(**values))
            return cls(records=records)
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, TypeError) as error:
            raise GPTHelpersError(f"History file '{path}' is not a valid history ({error}).") from None
