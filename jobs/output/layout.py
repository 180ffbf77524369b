"""Every key of an output, relative to output.path, and the kinds of file a committed shard is
published as. The one place they are spelled: commits, publish, the cleanup, --overwrite, status
and the report all ask here.

    README.md  job.json  index.json  summary.json  report.html
    commits/<shard>-<attempt>.json             the commit marker (the source of truth)
    attempts/<shard>-<attempt>-<run>.parquet   the metadata a commit covers
    images/<shard>-<attempt>-<run>/<name>      one file per ok row (workers.keys.image_dir)
    data/<shard>.parquet  webdataset/<shard>.tar  contact/<shard>.jpg  contact/job.jpg   published
    data/schema.parquet                        no rows: the output's columns, for readers before any shard
    stamps/<kind>/<shard>-<attempt>-<tag>      which attempt each published file holds
    leases/<shard>-<generation>.json           which driver renders the shard now (jobs/output/leases.py)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from workers.keys import IMAGES, image_dir  # noqa: F401 - image_dir re-exported: the writer names image folders

# The output's own files at its top.
CARD = "README.md"
JOB = "job.json"
INDEX = "index.json"
SUMMARY = "summary.json"
REPORT = "report.html"

# Its folders.
COMMITS = "commits/"
ATTEMPTS = "attempts/"
DATA = "data/"
WEBDATASET = "webdataset/"
CONTACT = "contact/"
STAMPS = "stamps/"
LEASES = "leases/"
CARD_FILES = "card/"  # the card's pictures (score histograms)
LEGACY = ("shards/",)  # metadata of outputs written before data/ and attempts/

# All that --overwrite may delete: an ifrender output's own files.
FILES = (JOB, INDEX, SUMMARY, CARD, REPORT)
FOLDERS = (COMMITS, ATTEMPTS, DATA, STAMPS, LEASES, IMAGES, WEBDATASET, CONTACT, CARD_FILES, *LEGACY)

DATA_GLOB = DATA + "*.parquet"  # what readers glob, and the card's data_files
# The output's columns and no row, written when a job claims its output: every reader of DATA_GLOB
# (DuckDB, pyarrow, Ray, datasets) then gets the schema and zero rows before the first shard
# publishes, where a glob over an empty folder would fail.
SCHEMA = DATA + "schema.parquet"
JOB_SHEET = CONTACT + "job.jpg"

# A marker's name is its shard and attempt, zero-padded but never cut: shard 1,000,000 is 1000000-000.
MARKER = re.compile(r"^commits/(\d+)-(\d+)\.json$")
# An attempt's own files: its metadata, and its images' folder.
ATTEMPT_FILE = re.compile(r"^(?:attempts|images)/(\d+)-(\d+)-([^/.]+)(?:/|\.parquet$)")
STAMP = re.compile(r"^stamps/([a-z-]+)/(\d+)-(\d+)-([^/]+)$")
LEASE = re.compile(r"^leases/(\d+)-(\d+)\.json$")


def marker_key(shard: int, attempt: int) -> str:
    return f"{COMMITS}{shard:06d}-{attempt:03d}.json"


def markers_of(shard: int) -> str:
    """The prefix of one shard's markers, every attempt."""
    return f"{COMMITS}{shard:06d}-"


def attempt_key(shard: int, attempt: int, run_id: str) -> str:
    return f"{ATTEMPTS}{shard:06d}-{attempt:03d}-{run_id}.parquet"


def attempt_files_of(shard: int) -> tuple[str, str]:
    """The prefixes of one shard's attempt metadata and image folders, every attempt and run."""
    return f"{ATTEMPTS}{shard:06d}-", f"{IMAGES}{shard:06d}-"


def lease_key(shard: int, generation: int) -> str:
    return f"{LEASES}{shard:06d}-{generation:06d}.json"


def data_key(shard: int) -> str:
    """The published metadata of a committed shard: what a glob over OUTPUT/data/ reads."""
    return f"{DATA}{shard:06d}.parquet"


def tar_key(shard: int) -> str:
    return f"{WEBDATASET}{shard:06d}.tar"


def sheet_key(shard: int) -> str:
    return f"{CONTACT}{shard:06d}.jpg"


def stamp_key(kind: str, shard: int, attempt: int, tag: str) -> str:
    return f"{STAMPS}{kind}/{shard:06d}-{attempt:03d}-{tag}"


def stamps_of(kind: str, shard: int) -> str:
    return f"{STAMPS}{kind}/{shard:06d}-"


# What a committed shard is published as: kind -> (its file, the folder listed for version tags).
KINDS = {
    "data": (data_key, DATA),
    "data-images": (data_key, DATA),  # the same file, with the images embedded
    "webdataset": (tar_key, WEBDATASET),
    "contact": (sheet_key, CONTACT),
}


def published_keys(shard: int) -> list[str]:
    """Every file a committed shard may be published as, whatever the settings: what retiring the
    shard removes."""
    return sorted({key(shard) for key, _ in KINDS.values()})


@dataclass(frozen=True)
class Derived:
    """Which kinds this output publishes, from the output settings."""

    embed_images: bool = False
    webdataset: bool = False
    contact_sheets: bool = False

    @classmethod
    def of(cls, manifest) -> Derived:
        return cls(manifest.output.embed_images, manifest.output.webdataset, manifest.contact_sheets)

    def kinds(self) -> tuple[str, ...]:
        return (
            ("data-images" if self.embed_images else "data",)
            + ("webdataset",) * self.webdataset
            + ("contact",) * self.contact_sheets
        )
