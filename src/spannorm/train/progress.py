"""What a run shows while it trains: a one-line progress bar on a terminal (loss, tokens/s, ETA), plain log
lines otherwise. Only rank 0 displays anything."""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def format_rate(tokens_per_s: float) -> str:
    if tokens_per_s >= 1e6:
        return f"{tokens_per_s / 1e6:.2f}M"
    if tokens_per_s >= 1e3:
        return f"{tokens_per_s / 1e3:.1f}k"
    return f"{tokens_per_s:.0f}"


class Progress:
    """``mode``: ``bar`` (redrawn in place), ``plain`` (a line every ``log_every`` steps), ``none``, or
    ``auto`` (bar when ``stream`` is a terminal, else plain)."""

    def __init__(self, mode: str, total_steps: int, start_step: int = 0, log_every: int = 10,
                 stream: TextIO | None = None, enabled: bool = True):
        self.stream = stream or sys.stdout
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "plain"
        self.mode = mode if enabled else "none"
        self.total = total_steps
        self.start_step = start_step
        self.log_every = max(1, log_every)
        self.started = time.perf_counter()
        self._bar_drawn = False

    def _eta(self, step: int) -> float:
        done = step - self.start_step
        if done <= 0:
            return float("nan")
        return (time.perf_counter() - self.started) / done * (self.total - step)

    def step(self, step: int, record: dict) -> None:
        """Show the state after optimizer step ``step`` (1-based)."""
        if self.mode == "none":
            return
        loss = record.get("train_loss", float("nan"))
        rate = record.get("tokens_per_s", 0.0)
        eta = format_duration(self._eta(step)) if step > self.start_step else "?"
        if self.mode == "bar":
            width = 24
            filled = int(width * step / max(1, self.total))
            text = (f"\r[{'#' * filled}{'.' * (width - filled)}] {step}/{self.total} loss {loss:.4f} "
                    f"{format_rate(rate)} tok/s ETA {eta}")
            columns = shutil.get_terminal_size((100, 20)).columns
            self.stream.write(text[:columns].ljust(min(columns, len(text) + 2)))
            self.stream.flush()
            self._bar_drawn = True
        elif step % self.log_every == 0 or step == self.total:
            self.stream.write(f"step {step}/{self.total} loss {loss:.4f} lr {record.get('lr', 0.0):.3g} "
                              f"grad_norm {record.get('grad_norm', float('nan')):.3g} "
                              f"{format_rate(rate)} tok/s ETA {eta}\n")
            self.stream.flush()

    def message(self, text: str) -> None:
        """A line that stays (evaluations, checkpoints, warnings)."""
        if self.mode == "none":
            return
        if self._bar_drawn:
            self.stream.write("\n")
            self._bar_drawn = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._bar_drawn and self.mode == "bar":
            self.stream.write("\n")
            self.stream.flush()
            self._bar_drawn = False
