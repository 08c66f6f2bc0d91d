"""The faithful study's report (experiments/faithful_report.py): table and plot."""

from experiments import faithful_report as FR


def _rows():
    def rep(f, gap):
        return {"eps": {str(e): {"pgd_gap": gap * e, "pgd_gap_crown_points": gap * e,
                                 "certified_gap": 2 * gap * e,
                                 "certified_faithful": {"0.1": f, "0.2": f}}
                        for e in (0.01, 0.1)}, "bound_violations": 0}
    return [{"run": "kd", "seed": 0, "faithfulness": rep(0.5, 1.0)},
            {"run": "kd", "seed": 1, "faithfulness": rep(0.7, 1.0)},
            {"run": "fpgd", "seed": 0, "faithfulness": rep(0.9, 0.5)}]


def test_certification_table():
    table = FR.certification_table(_rows(), (0.01, 0.1), (0.1, 0.2), row_order=["fpgd", "kd"])
    lines = table.split("\n")
    assert lines[0] == ("| run | eps=0.01, delta=0.1 | eps=0.01, delta=0.2 | eps=0.1, "
                        "delta=0.1 | eps=0.1, delta=0.2 | n |")
    assert lines[2].startswith("| fpgd | 90.0 ± 0.0 (1) |") and lines[2].endswith("| 1 |")
    assert lines[3].startswith("| kd | 60.0 ± 14.1 (2) |") and lines[3].endswith("| 2 |")


def test_plot_gap_bounds_writes_a_png(tmp_path):
    path = str(tmp_path / "gaps.png")
    FR.plot_gap_bounds(_rows(), (0.01, 0.1), path)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    FR.plot_gap_bounds(_rows(), (0.01, 0.1), path, crown=False)
