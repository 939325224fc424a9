"""MovieLens formats on fixtures written in each real layout, broken files, and the leave-last-out protocol."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from modelworks.errors import DataError
from modelworks.tasks.recommendation import data as rec_data

REAL = Path(__file__).resolve().parents[4] / "shared" / "data" / "movielens"
WRITERS = {"ml-100k": rec_data.write_ml100k, "ml-1m": rec_data.write_ml1m, "ml-latest": rec_data.write_ml_latest}


@pytest.mark.parametrize("layout", list(WRITERS))
def test_every_movielens_layout_reads_the_same_events_with_titles_and_genres(layout, tmp_path):
    WRITERS[layout](tmp_path / layout, n_users=10, n_items=12, seed=3)
    data = rec_data.read_movielens(tmp_path / layout)
    expected = sorted((str(u), str(i), float(t)) for u, i, _, t in rec_data.synthetic_events(10, 12, seed=3))
    assert sorted(zip(data.users, data.items, data.timestamps)) == expected
    assert len(data.titles) == 12 and all(data.titles[str(i)] for i in range(1, 13))
    if layout == "ml-1m":
        assert data.titles["2"] == "Caf\xe9 2 (1995)"  # latin-1, as GroupLens wrote it
    if layout == "ml-latest":
        assert data.titles["2"] == "Movie 2, The (1995)" and data.genres["1"] == [] and data.genres["2"] == [
            "Action", "Sci-Fi"]
    if layout == "ml-100k":
        assert data.genres["3"] == [rec_data.ML100K_GENRES[3]]


def test_a_broken_ratings_file_names_the_file_and_line(tmp_path):
    rec_data.write_ml100k(tmp_path, n_users=4, n_items=8)
    lines = (tmp_path / "u.data").read_text().splitlines()
    lines[2] = "1\t2\t3"  # a field missing
    (tmp_path / "u.data").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"u\.data:3: expected 4 fields separated by '\\t' \(got 3"):
        rec_data.read_movielens(tmp_path)
    csv_folder = tmp_path / "latest"
    rec_data.write_ml_latest(csv_folder, n_users=4, n_items=8)
    text = (csv_folder / "ratings.csv").read_text().splitlines()
    text[4] = "1,2,3.5,yesterday"
    (csv_folder / "ratings.csv").write_text("\n".join(text) + "\n")
    with pytest.raises(DataError, match=r"ratings\.csv:5: timestamp 'yesterday' is not a number"):
        rec_data.read_movielens(csv_folder)


def test_a_folder_without_ratings_and_an_events_csv_with_other_columns(tmp_path):
    with pytest.raises(DataError, match="no MovieLens ratings file"):
        rec_data.read_movielens(tmp_path)
    path = tmp_path / "events.csv"
    path.write_text("who,what,when\na,x,3\na,y,1\nb,x,2\n")
    with pytest.raises(DataError, match=r"events\.csv:1: no column 'user'"):
        rec_data.read_csv_events(path, "user", "what", "when")
    data = rec_data.read_csv_events(path, "who", "what", "when")
    assert data.users == ["a", "a", "b"] and data.items == ["x", "y", "x"] and data.timestamps == [3.0, 1.0, 2.0]


def test_leave_last_out_holds_out_the_latest_by_time_and_never_trains_on_it(tmp_path):
    data = rec_data.Interactions(users=["u"] * 5 + ["v"] * 2, items=["a", "b", "c", "d", "e", "a", "b"],
                                 timestamps=[5, 1, 3, 3, 2, 1, 2])
    split = rec_data.leave_last_out(data)
    index = {raw: i + 1 for i, raw in enumerate(split.item_ids)}
    u, v = split.user_ids.index("u"), split.user_ids.index("v")
    # u by time: b(1) e(2) c(3) d(3, after c in the file) a(5)
    assert split.train[u] == [index["b"], index["e"], index["c"]]
    assert (split.val[u], split.test[u]) == (index["d"], index["a"])
    assert split.train[v] == [index["a"], index["b"]] and split.val[v] == split.test[v] == 0  # too few to hold out
    assert split.popularity[index["a"]] == 1 and split.popularity[index["b"]] == 2


def test_no_held_out_item_reaches_a_training_input(tmp_path):
    rec_data.write_ml100k(tmp_path, n_users=30, n_items=20, seed=1)
    split = rec_data.leave_last_out(rec_data.read_movielens(tmp_path))
    train = rec_data.NextItemSequences(split.train, max_len=8)
    val, test = rec_data.evaluation_splits(split, max_len=8)
    kept = [i for i, s in enumerate(split.train) if len(s) >= 2]
    for row, user in enumerate(kept):
        held = {split.val[user], split.test[user]}
        assert not held & set(train.inputs[row].tolist()) and not held & set(train.targets[row].tolist())
    # Validation reads only training items; the test history adds the validation item, never the test item.
    for row in range(len(val)):
        assert val.target[row].item() not in val.history[row].tolist()
        assert test.target[row].item() not in test.seen[row].tolist()
    assert torch.equal(test.history[:, -1], val.target)


def test_every_window_makes_each_training_transition_a_target_exactly_once():
    history = list(range(1, 24))  # 23 items: 22 transitions, windows of max_len + 1 = 6 items cut from the end
    windows = rec_data.training_windows(history, max_len=5, every_window=True)
    assert windows[0] == history[-6:] and windows[-1][0] == history[0]
    transitions = [(w[i], w[i + 1]) for w in windows for i in range(len(w) - 1)]
    assert sorted(transitions) == [(a, a + 1) for a in range(1, 23)]  # all 22, none twice
    assert rec_data.training_windows(history, max_len=5, every_window=False) == [history[-6:]]
    assert rec_data.training_windows([7], max_len=5, every_window=True) == []  # one item: nothing to predict
    train = rec_data.NextItemSequences([history, [3, 4]], max_len=5, every_window=True)
    assert len(train) == len(windows) + 1
    assert train.inputs[0].tolist() == history[-6:-1] and train.targets[0].tolist() == history[-5:]
    assert train.inputs[-1].tolist() == [0, 0, 0, 0, 3] and train.targets[-1].tolist() == [0, 0, 0, 0, 4]


@pytest.mark.skipif(not (REAL / "ml-100k" / "u.data").is_file(), reason="../shared MovieLens data absent")
def test_real_ml100k_reads_with_its_catalogue():
    data = rec_data.read_movielens(REAL / "ml-100k")
    split = rec_data.leave_last_out(data)
    assert len(data.users) == 100_000 and split.n_items == 1682 and len(split.user_ids) == 943
    assert data.titles["1"] == "Toy Story (1995)" and "Animation" in data.genres["1"]
