"""The detection readers on fixtures written in the exact real formats (VOC XML tree, COCO json, YOLO txt), their
errors on malformed input (each naming the file), and BCCD, a real VOC data set, when it is present."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from modelworks.data.detection import formats
from modelworks.data.detection.formats import DataWarning, read_coco, read_voc, read_yolo
from modelworks.data.detection.writers import write_coco, write_voc, write_yolo
from modelworks.errors import DataError

from helpers import detection_samples as samples, write_labelling_tool_voc

CLASSES = ["cat", "dog", "bird"]
BCCD = Path(__file__).resolve().parents[3] / "shared" / "data" / "bccd"


def assert_same(data, expected):
    assert data.classes == CLASSES
    assert len(data.records) == len(expected)
    for record, (image, boxes, labels) in zip(data.records, expected):
        assert (record.height, record.width) == image.shape[:2]
        np.testing.assert_allclose(record.boxes, boxes, atol=1e-3)
        np.testing.assert_array_equal(record.labels, labels)
        assert record.image.is_file()


def test_voc_round_trip(tmp_path):
    train, val = samples(4, 0), samples(2, 1)
    write_voc(tmp_path, {"train": train, "val": val}, CLASSES)
    assert_same(read_voc(tmp_path, "train", CLASSES), train)
    assert_same(read_voc(tmp_path, "val", CLASSES), val)
    assert formats.voc_class_names(tmp_path, formats.voc_split_ids(tmp_path, "train")) == sorted(
        {CLASSES[int(label)] for _, _, labels in train for label in labels})


def test_coco_round_trip(tmp_path):
    data = samples(5)
    write_coco(tmp_path / "instances.json", tmp_path / "images", data, CLASSES)
    assert_same(read_coco(tmp_path / "instances.json", tmp_path / "images"), data)


def test_yolo_round_trip(tmp_path):
    train = samples(3)
    data_yaml = write_yolo(tmp_path, {"train": train, "val": samples(1, 2)}, CLASSES)
    assert_same(read_yolo(data_yaml, "train"), train)
    assert len(read_yolo(tmp_path, "val").records) == 1  # the folder holding data.yaml works too


# ---------------------------------------------------------------------------------------------- written by hand
# The round trips above read what our own writers wrote, so a misreading shared by both would pass. These files
# are written by hand as the real tools write them, and the expected boxes worked out by hand.


def jpeg(path: Path, width: int, height: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (120, 80, 40)).save(path, format="JPEG")


VOC_XML = """<annotation>
	<folder>VOC2007</folder>
	<filename>000005.jpg</filename>
	<source>
		<database>The VOC2007 Database</database>
		<annotation>PASCAL VOC2007</annotation>
		<image>flickr</image>
	</source>
	<size>
		<width>64</width>
		<height>48</height>
		<depth>3</depth>
	</size>
	<segmented>0</segmented>
	<object>
		<name>dog</name>
		<pose>Left</pose>
		<truncated>1</truncated>
		<difficult>0</difficult>
		<bndbox>
			<xmin>1</xmin>
			<ymin>2</ymin>
			<xmax>30</xmax>
			<ymax>40</ymax>
		</bndbox>
	</object>
	<object>
		<name>cat</name>
		<pose>Unspecified</pose>
		<truncated>0</truncated>
		<difficult>1</difficult>
		<bndbox>
			<xmin>33</xmin>
			<ymin>5</ymin>
			<xmax>64</xmax>
			<ymax>48</ymax>
		</bndbox>
	</object>
</annotation>
"""


def test_voc_file_written_by_hand(tmp_path):
    """VOC's pixel indices are 1-based and inclusive: xmin 1 .. xmax 30 is the 30 pixels [0, 30) of our frame."""
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "Annotations" / "000005.xml").write_text(VOC_XML)
    jpeg(tmp_path / "JPEGImages" / "000005.jpg", 64, 48)
    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Main" / "train.txt").write_text("000005\n")
    (tmp_path / "ImageSets" / "Main" / "dog_train.txt").write_text("000005  1\n")  # the devkit's per-class lists
    assert formats.voc_class_names(tmp_path, ["000005"]) == ["cat", "dog"]
    (record,) = read_voc(tmp_path, "train", CLASSES).records
    assert (record.width, record.height, record.image.name) == (64, 48, "000005.jpg")
    np.testing.assert_array_equal(record.boxes, [[0, 1, 30, 40], [32, 4, 64, 48]])
    np.testing.assert_array_equal(record.labels, [1, 0])


