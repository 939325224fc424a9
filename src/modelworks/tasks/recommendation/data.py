"""Interaction data for recommendation: MovieLens files and plain event CSVs, and the leave-last-out protocol.

Formats read (GroupLens' own layouts, recognised by their file names):
  ml-100k                       u.data (user \\t item \\t rating \\t timestamp), u.item (id|title|date|...|19 genre flags)
  ml-1m                         ratings.dat (user::item::rating::timestamp), movies.dat (id::title::genres)
  ml-latest-small, ml-25m ...   ratings.csv (userId,movieId,rating,timestamp), movies.csv (movieId,title,genres)
  interactions:events.csv       any CSV with user, item and timestamp columns (names set in the config)

Every rating counts as an interaction (implicit feedback, as in the EASE and SASRec evaluations). Protocol:
leave-last-out by time (Kang & McAuley 2018): each user's last interaction is the test target, the one before it
the validation target, the rest trains. Ties in time keep the file's order.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ...errors import DataError

# u.genre of ml-100k (not always shipped beside u.data): the order of u.item's 19 genre flags.
ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                 "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                 "War", "Western")


@dataclass
class Interactions:
    """Events in file order, with raw ids as strings (a package maps them back), and the item catalogue."""

    users: list[str]
    items: list[str]
    timestamps: list[float]
    titles: dict[str, str] = field(default_factory=dict)  # raw item id -> title (empty when unknown)
    genres: dict[str, list[str]] = field(default_factory=dict)
    source: str = ""


def _fail(path: Path, line: int, what: str) -> DataError:
    return DataError(f"{path}:{line}: {what}; fix or remove the line (each line: user, item, rating, timestamp)")


def _read_separated(path: Path, separator: str, encoding: str = "latin-1") -> Interactions:
    """u.data / ratings.dat: user, item, rating, timestamp separated by `separator`, no header."""
    users, items, times = [], [], []
    with open(path, encoding=encoding) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rstrip("\r\n").split(separator)
            if len(parts) != 4:
                raise _fail(path, number, f"expected 4 fields separated by {separator!r} (got {len(parts)}: "
                                          f"{line.strip()[:80]!r})")
            user, item, rating, stamp = parts
            try:
                float(rating)
                times.append(float(stamp))
            except ValueError:
                raise _fail(path, number, f"rating {rating!r} and timestamp {stamp!r} must be numbers") from None
            users.append(user.strip())
            items.append(item.strip())
    return Interactions(users, items, times, source=str(path))


def read_csv_events(path: Path, user: str, item: str, timestamp: str) -> Interactions:
    """A CSV with a header naming at least the user, item and timestamp columns (ratings.csv, events.csv)."""
    try:
        f = open(path, newline="", encoding="utf-8")
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    with f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: empty file; expected a header with {user}, {item}, {timestamp} columns")
        missing = [c for c in (user, item, timestamp) if c not in header]
        if missing:
            raise DataError(f"{path}:1: no column {', '.join(map(repr, missing))} in the header {header}; name "
                            "the columns in data.user_column / item_column / timestamp_column")
        u, i, t = header.index(user), header.index(item), header.index(timestamp)
        users, items, times = [], [], []
        for number, row in enumerate(reader, 2):
            if not row:
                continue
            if len(row) != len(header):
                raise _fail(path, number, f"expected {len(header)} fields like the header (got {len(row)})")
            try:
                times.append(float(row[t]))
            except ValueError:
                raise _fail(path, number, f"timestamp {row[t]!r} is not a number") from None
            users.append(row[u].strip())
            items.append(row[i].strip())
    return Interactions(users, items, times, source=str(path))


def _read_catalogue(path: Path, kind: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    titles, genres = {}, {}
    if kind == "u.item":
        with open(path, encoding="latin-1") as f:
            for number, line in enumerate(f, 1):
                parts = line.rstrip("\r\n").split("|")
                if len(parts) < 5:
                    continue
                titles[parts[0]] = parts[1]
                flags = parts[5:5 + len(ML100K_GENRES)]
                genres[parts[0]] = [g for g, flag in zip(ML100K_GENRES, flags) if flag == "1"]
    elif kind == "movies.dat":
        with open(path, encoding="latin-1") as f:
            for line in f:
                parts = line.rstrip("\r\n").split("::")
                if len(parts) == 3:
                    titles[parts[0]], genres[parts[0]] = parts[1], parts[2].split("|")
    else:  # movies.csv
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                titles[row["movieId"]] = row["title"]
                genres[row["movieId"]] = [] if row["genres"] == "(no genres listed)" else row["genres"].split("|")
    return titles, genres


MOVIELENS_LAYOUTS = (("u.data", "\t", "u.item"), ("ratings.dat", "::", "movies.dat"), ("ratings.csv", ",", "movies.csv"))


def read_movielens(folder: Path) -> Interactions:
    """ml-100k, ml-1m or ml-latest(-small)/ml-20m/ml-25m, recognised by their file names."""
    if not folder.is_dir():
        raise DataError(f"data.source: {folder} is not a folder; point movielens:PATH at an unpacked MovieLens "
                        "folder (ml-100k, ml-1m, ml-latest-small, ml-25m from grouplens.org/datasets/movielens)")
    for ratings, separator, catalogue in MOVIELENS_LAYOUTS:
        if (folder / ratings).is_file():
            if separator == ",":
                data = read_csv_events(folder / ratings, "userId", "movieId", "timestamp")
            else:
                data = _read_separated(folder / ratings, separator)
            if (folder / catalogue).is_file():
                data.titles, data.genres = _read_catalogue(folder / catalogue, catalogue)
            return data
    raise DataError(f"{folder}: no MovieLens ratings file (u.data, ratings.dat or ratings.csv); point "
                    "movielens:PATH at the folder that holds one")


# ---------------------------------------------------------------------------------------------- protocol


@dataclass
class LeaveLastOut:
    """Items indexed 1..n (0 pads histories); per user, time-ordered item indices split into train/val/test."""

    item_ids: list[str]  # index - 1 -> raw id
    user_ids: list[str]
    train: list[list[int]]  # per user: the interactions that train
    val: list[int]  # per user: the validation target (0: the user has too few interactions to hold one out)
    test: list[int]
    popularity: np.ndarray  # [n_items + 1] training interactions per item (index 0 unused)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)


def leave_last_out(data: Interactions, min_interactions: int = 3) -> LeaveLastOut:
    """Users with fewer than `min_interactions` events only train (nothing can be held out for them)."""
    if not data.users:
        raise DataError(f"{data.source}: no interactions")
    item_ids = sorted(set(data.items), key=lambda s: (len(s), s))  # numeric ids in numeric order
    item_index = {raw: i + 1 for i, raw in enumerate(item_ids)}
    per_user: dict[str, list[tuple[float, int, int]]] = {}
    for order, (user, item, stamp) in enumerate(zip(data.users, data.items, data.timestamps)):
        per_user.setdefault(user, []).append((stamp, order, item_index[item]))
    user_ids = sorted(per_user, key=lambda s: (len(s), s))
    train, val, test = [], [], []
    for user in user_ids:
        sequence = [item for _, _, item in sorted(per_user[user])]
        if len(sequence) >= min_interactions:
            train.append(sequence[:-2]), val.append(sequence[-2]), test.append(sequence[-1])
        else:
            train.append(sequence), val.append(0), test.append(0)
    popularity = np.zeros(len(item_ids) + 1, np.int64)
    for sequence in train:
        np.add.at(popularity, sequence, 1)
    return LeaveLastOut(item_ids, user_ids, train, val, test, popularity)


def pad_left(sequence: list[int], length: int) -> list[int]:
    """The last `length` items, left-padded with 0: the most recent item always sits at the last position."""
    tail = sequence[-length:]
    return [0] * (length - len(tail)) + tail


def training_windows(sequence: list[int], max_len: int, every_window: bool) -> list[list[int]]:
    """Windows of at most max_len + 1 items, cut back from the end of `sequence`. Consecutive windows share one
    item (the last input of one is the first of the next), so with `every_window` each transition of the
    history is a target exactly once; without it, only the most recent window."""
    windows = []
    end = len(sequence)
    while end >= 2:
        windows.append(sequence[max(0, end - max_len - 1):end])
        if not every_window:
            break
        end -= max_len
    return windows


class NextItemSequences(Dataset):
    """Training: (input [L], target [L]) samples, the history shifted by one, left-padded: one per user (its
    latest window), or with `every_window` one per window of the whole history."""

    def __init__(self, sequences: list[list[int]], max_len: int, every_window: bool = False):
        kept = [w for s in sequences for w in training_windows(s, max_len, every_window)]
        self.inputs = torch.tensor([pad_left(s[:-1], max_len) for s in kept], dtype=torch.long)
        self.targets = torch.tensor([pad_left(s[1:], max_len) for s in kept], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.inputs)

    def to(self, device: torch.device) -> "NextItemSequences":
        self.inputs, self.targets = self.inputs.to(device), self.targets.to(device)
        return self

    def get_batch(self, indices: torch.Tensor):
        return self.inputs[indices], self.targets[indices]


class HeldOut(Dataset):
    """Evaluation: (history [L], target, seen [S]) per user holding a target; `seen` is the whole history, which
    full ranking masks (it may be longer than the model's input)."""

    def __init__(self, histories: list[list[int]], targets: list[int], max_len: int):
        kept = [(h, t) for h, t in zip(histories, targets) if t]
        longest = max((len(h) for h, _ in kept), default=1)
        self.history = torch.tensor([pad_left(h, max_len) for h, _ in kept], dtype=torch.long).view(-1, max_len)
        self.target = torch.tensor([t for _, t in kept], dtype=torch.long)
        self.seen = torch.tensor([pad_left(h, longest) for h, _ in kept], dtype=torch.long).view(-1, longest)

    def __len__(self) -> int:
        return len(self.target)

    def to(self, device: torch.device) -> "HeldOut":
        self.history, self.target, self.seen = self.history.to(device), self.target.to(device), self.seen.to(device)
        return self

    def get_batch(self, indices: torch.Tensor):
        return self.history[indices], self.target[indices], self.seen[indices]


def evaluation_splits(split: LeaveLastOut, max_len: int) -> tuple[HeldOut, HeldOut]:
    """Validation: history = train part, target = val. Test: history = train + val, target = test."""
    val = HeldOut(split.train, split.val, max_len)
    test = HeldOut([h + [v] if v else h for h, v in zip(split.train, split.val)], split.test, max_len)
    return val, test


# ---------------------------------------------------------------------------------------------- fixtures


def synthetic_events(n_users: int, n_items: int, seed: int = 0) -> list[tuple[int, int, int, int]]:
    """(user, item, rating, timestamp) with sequential structure a model can learn: each user walks the items
    in order (item i, then i + 1, ...) from a random start, with the occasional random jump."""
    rng = np.random.default_rng(seed)
    events = []
    for user in range(1, n_users + 1):
        length = int(rng.integers(6, min(n_items, 16)))
        item, seen = int(rng.integers(1, n_items + 1)), set()
        stamp = 880_000_000 + int(rng.integers(0, 10_000_000))
        while len(seen) < length:
            if item not in seen:
                seen.add(item)
                events.append((user, item, int(rng.integers(1, 6)), stamp))
                stamp += int(rng.integers(1, 5_000))
            item = item % n_items + 1 if rng.random() < 0.9 else int(rng.integers(1, n_items + 1))
    order = rng.permutation(len(events))  # the files are not sorted by time
    return [events[i] for i in order]


def write_ml100k(folder: Path, n_users: int = 48, n_items: int = 30, seed: int = 0) -> None:
    """u.data and u.item in ml-100k's exact layout (tab-separated; latin-1 '|' catalogue with 19 genre flags)."""
    folder.mkdir(parents=True, exist_ok=True)
    events = synthetic_events(n_users, n_items, seed)
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in events))
    lines = []
    for item in range(1, n_items + 1):
        flags = ["1" if g == item % len(ML100K_GENRES) else "0" for g in range(len(ML100K_GENRES))]
        lines.append(f"{item}|Movie {item} (1995)|01-Jan-1995||http://example.invalid/{item}|" + "|".join(flags))
    (folder / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))


