"""The benchmark description and the generated images (metrics/cases.py): reading the project's
cases.json and a user's "cases" list, the errors of a bad file, finding the generated images of each
case, selecting cases. The benchmark file and DreamBench photos come from the project's shared data
folder ($PERSONALIZE_TEST_DATA, default /work/shared/data); the tests that need it skip without it."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from personalize_pack.metrics.cases import (Case, Subject, discover_images, load_cases, parse_cases, select_cases,
                                            unmatched_entries)
from personalize_pack.metrics.errors import EvaluationError, UsageError
from personalize_pack.metrics.evaluate import Scorers, evaluate
from benchmark_cases import ALL_NAMES, CASES_JSON, DATA, by_name, needs_data



# ------------------------------------------------------------------------------------- cases.json

@needs_data
def test_shared_cases_json_names_and_order():
    cases = load_cases(CASES_JSON)
    assert [c.name for c in cases] == ALL_NAMES        # the file's key order


@needs_data
def test_shared_cases_json_subjects_prompts_and_references():
    c = by_name(load_cases(CASES_JSON))
    cat_and_dog = c["cat_and_dog"]
    assert cat_and_dog.prompt == "a cat and a dog sitting together on a sofa"
    assert cat_and_dog.threshold is None
    assert [(s.name, s.query) for s in cat_and_dog.subjects] == [("cat", "cat"), ("dog", "dog")]
    assert [s.reference_paths for s in cat_and_dog.subjects] == [[DATA / "dreambench/cat/04.jpg"],
                                                                [DATA / "dreambench/dog6/02.jpg"]]
    three = c["two_cats_and_dog"]
    assert [s.query for s in three.subjects] == ["cat", "cat", "dog"]
    assert [s.reference_paths[0] for s in three.subjects] == [DATA / "dreambench/cat/04.jpg",
                                                             DATA / "dreambench/cat2/02.jpg",
                                                             DATA / "dreambench/dog6/02.jpg"]
    assert c["dog_and_teapot"].subjects[1].reference_paths == [DATA / "dreambench/teapot/00.jpg"]

    demo = c["detect_and_compare_demo"]
    assert demo.prompt is None and demo.threshold == 0.4
    assert [s.query for s in demo.subjects] == ["monster toy", "robot toy"]
    assert [s.name for s in demo.subjects] == ["monster_toy", "robot_toy"]
    for s, folder in zip(demo.subjects, ["monster_toy", "robot_toy"]):
        assert s.reference_paths == [DATA / "dreambench" / folder / f"0{i}.jpg" for i in range(3)]

    mip = c["mip_combination_2"]
    assert mip.prompt == "A pet cat playing with dice on a sidewalk."
    assert [s.query for s in mip.subjects] == ["cat", "dice"]
    assert [s.reference_paths for s in mip.subjects] == [[DATA / "mip_adapter_combinations/combination_2/cat.jpg"],
                                                        [DATA / "mip_adapter_combinations/combination_2/dice.jpg"]]
    assert [s.query for s in c["mip_combination_3"].subjects] == ["barn", "dog"]

    mudi = c["mudi_dog6_dog2"]
    assert mudi.prompt is None
    assert [(s.name, s.query) for s in mudi.subjects] == [("dog6", "dog"), ("dog2", "dog")]
    assert mudi.subjects[1].reference_paths == [DATA / f"dreambench/dog2/0{i}.jpg" for i in (0, 3, 4)]
    assert [s.query for s in c["mudi_can_monster_toy"].subjects] == ["can", "toy"]

    cat2 = c["dreambench_cat2"]
    assert cat2.prompt is None and len(cat2.subjects) == 1
    assert (cat2.subjects[0].name, cat2.subjects[0].query) == ("cat2", "cat")
    assert cat2.subjects[0].reference_paths == [DATA / "dreambench/cat2/00.jpg", DATA / "dreambench/cat2/02.jpg"]


@needs_data
def test_data_root_moves_the_relative_paths(tmp_path):
    (tmp_path / "b.json").write_text('{"about": "ignored", "cases": [{"name": "x", '
                                     '"subjects": [{"name": "cat", "images": ["dreambench/cat"]}]}]}')
    with pytest.raises(EvaluationError, match="dreambench/cat does not exist"):
        load_cases(tmp_path / "b.json")              # relative to the JSON file's folder
    (case,) = load_cases(tmp_path / "b.json", data_root=DATA)
    assert case.subjects[0].reference_paths == [DATA / f"dreambench/cat/0{i}.jpg" for i in (0, 3, 4)]


# ------------------------------------------------------------------------------ a "cases" list

def make_refs(root: Path):
    (root / "refs/dog").mkdir(parents=True)
    for name, colour in [("01.jpg", (200, 10, 10)), ("00.png", (10, 200, 10)), ("00_mask.png", (255, 255, 255)),
                         ("Mask-dog.jpg", (0, 0, 0))]:
        Image.new("RGB", (20, 16), colour).save(root / "refs/dog" / name)
    (root / "refs/dog/notes.txt").write_text("not an image")
    Image.new("RGB", (16, 16), (0, 0, 200)).save(root / "refs/cat.webp")


def test_generic_cases_file(tmp_path):
    make_refs(tmp_path)
    obj = {"about": "unknown keys are ignored",
           "cases": [{"name": "pets", "prompt": "a cat and a dog", "threshold": 0.25, "extra": 1,
                      "subjects": [{"name": "cat", "query": "tabby cat", "images": ["refs/cat.webp"]},
                                   {"name": "dog", "images": ["refs/dog"]}]},
                     {"name": "just_a_dog", "subjects": [{"name": "dog", "images": "refs/dog/01.jpg"}]}]}
    pets, dog = parse_cases(obj, tmp_path)
    assert (pets.name, pets.prompt, pets.threshold) == ("pets", "a cat and a dog", 0.25)
    assert [(s.name, s.query) for s in pets.subjects] == [("cat", "tabby cat"), ("dog", "dog")]
    assert pets.subjects[0].reference_paths == [tmp_path / "refs/cat.webp"]
    # a folder: its images without "mask" in the name, sorted
    assert pets.subjects[1].reference_paths == [tmp_path / "refs/dog/00.png", tmp_path / "refs/dog/01.jpg"]
    assert (dog.prompt, dog.threshold) == (None, None)
    assert dog.subjects[0].reference_paths == [tmp_path / "refs/dog/01.jpg"]


@pytest.mark.parametrize("obj, message", [
    ({"cases": [{"name": "pets", "subjects": [{"name": "cat", "images": ["refs/cat.webp", "refs/missing.png"]}]}]},
     r"case pets, subject cat: reference image .*refs/missing.png does not exist"),
    ({"cases": [{"name": "pets", "subjects": [{"name": "cat", "images": ["refs/cat.webp"]}]},
                {"name": "pets", "subjects": [{"name": "dog", "images": ["refs/dog"]}]}]},
     r"case pets: the name appears twice"),
    ({"about": "x", "references": []},
     r"has none of the keys this tool reads \(multi_reference_cases, mip_adapter_combinations, "
     r"mudi_pairs_using_dreambench, detect_and_compare_demo, dreambench_subjects, cases\); its keys: about, references"),
    ({"cases": [{"name": "pets", "subjects": []}]}, r"case pets: the subject list is empty"),
    ({"cases": [{"name": "pets", "threshold": 2, "subjects": [{"name": "cat", "images": ["refs/cat.webp"]}]}]},
     r"case pets: threshold must be a number from 0 to 1"),
    ({"cases": [{"name": "a/b", "subjects": [{"name": "cat", "images": ["refs/cat.webp"]}]}]},
     r"may not be empty, contain /"),
    ({"cases": [{"name": "pets", "subjects": [{"name": "cat"}]}]}, r"case pets, subject cat: no images"),
    ({"cases": []}, r"cases hold no cases"),
    ({"dreambench_subjects": {"cat": {"class": "cat", "images": ["refs/cat.webp"]}},
      "mudi_pairs_using_dreambench": {"pairs": [["cat", "dog9"]]}},
     r"case mudi_cat_dog9: 'dog9' is not in dreambench_subjects"),
    ({"masked_references": [{"image": "refs/cat.webp", "concept": "a cat"}],
      "multi_reference_cases": [{"name": "m", "refs": [0, 1], "target_prompt": "p"}]},
     r"case m: ref 1 is not an index into masked_references"),
])
def test_benchmark_errors(tmp_path, obj, message):
    make_refs(tmp_path)
    with pytest.raises(EvaluationError, match=message):
        parse_cases(obj, tmp_path, "bench.json")


def test_load_cases_file_errors(tmp_path):
    with pytest.raises(UsageError, match="nope.json does not exist"):
        load_cases(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(EvaluationError, match="bad.json is not a JSON file"):
        load_cases(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(EvaluationError, match="list.json: expected a JSON object"):
        load_cases(tmp_path / "list.json")


# ----------------------------------------------------------------------------- generated images

def case(name):
    return Case(name, None, [Subject("s", "s", [Path("unused.png")])])


def touch_image(path, size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (1, 2, 3)).save(path)


def test_discover_images_subfolders_prefixes_and_longest_name(tmp_path):
    for rel in ["cat_and_dog/b.png", "cat_and_dog/a.jpg", "cat_and_dog/c.JPEG", "cat_and_dog/x.webp",
                "cat_1.png", "cat.jpg", "cat_and_dog_7.png", "catalog.png", "dog2_0.png", "other/z.png"]:
        touch_image(tmp_path / rel)
    (tmp_path / "cat_and_dog/notes.txt").write_text("no")
    (tmp_path / "cat_2.txt").write_text("no")
    cases = [case("cat"), case("cat_and_dog"), case("dog")]
    found = discover_images(tmp_path, cases)
    rel = {k: [p.relative_to(tmp_path).as_posix() for p in v] for k, v in found.items()}
    assert rel == {"cat": ["cat.jpg", "cat_1.png"],      # not cat_and_dog_7.png: the longer name wins
                   "cat_and_dog": ["cat_and_dog/a.jpg", "cat_and_dog/b.png", "cat_and_dog/c.JPEG",
                                   "cat_and_dog/x.webp", "cat_and_dog_7.png"],
                   "dog": []}                           # dog2_0.png is not dog's
    # a file of a case that is known but not selected stays with that case
    only_cat = discover_images(tmp_path, [case("cat")], known_names=["cat_and_dog"])
    assert [p.name for p in only_cat["cat"]] == ["cat.jpg", "cat_1.png"]
    assert unmatched_entries(tmp_path, ["cat", "cat_and_dog", "dog"]) == ["catalog.png", "dog2_0.png", "other/"]


def test_select_cases():
    cases = [case("a"), case("b"), case("c")]
    assert [c.name for c in select_cases(cases, "c, a")] == ["a", "c"]      # benchmark order
    assert select_cases(cases, None) == cases
    with pytest.raises(UsageError, match=r"--cases: x, y not in the benchmark \(its cases: a, b, c\)"):
        select_cases(cases, "a,x,y")
    with pytest.raises(UsageError, match="no case names"):
        select_cases(cases, " , ")


def test_no_images_for_any_selected_case(tmp_path):
    touch_image(tmp_path / "b_0.png")
    scorers = Scorers(dino=object())
    with pytest.raises(EvaluationError, match=r"no generated images for any of the 1 selected cases in .*<case>/\*.png"):
        evaluate([case("a")], tmp_path, scorers, known_names=["a", "b"])
