"""Read an offline W&B run's `.wandb` log (wandb 0.31 ships no reader): what a test checks was really logged."""

import json
from pathlib import Path


def iter_wandb_records(path: Path):
    """Yield the protobuf Records of a .wandb transaction log.

    wandb 0.31 no longer ships a Python reader (wandb.sdk.internal.datastore is gone; wandb-core writes
    the file), so this decodes the LevelDB-log framing directly: a 7-byte file header
    (b":W&B", uint16 magic 0xBEE1, uint8 version 0), then 32 KiB blocks of chunks, each with a 7-byte
    header (uint32 crc, uint16 length, uint8 type: 1 FULL, 2 FIRST, 3 MIDDLE, 4 LAST). Blocks' tails
    shorter than 7 bytes are zero padding.
    """
    import struct

    from wandb.proto import wandb_internal_pb2

    block = 32 * 1024
    raw = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", raw[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, hex(magic), version)
    pos, pending = 7, b""
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # zero padding at the end of a block
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if length == 0 and kind == 0:  # zeroed tail of the last, unfinished block
            break
        data = raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            pending = data
        elif kind in (2, 3):
            pending = (b"" if kind == 2 else pending) + data
            continue
        elif kind == 4:
            pending += data
        else:
            raise ValueError(f"bad chunk type {kind} at {pos}")
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(pending)
        pending = b""
        yield rec


def read_offline_run(run_dir: Path) -> tuple[list[dict], dict, dict]:
    """Parse the binary .wandb transaction log of an offline run: (history rows, summary, config)."""

    wandb_files = list(run_dir.glob("run-*.wandb"))
    assert len(wandb_files) == 1, wandb_files
    history, summary, config = [], {}, {}
    for rec in iter_wandb_records(wandb_files[0]):
        kind = rec.WhichOneof("record_type")
        if kind in ("run", "config"):
            items = rec.run.config.update if kind == "run" else rec.config.update
            for it in items:
                config[it.key or "/".join(it.nested_key)] = json.loads(it.value_json)
        elif kind == "history":
            history.append({(it.key or "/".join(it.nested_key)): json.loads(it.value_json) for it in rec.history.item})
        elif kind == "summary":
            for it in rec.summary.update:
                summary[it.key or "/".join(it.nested_key)] = json.loads(it.value_json)
    return history, summary, config


