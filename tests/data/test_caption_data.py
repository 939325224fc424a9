"""fmnist-captions (deterministic, references true to the layout, unseen pairs absent from training) and the two
real caption formats (COCO captions json; Flickr8k token file + Karpathy split json) on fixtures in their exact
formats, with errors that name the file and the entry."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from modelworks.data.captioning import formats
from modelworks.data.captioning.scenes import (HELD_OUT, NOUNS, CaptionSceneConfig, compose_caption_scenes,
                                               ensure_caption_scenes)
from modelworks.data.captioning.words import WordTokenizer, caption_tokenizer_from_json, train_caption_tokenizer
from modelworks.data.detection.writers import save_image
from modelworks.data.synthetic import write_fashion_mnist
from modelworks.errors import DataError


@pytest.fixture(scope="module")
def items():
    rng = np.random.default_rng(0)
    images = np.zeros((200, 28, 28), np.uint8)
    images[:, 6:22, 6:22] = rng.integers(120, 255, (200, 16, 16))  # a visible square item
    return images, np.arange(200) % 10


def test_scenes_are_deterministic_in_the_seed(items):
    a = list(compose_caption_scenes(*items, 6, 64, seed=3))
    b = list(compose_caption_scenes(*items, 6, 64, seed=3))
    c = list(compose_caption_scenes(*items, 6, 64, seed=4))
    assert all(np.array_equal(x[0], y[0]) and x[3] == y[3] for x, y in zip(a, b))
    assert any(not np.array_equal(x[0], y[0]) for x, y in zip(a, c))


def centre(box):
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def test_references_describe_the_layout(items):
    """Count, class, colour and size are each group's; a stated relation holds between the groups' boxes."""
    for image, groups, relation, refs in compose_caption_scenes(*items, 60, 64, seed=1):
        assert len(refs) == 5 and len(set(refs)) == 5
        for g in groups:
            noun = NOUNS[g.label][g.count > 1]
            assert any(f"{'a' if g.count == 1 else 'two'} {g.size} {g.colour} {noun}" in r for r in refs)
            assert len(g.boxes) == g.count
        for r in refs:  # the verb agrees with the count that follows it
            assert not re.search(r"there is two|there are a ", r), r
        if relation is None:
            continue
        a, b = groups
        match = re.search(r" (left of|right of|above|below) ", refs[0])
        ax = [centre(box) for box in a.boxes]
        bx = [centre(box) for box in b.boxes]
        axis, sign = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}[match.group(1)]
        assert all(sign * (p[axis] - q[axis]) > 0 for p in ax for q in bx), (refs[0], a.boxes, b.boxes)


def test_unseen_pairs_only_in_the_second_half_of_test(tmp_path):
    write_fashion_mnist(tmp_path, n_train=300, n_test=60)
    cfg = CaptionSceneConfig(train=120, val=20, test=40, image_size=32)
    folder = ensure_caption_scenes(tmp_path, cfg)
    for split in ("train", "val"):
        data = json.loads((folder / "annotations" / f"captions_{split}.json").read_text())
        pairs = {(g["label"], g["colour"]) for im in data["images"] for g in im["groups"]}
        assert not pairs & HELD_OUT
        assert {im["combination"] for im in data["images"]} == {"seen"}
    test = json.loads((folder / "annotations" / "captions_test.json").read_text())
    marks = [im["combination"] for im in test["images"]]
    assert marks == ["seen"] * 20 + ["unseen"] * 20
    for im in test["images"]:
        has_unseen = any((g["label"], g["colour"]) in HELD_OUT for g in im["groups"])
        assert has_unseen == (im["combination"] == "unseen")
    assert len(test["annotations"]) == 5 * 40


# ---------------------------------------------------------------------------------------------- real formats


def write_images(folder: Path, names: list[str]) -> None:
    for k, name in enumerate(names):
        save_image(np.full((20, 30, 3), 40 * k % 256, np.uint8), folder / name)


def test_coco_captions_reader(tmp_path):
    """captions_val2014.json's exact shape: info, images (license, file_name, coco_url, height, width,
    date_captured, flickr_url, id), licenses, annotations (image_id, id, caption)."""
    write_images(tmp_path / "val2014", ["COCO_val2014_000000391895.jpg", "COCO_val2014_000000522418.jpg"])
    data = {"info": {"description": "This is stable 1.0 version of the 2014 MS COCO dataset.", "year": 2014},
            "images": [{"license": 3, "file_name": "COCO_val2014_000000391895.jpg", "coco_url": "http://x",
                        "height": 20, "width": 30, "date_captured": "2013-11-14 11:18:45", "flickr_url": "http://y",
                        "id": 391895},
                       {"license": 4, "file_name": "COCO_val2014_000000522418.jpg", "coco_url": "http://x",
                        "height": 20, "width": 30, "date_captured": "2013-11-14 11:38:44", "flickr_url": "http://y",
                        "id": 522418}],
            "licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1, "name": "BY-NC-SA"}],
            "annotations": [{"image_id": 391895, "id": 770337, "caption": "A man with a red helmet on a small moped "
                                                                           "on a dirt road. "},
                            {"image_id": 522418, "id": 770338, "caption": "A woman wearing a net on her head."},
                            {"image_id": 391895, "id": 770339, "caption": "Man riding a motor bike on a dirt road."}]}
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps(data))
    images = formats.read_coco_captions(path, tmp_path / "val2014")
    assert [im.path.name for im in images] == ["COCO_val2014_000000391895.jpg", "COCO_val2014_000000522418.jpg"]
    assert images[0].captions == ["A man with a red helmet on a small moped on a dirt road.",
                                  "Man riding a motor bike on a dirt road."]
    pixels = formats.load_images(images, 16, 10_000)
    assert pixels.shape == (2, 3, 16, 16) and pixels[1].float().mean() == pytest.approx(40, abs=1)

    data["annotations"].append({"image_id": 7, "id": 1, "caption": "x"})
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"captions_val2014.json: annotations\[3\]: image_id 7 is not in images"):
        formats.read_coco_captions(path, tmp_path / "val2014")
    data["annotations"][3] = {"image_id": 391895, "id": 1}
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"annotations\[3\]: needs a non-empty string `caption`"):
        formats.read_coco_captions(path, tmp_path / "val2014")


def test_flickr_token_file_with_karpathy_splits(tmp_path):
    names = ["1000268201_693b08cb0e.jpg", "1001773457_577c3a7d70.jpg", "1002674143_1b742ab4b8.jpg",
             "1003163366_44323f5815.jpg"]
    write_images(tmp_path / "Flicker8k_Dataset", names)
    lines = []
    for name in names:
        lines += [f"{name}#{j}\tA dog runs number {j} ." for j in range(5)]
    captions = tmp_path / "Flickr8k.token.txt"
    captions.write_text("\n".join(lines) + "\n")
    karpathy = {"images": [{"sentids": list(range(5 * i, 5 * i + 5)), "imgid": i, "split": split,
                            "filename": name,
                            "sentences": [{"tokens": ["a", "dog"], "raw": "A dog .", "imgid": i, "sentid": 5 * i}]}
                           for i, (name, split) in enumerate(zip(names, ["train", "restval", "test", "val"]))],
                "dataset": "flickr8k"}
    (tmp_path / "dataset_flickr8k.json").write_text(json.dumps(karpathy))
    splits, notes = formats.read_caption_source(f"flickr:{captions}:{tmp_path / 'Flicker8k_Dataset'}", 0.1, 0.1, 0)
    assert [im.path.name for im in splits["train"]] == names[:2]  # restval counts as train
    assert [im.path.name for im in splits["test"]] == names[2:3]
    assert [im.path.name for im in splits["val"]] == names[3:]
    assert splits["train"][0].captions[4] == "A dog runs number 4 ."
    assert "Karpathy" in notes[0]
    karpathy["images"] = karpathy["images"][:3]
    (tmp_path / "dataset_flickr8k.json").write_text(json.dumps(karpathy))
    with pytest.raises(DataError, match=r"dataset_flickr8k.json: has no split for 1 image\(s\) of .*1003163366"):
        formats.read_caption_source(f"flickr:{captions}:{tmp_path / 'Flicker8k_Dataset'}", 0.1, 0.1, 0)
    captions.write_text(lines[0] + "\n1000268201_693b08cb0e.jpg A dog without a tab\n")
    with pytest.raises(DataError, match=r"Flickr8k.token.txt:2: expected `IMAGE.jpg#N<TAB>caption`"):
        formats.read_flickr_captions(captions, tmp_path)


def test_flickr_without_a_split_file_is_split_by_seed_and_says_so(tmp_path):
    names = [f"{i}_abc.jpg" for i in range(20)]
    write_images(tmp_path / "images", names)
    captions = tmp_path / "captions.txt"
    captions.write_text("".join(f"{n}#0\tcaption {i}\n" for i, n in enumerate(names)))
    splits, notes = formats.read_caption_source(f"flickr:{captions}:{tmp_path / 'images'}", 0.2, 0.1, 0)
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (14, 4, 2)
    assert "seeded split" in notes[0]
    with pytest.raises(DataError, match="the images folder .* does not exist"):
        formats.read_caption_source(f"flickr:{captions}:{tmp_path / 'nowhere'}", 0.2, 0.1, 0)


def test_word_tokenizer_min_count_and_json_round_trip():
    tokenizer = train_caption_tokenizer("word", ["A red bag.", "a red coat", "a blue bag"], 2, 0)
    assert isinstance(tokenizer, WordTokenizer)
    assert tokenizer.words[2:] == ["a", "bag", "red"]  # "." "blue" "coat" seen once
    ids = tokenizer.encode("a blue bag")
    assert ids[1] == tokenizer.unknown_id and tokenizer.decode(ids) == "a <unk> bag"
    again = caption_tokenizer_from_json(tokenizer.to_json())
    assert again.encode("red bag") == tokenizer.encode("red bag")
    bpe = train_caption_tokenizer("bpe", ["a red bag", "a blue coat"] * 20, 1, 300)
    assert bpe.decode(bpe.encode("a red bag")) == "a red bag"
    assert caption_tokenizer_from_json(bpe.to_json()).encode("a red") == bpe.encode("a red")
