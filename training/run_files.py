"""The on-disk layout every training run here shares: checkpoints and the metrics log.

A run directory holds ``checkpoints/step-XXXXXXXX/`` and ``metrics.jsonl`` (one JSON record
per line, each with a ``step``). A checkpoint is written into a hidden staging directory and
renamed into place (``commit_checkpoint``), so a directory with a final name was complete
when written; a resumed run first drops the log records a killed run wrote after its last
checkpoint (``truncate_records``); ``check_resumable`` decides whether a run may continue
from a checkpoint with the settings it is given now. The LM RL, BC and encoder trainers use
these.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from dataclasses import MISSING, asdict, fields
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
_CHECKPOINT_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_path(out_dir: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint of ``step`` lives under a run directory."""
    return Path(out_dir) / CHECKPOINT_DIR / f"step-{step:08d}"


def staging_path(target: Path) -> Path:
    """A fresh, empty-to-be hidden directory beside ``target`` to write a checkpoint into."""
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    return staging


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint directories under out_dir/checkpoints with a final name, oldest first."""
    root = Path(out_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _CHECKPOINT_NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_CHECKPOINT_NAME.match(p.name).group(1)))


def replace_dir(staging: Path, target: Path) -> None:
    """Rename a complete ``staging`` directory onto ``target``.

    rename(2) cannot replace a non-empty directory (e.g. a damaged checkpoint of the same
    step, left by a run that resumed from an earlier one): an existing target is moved aside
    first and deleted after.
    """
    previous = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, previous)
    os.replace(staging, target)
    shutil.rmtree(previous, ignore_errors=True)


def commit_checkpoint(staging: Path, target: Path, out_dir: str | os.PathLike, keep: int) -> None:
    """``replace_dir`` a complete checkpoint into place, then keep only the newest ``keep``."""
    replace_dir(staging, target)
    for stale in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(stale)


def read_records(path: Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines file in order (empty when it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_records(path: Path, step: int) -> None:
    """Drop records past ``step`` (written after the checkpoint a run resumes from), atomically."""
    if not path.exists():
        return
    kept = [r for r in read_records(path) if r["step"] <= step]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


def log_record(writer: Any, metrics_file: Any, record: dict[str, float]) -> None:
    """One record to TensorBoard (finite scalars, at record["step"]) and to the JSON-lines log."""
    step = int(record["step"])
    for key, value in record.items():
        if key != "step" and math.isfinite(value):
            writer.add_scalar(key, value, step)
    metrics_file.write(json.dumps(record) + "\n")
    metrics_file.flush()


def warmup_cosine(step: int, max_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate factor: linear warm-up to 1 (over at most a tenth of the run), then cosine
    decay to min_lr_ratio at max_steps."""
    warmup = min(warmup_steps, max_steps // 10)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def jsonable(value: Any) -> Any:
    """A config value as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value))


def check_resumable(
    directory: Path,
    config: Any,
    saved_config: dict[str, Any],
    resumable: tuple[str, ...],
    data_fingerprint: str,
    saved_fingerprint: str | None,
) -> None:
    """ValueError unless the run saved in `directory` may go on with `config` (a dataclass).

    Only the `resumable` fields may differ (they do not alter what has been learned so far); a
    field the run did not save did not exist yet, so it ran with the field's default. The data
    must be the data the run was trained on. A changed max_steps is allowed with a warning.
    """
    defaults = {f.name: jsonable(f.default) for f in fields(config) if f.default is not MISSING}
    saved = {**defaults, **saved_config}
    current = asdict(config)
    changed = sorted(k for k in current if k not in resumable and jsonable(current[k]) != saved.get(k))
    if changed:
        listed = ", ".join(f"{k} (was {saved.get(k)!r}, now {current[k]!r})" for k in changed)
        raise ValueError(f"{directory}: cannot resume with different {listed}; use a new out_dir or the original settings")
    if saved_fingerprint != data_fingerprint:
        raise ValueError(
            f"{directory}: the data in {config.data_dir} differ from what the run was trained on "
            f"(fingerprint {data_fingerprint}, was {saved_fingerprint}); use a new out_dir"
        )
    if saved.get("max_steps") != config.max_steps:
        logger.warning("max_steps changed from %s to %s: the learning-rate schedule is stretched from here on",
                       saved.get("max_steps"), config.max_steps)
