"""The shared data folder's benchmark description (``cases.json``) as the evaluation tests use it:
where it is (``$PERSONALIZE_TEST_DATA``, default /work/shared/data), the skip when it is absent, and the
case names it holds."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

DATA = Path(os.environ.get("PERSONALIZE_TEST_DATA", "/work/shared/data"))
CASES_JSON = DATA / "cases.json"
needs_data = pytest.mark.skipif(not CASES_JSON.is_file(),
                                reason=f"{CASES_JSON} is not here (set PERSONALIZE_TEST_DATA to the shared data folder)")

DREAMBENCH_NAMES = ["dreambench_dog6", "dreambench_dog2", "dreambench_cat", "dreambench_cat2",
                    "dreambench_monster_toy", "dreambench_robot_toy", "dreambench_teapot", "dreambench_can",
                    "dreambench_red_cartoon"]
ALL_NAMES = DREAMBENCH_NAMES + ["cat_and_dog", "dog_and_teapot", "two_cats_and_dog", "detect_and_compare_demo",
                                "mip_combination_1", "mip_combination_2", "mip_combination_3",
                                "mudi_dog6_dog2", "mudi_can_monster_toy", "mudi_monster_toy_robot_toy"]


def by_name(cases):
    return {c.name: c for c in cases}
