"""Read what an offline W&B run wrote (``run-<id>.wandb``), for tests that log without a network.

W&B keeps no readable copy of an offline run's config and summary, only its transaction log:
protobuf ``Record`` messages in LevelDB's log framing (32 KiB blocks; a 7-byte file header
``:W&B`` + magic + version; each chunk a 7-byte header: crc32, length, type FULL / FIRST /
MIDDLE / LAST). This reads that log back into the run's config, summary and history keys.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:HEADER])
    assert ident == b":W&B" and magic == 0xBEE1, f"{path}: not a W&B transaction log"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (FULL, FIRST):
            pending = chunk
        elif kind in (MIDDLE, LAST):
            pending += chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def read_run(run_dir: Path) -> dict:
    """``{"config": {...}, "summary": {...}, "history": set of keys}`` of the one offline run under ``run_dir``."""
    (log,) = run_dir.glob("**/offline-run-*/run-*.wandb")
    out = {"config": {}, "summary": {}, "history": set()}
    for record in records(log):
        kind = record.WhichOneof("record_type")
        if kind in ("config", "summary"):
            items = record.config.update if kind == "config" else record.summary.update
            out[kind].update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items})
        elif kind == "history":
            out["history"].update(i.key or "/".join(i.nested_key) for i in record.history.item)
    return out
