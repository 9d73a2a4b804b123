#!/usr/bin/env python
"""Download the full public Chat-Huanhuan dataset (about 3,700 records) used by the seed tutorial.

The repository ships only a small sample written for this project (dataset/huanhuan.json); the full
set lives in datawhalechina/self-llm. This fetches it with the standard library only, checks that it
really is an alpaca-style JSON array (an HTML error page or a truncated body must not end up as
training data), and writes it atomically, so an interrupted download leaves no partial file.

Usage::

    python scripts/download_dataset.py [--out dataset/huanhuan.json] [--url URL]

Exit codes: 0 done, 2 download or validation failed (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

from mlx_lora.core.errors import MlxLoraError
from mlx_lora.core.files import write_bytes_atomic

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_URL = (
    "https://raw.githubusercontent.com/datawhalechina/self-llm/master/dataset/huanhuan.json"
)
DEFAULT_OUT = REPO_ROOT / "dataset" / "huanhuan.json"
TIMEOUT_S = 30


class DownloadError(MlxLoraError):
    """Download or validation failed; the message is the one line shown to the user."""


def fetch(url: str, timeout: float = TIMEOUT_S) -> bytes:
    """Return the body at ``url``; raise DownloadError with the reason on any network failure."""
    req = urllib.request.Request(url, headers={"User-Agent": "mlx_lora-download/0.1"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read()
    except urllib.error.HTTPError as e:
        raise DownloadError(f"HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise DownloadError(str(e.reason)) from e
    except (TimeoutError, OSError, ValueError) as e:  # ValueError: malformed URL
        raise DownloadError(str(e) or type(e).__name__) from e


def validate(body: bytes) -> list[dict]:
    """Parse ``body`` as a JSON array of records with string instruction/output fields."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise DownloadError(f"the response is not UTF-8 JSON ({e})") from e
    if not isinstance(data, list) or not data:
        raise DownloadError("the response is not a non-empty JSON array of records")
    for i, rec in enumerate(data):
        if not (
            isinstance(rec, dict)
            and isinstance(rec.get("instruction"), str)
            and isinstance(rec.get("output"), str)
        ):
            raise DownloadError(f"record {i} lacks string 'instruction'/'output' fields")
    return data


def write_atomic(path: Path, body: bytes) -> None:
    """Write ``body`` beside ``path`` and rename it into place (``mlx_lora.core.files``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, body)


def download_dataset(out: Path = DEFAULT_OUT, url: str = DEFAULT_URL) -> int:
    """Download, validate and write the dataset; return the number of records."""
    body = fetch(url)
    records = validate(body)
    write_atomic(Path(out), body)  # the original bytes, unchanged
    return len(records)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON file")
    ap.add_argument("--url", default=DEFAULT_URL, help="source URL (a mirror, a file:// path)")
    args = ap.parse_args(argv)
    try:
        n = download_dataset(args.out, args.url)
    except DownloadError as e:
        print(
            f"error: cannot download {args.url}: {e}; check your network or pass --url "
            f"/ copy the file to {args.out}",
            file=sys.stderr,
        )
        return 2
    print(f"{args.out}: {n} records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
