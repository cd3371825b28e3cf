"""The README's results are the committed results: every number in its Results and What we found sections is one
that a committed results file holds, and each committed results.md is what main.py writes from its results.json."""
import json
import math
import re
import subprocess

import pytest

import main
from conftest import ROOT

# the committed studies the README reports, by name: a run's own folders (plots/latest/, where a quick run writes, or
# any other out-dir under plots/) are not studies
STUDIES = [ROOT / "plots" / name for name in ("mnist", "rotated", "fashion", "memory")]
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
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", "plots"], capture_output=True, text=True).stdout
    for study in STUDIES:
        assert f"plots/{study.name}/results.json" in tracked.split()  # committed, not a run's own output
        assert f"(plots/{study.name}/results.md)" in results_sections()


def test_every_number_in_the_readmes_results_is_in_a_committed_results_file():
    missing = sorted(numbers(results_sections()) - numbers_in_results())
    assert not missing, f"numbers in the README's results that no committed results file holds: {missing}"


@pytest.mark.parametrize("study", STUDIES, ids=lambda p: p.name)
def test_each_results_md_is_what_main_writes_from_its_results_json(study):
    results = main.read_results(study / "results.json", "")  # a results file of this script, of this format
    assert main.results_markdown(results) == (study / "results.md").read_text()


@pytest.mark.parametrize("study", ["mnist", "memory"])
def test_replot_redraws_a_committed_study_from_its_results_json(study, tmp_path, capsys):
    code = main.main(["--replot", str(ROOT / "plots" / study), "--out-dir", str(tmp_path)])
    assert code == 0 and (tmp_path / "results.md").read_text() == (ROOT / "plots" / study / "results.md").read_text()
    committed = {p.name for p in (ROOT / "plots" / study).glob("*.png")}
    assert committed and committed == {p.name for p in tmp_path.glob("*.png")}


@pytest.mark.parametrize("study", STUDIES[:3], ids=lambda p: p.name)
def test_every_tested_run_of_a_committed_study_holds_its_per_image_test_results(study):
    """Each paired interval of the README holds the test set's noise: every tested run carries which test images
    it got right, and those bits give back its recorded test accuracy."""
    results = main.add_summary(json.loads((study / "results.json").read_text()))
    n = results["config"]["test_size"]
    for r in results["runs"] + results["other_runs"]:
        right = main.right_bits(r["test_right"], n)
        assert len(r["test_right"]) == 2 * math.ceil(n / 8) and 100 * right.sum() / n == pytest.approx(r["test_acc"])
    assert all(c["noise"] == "seed and test-set" for c in results["contrasts"])
    # four adapters: each against full FT and head only, three against LoRA (11); Fashion-MNIST's two variant rows
    # add against full FT, head only and LoRA each, and the storage-budget row against its own row (18)
    assert len(results["contrasts"]) == {"mnist": 11, "rotated": 11, "fashion": 18}[study.name]
    qlora = [r for r in results["runs"] if r["method"] == "qlora" and r["rank"] == results["config"]["rank"]]
    for r in qlora:  # and as PEFT loads its adapter, on the fp32 base
        assert 100 * main.right_bits(r["test_right_in_peft"], n).sum() / n == pytest.approx(r["test_acc_in_peft"])
    assert len(qlora) == len(results["seeds"]) and results["summary"]["qlora"]["in_peft"]["vs_trained"]["noise"] == (
        "seed and test-set")
