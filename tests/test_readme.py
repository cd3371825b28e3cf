"""The README's results are the committed results: each table row of its results is that row of the committed
results.md of the study its section names, each interval of its findings one those files hold, and each committed
results.md is what main.py writes from its results.json."""
import json
import math
import re
import subprocess

import pytest

import main
from conftest import ROOT

import adalora_side_by_side as adalora  # tests/ is on the path: pytest's rootdir-relative import

STUDIES = [ROOT / "plots" / name for name in ("mnist", "rotated", "fashion", "memory")]
NUMBER = re.compile(r"(?<![\d.,])[+\-−]?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+\.\d+)(?![\d.]*\d)")  # 1.23, 12,498, −0.5
INTERVAL = re.compile(r"[+\-−]?\d+\.\d+ \[[+\-−]?\d+\.\d+, [+\-−]?\d+\.\d+\]")  # −0.21 [−0.54, +0.12]


def numbers(text):
    return {n.replace("−", "-").lstrip("+") for n in NUMBER.findall(text)}


def plain(text):
    """The same number however written: − as -, no + sign."""
    return re.sub(r"\+(?=\d)", "", text.replace("−", "-"))


def table_rows(text):
    """{first cell: [the rows' cells]} of every markdown table row in `text` (headers and separators too)."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not set(line) <= set("|-: "):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows.setdefault(cells[0], []).append(cells)
    return rows


def adalora_table(study):
    return adalora.table(json.loads((study / "results.json").read_text()),
                         json.loads((study / "adalora.json").read_text()))


def committed_text(study):
    """What a study's README section may cite: its results.md, and its AdaLoRA table where it has one."""
    text = (study / "results.md").read_text()
    return text + ("\n" + adalora_table(study) if (study / "adalora.json").is_file() else "")


def readme_sections():
    """(the study a part of the README's results names first, that part's text): the headline's accuracy and
    its memory, then each numbered section."""
    readme = (ROOT / "README.md").read_text()
    results = readme[readme.index("**Which method?**"):readme.index("## What we found")]
    parts = re.split(r"\n(?=### |\*\*And for memory\?\*\*)", results)
    return [(re.search(r"plots/(\w+)/", part).group(1), part) for part in parts]


def findings():
    readme = (ROOT / "README.md").read_text()
    return readme[readme.index("## What we found"):readme.index("## How it works")]


def test_the_committed_studies_are_the_readmes():
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", "plots"], capture_output=True, text=True).stdout
    for study in STUDIES:
        assert f"plots/{study.name}/results.json" in tracked.split()  # committed, not a run's own output
        assert f"(plots/{study.name}/results.md)" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("index", range(7))
def test_each_table_row_of_the_readmes_results_is_that_row_of_its_studys_results(index):
    """A row's numbers all sit in one row of the same name in the results.md of the study its section names (the
    memory section: the memory study's, or any study's memory table, which is the same in every study)."""
    name, text = readme_sections()[index]
    sources = [ROOT / "plots" / name] + ([ROOT / "plots" / "mnist"] if name == "memory" else [])
    theirs = {}
    for study in sources:
        for label, rows in table_rows(committed_text(study)).items():
            theirs.setdefault(label, []).extend(rows)
    mine = [cells for rows in table_rows(text).values() for cells in rows if numbers(" ".join(cells[1:]))]
    assert mine  # every part of the results shows a table
    for cells in mine:
        wanted = numbers(plain(" ".join(cells[1:])))
        assert any(wanted <= numbers(plain(" ".join(row[1:]))) for row in theirs.get(cells[0], [])), (
            f"README row {cells[0]!r} ({sorted(wanted)}) is no row of plots/{name}'s results")


def test_every_interval_in_the_findings_is_one_a_committed_file_holds():
    held = plain("\n".join(committed_text(study) for study in STUDIES))
    cited = [plain(i) for i in INTERVAL.findall(findings())]
    assert cited and not [i for i in cited if i not in held], "intervals no committed results file holds"


def test_every_number_in_the_findings_is_in_a_committed_results_file():
    held = set()
    for study in STUDIES:
        held |= numbers(committed_text(study))
        for name in ("results.json", "adalora.json"):
            if (study / name).is_file():
                stack = [json.loads((study / name).read_text())]
                while stack:
                    value = stack.pop()
                    if isinstance(value, dict):
                        stack += value.values()
                    elif isinstance(value, list):
                        stack += value
                    elif isinstance(value, (int, float)) and not isinstance(value, bool):
                        held |= {f.format(value).lstrip("+") for f in ("{:.2f}", "{:.1f}", "{:,.0f}", "{:,.2f}")}
    missing = sorted(numbers(findings()) - held)
    assert not missing, f"numbers in the README's findings that no committed results file holds: {missing}"


@pytest.mark.parametrize("study", STUDIES, ids=lambda p: p.name)
def test_each_results_md_is_what_main_writes_from_its_results_json(study):
    results = main.read_results(study / "results.json", "")  # a results file of this script, of this format
    assert main.results_markdown(results) == (study / "results.md").read_text()


@pytest.mark.parametrize("study", ["mnist", "memory"])
def test_replot_redraws_a_committed_study_from_its_results_json(study, tmp_path, capsys):
    code = main.main(["--replot", str(ROOT / "plots" / study), "--out-dir", str(tmp_path / "out")])
    assert code == 0 and (tmp_path / "out" / "results.md").read_text() == (ROOT / "plots" / study / "results.md").read_text()
    committed = {p.name for p in (ROOT / "plots" / study).glob("*.png")}
    assert committed and committed == {p.name for p in (tmp_path / "out").glob("*.png")}


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