COCO_JSON = """{
  "info": {"description": "COCO 2017 Dataset", "version": "1.0", "year": 2017},
  "licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1, "name": "BY-NC-SA"}],
  "images": [
    {"license": 1, "file_name": "000000397133.jpg", "height": 48, "width": 64, "id": 397133},
    {"license": 1, "file_name": "000000037777.jpg", "height": 32, "width": 40, "id": 37777}
  ],
  "annotations": [
    {"segmentation": [[10.5, 4.25, 30.5, 4.25, 30.5, 35.0]], "area": 615.0, "iscrowd": 0, "image_id": 397133,
     "bbox": [10.5, 4.25, 20.0, 30.75], "category_id": 18, "id": 1768},
    {"segmentation": [[40, 10, 52.5, 10, 52.5, 30]], "area": 250.0, "iscrowd": 0, "image_id": 397133,
     "bbox": [40, 10, 12.5, 20], "category_id": 1, "id": 1769},
    {"segmentation": {"counts": [0, 3072], "size": [48, 64]}, "area": 3072, "iscrowd": 1, "image_id": 397133,
     "bbox": [0, 0, 64, 48], "category_id": 1, "id": 900100397133}
  ],
  "categories": [
    {"supercategory": "animal", "id": 18, "name": "dog"},
    {"supercategory": "person", "id": 1, "name": "person"}
  ]
}
"""


def test_coco_file_written_by_hand(tmp_path):
    """COCO boxes are [x, y, width, height]; labels follow the category ids sorted; crowd regions are no objects;
    an image without annotations is a background image."""
    (tmp_path / "instances_train2017.json").write_text(COCO_JSON)
    jpeg(tmp_path / "train2017" / "000000397133.jpg", 64, 48)
    jpeg(tmp_path / "train2017" / "000000037777.jpg", 40, 32)
    data = read_coco(tmp_path / "instances_train2017.json", tmp_path / "train2017")
    assert data.classes == ["person", "dog"]
    first, second = data.records
    assert (first.width, first.height, second.width, second.height) == (64, 48, 40, 32)
    np.testing.assert_array_equal(first.boxes, [[10.5, 4.25, 30.5, 35.0], [40, 10, 52.5, 30]])
    np.testing.assert_array_equal(first.labels, [1, 0])
    assert second.boxes.shape == (0, 4) and second.labels.shape == (0,)


def test_yolo_files_written_by_hand(tmp_path):
    """YOLO label lines are `class cx cy w h`, normalised by the image's width and height; names may be a
    mapping; an image without a label file is a background image."""
    (tmp_path / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames:\n  0: person\n"
                                        "  1: car\n")
    jpeg(tmp_path / "images" / "train" / "street.jpg", 64, 48)
    jpeg(tmp_path / "images" / "val" / "empty.jpg", 64, 48)
    (tmp_path / "labels" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "train" / "street.txt").write_text("1 0.5 0.5 0.25 0.5\n0 0.125 0.25 0.25 0.5\n")
    (record,) = read_yolo(tmp_path / "data.yaml", "train").records
    assert read_yolo(tmp_path / "data.yaml", "train").classes == ["person", "car"]
    # car: centre (32, 24), 16 x 24 pixels; person: centre (8, 12), 16 x 24 pixels
    np.testing.assert_allclose(record.boxes, [[24, 12, 40, 36], [0, 0, 16, 24]], atol=1e-4)
    np.testing.assert_array_equal(record.labels, [1, 0])
    (empty,) = read_yolo(tmp_path / "data.yaml", "val").records
    assert empty.boxes.shape == (0, 4)


def test_zero_area_boxes_are_dropped_and_reported(tmp_path):
    image, boxes, labels = samples(1)[0]
    boxes = np.concatenate([boxes, [[10, 10, 10, 20]]]).astype(np.float32)  # zero width
    write_coco(tmp_path / "i.json", tmp_path / "images", [(image, boxes, np.append(labels, 0))], CLASSES)
    data = read_coco(tmp_path / "i.json", tmp_path / "images")
    assert len(data.records[0].labels) == len(labels) and len(data.dropped) == 1
    assert "i.json" in data.dropped[0] and "zero-area" in data.dropped[0]
    with pytest.warns(DataWarning, match="1 unusable box"):
        formats.report_dropped("coco", data.dropped)


def test_voc_errors_name_the_file(tmp_path):
    write_voc(tmp_path, {"train": samples(2)}, CLASSES)
    xml = tmp_path / "Annotations" / "train_000001.xml"
    text = xml.read_text()
    name = text.split("<name>")[1].split("</name>")[0]
    xml.write_text(text.replace(f"<name>{name}</name>", "<name>zebra</name>", 1))
    with pytest.raises(DataError, match=r"train_000001\.xml: object 0 has unknown class name 'zebra'; known "
                                        r"classes: cat, dog, bird"):
        read_voc(tmp_path, "train", CLASSES)
    xml.write_text(text.replace("<xmax>", "<xmax>9", 1))  # far past the 48-pixel width
    with pytest.raises(DataError, match=r"train_000001\.xml: box .* lies outside the 48x40 image"):
        read_voc(tmp_path, "train", CLASSES)
    xml.write_text(text[:-30])
    with pytest.raises(DataError, match=r"train_000001\.xml: not valid XML"):
        read_voc(tmp_path, "train", CLASSES)
    xml.write_text(text)
    (tmp_path / "JPEGImages" / "train_000000.jpg").unlink()
    with pytest.raises(DataError, match=r"train_000000\.xml: its image .*train_000000\.jpg does not exist"):
        read_voc(tmp_path, "train", CLASSES)
    with pytest.raises(DataError, match=r"test\.txt: no such split file \(found: train\)"):
        read_voc(tmp_path, "test", CLASSES)


