"""Convert MovieLens 100K into the replay format (events + items, gzipped CSV).

Why: a public, real interaction log gives a second workload beside the synthetic one. ML-100K
has explicit ratings, not impressions and clicks, so the conventional mapping is used: every
rating is an impression (the movie was shown to, and seen by, the user) and a rating of 4 or 5
is a positive, emitted as a click shortly after the impression. The click delay is a
deterministic pseudo-random function of (user, item) so conversions are reproducible.

The dataset is never copied into the repository: the caller gives the output directory.
"""

from __future__ import annotations

import csv
import gzip
import io
import re
import zlib
from pathlib import Path

#: Ratings at or above this are clicks.
POSITIVE_RATING = 4
#: Click delays are spread over [MIN_DELAY_S, MAX_DELAY_S] seconds.
MIN_DELAY_S = 2
MAX_DELAY_S = 120
#: Age buckets (the ones MovieLens 1M uses).
AGE_BUCKETS = ((18, "<18"), (25, "18-24"), (35, "25-34"), (45, "35-44"), (50, "45-49"), (56, "50-55"))
EVENT_HEADER = ("ts", "type", "impression_id", "user_id", "item_id", "age", "gender", "occupation")
ITEM_HEADER = ("item_id", "text", "year", "genres")


def age_bucket(age: int) -> str:
    """MovieLens-1M style age bucket of an age in years."""
    for bound, label in AGE_BUCKETS:
        if age < bound:
            return label
    return "56+"


def click_delay_s(user: int, item: int) -> int:
    """Deterministic pseudo-random click delay in seconds for a (user, item) pair."""
    h = zlib.crc32(f"{user}:{item}".encode())
    return MIN_DELAY_S + h % (MAX_DELAY_S - MIN_DELAY_S + 1)


def read_genres(src: Path) -> list[str]:
    """Genre names by index from ``u.genre``."""
    genres: dict[int, str] = {}
    for line in (src / "u.genre").read_text(encoding="latin-1").splitlines():
        if "|" in line:
            name, _, idx = line.rpartition("|")
            genres[int(idx)] = name
    return [genres[i] for i in range(len(genres))]


def read_users(src: Path) -> dict[int, tuple[str, str, str]]:
    """user id → (age bucket, gender, occupation) from ``u.user``."""
    users = {}
    for line in (src / "u.user").read_text(encoding="latin-1").splitlines():
        if line.strip():
            uid, age, gender, occupation, _zip = line.split("|")
            users[int(uid)] = (age_bucket(int(age)), gender, occupation)
    return users


def read_items(src: Path, genre_names: list[str]) -> list[tuple[str, str, str, str]]:
    """Item rows (item_id, text, year, genres) from ``u.item`` (latin-1).

    The text is the title followed by the genre names: what a catalogue would show and what the
    semantic teacher can embed.
    """
    rows = []
    for line in (src / "u.item").read_text(encoding="latin-1").splitlines():
        if not line.strip():
            continue
        fields = line.split("|")
        movie_id, title, release = fields[0], fields[1].strip(), fields[2]
        flags = fields[5 : 5 + len(genre_names)]
        genres = [g for g, f in zip(genre_names, flags) if f == "1" and g != "unknown"]
        match = re.search(r"\((\d{4})\)\s*$", title) or re.search(r"(\d{4})$", release)
        year = match.group(1) if match else ""
        text = f"{title}. {', '.join(genres)}." if genres else f"{title}."
        rows.append((f"i{movie_id}", text, year, "|".join(genres)))
    return rows


def read_ratings(src: Path) -> list[tuple[int, int, int, int]]:
    """(ts, user, item, rating) from ``u.data``, ordered by timestamp, then user, then item."""
    ratings = []
    for line in (src / "u.data").read_text(encoding="latin-1").splitlines():
        if line.strip():
            user, item, rating, ts = (int(x) for x in line.split("\t"))
            ratings.append((ts, user, item, rating))
    ratings.sort()
    return ratings


def event_rows(src: Path) -> list[tuple[object, ...]]:
    """Impression and click rows in event-time order (clicks after their impression at equal ts)."""
    users = read_users(src)
    rows: list[tuple[int, int, tuple[object, ...]]] = []
    for seq, (ts, user, item, rating) in enumerate(read_ratings(src)):
        impression_id = f"u{user}-i{item}"
        age, gender, occupation = users[user]
        rows.append((ts, 2 * seq, (ts, "impression", impression_id, f"u{user}", f"i{item}", age, gender, occupation)))
        if rating >= POSITIVE_RATING:
            click_ts = ts + click_delay_s(user, item)
            rows.append((click_ts, 2 * seq + 1, (click_ts, "click", impression_id, "", "", "", "", "")))
    rows.sort(key=lambda r: (r[0], r[1]))
    return [r[2] for r in rows]


def _write_csv_gz(path: Path, header: tuple[str, ...], rows: list[tuple[object, ...]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with gzip.open(tmp, "wb") as raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    tmp.replace(path)


def convert_ml100k(src: Path, out: Path) -> tuple[Path, Path]:
    """Write ``out/events.csv.gz`` and ``out/items.csv.gz`` from the ML-100K directory ``src``."""
    src, out = Path(src), Path(out)
    if not (src / "u.data").is_file():
        raise FileNotFoundError(f"{src} does not look like MovieLens 100K (no u.data)")
    out.mkdir(parents=True, exist_ok=True)
    events_path, items_path = out / "events.csv.gz", out / "items.csv.gz"
    _write_csv_gz(events_path, EVENT_HEADER, event_rows(src))
    _write_csv_gz(items_path, ITEM_HEADER, list(read_items(src, read_genres(src))))
    return events_path, items_path
