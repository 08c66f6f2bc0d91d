"""The code blocks of docs/guide/engine.md run, in order, in one namespace."""


def test_engine_guide_code_blocks_run(run_guide):
    namespace = run_guide("engine", min_blocks=5)
    assert len(namespace["res"].best) == 3
    assert namespace["teacher_acc"] > 0.9 and min(namespace["accs"]) > 0.85