def test_coco_errors_name_the_file(tmp_path):
    path = write_coco(tmp_path / "i.json", tmp_path / "images", samples(2), CLASSES)
    good = json.loads(path.read_text())
    broken = json.loads(path.read_text())
    broken["annotations"][0]["category_id"] = 99
    path.write_text(json.dumps(broken))
    with pytest.raises(DataError, match=r"i\.json: annotation 0 has unknown category_id 99"):
        read_coco(path, tmp_path / "images")
    broken = json.loads(json.dumps(good))
    broken["annotations"][0]["bbox"] = [40, 30, 30, 30]
    path.write_text(json.dumps(broken))
    with pytest.raises(DataError, match=r"i\.json \(image 000000\.png\): box .* lies outside"):
        read_coco(path, tmp_path / "images")
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match=r"i\.json: not a COCO instances file \(missing 'categories'\)"):
        read_coco(path, tmp_path / "images")
    path.write_text("{")
    with pytest.raises(DataError, match=r"i\.json: not valid JSON"):
        read_coco(path, tmp_path / "images")
    path.write_text(json.dumps(good))
    (tmp_path / "images" / "000001.png").unlink()
    with pytest.raises(DataError, match=r"i\.json \(image id 2\): its image .*000001\.png does not exist"):
        read_coco(path, tmp_path / "images")


def test_yolo_errors_name_the_file(tmp_path):
    data_yaml = write_yolo(tmp_path, {"train": samples(2)}, CLASSES)
    label = tmp_path / "labels" / "train" / "000001.txt"
    text = label.read_text()
    label.write_text("7 0.5 0.5 0.1 0.1\n")
    with pytest.raises(DataError, match=r"000001\.txt:1: unknown class index 7"):
        read_yolo(data_yaml, "train")
    label.write_text("0 0.5 0.5\n")
    with pytest.raises(DataError, match=r"000001\.txt:1: expected `class cx cy w h`"):
        read_yolo(data_yaml, "train")
    label.write_text("0 0.5 0.5 1.8 0.2\n")
    with pytest.raises(DataError, match=r"000001\.txt: box .* lies outside"):
        read_yolo(data_yaml, "train")
    label.write_text(text)
    with pytest.raises(DataError, match=r"data\.yaml: has no 'test' split"):
        read_yolo(data_yaml, "test")


@pytest.mark.skipif(not BCCD.is_dir(), reason="BCCD is not present at ../shared/data/bccd")
def test_bccd_reads_through_the_voc_path():
    ids = formats.voc_split_ids(BCCD, "train")
    classes = formats.voc_class_names(BCCD, ids)
    assert classes == ["Platelets", "RBC", "WBC"]
    splits = {s: read_voc(BCCD, s, classes) for s in ("train", "val", "test")}
    assert [len(s) for s in splits.values()] == [205, 87, 72]
    dropped = [line for s in splits.values() for line in s.dropped]
    assert len(dropped) == 2 and all("zero-area" in line for line in dropped)
    record = splits["train"].records[0]
    assert (record.width, record.height) == (640, 480)
    assert (record.boxes[:, 2] <= 640).all() and (record.boxes[:, :2] >= 0).all()


# ---------------------------------------------------------------------------------------------- VOC as users have it


@pytest.mark.parametrize("layout", ["lower", "mixed", "beside"])
def test_voc_layouts_of_labelling_tools_read_without_split_files(tmp_path, layout):
    data = samples(5)
    root = write_labelling_tool_voc(tmp_path, data, CLASSES, layout)
    found = formats.find_voc_layout(root)
    assert found.splits == {} and len(found.all_ids()) == 5
    assert_same(formats.read_voc_ids(found, found.all_ids(), CLASSES), data)


def test_voc_image_is_found_by_the_xml_name_when_filename_disagrees(tmp_path):
    root = write_labelling_tool_voc(tmp_path, samples(2), CLASSES, "lower")
    xml = root / "annotations" / "train_000000.xml"
    # LabelImg keeps the name the image had when it was labelled; CVAT writes the name without the extension.
    xml.write_text(xml.read_text().replace("<filename>train_000000.jpg", "<filename>IMG_0042.JPG"))
    layout = formats.find_voc_layout(root)
    assert formats.read_voc_ids(layout, ["train_000000"], CLASSES).records[0].image.name == "train_000000.jpg"
    (root / "images" / "train_000000.jpg").unlink()
    with pytest.raises(DataError, match=r"train_000000\.xml: its image .*IMG_0042\.JPG does not exist"):
        formats.read_voc_ids(layout, ["train_000000"], CLASSES)


def test_voc_folder_without_annotations_says_which_layouts_work(tmp_path):
    (tmp_path / "pictures").mkdir()
    with pytest.raises(DataError, match=r"no VOC annotations found \(got folders: pictures\); expected Annotations/ "
                                        r"\+ JPEGImages/ \(VOCdevkit\), annotations/ \+ images/"):
        formats.find_voc_layout(tmp_path)
