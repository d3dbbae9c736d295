"""Study cells are reused only when spec, upstream cells and code are unchanged."""
import json
import subprocess
import sys

from distil_scale.tools.study_cells import STARTED, Cells, code_version


def _chain(cells: Cells, lr: float, steps: int, probe: int) -> dict:
    """teacher -> student (lr, steps) -> probe (probe size), each writing a file it reads back."""
    def write(value):
        def run(d):
            (d / "out.txt").write_text(str(value))
            return {"value": value}
        return run
    t = cells.run("teacher", {"steps": 5}, write("t"))
    s = cells.run("student", {"lr": lr, "steps": steps}, write(f"s{lr}/{steps}"), upstream=(t,))
    p = cells.run("probe", {"n": probe}, write(f"p{probe}"), upstream=(s,))
    return {"teacher": t, "student": s, "probe": p}


def test_a_changed_setting_reruns_what_it_reaches_and_reuses_the_rest(tmp_path):
    said = []
    first = Cells(tmp_path, "code-1", say=said.append)
    r1 = _chain(first, 1e-3, 10, 100)
    assert first.ran == ["teacher", "student", "probe"] and first.reused == []
    assert json.loads((tmp_path / "student" / "cell.json").read_text())["result"] == {
        "value": "s0.001/10"}

    same = Cells(tmp_path, "code-1", say=said.append)
    assert _chain(same, 1e-3, 10, 100) == r1 and same.ran == [] and said == []

    probe_only = Cells(tmp_path, "code-1", say=said.append)
    _chain(probe_only, 1e-3, 10, 200)
    assert probe_only.ran == ["probe"] and probe_only.reused == ["teacher", "student"]
    assert said == ["probe: changed (settings n); running it again"]
    assert (tmp_path / "probe" / "out.txt").read_text() == "p200"

    said.clear()
    student = Cells(tmp_path, "code-1", say=said.append)
    _chain(student, 1e-3, 20, 200)  # the student's change reaches its probe through upstream
    assert student.ran == ["student", "probe"] and student.reused == ["teacher"]
    assert said == ["student: changed (settings steps); running it again",
                    "probe: changed (an upstream cell); running it again"]

    new_code = Cells(tmp_path, "code-2", say=lambda m: None)
    _chain(new_code, 1e-3, 20, 200)
    assert new_code.ran == ["teacher", "student", "probe"]


def test_an_interrupted_cell_keeps_its_files_only_for_the_same_key(tmp_path):
    cells = Cells(tmp_path, "c")

    def crash(d):
        (d / "checkpoint").write_text("half")
        raise KeyboardInterrupt

    for spec in ({"steps": 10}, {"steps": 10}):
        try:
            cells.run("run", spec, crash)
        except KeyboardInterrupt:
            pass
    seen = []
    cells.run("run", {"steps": 10}, lambda d: seen.append((d / "checkpoint").exists()) or {})
    assert seen == [True]  # the same experiment resumes from what it left
    (tmp_path / "run" / "cell.json").unlink()
    (tmp_path / "run" / STARTED).write_text("c0ffee\n")
    cells.run("run", {"steps": 10}, lambda d: seen.append((d / "checkpoint").exists()) or {})
    assert seen == [True, False]  # another experiment's leftovers are deleted first


def test_code_version_follows_the_source_files(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "notes.txt").write_text("not code")
    v1 = code_version(roots=(tmp_path,))
    (tmp_path / "notes.txt").write_text("still not code")
    assert code_version(roots=(tmp_path,)) == v1
    (tmp_path / "a.py").write_text("x = 2\n")
    assert code_version(roots=(tmp_path,)) != v1
    # the report's own code is excluded: editing it reruns no cell
    v2 = code_version(roots=(tmp_path,), exclude=("a.py",))
    (tmp_path / "a.py").write_text("x = 3\n")
    assert code_version(roots=(tmp_path,), exclude=("a.py",)) == v2
    # a folder entry excludes everything below it
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.py").write_text("y = 1\n")
    v3 = code_version(roots=(tmp_path,), exclude=("a.py", "sub/"))
    (tmp_path / "sub" / "b.py").write_text("y = 2\n")
    assert code_version(roots=(tmp_path,), exclude=("a.py", "sub/")) == v3


def test_the_tools_the_study_leaves_out_of_its_hash_are_never_imported_by_it():
    # the core never imports tools (test_layers), so what the study module pulls in is all a
    # cell runs: any module under NOT_RUN showing up here would make a stale cell look current
    code = ("import sys, distil_scale.tools.study as s\n"
            "bad = [m for m in sys.modules if m.startswith('distil_scale.') and any(\n"
            "    m.replace('.', '/')[len('distil_scale/'):].startswith(e.rstrip('/').removesuffix('.py'))\n"
            "    for e in s.NOT_RUN)]\n"
            "print(bad); assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