def write_ml1m(folder: Path, n_users: int = 48, n_items: int = 30, seed: int = 0) -> None:
    """ratings.dat and movies.dat in ml-1m's layout ('::'-separated, latin-1)."""
    folder.mkdir(parents=True, exist_ok=True)
    events = synthetic_events(n_users, n_items, seed)
    (folder / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in events))
    (folder / "movies.dat").write_bytes("".join(f"{i}::Caf\xe9 {i} (1995)::Comedy|Drama\n"
                                                for i in range(1, n_items + 1)).encode("latin-1"))


def write_ml_latest(folder: Path, n_users: int = 48, n_items: int = 30, seed: int = 0) -> None:
    """ratings.csv and movies.csv in ml-latest(-small)/ml-25m's layout (headers, UTF-8, half-star ratings)."""
    folder.mkdir(parents=True, exist_ok=True)
    events = synthetic_events(n_users, n_items, seed)
    (folder / "ratings.csv").write_text("userId,movieId,rating,timestamp\n"
                                        + "".join(f"{u},{i},{r - 0.5},{t}\n" for u, i, r, t in events))
    (folder / "movies.csv").write_text("movieId,title,genres\n" + "".join(
        f'{i},"Movie {i}, The (1995)",{"(no genres listed)" if i == 1 else "Action|Sci-Fi"}\n'
        for i in range(1, n_items + 1)))
