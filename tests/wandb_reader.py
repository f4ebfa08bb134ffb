"""Read back what a W&B offline run recorded (wandb 0.31 ships no reader for its ``.wandb`` files).

Format (wandb's datastore, a LevelDB log variant): a 7-byte header (``:W&B`` + 2-byte magic + 1-byte version),
then 32 KiB blocks of chunks, each chunk ``crc32 (4, LE) | length (2, LE) | type (1)`` followed by ``length``
bytes; type 1 = full record, 2/3/4 = first/middle/last fragment. A record is a
``wandb.proto.wandb_internal_pb2.Record`` protobuf.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7
CHUNK_HEADER = 7


def iter_records(path: str | Path):
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file (header {data[:4]!r})")
    pos, pending = HEADER, b""
    while pos + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK - (pos % BLOCK)
        if left_in_block < CHUNK_HEADER:
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        if pos + CHUNK_HEADER + length > len(data):  # a record still being written
            break
        pos += CHUNK_HEADER
        chunk = data[pos : pos + length]
        pos += length
        if kind == 0 and length == 0:
            continue
        if kind == 1:
            pending = b""
            yield _parse(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield _parse(pending + chunk)
            pending = b""


def _parse(raw: bytes):
    rec = wandb_internal_pb2.Record()
    rec.ParseFromString(raw)
    return rec


def read_run(run_dir: str | Path, wait: float = 60.0) -> dict:
    """``{"history": [row dicts], "summary": {key: value}, "alerts": [(title, text, level)]}`` of an offline run
    directory (``.../wandb/offline-run-*``).

    wandb's service writes the file asynchronously, even after ``run.finish()`` returns; this waits (up to
    ``wait`` seconds) for the run's final ``exit`` record so that a finished run is read whole.
    """
    files = list(Path(run_dir).glob("*.wandb"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one .wandb file in {run_dir}, found {files}")
    deadline = time.monotonic() + wait
    records = list(iter_records(files[0]))
    while not any(r.WhichOneof("record_type") == "exit" for r in records) and time.monotonic() < deadline:
        time.sleep(0.2)
        records = list(iter_records(files[0]))
    history, summary, alerts = [], {}, []
    for rec in records:
        which = rec.WhichOneof("record_type")
        if which == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in rec.history.item})
        elif which == "summary":
            for item in rec.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif which == "alert":
            alerts.append((rec.alert.title, rec.alert.text, rec.alert.level))
    return {"history": history, "summary": summary, "alerts": alerts}


def find_run_dir(root: str | Path) -> Path:
    runs = sorted(Path(root).rglob("offline-run-*"))
    if not runs:
        raise FileNotFoundError(f"no offline W&B run under {root}")
    return runs[-1]
