"""Files that survive a crash: atomic writes, strict JSON lines that tolerate a torn last line, and
a kernel lock for one process at a time in a directory. docs/pretraining.md lists the guarantees."""

import json
import math
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

def write_atomically(path: str, write) -> None:
    """write(tmp) writes; tmp replaces path once on disk. A crash keeps the old file, and no tmp."""
    tmp = path + ".tmp"
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the rename must not reach the disk before the data it points to
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.lexists(tmp):
            os.remove(tmp)
        # a full disk: an OSError, torch.save's RuntimeError, safetensors' SafetensorError, ...
        if isinstance(e, Exception) and not isinstance(e, (ValueError, TypeError)):
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 2**20
            reason = str(e).splitlines()[0][:120]
            raise OSError(f"could not write {path} ({reason}; {free:,.0f} MiB free on its disk): "
                          "the previous version of the file, if any, is intact") from None
        raise

def write_text_atomically(path: str, text: str) -> None:
    write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

def write_json(path: str, content) -> None:
    # default=str: metadata of an odd type is written as text, not refused
    text = json.dumps(strict(content), indent=1, ensure_ascii=False, default=str)
    write_text_atomically(path, text + "\n")

def strict(value):
    """value with every non-finite float replaced by None: strict JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value

def json_line(record: dict) -> str:
    return json.dumps(strict(record), allow_nan=False) + "\n"

def read_json(path: str, what: str = "a JSON file"):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({str(e)[:80]}): is it {what}, complete and "
                         "unedited?") from None

def read_json_lines(path: str, repair: bool = False) -> list[dict]:
    """A JSON-lines file's records; a torn last line (a crash) is dropped, repair=True: cut too."""
    if not os.path.exists(path):
        return []
    lines = Path(path).read_bytes().split(b"\n")
    last = lines.pop()  # b"" when the file ends with a newline
    records = [parse_json_line(path, n, line) for n, line in enumerate(lines, 1) if line.strip()]
    if last.strip():
        try:
            records.append(parse_json_line(path, len(lines) + 1, last))
        except ValueError:
            print(f"warning: {path}, line {len(lines) + 1}: dropped a torn last line "
                  "(a crash mid-write)", file=sys.stderr)
    if repair and last:
        write_text_atomically(path, "".join(json_line(r) for r in records))
    return records

def jsonl_records(path: str):
    """Yields (line number, record) of a JSON-lines data file (a corpus, a task)."""
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is reported with its number
        for n, line in enumerate(f, start=1):
            if line.strip():
                yield n, parse_json_line(path, n, line)

def parse_json_line(path: str, n: int, line: bytes) -> dict:
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}, line {n}: not UTF-8 text (byte 0x{line[e.start]:02x} at column "
                         f"{e.start + 1}): save the file as UTF-8") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}, line {n}: invalid JSON ({e.msg}, column {e.colno}): "
                         "fix or delete that line") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}, line {n}: expected a JSON object, got {type(record).__name__}")
    return record

class Busy(OSError):
    """Another process holds the lock."""

@contextmanager
def exclusive(directory: str, what: str, wait: bool = False):
    """Locks a directory for the with block (a flock: none left if killed); Busy, or wait=True."""
    os.makedirs(directory, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY) if fcntl else \
        os.open(os.path.join(directory, ".lock"), os.O_RDWR | os.O_CREAT)
    try:
        if not _try_lock(fd):
            if not wait:
                raise Busy(f"{what}: another process is already working there ({directory} is "
                           "locked); wait for it to finish or choose another directory")
            print(f"waiting for another process, which is already {what}", file=sys.stderr)
            while not _try_lock(fd, block=True):
                time.sleep(1)  # msvcrt has no blocking lock without a time limit
        yield
    finally:
        os.close(fd)  # which releases the lock

def _try_lock(fd: int, block: bool = False) -> bool:
    try:
        if fcntl:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
        else:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return True
    except OSError:
        return False
