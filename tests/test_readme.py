"""The README's results are the committed results: every number in its Results and What we found sections is one
that a committed results file holds, and each committed results.md is what main.py writes from its results.json."""
import json
import re
import shutil

import pytest

import main
from conftest import ROOT

STUDIES = sorted(p.parent for p in (ROOT / "plots").glob("*/results.json"))
NUMBER = re.compile(r"(?<![\d.,])[+\-−]?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+\.\d+)(?![\d.]*\d)")  # 1.23, 12,498, −0.5


def numbers(text):
    return {n.replace("−", "-").lstrip("+") for n in NUMBER.findall(text)}


def numbers_in_results():
    """Every number the committed results files hold: what their results.md print, and every number of their
    JSON files (results.json, adalora.json) as the text may round it."""
    found = set()

    def walk(value):
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            found.update(f.format(value).lstrip("+") for f in ("{:.2f}", "{:.1f}", "{:,.0f}", "{:,.2f}"))
    for study in STUDIES:
        found |= numbers((study / "results.md").read_text())
        for name in ("results.json", "adalora.json"):
            if (study / name).is_file():
                walk(json.loads((study / name).read_text()))
    return found


def results_sections():
    readme = (ROOT / "README.md").read_text()
    return readme[readme.index("## Results"):readme.index("## Install")]


def test_the_committed_studies_are_the_readmes():
    assert {s.name for s in STUDIES} == {"fashion", "mnist", "rotated"}
    for study in STUDIES:
        assert f"(plots/{study.name}/results.md)" in results_sections()


def test_every_number_in_the_readmes_results_is_in_a_committed_results_file():
    missing = sorted(numbers(results_sections()) - numbers_in_results())
    assert not missing, f"numbers in the README's results that no committed results file holds: {missing}"


@pytest.mark.parametrize("study", STUDIES, ids=lambda p: p.name)
def test_each_results_md_is_what_main_writes_from_its_results_json(study, tmp_path):
    shutil.copy(study / "results.json", tmp_path / "results.json")
    results = json.loads((tmp_path / "results.json").read_text())
    main.check_results_file(results)  # a results file of this script, every field it reads there
    main.save_results(results, tmp_path)
    assert (tmp_path / "results.md").read_text() == (study / "results.md").read_text()
